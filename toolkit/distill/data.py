"""Training examples from teacher records: prompt tokens (no loss) + teacher completion tokens (loss).

The prompt is rendered exactly as the teacher saw it (toolkit.engines.render: the same text and token ids),
the completion is the teacher's output followed by the end-of-turn token (unless the teacher was cut off at
max_new_tokens), so the student also learns where to stop.
Problems are counted, not hidden: empty or too-short completions are skipped, over-long examples are
truncated (prompt from the left, so the generation prompt and the answer stay), and both counts are logged
and written to student.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from toolkit.errors import OptkitError

log = logging.getLogger("optkit.distill")

IGNORE = -100


@dataclass
class BuildStats:
    used: int = 0
    skipped_short: int = 0
    truncated: int = 0
    topk_misaligned: int = 0  # no usable top-k row: the example trains on the answer alone
    topk_partial: int = 0  # top-k used up to the first token that re-tokenizes differently
    skipped_ids: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"examples": self.used, "skipped_short_completions": self.skipped_short,
                "truncated": self.truncated, "topk_misaligned": self.topk_misaligned,
                "topk_partial": self.topk_partial}


def build_example(rec: dict, renderer, max_length: int, stats: BuildStats) -> dict:
    # The prompt exactly as the teacher was given it, and its answer: the end-of-turn token teaches the
    # student to stop, but only where the teacher stopped (an output cut at max_new_tokens did not end there).
    prompt_ids = renderer.prompt(rec["messages"]).ids
    completion_ids = renderer.answer_ids(rec["output"], rec.get("finish_reason"))
    if len(prompt_ids) + len(completion_ids) > max_length:
        stats.truncated += 1
        # Keep at least a little prompt context; cut the completion's tail only when it alone is too long.
        room_for_completion = max_length - min(len(prompt_ids), max(4, max_length // 4))
        completion_ids = completion_ids[:room_for_completion]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(completion_ids)):]
    return {"id": rec["id"], "input_ids": prompt_ids + completion_ids,
            "labels": [IGNORE] * len(prompt_ids) + completion_ids, "prompt_len": len(prompt_ids)}


def build_examples(records: list[dict], tok, max_length: int, min_completion_tokens: int = 1,
                   chat_template: bool = True, topk: dict | None = None,
                   what: str = "training") -> tuple[list[dict], BuildStats]:
    """Examples for every usable record; OptkitError when none is usable."""
    from toolkit.engines.render import Renderer

    renderer = Renderer(tok, chat_template)
    stats = BuildStats()
    examples = []
    for rec in records:
        n_out = len(tok(rec.get("output") or "", add_special_tokens=False)["input_ids"])
        if n_out < min_completion_tokens:
            stats.skipped_short += 1
            stats.skipped_ids.append(rec["id"])
            continue
        ex = build_example(rec, renderer, max_length, stats)
        if topk is not None:
            attach_topk(ex, topk.get(rec["id"]), stats)
        examples.append(ex)
    stats.used = len(examples)
    if stats.skipped_short:
        log.warning("distill: skipped %d %s records whose teacher output has fewer than %d tokens",
                    stats.skipped_short, what, min_completion_tokens)
    if stats.truncated:
        log.warning("distill: truncated %d %s examples longer than training.max_length=%d tokens",
                    stats.truncated, what, max_length)
    if topk is not None and (stats.topk_misaligned or stats.topk_partial):
        log.warning("distill: the teacher's top-k log-probs cover %d of %d %s examples only in part and %d not at "
                    "all (re-tokenized answers differ from the tokens the teacher generated, or a stop string cut "
                    "them): logit KD applies to the aligned prefix, the rest trains on the answer alone",
                    stats.topk_partial, len(examples), what, stats.topk_misaligned)
    if not examples:
        raise OptkitError(f"distill: no usable {what} examples: all {len(records)} teacher outputs are empty or "
                          f"shorter than training.min_completion_tokens={min_completion_tokens}")
    return examples, stats


def attach_topk(ex: dict, topk, stats: BuildStats) -> None:
    """Align the teacher's top-k (one row per generated token) with our completion positions.

    Re-tokenizing the output text can differ from the tokens the teacher generated (SmolLM2 generates "ĊĊ", the
    text re-encodes as "Ċ", "Ċ"); rows are used while our token is among the teacher's top-k at that position,
    up to the first position where it is not (after that the positions no longer correspond).
    """
    labels = ex["labels"]
    start = ex["prompt_len"]
    n = len(labels) - start
    ex["topk_ids"] = None
    if topk is None:
        stats.topk_misaligned += 1
        return
    ids, lps = topk
    m = min(n, ids.shape[0])
    ours = labels[start:start + m]
    aligned = next((j for j, t in enumerate(ours) if int(t) not in set(ids[j].tolist())), m)
    if aligned == 0:
        stats.topk_misaligned += 1
        return
    stats.topk_partial += aligned < m
    ex["topk_ids"] = ids[:aligned].long()
    ex["topk_logprobs"] = lps[:aligned].float()


class LeftPadCollator:
    """Pads so completions end at the right edge, a shared prompt prefix once at the left
    (toolkit.engines.hf.collate); adds the teacher's top-k."""

    def __init__(self, pad_id: int, with_topk: bool, share_prefix: bool = True):
        self.pad_id = pad_id
        self.with_topk = with_topk
        self.share_prefix = share_prefix

    def __call__(self, batch: list[dict]) -> dict:
        from toolkit.engines.hf import collate

        out = collate(batch, self.pad_id, self.share_prefix)
        if self.with_topk:
            out.update(self.topk_tensors(batch, out["input_ids"].shape[1]))
        return out

    @staticmethod
    def topk_tensors(batch: list[dict], width: int) -> dict:
        import torch

        n = len(batch)
        k = next((ex["topk_ids"].shape[1] for ex in batch if ex.get("topk_ids") is not None), 1)
        t_ids = torch.zeros((n, width, k), dtype=torch.long)
        t_lps = torch.zeros((n, width, k), dtype=torch.float32)
        t_mask = torch.zeros((n, width), dtype=torch.bool)
        for i, ex in enumerate(batch):
            if ex.get("topk_ids") is None:
                continue
            start = width - len(ex["input_ids"]) + ex["prompt_len"]
            m = ex["topk_ids"].shape[0]
            t_ids[i, start:start + m] = ex["topk_ids"]
            t_lps[i, start:start + m] = ex["topk_logprobs"]
            t_mask[i, start:start + m] = True
        return {"topk_ids": t_ids, "topk_logprobs": t_lps, "topk_mask": t_mask}


def batches(examples: list[dict], pad_id: int, batch_size: int) -> list[dict]:
    collate = LeftPadCollator(pad_id, with_topk=False)
    return [collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]
