"""Building the student: any causal LM, or the teacher with a subset of its decoder layers (depth pruning).

Layer selection `search` scores a handful of candidate subsets by the NLL the pruned model gives the
teacher's own outputs (a few batches) and keeps the lowest. Measured on SmolLM2-135M, 30 -> 15 layers:
first 8 + last 7 = NLL 8.8, every other layer 13.5, first 15 = 20.5 (issue 3): the choice matters a lot,
and which split wins depends on the model, so we measure instead of hard-coding one.
"""

from __future__ import annotations

import copy
import logging
from typing import Callable, Optional

from toolkit.errors import OptkitError

log = logging.getLogger("optkit.distill")


# ----------------------------------------------------------------------------------------- layer subsets


def first_last(n_total: int, n_keep: int, n_first: Optional[int] = None) -> list[int]:
    """The first `n_first` and the last `n_keep - n_first` layers (default: split roughly in half)."""
    n_first = (n_keep + 1) // 2 if n_first is None else n_first
    return list(range(n_first)) + list(range(n_total - (n_keep - n_first), n_total))


def every_other(n_total: int, n_keep: int) -> list[int]:
    """Evenly spaced layers, always keeping the first and the last."""
    if n_keep == 1:
        return [0]
    return sorted({round(i * (n_total - 1) / (n_keep - 1)) for i in range(n_keep)})


def first(n_total: int, n_keep: int) -> list[int]:
    return list(range(n_keep))


STRATEGIES: dict[str, Callable[[int, int], list[int]]] = {
    "first_last": first_last,
    "every_other": every_other,
    "first": first,
}


def candidate_subsets(n_total: int, n_keep: int) -> dict[str, list[int]]:
    """Named candidates for `search`: first-k + last-m splits at several k, evenly spaced, first-n, last-n,
    and the first and last layers kept with the middle block thinned out."""
    cands: dict[str, list[int]] = {}
    for frac in (0.25, 0.4, 0.5, 0.6, 0.75):
        k = min(max(1, round(n_keep * frac)), n_keep - 1) if n_keep > 1 else 1
        cands[f"first{k}+last{n_keep - k}"] = first_last(n_total, n_keep, k)
    cands["every_other"] = every_other(n_total, n_keep)
    cands["first"] = first(n_total, n_keep)
    cands["last"] = list(range(n_total - n_keep, n_total))
    if n_keep >= 4:  # 2 at each end, the rest evenly spaced through the middle
        mid = every_other(n_total - 4, n_keep - 4) if n_keep > 4 else []
        cands["ends2+spaced"] = [0, 1] + [m + 2 for m in mid] + [n_total - 2, n_total - 1]
    # Drop duplicates (small models make several strategies coincide) and invalid ones.
    seen, out = set(), {}
    for name, subset in cands.items():
        key = tuple(subset)
        if len(set(subset)) == n_keep and key not in seen and all(0 <= i < n_total for i in subset):
            seen.add(key)
            out[name] = subset
    return out


# ----------------------------------------------------------------------------------------- pruning


def decoder_layers(model):
    """The ModuleList of decoder layers of a (Llama-style) causal LM, or an OptkitError."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise OptkitError(f"distill.student.from_teacher: depth pruning supports decoder models with "
                          f"model.layers (Llama, Qwen, Mistral, …); {type(model).__name__} has none")
    return layers


def set_layers(model, keep: list[int]) -> None:
    """Keep only the listed decoder layers, in place, and make config and KV-cache indices consistent."""
    import torch

    layers = decoder_layers(model)
    n_total = len(layers)
    if sorted(set(keep)) != sorted(keep) or not keep or min(keep) < 0 or max(keep) >= n_total:
        raise OptkitError(f"distill.student.from_teacher.layers: {keep} is not a set of distinct indices "
                          f"in 0..{n_total - 1}")
    keep = sorted(keep)
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx  # the KV cache is indexed by it
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):  # per-layer attention types (sliding/full) follow their layer
        cfg.layer_types = [cfg.layer_types[i] for i in keep]


def pruned_copy(teacher, keep: list[int]):
    """A new model with copies of the teacher's kept layers (the teacher stays intact for eval / online KD)."""
    student = copy.deepcopy(teacher)
    set_layers(student, keep)
    return student


