"""Benchmark of the cache stage: does the promised false-hit bound hold, how many hits does it cost, how fast is
a lookup at 100k entries. Rerun: `python eval/bench_cache.py` (about 5 minutes on 2 CPU cores).

What the query threshold adds to a lookup: `python eval/bench_cache.py --parts gate --out
eval/results/bench_cache_gate` (a minute).

The default-bound study: `python eval/bench_cache.py --parts bound --splits 500 --cluster` (~15 minutes on one
loaded core; embeddings of the three datasets, ~4 minutes, are kept in ~/.cache/optkit/bench_cache) writes
eval/results/bench_cache_bound.{json,md}: for CLINC150 (test split: the shipped intent pairs and nearest-neighbour
pairs), Banking77 train and SNIPS train (nearest-neighbour pairs, label = same intent), epsilon 0.05 and 0.1,
random splits of 2,000 calibration and 857 held-out pairs: the share of splits whose REALIZED held-out false-hit
share is <= epsilon, per policy, and the hit rate against the best static threshold chosen with hindsight on the
same held-out pairs, plus the ceiling no single calibrated threshold can pass (see bound_study).

Definitions (as in toolkit/cache/tune.py): similarity = cosine of MiniLM embeddings; a pair is served when
similarity >= threshold; false-hit rate = P(label 0 | served); hit rate = P(served).

Data: CLINC150 test split (../shared/data/clinc150, CC BY 3.0), label = same intent (a proxy for "reusable").
1. pairs:  the 6,000 shared intent pairs (1/3 positives, hard negatives from the same domain).
2. nn:     nearest-neighbour pairs, what a deployed cache actually faces: each test utterance against its nearest
           other test utterance; label = same in-scope intent (an out-of-scope query is never reusable).
For each: a fixed calibration / held-out split (70/30) -> selected threshold -> (a) realized false-hit rate on
1,000 bootstrap resamples of the held-out pairs, (b) 100 repeated random splits (does the whole procedure keep
its promise), (c) the best static threshold chosen with hindsight on the held-out pairs at the same realized
error, (d) the F1-optimal threshold, (e) per-cluster thresholds.
3. latency: SemanticCache.lookup_vector at 20k and 100k entries (numpy brute force and faiss HNSW), with the
   embedding of a query timed separately. The 100k entries are the 5.5k real embeddings plus perturbed copies.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# name -> (cache.selection, cache.bound, per-cluster thresholds: False / "crossfit" (the stage's) / "split" (fit on
# one half, certify on the other)). scan / fixed_sequence bound the false-hit rate; realized bounds the rate
# realized on a held-out-sized batch; audit bounds what an audit of that batch would itself state (the bootstrap
# target below); cluster* are per-cluster thresholds with the same bounds.
POLICIES = {"scan": ("scan", "rate", False), "fixed_sequence": ("fixed_sequence", "rate", False),
            "realized": ("scan", "realized", False), "audit": ("scan", "audit", False),
            "cluster": ("scan", "rate", "crossfit"), "cluster_audit": ("scan", "audit", "crossfit"),
            "cluster_split": ("scan", "rate", "split"), "cluster_split_audit": ("scan", "audit", "split")}


def run_policy(name, sims, labels, cached_vecs, cal, eps, conf, batch_ratio, seed=0):
    """Calibrate policy `name` on the pairs `cal`; return (selection, served mask over all pairs)."""
    from toolkit.cache import adaptive, tune

    method, bound, per_cluster = ALL_POLICIES[name]
    if per_cluster:
        res = adaptive.calibrate(sims[cal], labels[cal], cached_vecs[cal], eps, conf, seed=seed, method=method,
                                 bound=bound, batch_ratio=batch_ratio, crossfit=per_cluster == "crossfit")
        return res.selection, res.served(sims, cached_vecs)
    sel = tune.select(sims[cal], labels[cal], eps, conf, method, bound, batch_ratio)
    return sel, (sims >= sel.threshold if sel.feasible else np.zeros(len(sims), bool))


# The default-bound study (--parts bound): which cache.bound keeps the *realized* held-out false-hit share <= eps
# on >= 95% of random calibration / held-out splits, and at what hit rate against the best static threshold chosen
# with hindsight on each split's held-out pairs. Global policies only by default; --cluster adds per-cluster ones.
BOUND_POLICIES = {"rate": ("scan", "rate", False), "fixed_sequence": ("fixed_sequence", "rate", False),
                  "realized": ("scan", "realized", False), "realized_grid": ("grid", "realized", False),
                  "realized_fs": ("fixed_sequence", "realized", False), "audit": ("scan", "audit", False)}
CLUSTER_POLICIES = {"cluster_rate": ("scan", "rate", "crossfit"), "cluster_realized": ("grid", "realized", "crossfit")}
ALL_POLICIES = {**POLICIES, **BOUND_POLICIES, **CLUSTER_POLICIES}
DEFAULT_POLICY = "realized_grid"  # what toolkit/config/cache.py defaults to (bound realized, selection grid)


# The learned similarity (cache.metric, toolkit/cache/metric.py), through the stage's own functions: pairs built
# from groups are re-paired under the learned metric (the runtime serves the nearest entry under the metric it
# uses), the threshold is set on cross-fitted calibration scores. name -> (cache.metric, selection, bound).
# metric_auto is the product's default (auto + the default bound); diagonal_scan forces the learned metric with the
# scan selection (more hits, less coverage).
# query_*: cache.adaptive query (toolkit/cache/local.py) on top of the auto metric.
METRIC_POLICIES = {"metric_auto": ("auto", "grid", "realized"), "diagonal_scan": ("diagonal", "scan", "realized"),
                   "query_grid": ("auto", "grid", "realized", "query"),
                   "query_scan": ("auto", "scan", "realized", "query")}


def metric_policy(pairs, vecs, cal, held, eps, conf, batch_ratio, spec, seed=0):
    """(served mask over `held`, labels of the held pairs as served, metric kind) of a cache.metric policy
    calibrated on `cal`."""
    from toolkit.cache import stage
    from toolkit.config.cache import CacheConfig

    from toolkit.cache import local

    kind, method, bound, adaptive = (*spec, "none")[:4]
    cfg = CacheConfig(metric=kind, epsilon=eps, confidence=conf, selection=method, bound=bound, adaptive=adaptive)
    choice = stage.choose_metric(cfg, seed, pairs, vecs, cal, batch_ratio)
    s_held, y_held, c_held = stage.pair_fn(pairs, vecs)(choice.weights, held)
    sel = choice.selection
    served = s_held >= sel.threshold if sel.feasible else np.zeros(len(held), bool)
    if adaptive == "query":
        gate = stage.choose_query_threshold(cfg, seed, pairs, vecs, cal, choice, batch_ratio).gate
        if gate is not None:  # read only what a runtime query could (local.pair_skip), as the stage's check
            q = pairs.query[held]
            skip = local.pair_skip(q, c_held, pairs.query[cal], choice.calibration[2])
            served = gate.served(s_held, vecs[q], vecs[c_held], skip)
        return served, y_held, "query" if gate is not None else choice.report["kind"]
    return served, y_held, choice.report["kind"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(REPO / ".." / "shared" / "data" / "clinc150"),
                    help="folder with clinc150_full.csv and clinc150_test_intent_pairs.csv")
    ap.add_argument("--epsilon", type=float, default=0.05)
    ap.add_argument("--confidences", default="0.95,0.99",
                    help="confidence levels to compare (the literal held-out bootstrap target needs slack)")
    ap.add_argument("--parts", default="pairs,nn,latency")
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--splits", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "bench_cache"))
    # --parts bound
    ap.add_argument("--shared", default=str(REPO / ".." / "shared" / "data"),
                    help="folder holding clinc150/, banking77/ and snips/ (the shared datasets)")
    ap.add_argument("--epsilons", default="0.05,0.1", help="bound study: epsilons")
    ap.add_argument("--calibration", type=int, default=2000, help="bound study: calibration pairs per split")
    ap.add_argument("--heldout", type=int, default=857,
                    help="bound study: held-out pairs per split (857 = what cache.holdout 0.3 leaves beside 2,000)")
    ap.add_argument("--first-split", type=int, default=0, help="bound study: the first split's number (split r "
                    "uses seed 1000 + r): a later range re-measures a policy on splits its design never saw")
    ap.add_argument("--datasets", default=None, help="bound study: only these datasets (comma-separated names)")
    ap.add_argument("--cluster", action="store_true", help="bound study: add the per-cluster policies (slow)")
    ap.add_argument("--cluster-splits", type=int, default=50, help="bound study: per-cluster policies run on the "
                    "first this many splits only")
    ap.add_argument("--keep-mirrors", action="store_true", help="bound study: keep both pairs of a mirror (A->B "
                    "and B->A), as the cache stage did before it counted them once (the tables before 2026-12-02)")
    ap.add_argument("--learned", action="store_true", help="bound study: add the learned-metric policies "
                    "(cache.metric: auto, the default, and diagonal; ~3 s per split)")
    ap.add_argument("--policies", default=None, help="bound study: only these policies (comma-separated names)")
    ap.add_argument("--emb-cache", default=str(Path.home() / ".cache" / "optkit" / "bench_cache"),
                    help="where embeddings are kept between runs (keyed by texts)")
    return ap.parse_args()


def embed_all(texts: list[str]) -> tuple[np.ndarray, float]:
    from toolkit.cache.runtime import embed_texts
    from toolkit.models import load_embedder

    model = load_embedder("minilm-l6")
    t = time.perf_counter()
    vecs = embed_texts(model, texts, batch_size=64)
    return vecs, len(texts) / (time.perf_counter() - t)


def nn_groups(intents: list[str]) -> list[str]:
    return [f"oos#{i}" if g == "oos" else g for i, g in enumerate(intents)]  # oos is never reusable


def nn_pairs(vecs: np.ndarray, intents: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from toolkit.cache.stage import nearest_pairs

    q = np.arange(len(vecs))
    c, y = nearest_pairs(vecs, nn_groups(intents), list(q))
    return q, c, y


def boot_fraction(served: np.ndarray, labels: np.ndarray, eps: float, rounds: int, rng) -> float:
    """Fraction of bootstrap resamples of these held-out pairs whose realized false-hit rate is <= eps."""
    idx = rng.integers(0, len(labels), (rounds, len(labels)))
    n_served = served[idx].sum(1)
    false = (served[idx] & (labels[idx] == 0)).sum(1)
    fhr = np.where(n_served > 0, false / np.maximum(n_served, 1), 0.0)
    return float((fhr <= eps).mean())


def study(name: str, sims, labels, cached_vecs, args, rng, conf: float) -> dict:
    from toolkit.cache import tune

    eps = args.epsilon
    n = len(sims)
    held_mask = rng.random(n) < 0.3
    cal, held = np.nonzero(~held_mask)[0], np.nonzero(held_mask)[0]
    out = {"pairs": int(n), "positives": int(labels.sum()), "calibration": int(len(cal)), "heldout": int(len(held))}

    def boot_ok(served_mask):
        return boot_fraction(served_mask[held], labels[held], eps, args.boot, rng)

    ratio = len(held) / len(cal)
    policies = {m: run_policy(m, sims, labels, cached_vecs, cal, eps, conf, ratio) for m in POLICIES}
    for method, (sel, mask) in policies.items():
        h = tune.rates(mask[held], labels[held], conf)
        best = tune.hindsight_best(sims[held], labels[held], h["fhr"])
        out[method] = {"threshold": None if POLICIES[method][2] else sel.threshold,
                       "calibration_bound": sel.bound, "calibration_hit_rate": float(mask[cal].mean()),
                       "heldout_fhr": h["fhr"], "heldout_hit_rate": h["hit_rate"], "heldout_recall": h["recall"],
                       "heldout_served": h["served"], "bootstrap_fraction_fhr_le_eps": boot_ok(mask),
                       "hindsight_static_hit_rate_at_same_fhr": best["hit_rate"],
                       "hit_rate_ratio_vs_hindsight": h["hit_rate"] / best["hit_rate"] if best["hit_rate"] else None}
    t_f1 = tune.f1_threshold(sims[cal], labels[cal])
    f1 = tune.evaluate(sims[held], labels[held], t_f1, conf)
    out["f1_reference"] = {"threshold": t_f1, "heldout_fhr": f1["fhr"], "heldout_hit_rate": f1["hit_rate"]}

    # The whole procedure, repeated on fresh random splits: does the promise hold on held-out data?
    rep = {m: {"ok": 0, "certified": 0, "hit": [], "fhr": [], "ratio": []} for m in POLICIES}
    for r in range(args.splits):
        hm = rng.random(n) < 0.3
        c_idx, h_idx = np.nonzero(~hm)[0], np.nonzero(hm)[0]
        for m in POLICIES:
            mask = run_policy(m, sims, labels, cached_vecs, c_idx, eps, conf, len(h_idx) / len(c_idx), seed=r)[1]
            mask = mask[h_idx]
            h = tune.rates(mask, labels[h_idx], conf)
            rep[m]["ok"] += h["fhr"] <= eps
            rep[m]["certified"] += boot_fraction(mask, labels[h_idx], eps, 200, rng) >= 0.95  # the target, per split
            rep[m]["hit"].append(h["hit_rate"])
            rep[m]["fhr"].append(h["fhr"])
            best = tune.hindsight_best(sims[h_idx], labels[h_idx], h["fhr"])["hit_rate"]
            if h["served"] and best:
                rep[m]["ratio"].append(h["hit_rate"] / best)
    out["repeated_splits"] = {m: {"splits": args.splits, "fraction_heldout_fhr_le_eps": v["ok"] / args.splits,
                                  "fraction_bootstrap_target_met": v["certified"] / args.splits,
                                  "mean_heldout_hit_rate": float(np.mean(v["hit"])),
                                  "median_ratio_vs_hindsight": float(np.median(v["ratio"])) if v["ratio"] else None,
                                  "splits_serving": len(v["ratio"]),
                                  "mean_heldout_fhr": float(np.mean(v["fhr"])),
                                  "p95_heldout_fhr": float(np.percentile(v["fhr"], 95))} for m, v in rep.items()}
    print(f"[{name} @ {conf}] done")
    return out


def latency(vecs: np.ndarray, texts: list[str], rng) -> dict:
    from toolkit.cache import SemanticCache
    from toolkit.cache.runtime import l2_normalize
    from toolkit.models import load_embedder

    def corpus(size):
        reps = int(np.ceil(size / len(vecs)))
        noise = 0.35 * rng.standard_normal((reps * len(vecs), vecs.shape[1])).astype(np.float32) / np.sqrt(
            vecs.shape[1])
        base = np.tile(vecs, (reps, 1)) + np.where(np.arange(reps * len(vecs))[:, None] < len(vecs), 0, noise)
        return l2_normalize(base[:size])

    queries = l2_normalize(vecs[rng.choice(len(vecs), 1000, replace=False)]
                           + 0.2 * rng.standard_normal((1000, vecs.shape[1])).astype(np.float32) / np.sqrt(384))
    out = {}
    numpy_answers = {}
    for size, ann in ((20_000, "numpy"), (100_000, "numpy"), (100_000, "faiss")):
        try:
            cache = SemanticCache(threshold=0.0, ann=ann, ann_min_entries=1, max_entries=size)
            c = corpus(size)
            t0 = time.perf_counter()
            cache.insert_many([f"q{i}" for i in range(size)], list(range(size)), vectors=c)
            build = time.perf_counter() - t0
        except ImportError as exc:  # faiss not installed
            out[f"{ann}@{size}"] = {"skipped": str(exc)}
            continue
        times, cpu, answers = [], [], []
        for q in queries:
            t, c0 = time.perf_counter(), time.thread_time()
            hit = cache.lookup_vector(q)
            cpu.append(time.thread_time() - c0)  # CPU time: excludes waiting for a core on a shared machine
            times.append(time.perf_counter() - t)
            answers.append(hit.answer)
        key = f"{ann}@{size}"
        out[key] = {"entries": size, "insert_s": build, "p50_ms": float(np.median(times) * 1e3),
                    "p99_ms": float(np.percentile(times, 99) * 1e3), "cpu_p50_ms": float(np.median(cpu) * 1e3),
                    "cpu_p99_ms": float(np.percentile(cpu, 99) * 1e3), "lookups": len(queries)}
        if ann == "numpy":
            numpy_answers[size] = answers
        else:
            out[key]["recall_at_1_vs_numpy"] = float(np.mean(np.array(answers) == np.array(numpy_answers[size])))
        print(f"[latency] {key}: {out[key]}")
    model = load_embedder("minilm-l6")
    sample = [texts[i] for i in rng.choice(len(texts), 200, replace=False)]
    model.encode(sample[:8])
    times = []
    for t_ in sample:
        t = time.perf_counter()
        model.encode([t_], normalize_embeddings=True)
        times.append(time.perf_counter() - t)
    out["embedding_single_query"] = {"p50_ms": float(np.median(times) * 1e3),
                                     "p99_ms": float(np.percentile(times, 99) * 1e3), "queries": len(sample)}
    return out


def gate_latency(vecs: np.ndarray, rng, entries: int = 20_000, ref: int = 2_000) -> dict:
    """What cache.adaptive: query adds to a lookup (--parts gate): one cache of `entries` real and perturbed
    embeddings, looked up with the global threshold only, with the query gate (one product of the query with a
    `ref` x dim reference) and with cache.query_entry (one more, of the nearest entry). The three are timed in turn
    on the same queries, the order rotating, so the machine's noise falls on all three alike."""
    from toolkit.cache import SemanticCache, local
    from toolkit.cache.runtime import l2_normalize

    reps = int(np.ceil(entries / len(vecs)))
    corpus = l2_normalize(np.tile(vecs, (reps, 1))[:entries] + 0.35 * rng.standard_normal(
        (entries, vecs.shape[1])).astype(np.float32) / np.sqrt(vecs.shape[1]))
    pick = rng.choice(len(vecs), ref, replace=False)
    gate = dict(offset=0.9, ref_vecs=vecs[pick].astype(np.float32), ref_labels=rng.integers(0, 2, ref),
                support=-1.0, fallback=0.9)
    caches = {"global": SemanticCache(0.9, max_entries=entries),
              "query": SemanticCache(0.9, max_entries=entries, query_gate=local.Gate(
                  slopes=np.r_[0.1, 0.1, 0.1, 0.1, 0.0, 0.0], entry=False, **gate)),
              "query_entry": SemanticCache(0.9, max_entries=entries, query_gate=local.Gate(
                  slopes=np.full(len(local.FEATURES), 0.1), entry=True, **gate))}
    for cache in caches.values():
        cache.insert_many([f"q{i}" for i in range(entries)], list(range(entries)), vectors=corpus)
    queries = l2_normalize(vecs[rng.choice(len(vecs), 1000, replace=False)]
                           + 0.2 * rng.standard_normal((1000, vecs.shape[1])).astype(np.float32)
                           / np.sqrt(vecs.shape[1]))
    names, times = list(caches), {name: [] for name in caches}
    for i, q in enumerate(queries):
        for name in names[i % 3:] + names[:i % 3]:
            t = time.perf_counter()
            caches[name].lookup_vector(q)
            times[name].append(time.perf_counter() - t)
    p50 = {name: float(np.median(t) * 1e3) for name, t in times.items()}
    out = {"entries": entries, "reference": ref, "dim": int(vecs.shape[1]), "lookups": len(queries), "p50_ms": p50,
           "p99_ms": {name: float(np.percentile(t, 99) * 1e3) for name, t in times.items()},
           "added_p50_ms": {"query": float(np.median(np.array(times["query"]) - times["global"]) * 1e3),
                            "query_entry": float(np.median(np.array(times["query_entry"]) - times["global"]) * 1e3)}}
    print(f"[gate latency] {out}")
    return out


