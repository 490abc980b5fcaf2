"""Answer NLL, one way for every engine: each engine gives the NLL of every token of a sequence from a
start position on (`Engine.token_nll`); these helpers build the sequences (rendered prompt + answer) and
turn the NLLs into perplexities."""

from __future__ import annotations

import math
from typing import Optional


def answer_sequences(renderer, pairs: list[tuple[list[dict], str, Optional[str]]]) -> list[tuple[list[int], int]]:
    """(prompt ids + answer ids, index of the answer's first token) per (messages, answer, finish_reason)."""
    out = []
    for messages, answer, finish in pairs:
        prompt = renderer.prompt(messages).ids
        answer_ids = renderer.answer_ids(answer, finish)
        if answer_ids:
            out.append((prompt + answer_ids, len(prompt)))
    return out


def nll_from_logits(logits, ids: list[int], start: int) -> list[float]:
    """NLL of ids[start:] from per-position logits [T, V] (row i predicts token i + 1); numpy, float64."""
    import numpy as np

    start = max(start, 1)
    rows = np.asarray(logits[start - 1: len(ids) - 1], dtype=np.float64)
    rows = rows - rows.max(axis=-1, keepdims=True)
    logp = rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    target = np.asarray(ids[start:])
    return (-logp[np.arange(len(target)), target]).tolist()


def perplexity(nlls: Optional[list[list[float]]]) -> Optional[float]:
    """exp(mean NLL) over every scored token; None when the engine cannot score or nothing was scored."""
    if nlls is None:
        return None
    flat = [x for row in nlls for x in row]
    return math.exp(sum(flat) / len(flat)) if flat else None
