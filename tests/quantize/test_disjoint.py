"""Calibration and evaluation never share a prompt: in the stage (train split calibrates, test scores, a
prompt repeated across splits is not scored) and in eval/bench_quantize.py (calibration / validation / test
rows of one shuffle). A quantizer fitted to the rows it is scored on looks better than it is (issue 16: INT8
met its 1% goal only when calibration and evaluation shared a file)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from toolkit.errors import OptkitError
from toolkit.quantize.calibration import Example, calibration_examples, eval_examples, prompt_key

from .conftest import REPO, fake_run, recipe


def ex(i: int, split: str, text: str) -> Example:
    return Example(str(i), split, [{"role": "user", "content": text}], None, "answer")


class Cal:
    num_samples = 64


def test_a_prompt_repeated_in_the_test_split_is_not_scored():
    examples = [ex(1, "train", "cancel my order"), ex(2, "train", "where is my refund"),
                ex(3, "test", "cancel my order"),  # the same prompt under another id: calibration data
                ex(4, "test", "change my address")]
    held = eval_examples(examples, 10, calibration_examples(examples, Cal()))
    assert [e.id for e in held] == ["4"]


def test_no_train_and_no_test_split_is_an_error_not_an_overlap():
    examples = [ex(1, "val", "a"), ex(2, "val", "b")]
    cal = calibration_examples(examples, Cal())
    assert cal == []  # val calibrates only when a test split is there to score on
    with pytest.raises(OptkitError, match="no test or val prompts left"):
        eval_examples(examples, 10, [ex(9, "train", "a"), ex(8, "train", "b")])


def test_the_stage_calibrates_and_scores_on_disjoint_prompts(pruned_dir, workdir):
    """prepare() on a run whose test split repeats two train prompts: no calibration text's prompt is
    among the probe's sequences."""
    from toolkit.pipeline import StageContext
    from toolkit.quantize import prepare
    from toolkit.tracking import NullTracker

    run = fake_run(workdir, pruned_dir, n_train=20, n_test=8)
    rows = [json.loads(line) for line in (run / "collect/outputs.jsonl").read_text().splitlines()]
    for k in (20, 21):  # two test rows ask exactly what a train row asks
        rows[k]["messages"] = rows[k - 20]["messages"]
    (run / "collect/outputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = recipe({"calibration": {"num_samples": 20, "min_samples": 4}, "eval_samples": 8, "gptq": {}},
                 artifacts_dir=str(workdir / "artifacts"))
    ctx = StageContext("quantize", rec, run, run / "quantize", NullTracker())
    setup = prepare(ctx)
    renderer = setup.probe.renderer
    scored = [renderer.tok.decode(ids) for ids in setup.probe.eval_ids]
    prompts = [renderer.prompt(r["messages"]).text for r in rows if r["split"] == "train"]
    test_prompts = [renderer.prompt(r["messages"]).text for r in rows if r["split"] == "test"]
    assert len(setup.texts) == 20 and len(scored) == 6  # 8 test rows minus the 2 repeats
    assert all(any(s.startswith(p) for p in test_prompts) for s in scored)  # the comparison below can match
    assert not any(s.startswith(p) for s in scored for p in prompts)
    assert setup.probe.params > 0


def test_the_bench_splits_calibration_validation_and_test_apart(pruned_dir, tmp_path):
    """eval/bench_quantize.py's three sets of one shuffle share no prompt, even when the file repeats one."""
    sys.path.insert(0, str(REPO / "eval"))
    import bench_quantize

    from transformers import AutoTokenizer

    from toolkit.engines.render import Renderer

    rows = [json.loads(line) for line in (REPO / "recipes/data/bitext/bitext_cs_quickstart.jsonl")
            .read_text().splitlines()[:40]]
    rows += [dict(r, id=10_000 + i) for i, r in enumerate(rows[:20])]  # every prompt of 20 rows twice
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(dict(r, response="ok")) + "\n" for r in rows))
    args = argparse.Namespace(records=None, data=str(data), cal_samples=16, val_samples=12, eval_samples=12,
                              max_length=64, gen_samples=2)
    renderer = Renderer(AutoTokenizer.from_pretrained(pruned_dir), chat_template=True)
    texts, probes = bench_quantize.prepare_seed(args, Path(pruned_dir), renderer, seed=3)
    val = {renderer.tok.decode(ids) for ids in probes["val"].eval_ids}
    test = {renderer.tok.decode(ids) for ids in probes["test"].eval_ids}
    assert len(texts) == 16 and val and test
    assert not val & test
    assert not any(t.startswith(c) or c.startswith(t) for t in val | test for c in texts)


def test_prompt_key_ignores_id_and_split():
    assert prompt_key(ex(1, "train", "x")) == prompt_key(ex(2, "test", "x")) != prompt_key(ex(1, "train", "y"))


def test_a_finished_stage_the_recipe_no_longer_has_is_not_read(pruned_dir, workdir):
    """The run dir keeps collect/ and distill/ from an earlier recipe that had them; this one has neither. Reading
    them calibrated on old teacher answers that no skip decision tracks (upstream_stages keys skips by the
    recipe's own stages): quantize now calibrates on the data file and says which model it lacks."""
    from toolkit.quantize import source_model
    from toolkit.quantize.calibration import load_examples

    from .conftest import stage_ctx

    run = fake_run(workdir, pruned_dir, n_train=20, n_test=8)
    ctx = stage_ctx(run, recipe({"gptq": {}}, collect=None, distill=None))
    assert not ctx.has_upstream("collect") and stage_ctx(run, recipe({"gptq": {}})).has_upstream("collect")
    examples = load_examples(ctx)
    assert len(examples) > 28 and all(e.teacher is None for e in examples)  # the data file's rows
    with pytest.raises(OptkitError, match="recipe has no 'distill' section"):
        source_model(ctx)
