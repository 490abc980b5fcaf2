"""Fixtures for the quantize tests: a depth-pruned SmolLM2 (real weights, 2 of 30 decoder blocks: the
real shapes, vocabulary and tokenizer, quantized in seconds) and a run dir whose collect/distill stages look
finished, holding real prompts from the quickstart data with teacher outputs (the gold category, as the
teacher's answer to a classification prompt)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BITEXT = REPO / "recipes" / "data" / "bitext" / "bitext_cs_quickstart.jsonl"


def prune(src: Path, dst: Path, keep: list[int]) -> Path:
    """Keep only the given decoder blocks of a Llama-style checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.distill.student import set_layers

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    set_layers(model, keep)  # the distill stage's own pruning, so tests prune exactly as users' runs do
    model.save_pretrained(dst, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="session")
def pruned_dir(smollm2_dir, tmp_path_factory):
    return prune(Path(smollm2_dir), tmp_path_factory.mktemp("pruned") / "model", keep=[0, 29])


def bitext_rows(n: int) -> list[dict]:
    rows = [json.loads(line) for line in BITEXT.read_text().splitlines()[:n]]
    return rows


def fake_run(root: Path, model_dir: Path | None, n_train: int = 40, n_test: int = 12, outputs: bool = True) -> Path:
    """artifacts/<name>/ with finished collect (real prompts, teacher = gold label) and distill stages."""
    import shutil

    run = root / "artifacts" / "qtest"
    collect, distill = run / "collect", run / "distill"
    collect.mkdir(parents=True)
    rows = bitext_rows(n_train + n_test)
    records = []
    for i, r in enumerate(rows):
        split = "train" if i < n_train else "test"
        msgs = [{"role": "system", "content": "Answer with the category of the customer message."},
                {"role": "user", "content": r["instruction"]}]
        records.append({"id": r["id"], "split": split, "messages": msgs, "prompt": r["instruction"],
                        "reference": r["category"], "output": r["category"], "finish_reason": "stop",
                        "input_tokens": 0, "output_tokens": 1, "latency_s": 0.0, "cost_usd": 0.0, "model": "t"})
    if outputs:
        (collect / "outputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        (collect / "outputs.jsonl").write_text("")
        (collect / "prompts.jsonl").write_text("".join(json.dumps({k: r[k] for k in (
            "id", "split", "messages", "prompt", "reference")}) + "\n" for r in records))
    (collect / "manifest.json").write_text(json.dumps({"status": "done", "config_hash": "x", "outputs": {}}))
    if model_dir is not None:
        distill.mkdir(parents=True)
        shutil.copytree(model_dir, distill / "model")
        (distill / "manifest.json").write_text(json.dumps({"status": "done", "config_hash": "x", "outputs": {}}))
    return run


def recipe(quantize: dict, **extra):
    from toolkit.config import recipe_from_dict

    return recipe_from_dict({"name": "qtest", "teacher": {"model": "smollm2-135m-instruct"},
                             "data": {"path": str(BITEXT), "prompt_column": "instruction",
                                      "reference_column": "category"},
                             "quantize": quantize,
                             # the stages fake_run leaves finished: a stage reads only its recipe's stages
                             "collect": {}, "distill": {"student": {"model": "smollm2-135m-instruct"}},
                             "tracking": {"enabled": False}, **extra})


def stage_ctx(run: Path, rec):
    from toolkit.pipeline import StageContext
    from toolkit.tracking import NullTracker

    return StageContext("quantize", rec, run, run / "quantize", NullTracker())


# Every method on the pruned model, small settings: shared by the stage test and the vLLM test.
ALL_METHODS = {"calibration": {"num_samples": 16}, "eval_samples": 8, "agreement_samples": 2,
               "max_new_tokens": 4, "int8": {}, "gptq": {"group_size": 32, "symmetric": False, "act_order": True},
               "awq": {"group_size": 64}, "gguf": {"types": ["Q8_0", "Q4_K_M"]}}


@pytest.fixture(scope="session")
def quantized_run(pruned_dir, tmp_path_factory):
    """(run dir, recipe, first outcome) after the quantize stage ran every method once."""
    from toolkit.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("qrun")
    run = fake_run(root, pruned_dir)
    rec = recipe(ALL_METHODS, artifacts_dir=str(root / "artifacts"))
    [outcome] = run_pipeline(rec, only="quantize")
    return run, rec, outcome
