"""Test helpers for the distill stage: a tiny Llama teacher built locally with the real SmolLM2 tokenizer,
teacher records over the real Bitext quickstart extract, and a run directory whose collect stage is done."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BITEXT = REPO / "recipes" / "data" / "bitext" / "bitext_cs_quickstart.jsonl"
SYSTEM = ("Classify the customer message into one of these categories: ACCOUNT, CANCEL, CONTACT, DELIVERY, "
          "FEEDBACK, INVOICE, ORDER, PAYMENT, REFUND, SHIPPING, SUBSCRIPTION. Answer with the category only.")


def bitext_rows(n: int) -> list[dict]:
    rows = [json.loads(line) for line in BITEXT.read_text().splitlines() if line.strip()]
    # A stride through the file (it is sorted by category), so small samples see every class.
    return rows[::max(1, len(rows) // n)][:n]


def make_records(rows: list[dict], outputs: list[str] | None = None, val_every: int = 5) -> list[dict]:
    """Records in the toolkit.records format; by default the teacher 'answered' the gold category."""
    recs = []
    for i, r in enumerate(rows):
        split = "test" if i % val_every == 0 else ("val" if i % val_every == 1 else "train")
        out = outputs[i] if outputs is not None else r["category"]
        recs.append({"id": f"bx{r['id']}", "split": split,
                     "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["instruction"]}],
                     "prompt": r["instruction"], "reference": r["category"], "output": out,
                     "finish_reason": "stop", "input_tokens": 0, "output_tokens": 2, "latency_s": 0.0,
                     "cost_usd": 0.0, "model": "teacher"})
    return recs


def write_collect(run_dir: Path, records: list[dict], topk: dict | None = None) -> Path:
    """A finished collect stage: outputs.jsonl, prompts.jsonl, optional topk.safetensors, manifest done."""
    d = Path(run_dir) / "collect"
    d.mkdir(parents=True, exist_ok=True)
    (d / "outputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = [{k: r[k] for k in ("id", "split", "messages", "prompt", "reference")} for r in records]
    (d / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (d / "failures.jsonl").write_text("")
    if topk:
        from safetensors.torch import save_file

        tensors = {}
        for rid, (ids, lps) in topk.items():
            tensors[f"{rid}.ids"] = ids.contiguous()
            tensors[f"{rid}.logprobs"] = lps.contiguous()
        save_file(tensors, str(d / "topk.safetensors"))
    (d / "manifest.json").write_text(json.dumps({"stage": "collect", "status": "done", "config_hash": "test",
                                                 "outputs": {}, "upstream": {}}))
    return d


def build_tiny_llama(target: Path, tokenizer_dir: Path, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    """A randomly initialised Llama with the SmolLM2 tokenizer (real vocabulary, real chat template)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(target, safe_serialization=True)
    tok.save_pretrained(target)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(target)
    return target


def recipe_dict(tmp: Path, teacher: str, distill: dict, name: str = "t", max_new_tokens: int = 6) -> dict:
    return {"name": name, "seed": 0, "artifacts_dir": str(tmp / "artifacts"),
            "tracking": {"enabled": False},
            "teacher": {"model": teacher, "dtype": "float32"},
            "data": {"path": str(BITEXT), "prompt_column": "instruction", "reference_column": "category"},
            "collect": {"backend": "hf", "generation": {"max_new_tokens": max_new_tokens}},  # not auto: per machine
            "distill": distill}


@contextlib.contextmanager
def small_disk(path: Path, size_mb: int):
    """A real filesystem of `size_mb` MiB at `path` (tmpfs), so a write past it fails with ENOSPC the way a full
    disk does. Needs root (CI containers and this machine run as root); elsewhere the test is skipped."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow_disk(path: Path, size_mb: int) -> None:
    """Free space on the small disk the way a user would (here: make it bigger), keeping its files."""
    subprocess.run(["mount", "-o", f"remount,size={size_mb}m", str(path)], check=True)
