"""Verify an artifact with the engine that serves it: reload, perplexity, agreement, size, tokens/s.

compressed-tensors dirs are reloaded with transformers (which decompresses them through
compressed-tensors); GGUF files with llama-cpp-python, both through toolkit.engines. Both score the *same
token ids* (rendered once with the source model's tokenizer, as the teacher and the student saw them), so
their perplexities are comparable with the unquantized model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class Probe:
    """What every artifact is measured on."""

    eval_ids: list[list[int]]  # held-out token sequences for perplexity
    answer_starts: list[int]  # per sequence: index of the teacher answer's first token (len(ids) = no answer)
    prompts: list[list[dict]]  # test prompts (messages) for generation, rendered by `renderer`
    teacher: list[Optional[str]]  # teacher output per prompt
    gold: list[Optional[str]]  # gold answer per prompt
    labels: list[str]  # the gold label set (for label extraction), empty when answers are free text
    max_new_tokens: int
    renderer: object = None  # toolkit.engines.render.Renderer of the source model: every artifact sees its ids
    params: int = 0  # parameters of the unquantized model: bits_per_weight = size * 8 / params
    per_sequence: bool = False  # also return each sequence's [nll sum, tokens] (the bench's paired bootstrap)


def build_probe(examples, renderer, eval_n: int, gen_n: int, max_length: int, max_new_tokens: int,
                params: int = 0) -> Probe:
    eval_ids, answer_starts = [], []
    for e in examples[:eval_n]:
        prompt = renderer.prompt(e.messages).ids
        answer = renderer.answer_ids(e.teacher, e.finish_reason) if e.teacher else []
        ids = (prompt + answer)[:max_length]
        eval_ids.append(ids)
        answer_starts.append(min(len(prompt), len(ids)) if answer else len(ids))
    gen = examples[:gen_n]
    golds = [e.reference for e in gen]
    labels = sorted({e.reference for e in examples if e.reference})
    # A small closed label set means a classification task: score by the label the answer names.
    labels = labels if 0 < len(labels) <= 50 else []
    return Probe(eval_ids, answer_starts, [e.messages for e in gen], [e.teacher for e in gen], golds, labels,
                 max_new_tokens, renderer, params)


def dir_size(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class NLL:
    """Running next-token NLL over whole sequences and over their answer tokens only."""

    def __init__(self):
        self.total, self.tokens, self.answer_total, self.answer_tokens = 0.0, 0, 0.0, 0
        self.sequences: list[list[float]] = []  # per sequence: [nll sum, tokens, answer nll sum, answer tokens]

    def add(self, logits, ids, answer_start: int) -> None:
        """logits: [T, V] for the token ids `ids`; tokens from answer_start on are the answer."""
        from toolkit.engines.score import nll_from_logits

        self.add_nll(nll_from_logits(logits, ids, 1), answer_start)

    def add_nll(self, nll: list[float], answer_start: int) -> None:
        """nll[i] scores token i + 1 (an engine's token_nll from position 1)."""
        answer = nll[max(answer_start - 1, 0):]
        self.total, self.tokens = self.total + float(sum(nll)), self.tokens + len(nll)
        self.answer_total += float(sum(answer))
        self.answer_tokens += len(answer)
        self.sequences.append([float(sum(nll)), len(nll), float(sum(answer)), len(answer)])

    def result(self) -> dict:
        # Answer perplexity = the teacher's answers given their prompts: what a distilled student is trained on
        # (a student that never learned to model prompts has a huge whole-text perplexity that hides the
        # quantization error).
        out = {"perplexity": _perplexity(self.total, max(self.tokens, 1)), "eval_tokens": self.tokens}
        if self.answer_tokens:
            out.update(answer_perplexity=_perplexity(self.answer_total, self.answer_tokens),
                       answer_tokens=self.answer_tokens)
        return out


def _perplexity(nll_sum: float, tokens: int) -> float | None:
    """exp(mean NLL); None (null in summary.json) when it is not a number: a broken artifact scores NaN or a
    mean NLL beyond ~709 nats, where exp overflows; add_increases then reports no increase for it."""
    mean = nll_sum / tokens
    if not math.isfinite(mean) or mean > 700:
        return None
    return round(math.exp(mean), 4)


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


# --------------------------------------------------------------------------------------------- engines


def measure(engine, probe: Probe) -> tuple[NLL, list[str], int, float]:
    """NLL of the probe's sequences and greedy answers to its prompts (one at a time: tokens/s at batch 1)."""
    from toolkit.engines.base import Settings

    nll = NLL()
    for seq_nll, start in zip(engine.token_nll([(ids, 1) for ids in probe.eval_ids]), probe.answer_starts):
        nll.add_nll(seq_nll, start)
    if not probe.prompts:  # a perplexity-only probe (the bench's validation split)
        return nll, [], 0, 0.0
    rows = engine.generate(probe.prompts, Settings(max_new_tokens=probe.max_new_tokens), 1)
    return (nll, [r["output"] for r in rows], sum(r["output_tokens"] for r in rows),
            sum(r["latency_s"] for r in rows))


def verify_hf(model_dir: Path, probe: Probe) -> dict:
    """Reload a HF dir (plain or compressed-tensors) with transformers and measure it."""
    from toolkit.engines.hf import HFEngine

    engine = HFEngine.load(model_dir, chat_template=probe.renderer.chat_template, dtype="float32", device="cpu")
    engine.renderer = probe.renderer  # the source model's rendering (an artifact's tokenizer is its copy)
    try:
        nll, outputs, new_tokens, seconds = measure(engine, probe)
        quantized = getattr(engine.model.config, "quantization_config", None) is not None
    finally:
        engine.close()
    # transformers decompresses compressed-tensors weights to dense fp32 on load: tokens/s here is the dense
    # model's speed, not a quantized kernel's (vLLM's is measured by the evaluate stage / vLLM itself).
    engine_name = "transformers (decompressed to fp32)" if quantized else "transformers"
    return {**_result(nll, outputs, new_tokens, seconds, probe, dir_size(model_dir)), "engine": engine_name}


def verify_gguf(path: Path, probe: Probe, threads: int) -> dict:
    """Reload a GGUF with llama-cpp-python and measure it on the same token ids."""
    from toolkit.engines.llamacpp import LlamaCppEngine

    n_ctx = max([len(i) for i in probe.eval_ids] +
                [len(probe.renderer.prompt(m).ids) + probe.max_new_tokens for m in probe.prompts]) + 8
    engine = LlamaCppEngine(path, probe.renderer.tok, chat_template=probe.renderer.chat_template, n_ctx=n_ctx,
                            threads=threads, logits_all=True)
    try:
        nll, outputs, new_tokens, seconds = measure(engine, probe)
    finally:
        engine.close()
    return {**_result(nll, outputs, new_tokens, seconds, probe, dir_size(path)), "engine": "llama.cpp"}


def _result(nll: "NLL", outputs, new_tokens, seconds, probe, size) -> dict:
    from toolkit.quantize.dtype import bits_per_weight

    res = {**nll.result(), "size_bytes": size, "bits_per_weight": bits_per_weight(size, probe.params),
           "tokens_per_s": round(new_tokens / seconds, 2) if seconds > 0 else None,
           **agreement(outputs, probe)}
    res["sample_output"] = outputs[0][:200] if outputs else None
    if probe.per_sequence:
        res["sequence_nll"] = [[round(a, 4), b, round(c, 4), d] for a, b, c, d in nll.sequences]
    return res
