"""The cache stage's labeled pairs: from a pairs file, or nearest-neighbour pairs built from groups of the recipe's
data. Either way no pair touches a prompt of the test split (evaluate scores the system on those)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from toolkit.cache.runtime import normalize_text
from toolkit.errors import OptkitError
from toolkit.io import read_table, require_columns


@dataclass
class Pairs:
    texts: list[str]  # unique texts
    query: np.ndarray  # index into texts
    cached: np.ndarray
    labels: np.ndarray  # 1 = reusable
    source: str
    excluded: dict  # what was left out of the recipe's data, and why (test split, data.limit, test overlap)
    groups: Optional[list[str]] = None  # pairs built from groups: each text's group (a metric re-pairs by them)


def mirror_groups(query: np.ndarray, cached: np.ndarray) -> np.ndarray:
    """One id per pair, shared by a pair and its mirror (A->B and B->A: one similarity, one label)."""
    lo, hi = np.minimum(query, cached).astype(np.int64), np.maximum(query, cached).astype(np.int64)
    return lo * (int(hi.max(initial=0)) + 1) + hi


def drop_mirrors(pairs: Pairs) -> Pairs:
    """One pair per mirror: A->B and B->A with one label are one observation (one similarity, one label), and a
    query meets its nearest entry once in traffic (whichever came second), not twice. Counted twice, the bound's n
    overstated the evidence behind it: on nearest-neighbour pairs the realized false-hit share of held-out batches
    exceeded epsilon on 6-7% of splits where 5% was promised (eval/bench_cache.py --keep-mirrors)."""
    key = mirror_groups(pairs.query, pairs.cached) * 2 + np.asarray(pairs.labels, np.int64)
    _, first = np.unique(key, return_index=True)
    keep = np.sort(first)
    if len(keep) == len(pairs.labels):
        return pairs
    return replace(pairs, query=pairs.query[keep], cached=pairs.cached[keep], labels=pairs.labels[keep],
                   excluded={**pairs.excluded, "mirrored_duplicate_pairs": int(len(pairs.labels) - len(keep))})


def fold_ids(n: int, folds: int, rng: np.random.Generator, groups: Optional[np.ndarray] = None) -> np.ndarray:
    """A random fold per pair; with `groups` (mirror_groups) a pair and its mirror share their fold, so no pair is
    scored by a fit that saw its own mirror (cross-fitted scores would look better than they are)."""
    if groups is None:
        return rng.permutation(n) % folds
    _, inverse = np.unique(groups, return_inverse=True)
    return rng.permutation(int(inverse.max(initial=-1)) + 1)[inverse] % folds


def _label(value, where: str) -> int:
    text = str(value).strip().lower()
    if text in ("1", "true", "1.0"):
        return 1
    if text in ("0", "false", "0.0"):
        return 0
    raise OptkitError(f"{where}: label must be 0 or 1, got {value!r}")


def _text(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise OptkitError(f"{where}: empty text")
    return value


def hash_sample(keys: list[str], limit: Optional[int], seed: int) -> list[int]:
    """A deterministic sample of at most `limit` items, chosen by hash (stable when rows are appended; salted
    differently from `split`, or the sample would be exactly the pairs with the lowest split hashes)."""
    if limit is None or len(keys) <= limit:
        return list(range(len(keys)))
    ranked = sorted(range(len(keys)), key=lambda i: hashlib.sha256(f"sample:{seed}:{keys[i]}".encode()).hexdigest())
    return sorted(ranked[:limit])


def pairs_from_file(path: Path, cfg, seed: int, test_texts: frozenset = frozenset()) -> Pairs:
    """Labeled pairs from a file; a pair with a text among `test_texts` (the prompts evaluate scores the system
    on) is dropped, so the threshold is never tuned on the traffic that later judges it."""
    from toolkit.collect.prompts import read_data  # one-line errors for non-UTF-8 text, broken CSV, ...

    rows = read_data(path)
    cols = (cfg.query_column, cfg.cached_column, cfg.label_column)
    require_columns(rows, cols, str(path), "cache.query_column / cached_column / label_column")
    index: dict[str, int] = {}
    q, c, y = [], [], []
    overlap = 0
    for i, row in enumerate(rows, 1):
        where = f"{path}: row {i}"
        # .get: a later row may lack a column the first row has; that is the row's error, not a KeyError
        a = _text(row.get(cfg.query_column), f"{where}: column '{cfg.query_column}' (cache.query_column)")
        b = _text(row.get(cfg.cached_column), f"{where}: column '{cfg.cached_column}' (cache.cached_column)")
        label = _label(row.get(cfg.label_column), f"{where}: column '{cfg.label_column}' (cache.label_column)")
        if normalize_text(a) in test_texts or normalize_text(b) in test_texts:
            overlap += 1
            continue
        q.append(index.setdefault(a, len(index)))
        c.append(index.setdefault(b, len(index)))
        y.append(label)
    texts = list(index)
    keep = hash_sample([f"{texts[q[i]]}\x00{texts[c[i]]}" for i in range(len(q))], cfg.max_pairs, seed)
    return Pairs(texts, np.array(q, np.int64)[keep], np.array(c, np.int64)[keep], np.array(y, np.int64)[keep],
                 str(path), {"pairs_sharing_a_test_prompt": overlap})


def data_rows(recipe, all_rows: bool = False) -> tuple[Path, list[tuple[dict, str]]]:
    """(row, split) for each row of the recipe's data that collect keeps: the same dedupe, data.limit sample
    and train/val/test split, computed by collect's own functions, so "test" here is evaluate's test set.
    all_rows: every row of the file, data.limit not applied (splits are per prompt id, so unchanged)."""
    from toolkit.collect.prompts import build_messages, load_prompts, messages_id, render_user

    data = recipe.data.model_copy(update={"limit": None}) if all_rows else recipe.data
    path = recipe.resolve_path(data.path)
    split_of = {p.id: p.split for p in load_prompts(data, path, recipe.seed)}
    kept = []
    for row in read_table(path, data.format, data.split_name):
        pid = (("" if row[data.id_column] is None else str(row[data.id_column])) if data.id_column else
               messages_id(build_messages(render_user(row, data), data.system_prompt)))
        if pid in split_of:
            kept.append((row, split_of.pop(pid)))  # pop: a repeated prompt keeps its first row, as dedupe does
    return path, kept


def test_prompt_texts(recipe) -> frozenset:
    """The (normalized) prompts of the recipe's test split: what evaluate replays the system on."""
    if getattr(recipe, "data", None) is None:
        return frozenset()
    _, kept = data_rows(recipe)
    col = recipe.data.prompt_column
    return frozenset(normalize_text(str(row[col])) for row, split in kept if split == "test" and row.get(col))


