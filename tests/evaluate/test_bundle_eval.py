"""`optkit evaluate BUNDLE --data FILE`: the small evaluated run (fakerun.py) exported to a real bundle, then scored
on a labeled file none of its stages saw, end to end through the command line (real models, router, cache)."""

from __future__ import annotations

import json

import pytest

from tests.evaluate import fakerun
from toolkit.cli import main
from toolkit.io import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(exported):
    return exported[0]  # the session's one export of the evaluated run (tests/conftest.py)


def _new_rows(n: int) -> list[dict]:
    """Bitext rows the fixture's records did not use (it takes a stride from row 0; these are the next rows)."""
    used = {r["id"] for r in fakerun.bitext_rows(40)}
    rows = [json.loads(line) for line in fakerun.BITEXT.read_text().splitlines() if line.strip()]
    fresh = [r for r in rows if r["id"] not in used]
    return fresh[3::max(1, len(fresh) // n)][:n]


@pytest.fixture(scope="module")
def scored(bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle_eval")
    data = tmp / "new.jsonl"
    rows = _new_rows(10)
    rows.append(dict(rows[0], id=99999))  # the same message twice: the second is an exact-cache hit
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "out"
    rc = main(["evaluate", str(bundle), "--data", str(data), "--out", str(out), "--set", "evaluate.latency_samples=2",
               "--set", "evaluate.batch_sizes=[1, 4]", "--set", "evaluate.perplexity=false",
               "--set", "data.dedupe=false", "--set", "data.id_column=id",
               # in-process engines only: starting three vLLM servers and llama.cpp's was ~100 s of this test, and
               # serving measurement is tests/evaluate/test_serving.py's
               "--set", "evaluate.engine=transformers"])
    assert rc == 0
    return out, rows


def test_every_bundled_variant_and_the_system_are_scored_with_intervals(scored):
    out, rows = scored
    got = {r["variant"]: r for r in json.loads((out / "variants.json").read_text())}
    assert list(got) == ["teacher", "student", "student_lora", "int8", "gguf-Q4_1", "system"]
    for name, r in got.items():
        assert r["n"] == len(rows), name
        assert r["quality_lo"] <= r["quality"] <= r["quality_hi"], name
    for name in ("student", "student_lora", "int8", "gguf-Q4_1", "system"):
        assert got[name]["quality_vs_teacher"] in ("better", "worse", f"not distinguishable at n={len(rows)}")
    # The teacher re-answered the new prompts; its quality is its gold accuracy on them.
    teacher = read_jsonl(out / "outputs" / "teacher.jsonl")
    gold = {str(r["id"]): r["category"] for r in rows}
    assert {t["id"] for t in teacher} == set(gold)
    assert got["teacher"]["quality"] == pytest.approx(sum(t["score"] for t in teacher) / len(teacher))
    assert all(t["reference"] == gold[t["id"]] for t in teacher)
    # The fixture's adapter has B = 0: on its base it answers exactly like the merged student.
    merged = {o["id"]: o["output"] for o in read_jsonl(out / "outputs" / "student.jsonl")}
    assert merged == {o["id"]: o["output"] for o in read_jsonl(out / "outputs" / "student_lora.jsonl")}
    served = [r["served_by"] for r in read_jsonl(out / "outputs" / "system.jsonl")]
    assert "exact" in served  # the repeated message came from the cache, which started empty
    report = (out / "report.md").read_text()
    assert "[95% CI]" in report and "vs teacher (paired 95% CI)" in report and (out / "quality_vs_cost.png").is_file()


def test_missing_column_names_the_column(bundle, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps({"id": r["id"], "instruction": r["instruction"]}) + "\n"
                            for r in _new_rows(3)))
    assert main(["evaluate", str(bundle), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'category'" in err and "data.reference_column" in err and "Traceback" not in err
    # the column can be renamed with an override instead of editing the file
    data.write_text("".join(json.dumps({"id": r["id"], "text": r["instruction"], "label": r["category"]}) + "\n"
                            for r in _new_rows(3)))
    assert main(["evaluate", str(bundle), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--set", "data.prompt_column=text", "--set", "data.reference_column=nope"]) == 2
    assert "'nope'" in capsys.readouterr().err


def test_missing_file_and_a_tampered_bundle_are_refused(bundle, tmp_path, capsys):
    assert main(["evaluate", str(bundle), "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy, symlinks=False)
    (copy / "cache.json").write_text((copy / "cache.json").read_text().replace("0.93", "0.10"))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(_new_rows(1)[0]) + "\n")
    assert main(["evaluate", str(copy), "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "cache.json" in capsys.readouterr().err