def completion_nll(model, batches: list[dict]) -> float:
    """Mean per-token NLL of the completion tokens (labels != -100) over the batches (the engines' scorer)."""
    from toolkit.engines.hf import completion_nll as score

    return score(model, batches)


def search_layers(teacher, n_keep: int, batches: list[dict]) -> tuple[list[int], dict[str, dict]]:
    """Score every candidate subset by completion NLL on `batches`; returns (best subset, all scores)."""
    layers = decoder_layers(teacher)
    n_total = len(layers)
    scores: dict[str, dict] = {}
    saved = teacher.model.layers
    saved_n = teacher.config.num_hidden_layers
    saved_types = getattr(teacher.config, "layer_types", None)
    try:
        for name, subset in candidate_subsets(n_total, n_keep).items():
            set_layers(teacher, subset)  # a view over the same weights: nothing copied per candidate
            scores[name] = {"layers": subset, "nll": completion_nll(teacher, batches)}
            log.info("layer candidate %-16s NLL %.3f  %s", name, scores[name]["nll"], subset)
            teacher.model.layers = saved
            teacher.config.num_hidden_layers = saved_n
            if saved_types:
                teacher.config.layer_types = saved_types
    finally:
        teacher.model.layers = saved
        teacher.config.num_hidden_layers = saved_n
        if saved_types:
            teacher.config.layer_types = saved_types
        for idx, layer in enumerate(saved):
            attn = getattr(layer, "self_attn", None)
            if attn is not None and hasattr(attn, "layer_idx"):
                attn.layer_idx = idx
    best = min(scores, key=lambda k: scores[k]["nll"])
    return scores[best]["layers"], scores


def choose_layers(teacher, prune, batches_fn: Callable[[], list[dict]]) -> tuple[list[int], dict]:
    """(kept layer indices, facts for student.json) from a PruneConfig."""
    n_total = len(decoder_layers(teacher))
    if prune.num_layers >= n_total:
        raise OptkitError(f"distill.student.from_teacher.num_layers: {prune.num_layers} must be below the "
                          f"teacher's {n_total} layers")
    if prune.layers is not None:  # as many as num_layers and distinct (PruneConfig); in range: set_layers checks
        return sorted(prune.layers), {"selection": "explicit"}
    if prune.selection == "search":
        best, scores = search_layers(teacher, prune.num_layers, batches_fn())
        return best, {"selection": "search", "candidates": scores}
    return STRATEGIES[prune.selection](n_total, prune.num_layers), {"selection": prune.selection}


def count_params(model) -> int:
    # Tied embeddings are one tensor: count unique storage once.
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ----------------------------------------------------------------------------------------- tokenizers


def tokenizer_report(teacher_tok, student_tok) -> dict:
    """How compatible two tokenizers are: same vocabulary (token -> id) and same special tokens."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    same_vocab = tv == sv
    mismatched = 0 if same_vocab else sum(1 for t, i in tv.items() if sv.get(t) != i) + len(set(sv) - set(tv))
    specials = {name: (getattr(teacher_tok, name, None), getattr(student_tok, name, None))
                for name in ("eos_token", "bos_token", "pad_token")}
    return {"same_vocab": same_vocab, "teacher_vocab": len(tv), "student_vocab": len(sv),
            "mismatched_tokens": mismatched,
            "special_tokens_differ": {k: v for k, v in specials.items() if v[0] != v[1]}}


def check_tokenizers(teacher_tok, student_tok, logit_kd: bool) -> dict:
    """Logit KD compares distributions id by id, so it needs the same token -> id mapping; sequence-level
    KD (SFT on the teacher's text) works with any tokenizer. Fails before training, not after."""
    report = tokenizer_report(teacher_tok, student_tok)
    if not report["same_vocab"]:
        msg = (f"teacher and student tokenizers differ ({report['mismatched_tokens']} tokens map to different "
               f"ids; vocab {report['teacher_vocab']} vs {report['student_vocab']})")
        if logit_kd:
            raise OptkitError(f"distill.kd.loss: logit KD needs the same vocabulary, but {msg}; use "
                              "kd.loss: none (sequence-level KD) or a student from the teacher's family")
        log.warning("%s; fine for sequence-level KD", msg)
    elif report["special_tokens_differ"]:
        log.warning("teacher/student special tokens differ: %s", report["special_tokens_differ"])
    return report
