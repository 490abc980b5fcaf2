"""route.label_prompts: the route stage has the real teacher and student (SmolLM2, through toolkit.engines) answer
data rows outside the collected sample, labels them, never touches a test-split row, and a re-run generates only
what its work/ stores lack.

The collect / distill outputs of the sample are built by the test (tests/route/test_pipeline_labels.py); the
SmolLM2 checkpoint stands in for the distilled student, as in the cascade test.
"""

import os

from toolkit.collect.prompts import split_of
from toolkit.config import load_recipe
from toolkit.io import read_jsonl, write_jsonl
from toolkit.metrics import gold_match
from toolkit.models import dtype_name
from toolkit.pipeline import run_pipeline
from toolkit.route.label_prompts import STUDENT_STORE, TEACHER_STORE

from .test_pipeline_labels import _fake_upstream, _recipe


def _setup(tmp_path, smollm2_dir):
    run = tmp_path / "artifacts/pipe"
    records = _fake_upstream(run, n=200)
    # collect's prompts.jsonl = the sample (every split); the extra prompts are the rows outside it
    write_jsonl(run / "collect/prompts.jsonl", [{k: r[k] for k in ("id", "split", "messages", "prompt", "reference")}
                                                for r in records])
    os.symlink(smollm2_dir, run / "distill/model")
    return run, {r["id"] for r in records}


def _run(tmp_path, n_extra: int, eval_dtype: str = "auto", **route):
    """The route stage alone, asking for n_extra extra prompts (short answers: a category name)."""
    recipe = load_recipe(_recipe(tmp_path, label_prompts={"rows": "unsampled", "max": n_extra}, select=[],
                                 shift={"enabled": False}, **route))
    gen = recipe.collect.generation.model_copy(update={"max_new_tokens": 6})
    recipe = recipe.model_copy(update={"collect": recipe.collect.model_copy(update={"generation": gen}),
                                       "distill": recipe.distill.model_copy(update={"eval_dtype": eval_dtype})})
    return run_pipeline(recipe, only="route"), recipe


def test_extra_prompts_are_answered_labeled_and_never_test(tmp_path, monkeypatch, smollm2_dir):
    from toolkit.collect.backends import generation_params, make_backend
    from toolkit.collect.store import result_key

    from .test_pipeline_labels import BITEXT

    monkeypatch.chdir(tmp_path)
    run, sampled = _setup(tmp_path, smollm2_dir)
    outcomes, recipe = _run(tmp_path, 5)
    assert outcomes[-1].status == "ran"
    rows = read_jsonl(run / "route/labels.jsonl")
    extra = [r for r in rows if r["origin"] == "label_prompts"]
    assert len(extra) == 5 and len(rows) == 5 + sum(r["origin"] == "val_test" for r in rows)
    data = {str(r["id"]): r for r in read_jsonl(BITEXT)}
    splits = recipe.data.splits
    for r in extra:  # outside the sample, never a test-split row, and labeled into fit / cal only
        assert r["id"] not in sampled and r["part"] in ("fit", "cal")
        assert split_of(r["id"], recipe.seed, splits.train, splits.val) != "test"
        assert r["prompt"] == data[r["id"]]["instruction"]
    # the labels are the gold scores of the answers the real teacher gave (its result store, collect's keys)
    refs = sorted({r["reference"] for r in read_jsonl(run / "collect/outputs.jsonl")})
    teacher = {x["key"]: x["result"] for x in read_jsonl(run / "route/work" / TEACHER_STORE)}
    student = read_jsonl(run / "route/work" / STUDENT_STORE)
    assert len(teacher) == len(student) == 5 and all(x["result"]["output_tokens"] >= 1 for x in student)
    identity, params = make_backend("hf", recipe).identity(), generation_params(recipe, "hf")  # CPU: auto = hf
    for r in extra:
        answer = teacher[result_key(identity, [{"role": "user", "content": r["prompt"]}], params)]["output"]
        assert r["scores"]["teacher"] == gold_match(answer, data[r["id"]]["category"], refs)

    # a re-run asking for 7 keeps the 5 answers it has (byte for byte) and generates the 2 missing ones only;
    # in cascade mode the student's confidence is measured on the extra calibration prompts too (its own answers)
    before = {name: (run / "route/work" / name).read_bytes() for name in (TEACHER_STORE, STUDENT_STORE)}
    assert _run(tmp_path, 7, mode="cascade")[0][-1].status == "ran"
    for name, old in before.items():
        new = (run / "route/work" / name).read_bytes()
        assert new.startswith(old) and len(read_jsonl(run / "route/work" / name)) == 7
    rows = read_jsonl(run / "route/labels.jsonl")
    assert sum(r["origin"] == "label_prompts" for r in rows) == 7
    conf = {r["id"]: r["confidence"] for r in read_jsonl(run / "route/cascade_confidence.jsonl")}
    extra_cal = [r["id"] for r in rows if r["origin"] == "label_prompts" and r["part"] == "cal"]
    assert extra_cal and all(conf[i] is not None and conf[i] < 0 for i in extra_cal)

    # the student answering at another precision (distill.eval_dtype) is asked again; the teacher's answers stay
    other = "float32" if dtype_name("auto") == "bfloat16" else "bfloat16"
    before = {name: (run / "route/work" / name).read_bytes() for name in (TEACHER_STORE, STUDENT_STORE)}
    assert _run(tmp_path, 7, eval_dtype=other)[0][-1].status == "ran"
    assert (run / "route/work" / TEACHER_STORE).read_bytes() == before[TEACHER_STORE]
    student = read_jsonl(run / "route/work" / STUDENT_STORE)
    assert len(student) == 14 and (run / "route/work" / STUDENT_STORE).read_bytes().startswith(before[STUDENT_STORE])