def groups_from_data(recipe, cfg) -> tuple[list[str], list[str], Path, dict]:
    """Texts and groups of the recipe's data rows outside the test split (the pairs are tuned on prompts that
    evaluate never scores the system on): the rows collect keeps (data.limit applied), or with
    cache.data_rows = all every row of the file."""
    path, kept = data_rows(recipe, all_rows=cfg.data_rows == "all")
    text_col = cfg.text_column or recipe.data.prompt_column
    require_columns([row for row, _ in kept[:1]], (text_col, cfg.group_column), str(path),
                    "cache.text_column / cache.group_column")
    rows = [row for row, split in kept if split != "test"]
    excluded = {"test_split_rows": len(kept) - len(rows),
                "data_limit": recipe.data.limit if cfg.data_rows == "limit" else None}
    seen: dict[str, str] = {}
    for i, row in enumerate(rows, 1):
        text = normalize_text(_text(row.get(text_col), f"{path}: row {i}: column '{text_col}'"))
        group = row.get(cfg.group_column)
        if group is None or str(group).strip() == "":
            raise OptkitError(f"{path}: row {i}: empty '{cfg.group_column}' (cache.group_column)")
        seen.setdefault(text, str(group))  # a repeated text keeps its first group
    if len(set(seen.values())) < 2:
        raise OptkitError(f"{path}: cache.group_column '{cfg.group_column}' has a single value; pairs need at "
                          "least two groups")
    return list(seen), list(seen.values()), path, excluded


def nearest_pairs(vecs: np.ndarray, groups: list[str], queries: list[int],
                  weights: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """For each query text, its nearest *other* text (what a cache holding everything else would return) by
    cosine, or by the reweighted cosine of `weights` (toolkit.cache.metric); label = same group. Chunked so
    memory stays O(chunk x n)."""
    g = np.array(groups)
    cached = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), 1024):
        idx = np.array(queries[start:start + 1024])
        q = vecs[idx] if weights is None else vecs[idx] * weights
        sims = q @ vecs.T
        sims[np.arange(len(idx)), idx] = -np.inf
        cached[start:start + len(idx)] = np.argmax(sims, axis=1)
    q = np.array(queries, dtype=np.int64)
    return cached, (g[q] == g[cached]).astype(np.int64)