def markdown(res: dict) -> str:
    eps = res["epsilon"]
    lines = [f"# bench_cache results ({res['date']}, {res['machine']})", "",
             f"epsilon = {eps}, embedder = MiniLM-L6 (cosine). "
             "Timings measured on a shared 2-core machine: noisy.", ""]
    for name in ("pairs", "nn"):
        for conf, s in res.get(name, {}).items():
            lines += [f"## {name}, confidence {conf}: {s['pairs']} pairs ({s['positives']} positive), calibration "
                      f"{s['calibration']}, held-out {s['heldout']}", "",
                      "| policy | threshold | held-out FHR | held-out hit rate | bootstrap P(FHR<=eps) | "
                      "hindsight static hit rate @ same FHR | ratio | repeated splits P(FHR<=eps) "
                      "| repeated splits P(target met) "
                      "| mean hit rate | median ratio vs hindsight (splits serving) |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for m in POLICIES:
                p, r = s[m], s["repeated_splits"][m]
                thr = "per-cluster" if POLICIES[m][2] else (f"{p['threshold']:.3f}" if p["threshold"] else "none")
                ratio = f"{p['hit_rate_ratio_vs_hindsight']:.3f}" if p["hit_rate_ratio_vs_hindsight"] else "-"
                mr = f"{r['median_ratio_vs_hindsight']:.3f}" if r["median_ratio_vs_hindsight"] else "-"
                lines.append(f"| {m} | {thr} | {p['heldout_fhr']:.3f} | {p['heldout_hit_rate']:.3f} | "
                             f"{p['bootstrap_fraction_fhr_le_eps']:.3f} | "
                             f"{p['hindsight_static_hit_rate_at_same_fhr']:.3f} | {ratio} | "
                             f"{r['fraction_heldout_fhr_le_eps']:.2f} | {r['fraction_bootstrap_target_met']:.2f} | "
                             f"{r['mean_heldout_hit_rate']:.3f} | {mr} ({r['splits_serving']}) |")
            f1 = s["f1_reference"]
            lines += ["", f"F1-optimal threshold {f1['threshold']:.3f}: held-out FHR {f1['heldout_fhr']:.3f}, hit "
                      f"rate {f1['heldout_hit_rate']:.3f}.", ""]
    if "gate_latency" in res:
        g = res["gate_latency"]
        lines += [f"## what cache.adaptive: query adds to a lookup ({g['entries']} entries, {g['reference']} x "
                  f"{g['dim']} reference, {g['lookups']} lookups timed in turn)", "",
                  "| lookup | p50 ms | p99 ms | added, median of per-query differences, ms |", "|---|---|---|---|"]
        lines += [f"| {name} | {g['p50_ms'][name]:.3f} | {g['p99_ms'][name]:.3f} | "
                  f"{g['added_p50_ms'].get(name, 0.0):.3f} |" for name in g["p50_ms"]] + [""]
    if "latency" not in res:
        return "\n".join(lines)
    lat = res["latency"]
    lines += ["## lookup latency (after embedding; 1,000 lookups; wall clock and this thread's CPU time)", "",
              "| index | entries | p50 ms | p99 ms | CPU p50 ms | CPU p99 ms | note |", "|---|---|---|---|---|---|---|"]
    for key, v in lat.items():
        if key.startswith("embedding") or "skipped" in v:
            continue
        note = f"recall@1 vs exact {v['recall_at_1_vs_numpy']:.3f}" if "recall_at_1_vs_numpy" in v else "exact"
        lines.append(f"| {key.split('@')[0]} | {v['entries']} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} | "
                     f"{v['cpu_p50_ms']:.3f} | {v['cpu_p99_ms']:.3f} | {note} |")
    e = lat["embedding_single_query"]
    lines += ["", f"Embedding one query (MiniLM-L6, CPU): p50 {e['p50_ms']:.1f} ms, p99 {e['p99_ms']:.1f} ms.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- bound study


def embed_cached(texts: list[str], cache_dir: Path) -> np.ndarray:
    """MiniLM embeddings of `texts`, kept on disk by a hash of the texts: each dataset is embedded once."""
    import hashlib

    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = cache_dir / f"minilm-l6-{key}.npy"
    if path.is_file():
        return np.load(path, allow_pickle=False)
    vecs, rate = embed_all(texts)
    print(f"embedded {len(texts)} texts at {rate:.0f}/s")
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs.astype(np.float32), allow_pickle=False)
    return vecs


def bound_datasets(shared: Path, cache_dir: Path, keep_mirrors: bool = False) -> dict:
    """name -> (toolkit.cache.pairs.Pairs, embeddings of its texts). Nearest-neighbour pairs
    (each text against its nearest other text, label = same intent) for CLINC150 test (out-of-scope never
    reusable), Banking77 train and SNIPS train; and the shipped CLINC150 intent pairs file (hard negatives from the
    same domain)."""
    from toolkit.cache.pairs import Pairs

    def rows(path):
        return list(csv.DictReader(open(path, newline="", encoding="utf-8")))

    clinc = [r for r in rows(shared / "clinc150" / "clinc150_full.csv") if r["split"] == "test"]
    out = {}
    vecs = embed_cached([r["text"] for r in clinc], cache_dir)
    index = {r["text"]: i for i, r in enumerate(clinc)}
    pairs = rows(shared / "clinc150" / "clinc150_test_intent_pairs.csv")
    a = np.array([index[p["text_a"]] for p in pairs])
    b = np.array([index[p["text_b"]] for p in pairs])
    labels = np.array([int(p["label"]) for p in pairs])
    out["clinc150_pairs"] = (Pairs([r["text"] for r in clinc], a, b, labels,
                                   "CLINC150 test, shipped intent pairs (CC BY 3.0)", {}), vecs)
    for name, texts, intents, source in (
            ("clinc150_nn", [r["text"] for r in clinc], [r["intent"] for r in clinc], "CLINC150 test (CC BY 3.0)"),
            *[(n, [r["text"] for r in rs], [r["intent"] for r in rs], src) for n, rs, src in (
                ("banking77_nn", rows(shared / "banking77" / "banking77_train.csv"), "Banking77 train (CC BY 4.0)"),
                ("snips_nn", rows(shared / "snips" / "snips_train_full.csv"), "SNIPS 2017-06 train (CC0)"))]):
        v = vecs if name == "clinc150_nn" else embed_cached(texts, cache_dir)
        q, c, y = nn_pairs(v, intents)
        out[name] = (Pairs(texts, q, c, y, f"{source}, nearest-neighbour pairs", {}, nn_groups(intents)), v)
    if keep_mirrors:
        return out
    from toolkit.cache.pairs import drop_mirrors  # as the cache stage does: a mirrored pair counts once

    return {name: (drop_mirrors(pairs), v) for name, (pairs, v) in out.items()}


def bound_study(pairs, vecs, eps: float, policies: list[str], args) -> dict:
    """Repeated random splits: `calibration` pairs to choose, `heldout` other pairs to check. Per policy: share
    of splits whose realized held-out false-hit share is <= eps, and hit rate against the hindsight-best static
    threshold of the same held-out pairs (max hits with realized share <= eps). Also the ceiling: the one static
    threshold, chosen knowing every split's held-out labels, with realized <= eps on >= 95% of splits."""
    from toolkit.cache import tune

    conf = 0.95
    sims, labels = np.sum(vecs[pairs.query] * vecs[pairs.cached], 1).astype(np.float64), pairs.labels
    cached_vecs = vecs[pairs.cached]
    rec = {m: {"ok": [], "hit": [], "fhr": [], "split": [], "learned": []} for m in policies}
    hind, held_sets = [], []
    for r in range(args.first_split, args.first_split + args.splits):
        perm = np.random.default_rng(1000 + r).permutation(len(sims))
        cal, held = perm[:args.calibration], perm[args.calibration:args.calibration + args.heldout]
        held_sets.append(held)
        hind.append(tune.hindsight_best(sims[held], labels[held], eps)["hit_rate"])
        for m in policies:
            if m in CLUSTER_POLICIES and r - args.first_split >= args.cluster_splits:
                continue
            if m in METRIC_POLICIES:
                served, y_held, kind = metric_policy(pairs, vecs, cal, held, eps, conf, len(held) / len(cal),
                                                     METRIC_POLICIES[m], seed=r)
                rec[m]["learned"].append(kind != "cosine")  # query: the gate was exported
            else:
                served = run_policy(m, sims, labels, cached_vecs, cal, eps, conf, len(held) / len(cal), seed=r)[1][held]
                y_held = labels[held]
            h = tune.rates(served, y_held, conf)
            rec[m]["ok"].append(h["fhr"] <= eps)
            rec[m]["hit"].append(h["hit_rate"])
            rec[m]["fhr"].append(h["fhr"])
            rec[m]["split"].append(r - args.first_split)  # index into hind
    hind = np.array(hind)
    out = {"pairs": int(len(sims)), "positives": int(labels.sum()), "splits": args.splits,
           "heldout": int(len(held_sets[0])),  # fewer than --heldout when the dataset runs out of pairs
           "hindsight_mean_hit_rate": float(hind.mean()), "policies": {}}
    for m, v in rec.items():
        hit, hs = np.array(v["hit"]), hind[v["split"]]  # hindsight on the same splits
        out["policies"][m] = {"splits": len(hit), "share_splits_realized_le_eps": float(np.mean(v["ok"])),
                              "mean_hit_rate": float(hit.mean()),
                              "hit_ratio_vs_hindsight": float(hit.mean() / hs.mean()) if hs.mean() else None,
                              "median_split_ratio": float(np.median(hit[hs > 0] / hs[hs > 0]))
                              if (hs > 0).any() else None,
                              "mean_realized_fhr": float(np.mean(v["fhr"])),
                              "share_splits_learned": float(np.mean(v["learned"])) if v["learned"] else None,
                              "p95_realized_fhr": float(np.percentile(v["fhr"], 95))}
    # Ceiling of any static threshold at 95% split coverage (no calibration noise at all).
    grid = np.unique(np.quantile(sims, np.linspace(0, 1, 2001)))
    served = np.stack([sims[h][None, :] >= grid[:, None] for h in held_sets])  # [splits, grid, heldout]
    false = (served & (np.stack([labels[h] for h in held_sets])[:, None, :] == 0)).sum(2)
    n_served = served.sum(2)
    fhr = np.where(n_served > 0, false / np.maximum(n_served, 1), 0.0)
    cover = (fhr <= eps).mean(0)
    ok = np.nonzero(cover >= 0.95)[0]
    best = ok[np.argmax(n_served.mean(0)[ok])] if len(ok) else None
    hit = float(n_served.mean(0)[best] / len(held_sets[0])) if best is not None else 0.0  # held <= heldout
    out["ceiling_static"] = {"threshold": float(grid[best]) if best is not None else None,
                             "share_splits_realized_le_eps": float(cover[best]) if best is not None else None,
                             "mean_hit_rate": hit, "hit_ratio_vs_hindsight": hit / hind.mean() if hind.mean() else None}
    return out


def markdown_bound(res: dict) -> str:
    b = res["bound"]
    lines = [f"# bench_cache default-bound study ({res['date']}, {res['machine']})", "",
             f"{b['calibration']} calibration pairs and {b['heldout']} other held-out pairs per split, {b['splits']} "
             f"random splits per dataset (from split {b.get('first_split', 0)}), mirrored pairs (A->B and B->A) {b.get('mirrored_pairs', 'kept')}, "
             "confidence 0.95, MiniLM-L6 cosine. coverage = share of splits whose "
             "REALIZED held-out false-hit share is <= eps; hit ratio = mean held-out hit rate / mean hit rate of "
             "the hindsight-best static threshold (max hits with realized share <= eps on that split's held-out "
             "pairs). ceiling = the single static threshold chosen knowing every split's held-out labels that keeps "
             "coverage >= 0.95: no calibrated policy of one threshold can beat it. Goal: coverage >= 0.95 AND hit "
             "ratio >= 0.9. " + (f"Per-cluster policies (cluster_*) ran on the first {b['cluster_splits']} splits "
                                  "only (each fits k-means + logistic curves). " if b.get("cluster_splits") else "") +
             f"The realized / audit bounds promise a batch of {b['heldout']} lookups (cache.batch), the held-out "
             f"size. Runtime {b['runtime_s']:.0f} s." +
             (" metric_auto / diagonal_scan: cache.metric auto (the default: the learned per-dimension reweighted "
              "cosine when, cross-fitted on the calibration pairs, it serves more of them than the cosine) and "
              "diagonal (always learned) with selection scan, run through the cache stage's own functions; "
              "nearest-neighbour pairs are re-paired under the learned metric (what the runtime serves). Their hit "
              "ratio is against the same hindsight-best COSINE threshold, so they can pass the ceiling; 'learned' "
              "= share of splits where auto chose the learned metric." if any(m in METRIC_POLICIES for m in
                                                                               b["policies"]) else ""), ""]
    for eps, per in b["results"].items():
        names = list(next(iter(per.values()))["policies"])
        lines += [f"## epsilon {eps}", "",
                  "| dataset (pairs) | " + " | ".join(names) + " | ceiling |",
                  "|---" * (len(names) + 2) + "|"]
        for ds, r in per.items():
            cells = [f"{p['share_splits_realized_le_eps']:.2f} / {p['hit_ratio_vs_hindsight']:.2f}"
                     if p["hit_ratio_vs_hindsight"] is not None else f"{p['share_splits_realized_le_eps']:.2f} / -"
                     for p in r["policies"].values()]
            c = r["ceiling_static"]
            ceil = (f"{c['share_splits_realized_le_eps']:.2f} / {c['hit_ratio_vs_hindsight']:.2f}"
                    if c["threshold"] is not None else "none")
            short = f", held-out {r['heldout']}" if r.get("heldout", b["heldout"]) < b["heldout"] else ""
            lines.append(f"| {ds} ({r['pairs']}{short}) | " + " | ".join(cells) + f" | {ceil} |")
        lines += ["", "cells: coverage / hit ratio vs hindsight. Mean hit rates:", "",
                  "| dataset | hindsight | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
        for ds, r in per.items():
            lines.append(f"| {ds} | {r['hindsight_mean_hit_rate']:.3f} | " +
                         " | ".join(f"{p['mean_hit_rate']:.3f}" for p in r["policies"].values()) + " |")
        if "metric_auto" in names:
            lines += ["", "metric_auto chose the learned metric on this share of splits: " + ", ".join(
                f"{ds} {r['policies']['metric_auto']['share_splits_learned']:.2f}" for ds, r in per.items()) + "."]
        if {"rate", DEFAULT_POLICY} <= set(names):
            price = {ds: r["policies"][DEFAULT_POLICY]["mean_hit_rate"] / r["policies"]["rate"]["mean_hit_rate"]
                     for ds, r in per.items() if r["policies"]["rate"]["mean_hit_rate"]}
            lines += ["", f"Price of the default ({DEFAULT_POLICY}: bound realized, selection grid) against rate "
                      "(the old default), held-out hit rate ratio: " +
                      ", ".join(f"{ds} {v:.2f}" for ds, v in price.items()) + "."]
        lines.append("")
    return "\n".join(lines)


def run_bound(args) -> None:
    t0 = time.perf_counter()
    data = bound_datasets(Path(args.shared), Path(args.emb_cache), args.keep_mirrors)
    if args.datasets:
        data = {name: data[name] for name in args.datasets.split(",")}
    policies = (list(BOUND_POLICIES) + (list(CLUSTER_POLICIES) if args.cluster else []) +
                (list(METRIC_POLICIES) if args.learned else []))
    if args.policies:
        policies = args.policies.split(",")
    results = {}
    for eps in (float(e) for e in args.epsilons.split(",")):
        results[str(eps)] = {}
        for name, (pairs, vecs) in data.items():
            results[str(eps)][name] = {"source": pairs.source, **bound_study(pairs, vecs, eps, policies, args)}
            print(f"[bound eps={eps}] {name} done ({time.perf_counter() - t0:.0f} s)")
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared",
           "bound": {"calibration": args.calibration, "heldout": args.heldout, "splits": args.splits,
                     "first_split": args.first_split,
                     "confidence": 0.95, "mirrored_pairs": "kept" if args.keep_mirrors else "counted once",
                     "policies": {m: list({**ALL_POLICIES, **METRIC_POLICIES}[m]) for m in policies},
                     "cluster_splits": min(args.cluster_splits, args.splits) if args.cluster else None,
                     "runtime_s": time.perf_counter() - t0, "results": results}}
    out = Path(args.out + "_bound")
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, allow_nan=False) + "\n")
    md = markdown_bound(res)
    out.with_suffix(".md").write_text(md)
    print(md)


