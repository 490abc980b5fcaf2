"""Verify an artifact with the engine that serves it: reload, perplexity, agreement, size, tokens/s.

compressed-tensors dirs are reloaded with transformers (which decompresses them through
compressed-tensors); GGUF files with llama-cpp-python. Both score the *same token ids* (tokenized once
with the source model's tokenizer), so their perplexities are comparable with the unquantized model's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class Probe:
    """What every artifact is measured on."""

    eval_ids: list[list[int]]  # held-out token sequences for perplexity
    answer_starts: list[int]  # per sequence: index of the teacher answer's first token (len(ids) = no answer)
    prompts: list[list[int]]  # templated test prompts (token ids) for generation
    teacher: list[Optional[str]]  # teacher output per prompt
    gold: list[Optional[str]]  # gold answer per prompt
    labels: list[str]  # the gold label set (for label extraction), empty when answers are free text
    max_new_tokens: int


def build_probe(examples, tokenizer, eval_n: int, gen_n: int, max_length: int, max_new_tokens: int) -> Probe:
    from toolkit.quantize.calibration import format_prompt, render

    eval_ids, answer_starts = [], []
    for e in examples[:eval_n]:
        ids = tokenizer(render(e, tokenizer, with_answer=True), add_special_tokens=False, truncation=True,
                        max_length=max_length)["input_ids"]
        prompt = tokenizer(render(e, tokenizer, with_answer=False), add_special_tokens=False)["input_ids"]
        eval_ids.append(ids)
        # Chat templates end the prompt on a newline, so the prompt's ids are a prefix of the full text's.
        answer_starts.append(min(len(prompt), len(ids)) if e.teacher else len(ids))
    gen = examples[:gen_n]
    prompts = [tokenizer(format_prompt(e.messages, tokenizer), add_special_tokens=False)["input_ids"] for e in gen]
    golds = [e.reference for e in gen]
    labels = sorted({e.reference for e in examples if e.reference})
    # A small closed label set means a classification task: score by the label the answer names.
    labels = labels if 0 < len(labels) <= 50 else []
    return Probe(eval_ids, answer_starts, prompts, [e.teacher for e in gen], golds, labels, max_new_tokens)


def dir_size(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class NLL:
    """Running next-token NLL over whole sequences and over their answer tokens only."""

    def __init__(self):
        self.total, self.tokens, self.answer_total, self.answer_tokens = 0.0, 0, 0.0, 0

    def add(self, logits, ids, answer_start: int) -> None:
        """logits: numpy [T, V] for the token ids `ids`; tokens from answer_start on are the answer."""
        import numpy as np

        logits = np.asarray(logits[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        target = np.asarray(ids[1:])
        nll = -logp[np.arange(len(target)), target]  # nll[i] scores token i + 1
        answer = nll[max(answer_start - 1, 0):]
        self.total, self.tokens = self.total + float(nll.sum()), self.tokens + len(nll)
        self.answer_total += float(answer.sum())
        self.answer_tokens += len(answer)

    def result(self) -> dict:
        # Answer perplexity = the teacher's answers given their prompts: what a distilled student is trained on
        # (a student that never learned to model prompts has a huge whole-text perplexity that hides the
        # quantization error).
        out = {"perplexity": round(math.exp(self.total / max(self.tokens, 1)), 4), "eval_tokens": self.tokens}
        if self.answer_tokens:
            out.update(answer_perplexity=round(math.exp(self.answer_total / self.answer_tokens), 4),
                       answer_tokens=self.answer_tokens)
        return out


def add_increases(entry: dict, base: dict) -> None:
    """Perplexity increase (%) vs the unquantized model, on whole texts and on the teacher's answers alone."""
    for key in ("perplexity", "answer_perplexity"):
        if entry.get(key) and base.get(key):
            increase = 100.0 * (entry[key] - base[key]) / base[key]
            entry[key.replace("perplexity", "ppl_increase_pct")] = round(increase, 2)


def agreement(outputs: list[str], probe: Probe) -> dict:
    from toolkit.metrics import gold_match, token_f1

    out = {}
    pairs = [(o, t) for o, t in zip(outputs, probe.teacher) if t is not None]
    if pairs:
        out["teacher_f1"] = round(sum(token_f1(o, t) for o, t in pairs) / len(pairs), 4)
    golds = [(o, g) for o, g in zip(outputs, probe.gold) if g]
    if golds:
        out["gold_accuracy"] = round(sum(gold_match(o, g, probe.labels) for o, g in golds) / len(golds), 4)
    return out


# --------------------------------------------------------------------------------------------- transformers


def verify_hf(model_dir: Path, probe: Probe) -> dict:
    """Reload a HF dir (plain or compressed-tensors) with transformers and measure it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    nll = NLL()
    with torch.inference_mode():
        for ids, start in zip(probe.eval_ids, probe.answer_starts):
            nll.add(model(torch.tensor([ids])).logits[0].numpy(), ids, start)
        outputs, new_tokens, seconds = [], 0, 0.0
        for ids in probe.prompts:
            start = time.perf_counter()
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=probe.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
            seconds += time.perf_counter() - start
            new = gen[0, len(ids):]
            new_tokens += len(new)
            outputs.append(tok.decode(new, skip_special_tokens=True))
    # transformers decompresses compressed-tensors weights to dense fp32 on load: tokens/s here is the dense
    # model's speed, not a quantized kernel's (vLLM's is measured by the evaluate stage / vLLM itself).
    quantized = getattr(model.config, "quantization_config", None) is not None
    engine = "transformers (decompressed to fp32)" if quantized else "transformers"
    return {**_result(nll, outputs, new_tokens, seconds, probe, dir_size(model_dir)), "engine": engine}


# --------------------------------------------------------------------------------------------- llama.cpp


def verify_gguf(path: Path, probe: Probe, threads: int) -> dict:
    """Reload a GGUF with llama-cpp-python and measure it on the same token ids."""
    from llama_cpp import Llama

    n_ctx = max([len(i) for i in probe.eval_ids] + [len(p) + probe.max_new_tokens for p in probe.prompts]) + 8
    llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=threads, verbose=False)
    nll = NLL()
    for ids, start in zip(probe.eval_ids, probe.answer_starts):
        llm.reset()
        llm.eval(ids)
        nll.add(llm.scores[: len(ids)], ids, start)
    outputs, new_tokens, seconds = [], 0, 0.0
    for ids in probe.prompts:
        llm.reset()
        start = time.perf_counter()
        res = llm.create_completion(ids, max_tokens=probe.max_new_tokens, temperature=0.0, top_k=1)
        seconds += time.perf_counter() - start
        new_tokens += res["usage"]["completion_tokens"]
        outputs.append(res["choices"][0]["text"])
    del llm
    return {**_result(nll, outputs, new_tokens, seconds, probe, dir_size(path)), "engine": "llama.cpp"}


def _result(nll: "NLL", outputs, new_tokens, seconds, probe, size) -> dict:
    res = {**nll.result(), "size_bytes": size,
           "tokens_per_s": round(new_tokens / seconds, 2) if seconds > 0 else None,
           **agreement(outputs, probe)}
    res["sample_output"] = outputs[0][:200] if outputs else None
    return res
