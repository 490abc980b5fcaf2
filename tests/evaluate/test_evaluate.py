"""The evaluate stage on a small finished run made of real parts (see fakerun.py): real models on their real
engines (transformers, peft, compressed-tensors, llama.cpp), the real embedder, router and cache runtimes."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.evaluate import fakerun
from toolkit.evaluate.measure import pareto_flags
from toolkit.io import read_jsonl

pytestmark = pytest.mark.slow


def _rows(root):
    return {r["variant"]: r for r in json.loads((root / "artifacts" / fakerun.RUN / "evaluate" / "variants.json").read_text())}


def _outputs(root, name):
    return read_jsonl(root / "artifacts" / fakerun.RUN / "evaluate" / "outputs" / f"{name}.jsonl")


def test_every_variant_is_evaluated_on_its_engine(evaluated):
    root, _ = evaluated
    rows = _rows(root)
    assert list(rows) == ["teacher", "student", "student_lora", "int8", "gguf-Q4_1", "system"]
    assert {n: rows[n]["engine"] for n in ("teacher", "student", "student_lora", "int8", "gguf-Q4_1")} == {
        "teacher": "transformers", "student": "transformers", "student_lora": "transformers",
        "int8": "transformers", "gguf-Q4_1": "llama.cpp"}
    gguf = root / "artifacts" / fakerun.RUN / "quantize" / "gguf" / "model-Q4_1.gguf"
    assert rows["gguf-Q4_1"]["size_bytes"] == gguf.stat().st_size
    for name in ("student", "student_lora", "int8", "gguf-Q4_1"):
        assert len(_outputs(root, name)) == rows[name]["n"] == 11
        assert all(o["output_tokens"] >= 1 for o in _outputs(root, name))


def test_teacher_quality_and_agreement_are_computed_from_its_answers(evaluated):
    root, _ = evaluated
    rows = _rows(root)
    expected = fakerun.expected_teacher_accuracy(fakerun.make_records())
    assert expected < 1.0  # the fixture's teacher is wrong on some prompts
    assert rows["teacher"]["quality"] == pytest.approx(expected)
    assert rows["teacher"]["agreement"] == 1.0


def test_adapter_on_base_answers_like_the_merged_model(evaluated):
    # The fixture's LoRA adapter has B = 0: on its base it must give exactly the merged model's greedy answers.
    root, _ = evaluated
    merged = {o["id"]: o["output"] for o in _outputs(root, "student")}
    lora = {o["id"]: o["output"] for o in _outputs(root, "student_lora")}
    assert merged == lora
    assert any(merged.values())


def test_latency_metrics_are_ordered_and_throughput_is_measured(evaluated):
    root, _ = evaluated
    rows = _rows(root)
    for name in ("teacher", "student", "student_lora", "int8", "gguf-Q4_1"):
        r = rows[name]
        assert r["latency_n"] == 3
        assert 0 < r["ttft_p50_s"] <= r["e2e_p99_s"]
        assert r["e2e_p50_s"] <= r["e2e_p95_s"] <= r["e2e_p99_s"]
        assert r["tpot_p50_s"] > 0 and r["tokens_per_s_b1"] > 0
    for name in ("teacher", "student", "int8"):
        assert rows[name]["tokens_per_s_b4"] > 0 and rows[name]["requests_per_s_b4"] > 0
        assert rows[name]["perplexity"] > 1
    assert "tokens_per_s_b4" not in rows["gguf-Q4_1"]  # llama-cpp-python serves one request at a time


def test_costs_follow_the_recipe_pricing(evaluated):
    root, recipe = evaluated
    rows = _rows(root)
    teacher = recipe.pricing["teacher"]
    # Every fixture record has 60 input and 3 output tokens: a fixed bill per request.
    assert rows["teacher"]["cost_per_1m_requests"] == pytest.approx(60 * teacher.input_per_1m + 3 * teacher.output_per_1m)
    s = rows["student"]
    assert s["cost_per_1m_requests"] == pytest.approx(recipe.pricing["student"].per_hour / 3600 / s["requests_per_s_b4"] * 1e6)
    # The system pays the teacher only on the requests the router sends there.
    sysrow = rows["system"]
    assert sysrow["cost_per_1m_requests"] < rows["teacher"]["cost_per_1m_requests"]


def test_pareto_flags_match_a_brute_force_check(evaluated):
    root, _ = evaluated
    rows = list(_rows(root).values())
    for r in rows:
        dominated = any(o["quality"] >= r["quality"] and o["cost_per_1m_requests"] <= r["cost_per_1m_requests"]
                        and (o["quality"] > r["quality"] or o["cost_per_1m_requests"] < r["cost_per_1m_requests"])
                        for o in rows if o is not r)
        assert r["pareto"] == (not dominated), r["variant"]
    assert rows[0]["pareto"]  # the teacher has the best quality here: it is on the frontier


def test_pareto_flags_small_example():
    rows = [{"quality": 0.9, "cost_per_1m_requests": 10.0}, {"quality": 0.8, "cost_per_1m_requests": 2.0},
            {"quality": 0.7, "cost_per_1m_requests": 3.0}, {"quality": 0.8, "cost_per_1m_requests": 2.0},
            {"quality": None, "cost_per_1m_requests": 1.0}]
    assert pareto_flags(rows) == [True, True, False, True, False]


def test_system_replay_serves_repeats_from_the_cache_and_routes_the_rest(evaluated):
    root, _ = evaluated
    log = {r["id"]: r for r in _outputs(root, "system")}
    records = fakerun.make_records()
    test_ids = sorted(r["id"] for r in records if r["split"] == "test")
    assert sorted(log) == test_ids
    # "zz-repeat" repeats a val prompt, whose teacher answer the warm cache holds.
    repeat = next(r for r in records if r["id"] == "zz-repeat")
    assert log["zz-repeat"]["served_by"] == "exact"
    assert log["zz-repeat"]["output"] == repeat["reference"]
    assert {r["served_by"] for r in log.values()} <= {"exact", "semantic", "teacher", "student"}
    row = _rows(root)["system"]
    n = len(log)
    assert row["exact_hit_rate"] == pytest.approx(sum(r["served_by"] == "exact" for r in log.values()) / n)
    assert row["teacher_fraction"] + row["student_fraction"] + row["exact_hit_rate"] + row["semantic_hit_rate"] == pytest.approx(1.0)
    # A model answer in the system is that model's own answer to the prompt.
    student = {o["id"]: o["output"] for o in _outputs(root, "student")}
    for rid, r in log.items():
        if r["served_by"] == "student":
            assert r["output"] == student[rid]
    assert row["overhead_p50_s"] > 0
    # A routed request takes one of its model's timed latencies (not their mean): the system keeps their spread.
    rows = _rows(root)
    for model in ("teacher", "student"):
        took = [r["e2e_s"] - r["overhead_s"] for r in log.values() if r["served_by"] == model]
        timed = rows[model]["e2e_samples_s"]
        assert all(min(abs(t - x) for x in timed) < 1e-9 for t in took), (model, took, timed)
        if len(took) >= 4 and len(set(timed)) > 1:
            assert len({round(t, 9) for t in took}) > 1


def test_report_table_and_plots(evaluated):
    root, _ = evaluated
    d = root / "artifacts" / fakerun.RUN / "evaluate"
    report = (d / "report.md").read_text()
    for name in ("teacher", "student_lora", "int8", "gguf-Q4_1", "system", "Pareto set", "TPOT", "vLLM"):
        assert name in report
    for png in ("quality_vs_cost.png", "latency.png"):
        data = (d / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    csv_lines = (d / "variants.csv").read_text().splitlines()
    assert csv_lines[0].startswith("variant,source,engine") and len(csv_lines) == 7
    pareto = json.loads((d / "pareto.json").read_text())
    assert [p["variant"] for p in pareto] == [r["variant"] for r in sorted(
        (r for r in _rows(root).values() if r["pareto"]), key=lambda r: r["cost_per_1m_requests"])]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["teacher.quality"] == _rows(root)["teacher"]["quality"]


def test_mlflow_has_one_nested_run_per_variant(evaluated):
    root, _ = evaluated
    db = sqlite3.connect(root / "mlflow.db")
    variant_runs = dict(db.execute("select run_uuid, value from tags where key = 'optkit.variant'").fetchall())
    assert sorted(variant_runs.values()) == sorted(_rows(root))
    parents = {p for (p,) in db.execute(
        "select value from tags where key = 'mlflow.parentRunId' and run_uuid in (%s)" %
        ",".join("?" * len(variant_runs)), list(variant_runs))}
    (stage_run,) = parents
    assert db.execute("select value from tags where run_uuid = ? and key = 'optkit.stage'", (stage_run,)).fetchone() == ("evaluate",)
    run_id = next(k for k, v in variant_runs.items() if v == "teacher")
    metrics = dict(db.execute("select key, value from latest_metrics where run_uuid = ?", (run_id,)).fetchall())
    assert metrics["quality"] == pytest.approx(_rows(root)["teacher"]["quality"])


def test_a_rerun_reuses_finished_variant_measurements(evaluated, tmp_path):
    # Latencies are never measured twice alike: identical numbers prove the work/ results were reused.
    from toolkit.config import recipe_from_dict
    from toolkit.pipeline import run_pipeline

    root, _ = evaluated
    copy = fakerun.copy_run(root, tmp_path)
    before = _rows(tmp_path)
    (copy / "evaluate" / "variants.json").unlink()  # a stage that died before writing its table
    recipe = recipe_from_dict(fakerun.recipe_dict(tmp_path, evaluate=fakerun.EVALUATE))
    (outcome,) = run_pipeline(recipe, only="evaluate", force=True)
    after = _rows(tmp_path)
    for name in ("teacher", "student", "int8", "gguf-Q4_1"):
        assert after[name]["e2e_p50_s"] == before[name]["e2e_p50_s"]


def test_unknown_variant_is_a_one_line_error(built_root, tmp_path):
    from toolkit.config import recipe_from_dict
    from toolkit.errors import OptkitError
    from toolkit.pipeline import run_pipeline

    fakerun.copy_run(built_root, tmp_path)
    recipe = recipe_from_dict(fakerun.recipe_dict(tmp_path, evaluate={"variants": ["student", "gptq"]}))
    with pytest.raises(OptkitError, match=r"evaluate.variants: unknown variant\(s\) gptq; this run has: teacher"):
        run_pipeline(recipe, only="evaluate")


def test_report_and_compare_commands(evaluated, tmp_path, capsys):
    from toolkit.cli import main

    root, _ = evaluated
    run = root / "artifacts" / fakerun.RUN
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "evaluate  done" in out and "gguf-Q4_1" in out and "Pareto set (cheapest first):" in out
    # B: the same run with a changed recipe value and a changed quality number.
    import yaml

    other = fakerun.copy_run(root, tmp_path)
    changed = yaml.safe_load((run / "recipe.yaml").read_text())
    changed["seed"] = 7
    (other / "recipe.yaml").write_text(yaml.safe_dump(changed))
    rows = json.loads((other / "evaluate" / "variants.json").read_text())
    rows[0]["quality"] = rows[0]["quality"] - 0.25
    (other / "evaluate" / "variants.json").write_text(json.dumps(rows))
    assert main(["compare", str(run), str(other)]) == 0
    out = capsys.readouterr().out
    assert "seed" in out and "7" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("teacher") and " quality " in f" {ln} ")
    assert line.split()[-1] == "-0.25"
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_quality_intervals_verdicts_and_batch_movement_are_reported(evaluated):
    from tests.evaluate.test_stats import wilson_formula

    root, _ = evaluated
    rows = _rows(root)
    teacher = rows["teacher"]
    k = round(teacher["quality"] * teacher["quality_n"])
    assert (teacher["quality_lo"], teacher["quality_hi"]) == pytest.approx(wilson_formula(k, teacher["quality_n"]))
    for name in ("student", "student_lora", "int8", "gguf-Q4_1", "system"):
        r = rows[name]
        assert r["quality_lo"] <= r["quality"] <= r["quality_hi"]
        assert r["quality_diff"] == pytest.approx(r["quality"] - teacher["quality"])
        assert r["quality_diff_lo"] <= r["quality_diff"] <= r["quality_diff_hi"]
        verdict = ("better" if r["quality_diff_lo"] > 0 else "worse" if r["quality_diff_hi"] < 0
                   else f"not distinguishable at n={r['quality_paired_n']}")
        assert r["quality_vs_teacher"] == verdict
    # each in-process batched variant re-answered its latency prompts alone and says how many answers moved
    for name in ("teacher", "student", "student_lora", "int8"):
        assert rows[name]["batch_moved_n"] == fakerun.EVALUATE["latency_samples"]
        assert 0 <= rows[name]["batch_moved"] <= rows[name]["batch_moved_n"]
    report = (root / "artifacts" / fakerun.RUN / "evaluate" / "report.md").read_text()
    assert "vs teacher (paired 95% CI)" in report and "re-generated alone" in report
    assert f"{teacher['quality']:.3g} [{teacher['quality_lo']:.3g}, {teacher['quality_hi']:.3g}]" in report


def test_every_student_variant_runs_at_one_precision(built_root, tmp_path):
    from types import SimpleNamespace

    from toolkit.config import recipe_from_dict
    from toolkit.evaluate.stage import known_answers, variant_dtype
    from toolkit.evaluate.variants import Variant

    def context(distill_dtype: str, evaluate: dict):
        recipe = recipe_from_dict(fakerun.recipe_dict(
            tmp_path, teacher={"model": "smollm2-135m-instruct", "dtype": "bfloat16"}, evaluate=evaluate,
            distill={"student": {"from_teacher": {"num_layers": 2}}, "eval_dtype": distill_dtype}))
        return SimpleNamespace(recipe=recipe, config=recipe.evaluate, upstream=lambda s: run / s)

    run = fakerun.copy_run(built_root, tmp_path)
    # distill's answers for the test prompts: reused only while the student is scored at distill's precision
    records = [r for r in fakerun.make_records() if r["split"] == "test"]
    (run / "distill" / "student_outputs.jsonl").write_text("".join(
        json.dumps({"id": r["id"], "output": "ORDER", "output_tokens": 2}) + "\n" for r in records))
    variants = [Variant("teacher", "teacher", "transformers"), Variant("student", "student", "transformers"),
                Variant("student_lora", "student_lora", "transformers"), Variant("int8", "quantized", "transformers")]
    # default: every student variant at distill.eval_dtype (auto), distill's answers reused
    ctx = context("auto", {})
    assert [variant_dtype(ctx, v) for v in variants] == ["bfloat16", "auto", "auto", "auto"]
    assert [a["output"] for a in known_answers(ctx, variants[1], records)] == ["ORDER"] * len(records)
    ctx = context("bfloat16", {"student_dtype": "bfloat16"})
    assert [variant_dtype(ctx, v) for v in variants] == ["bfloat16", "bfloat16", "bfloat16", "bfloat16"]
    assert known_answers(ctx, variants[1], records) is not None
    ctx = context("bfloat16", {"student_dtype": "float32"})
    assert [variant_dtype(ctx, v) for v in variants] == ["bfloat16", "float32", "float32", "float32"]
    assert known_answers(ctx, variants[1], records) is None  # bf16 answers are not mixed into a float32 student
    # ...and every local variant answers in the batches the student's own answers came from (distill's)
    from toolkit.evaluate.stage import answer_batch_size

    ctx = context("auto", {"batch_sizes": [1, 8]})
    ctx.recipe.distill.eval_batch_size = 32
    assert answer_batch_size(ctx) == 32
    assert answer_batch_size(context("auto", {"batch_sizes": [1, 8], "answer_batch_size": 4})) == 4
    no_distill = SimpleNamespace(config=ctx.config, recipe=SimpleNamespace(distill=None))
    assert answer_batch_size(no_distill) == 8  # no distill section: the largest throughput batch, as before