def main():
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    if args.parts == "bound":
        return run_bound(args)
    data = Path(args.data)
    rng = np.random.default_rng(0)
    rows = [r for r in csv.DictReader(open(data / "clinc150_full.csv", newline="", encoding="utf-8"))
            if r["split"] == "test"]
    texts = [r["text"] for r in rows]
    index = {t: i for i, t in enumerate(texts)}
    vecs, rate = embed_all(texts)
    print(f"embedded {len(texts)} texts at {rate:.0f}/s")

    pairs = list(csv.DictReader(open(data / "clinc150_test_intent_pairs.csv", newline="", encoding="utf-8")))
    a = np.array([index[p["text_a"]] for p in pairs])
    b = np.array([index[p["text_b"]] for p in pairs])
    y = np.array([int(p["label"]) for p in pairs])
    parts = args.parts.split(",")
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared",
           "epsilon": args.epsilon, "embedding_texts_per_s": rate}
    confs = [float(c) for c in args.confidences.split(",")]
    datasets = {}
    if "pairs" in parts:
        datasets["pairs"] = (np.sum(vecs[a] * vecs[b], 1).astype(np.float64), y, vecs[b])
    if "nn" in parts:
        q, c, y_nn = nn_pairs(vecs, [r["intent"] for r in rows])
        datasets["nn"] = (np.sum(vecs[q] * vecs[c], 1).astype(np.float64), y_nn, vecs[c])
    for name, (sims, labels, cached) in datasets.items():
        res[name] = {str(conf): study(name, sims, labels, cached, args, np.random.default_rng(0), conf)
                     for conf in confs}
    if "latency" in parts:
        res["latency"] = latency(vecs, texts, rng)
    if "gate" in parts:
        res["gate_latency"] = gate_latency(vecs, rng)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, allow_nan=False) + "\n")
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
