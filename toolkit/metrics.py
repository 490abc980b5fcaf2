"""Answer-quality metrics shared by distill, route and evaluate (pure Python, no heavy imports).

- exact_match: after normalization (case, punctuation, articles, whitespace) — for short answers.
- token_f1: SQuAD-style bag-of-tokens F1.
- rouge_l: LCS-based F-measure over tokens (Lin 2004), for longer answers.
- gold_match: does the answer contain the gold label as its first normalized answer? (for class labels
  the model may wrap in a sentence: "The category is REFUND.").
- label_agreement: do two answers name the same first label? (agreement on the decision, not the phrasing).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Callable, Optional

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation if c != "_"})


def normalize(text: Optional[str]) -> str:
    text = (text or "").lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def tokens(text: Optional[str]) -> list[str]:
    return normalize(text).split()


def exact_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    p, r = tokens(pred), tokens(ref)
    if not p and not r:
        return 1.0
    common = Counter(p) & Counter(r)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(p), overlap / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    p, r = tokens(pred), tokens(ref)
    if not p and not r:
        return 1.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def gold_match(pred: str, gold: str, labels: Optional[list[str]] = None) -> float:
    """1.0 when the prediction names the gold label. With a label set, the first label mentioned in the
    prediction wins (so "REFUND, not ORDER" counts as REFUND); without one, exact match or containment."""
    p, g = normalize(pred), normalize(gold)
    if not g:
        return 0.0
    if labels:
        first = first_label(pred, labels)
        return float(first is not None and normalize(first) == g)
    return float(p == g or f" {g} " in f" {p} ")


def first_label(pred: str, labels: list[str]) -> Optional[str]:
    """The label mentioned earliest in the prediction (longest label wins a tie), or None."""
    p = f" {normalize(pred)} "
    best, best_pos = None, None
    for label in sorted(labels, key=lambda s: -len(s)):
        pos = p.find(f" {normalize(label)} ")
        if pos >= 0 and (best_pos is None or pos < best_pos):
            best, best_pos = label, pos
    return best


def label_set(references, max_labels: int = 50) -> Optional[list[str]]:
    """The distinct references as a label set, or None when they do not look like class labels (fewer than 2
    or more than `max_labels` distinct values: free-text references, not categories)."""
    labels = sorted({str(r) for r in references if r})
    return labels if 2 <= len(labels) <= max_labels else None


def label_agreement(pred: str, other: str, labels: list[str]) -> float:
    """1.0 when both answers name the same first label. When neither names a label, they agree only if their
    texts match exactly (normalized): two unlabeled answers are not the same decision just because both
    missed the label set (a student that never names a label would otherwise agree with every teacher miss)."""
    a, b = first_label(pred, labels), first_label(other, labels)
    if a is None and b is None:
        return exact_match(pred, other)
    return float(a == b)


METRICS: dict[str, Callable[[str, str], float]] = {
    "exact": exact_match,
    "f1": token_f1,
    "rouge_l": rouge_l,
}
