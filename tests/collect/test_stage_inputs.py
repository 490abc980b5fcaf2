"""What makes collect run again, and what it refuses to call done: a local teacher or a saved dataset changed in
place, top-k dropped from the recipe, every prompt skipped by the context guard. Real SmolLM2 teacher (CPU)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from tests.collect.conftest import read_jsonl, write_recipe

pytestmark = pytest.mark.slow


def summary(workdir, name="t") -> dict:
    return json.loads((workdir / "artifacts" / name / "collect" / "summary.json").read_text())


def test_a_local_teacher_saved_over_in_place_answers_again(workdir, smollm2_dir):
    """The store keyed a local teacher as "local": a new checkpoint in the same directory kept the old answers,
    even with --force (only deleting work/ helped)."""
    from toolkit.cli import main

    teacher = workdir / "my-teacher"
    teacher.mkdir()
    for f in smollm2_dir.iterdir():  # the weights by link; config.json our own copy, to change
        (teacher / f.name).write_bytes(f.read_bytes()) if f.name == "config.json" else os.symlink(f, teacher / f.name)
    path = write_recipe(workdir, {"generation": {"max_new_tokens": 6}}, data={"limit": 4},
                        teacher={"model": str(teacher), "dtype": "float32"})
    assert main(["run", str(path)]) == 0
    out = workdir / "artifacts" / "t" / "collect"
    before = [r["output"] for r in read_jsonl(out / "outputs.jsonl")]
    assert summary(workdir)["answered_this_run"] == 4
    cfg = json.loads((teacher / "config.json").read_text())
    cfg["num_hidden_layers"] //= 2  # "retrained": another model in the same place
    (teacher / "config.json").write_text(json.dumps(cfg))
    assert main(["run", str(path)]) == 0  # a plain re-run sees the changed input
    assert summary(workdir)["answered_this_run"] == 4 and summary(workdir)["from_store"] == 0
    assert [r["output"] for r in read_jsonl(out / "outputs.jsonl")] != before


def test_a_saved_dataset_directory_changed_in_place_is_collected_again(workdir):
    """A `datasets.save_to_disk` directory was recorded as "dir" and never compared: new rows saved over it left
    collect "skipped (unchanged)" on the old prompts."""
    from datasets import Dataset

    from toolkit.cli import main

    data = workdir / "prompts-ds"
    Dataset.from_list([{"id": "a", "prompt": "old prompt A"}]).save_to_disk(str(data))
    recipe = {"name": "t", "teacher": {"model": "smollm2-135m-instruct", "dtype": "float32"},
              "data": {"path": str(data), "id_column": "id"}, "tracking": {"enabled": False},
              "collect": {"backend": "hf", "generation": {"max_new_tokens": 2}}}
    path = workdir / "t.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    Dataset.from_list([{"id": "b", "prompt": "new prompt B"}, {"id": "c", "prompt": "new prompt C"}]).save_to_disk(
        str(data))
    assert main(["run", str(path)]) == 0
    prompts = [r["prompt"] for r in read_jsonl(workdir / "artifacts" / "t" / "collect" / "outputs.jsonl")]
    assert prompts == ["new prompt B", "new prompt C"]


def test_topk_dropped_from_the_recipe_leaves_no_stale_file(workdir):
    """top_logprobs 2 -> 0: the old topk.safetensors stayed, counted as an output, and distill's precomputed KD
    would have trained on it."""
    from toolkit.cli import main
    from toolkit.records import load_topk

    out = workdir / "artifacts" / "t" / "collect"
    for k in (2, 0):
        path = write_recipe(workdir, {"generation": {"max_new_tokens": 2}, "top_logprobs": k}, data={"limit": 2})
        assert main(["run", str(path)]) == 0
        assert (out / "topk.safetensors").is_file() == bool(k)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "topk.safetensors" not in manifest["outputs"] and load_topk(out) == {}


def test_every_prompt_skipped_by_the_context_guard_is_a_failure_not_an_empty_done(workdir, capsys):
    from toolkit.cli import main

    path = write_recipe(workdir, {"context": "skip", "generation": {"max_new_tokens": 8192}}, data={"limit": 3})
    assert main(["run", str(path)]) != 0
    assert "none of the 3 prompts was answered (3 skipped by the context guard" in capsys.readouterr().err
    manifest = json.loads((workdir / "artifacts" / "t" / "collect" / "manifest.json").read_text())
    assert manifest["status"] == "failed"
