"""cache stage: tune a semantic-cache threshold with a stated false-hit bound and export `cache.json`.

setup (pairs from a file, or nearest-neighbour pairs built from groups of the recipe's data; embeddings)
-> run (split calibration / held-out, the similarity: cosine or learned (cache.metric, toolkit/cache/metric.py),
bounded threshold selection, held-out check, F1 reference, optional per-cluster thresholds, stress set)
-> save (cache.json, report.json, curves.png, MLflow).
Definitions of false-hit rate, hit rate and similarity: see toolkit/cache/tune.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from toolkit.cache import local, metric, stress, tune
from toolkit.cache.pairs import (Pairs, drop_mirrors, fold_ids, groups_from_data,  # noqa: F401 (bench)
                                 hash_sample, mirror_groups, nearest_pairs, pairs_from_file, test_prompt_texts)
from toolkit.cache.runtime import (FORMAT, PROBES, STATIC_DIR, embed_texts, probe_vectors,
                                   similarity_spec)
from toolkit.errors import OptkitError
from toolkit.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger("optkit.cache")

CACHE_JSON = "cache.json"
REPORT_JSON = "report.json"
CURVES_PNG = "curves.png"
FHR_DEFINITION = ("false-hit rate = P(label = 0 | similarity >= threshold): among queries served from the cache, "
                  "the fraction whose cached answer may not be reused")
HIT_RATE_DEFINITION = "hit rate = P(similarity >= threshold): fraction of all queries served from the cache"
BOUND_ON = {"realized": "false-hit share realized on a batch of {batch} lookups (exact beta-binomial predictive)",
            "rate": "long-run false-hit rate (Clopper-Pearson)",
            "audit": "upper bound an audit of a batch of {batch} lookups would state"}


def embed_cached(ctx, embedder, ref: str, texts: list[str], batch_size: int, embedding: str = "transformer") -> np.ndarray:
    """Embeddings, kept under work/ so an interrupted or re-run stage does not embed again."""
    from toolkit.models import model_revision

    key = hashlib.sha256("\n".join([ref, model_revision(ref), embedding, *texts]).encode()).hexdigest()[:20]
    path = ctx.work_dir / f"emb-{key}.npy"
    if path.is_file():
        vecs = np.load(path, allow_pickle=False)
        if vecs.shape[0] == len(texts):
            return vecs
    out = []
    with ctx.progress("embedding", len(texts)) as advance:
        for start in range(0, len(texts), 512):
            out.append(embed_texts(embedder, texts[start:start + 512], batch_size))
            advance(len(out[-1]))
    vecs = np.concatenate(out).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, vecs, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    return vecs


def static_embedder(ctx):
    """The router's static embedder (toolkit.route.static: distilled once per embedder into the optkit cache),
    copied into <cache dir>/cache-embedder/ so cache.json ships with the very vectors its threshold was tuned on."""
    import shutil

    from toolkit.route.runtime import StaticEmbedder
    from toolkit.route.static import TOKENIZER, VECTORS, cached_vectors

    src, dest = cached_vectors(ctx.config.embedder), ctx.dir / STATIC_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for name in (VECTORS, TOKENIZER):
        shutil.copy(src / name, dest / name)
    return StaticEmbedder(dest)


def split(pairs: Pairs, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibration / held-out by hash of the pair's two texts, unordered, and the seed (deterministic, order-free).
    Unordered: when A's nearest text is B and B's is A, both pairs have one similarity and one label, and split
    apart a quarter of the held-out check was calibration data again."""
    def key(a: int, b: int) -> str:
        return "\x00".join(sorted((pairs.texts[a], pairs.texts[b])))

    u = np.array([int(hashlib.sha256(f"split:{seed}:{key(a, b)}".encode()).hexdigest()[:8], 16) / 16 ** 8
                  for a, b in zip(pairs.query, pairs.cached)])
    held = u < holdout
    return np.nonzero(~held)[0], np.nonzero(held)[0]


# --------------------------------------------------------------------------------------------- save


def write_json(path: Path, obj) -> None:
    """Strict JSON (a NaN or infinity is a bug to fix at its source, never a token other parsers reject)."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False, default=_plain) + "\n")


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON data")


def plot_curves(path: Path, cal: dict, held: dict, sel: tune.Selection, f1_t: float, epsilon: float,
                what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, table, title in ((axes[0], cal, "calibration"), (axes[1], held, "held-out")):
        t = table["threshold"]
        ax.plot(t, table["precision"], label="precision")
        ax.plot(t, table["recall"], label="recall")
        ax.plot(t, table["hit_rate"], label="hit rate")
        ax.plot(t, table["fhr"], label="false-hit rate")
        if title == "calibration":
            ax.plot(t, table["fhr_upper"], "--", label="false-hit upper bound")
        ax.axhline(epsilon, color="grey", lw=0.8, ls=":")
        if sel.threshold is not None:
            ax.axvline(sel.threshold, color="black", lw=1, label=f"chosen t={sel.threshold:.3f}")
        ax.axvline(f1_t, color="red", lw=1, ls="-.", label=f"F1-optimal t={f1_t:.3f}")
        ax.set_title(f"{title} pairs (n={table['n']})")
        ax.set_xlabel(f"{what} threshold (serve if similarity >= t)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def log_curve(ctx, table: dict) -> None:
    for i, t in enumerate(table["threshold"]):
        ctx.log_metrics({f"curve.{k}": table[k][i] for k in ("threshold", "precision", "recall", "hit_rate",
                                                             "fhr", "fhr_upper")}, step=i)


# --------------------------------------------------------------------------------------------- run


def load_pairs(ctx, embedder) -> tuple[Pairs, np.ndarray]:
    """Pairs and the embeddings of their texts. The data is read and checked before the embedder is used, so
    bad input fails in a second, not after loading a model."""
    cfg, recipe = ctx.config, ctx.recipe
    if cfg.pairs_path:
        path = ctx.add_input(recipe.resolve_path(cfg.pairs_path))
        pairs = pairs_from_file(path, cfg, recipe.seed, test_prompt_texts(recipe))
        tune.check_inputs(np.zeros(len(pairs.labels)), pairs.labels, cfg.epsilon, cfg.confidence, pairs.source)
        return pairs, embed_cached(ctx, embedder(), cfg.embedder, pairs.texts, cfg.batch_size, cfg.embedding)
    if not cfg.group_column:
        raise OptkitError("cache: set cache.pairs_path (labeled pairs) or cache.group_column (build pairs from "
                          "groups of the recipe's data)")
    texts, groups, path, excluded = groups_from_data(recipe, cfg)
    ctx.add_input(path)
    vecs = embed_cached(ctx, embedder(), cfg.embedder, texts, cfg.batch_size, cfg.embedding)
    queries = hash_sample(texts, cfg.max_pairs, recipe.seed)
    cached, labels = nearest_pairs(vecs, groups, queries)
    return Pairs(texts, np.array(queries), cached, labels, f"{path} (nearest-neighbour pairs by "
                                                               f"'{cfg.group_column}', test split excluded)",
                 excluded, groups), vecs


def pair_fn(pairs: Pairs, vecs: np.ndarray) -> metric.PairFn:
    """(scores, labels, cached text rows) of pairs under a metric. Pairs built from groups are re-paired: the
    runtime serves the nearest entry under the metric it uses, so that is the pair its threshold must be set on."""
    def fn(weights, idx):
        q = pairs.query[idx]
        if pairs.groups is None or weights is None:  # a file's pairs are fixed; groups' were built by cosine
            cached, labels = pairs.cached[idx], pairs.labels[idx]
        else:
            cached, labels = nearest_pairs(vecs, pairs.groups, list(q), weights)
        return metric.scores(vecs[q], vecs[cached], weights), labels, cached
    return fn


@dataclass
class MetricChoice:
    weights: Optional[np.ndarray]  # None = the cosine
    calibration: tuple  # (scores, labels, cached text rows) of the calibration pairs; when learned, cross-fitted
    # and moved onto the final metric's scale (metric.crossfit_shift)
    selection: tune.Selection  # the threshold chosen on those scores: the promise
    cosine_selection: tune.Selection  # the cosine's, on the same calibration pairs
    report: dict


def choose_metric(cfg, seed: int, pairs: Pairs, vecs: np.ndarray, cal: np.ndarray,
                  batch_ratio: float) -> MetricChoice:
    """The similarity and its threshold. The calibration scores of a learned metric are cross-fitted, so the
    threshold chosen on them is not chosen on the fit's own optimism; auto keeps the learned metric only if those
    scores serve more calibration pairs within the bound than the cosine. They are then shifted onto the final
    metric's scale (metric.crossfit_shift), so the threshold serves at runtime the share it was certified for.
    `cfg`: the cache section (metric, epsilon, confidence, selection, bound)."""
    fn = pair_fn(pairs, vecs)
    args = (cfg.epsilon, cfg.confidence, cfg.selection, cfg.bound, batch_ratio)
    cosine = fn(None, cal)
    sel_cos = tune.select(*cosine[:2], *args)
    if cfg.metric == "cosine":
        return MetricChoice(None, cosine, sel_cos, sel_cos, {"kind": "cosine", "reason": "cache.metric: cosine"})
    qv, cv, y = vecs[pairs.query], vecs[pairs.cached], pairs.labels
    crossfit = metric.crossfit(qv, cv, y, cal, fn, seed, groups=mirror_groups(pairs.query[cal], pairs.cached[cal]))
    sel_fit = tune.select(*crossfit[:2], *args)
    served_cos = sel_cos.served if sel_cos.feasible else 0
    served_fit = sel_fit.served if sel_fit.feasible else 0
    learned = cfg.metric == "diagonal" or served_fit > served_cos
    why = ("cache.metric: diagonal" if cfg.metric == "diagonal" else
           f"auto: cross-fitted on the calibration pairs the learned metric serves {served_fit} of {len(cal)} "
           f"within the bound, the cosine {served_cos}")
    report = {"kind": "diagonal" if learned else "cosine", "reason": why,
              "calibration_served": {"cosine": served_cos, "diagonal_crossfit": served_fit},
              "lambda": metric.LAMBDA, "folds": metric.FOLDS}
    if not learned:
        return MetricChoice(None, cosine, sel_cos, sel_cos, report)
    weights = metric.fit(qv[cal], cv[cal], y[cal])
    report["weights"] = {"min": float(weights.min()), "max": float(weights.max()),
                         "zero": int((weights == 0).sum()), "dim": int(len(weights))}
    # The threshold is applied to the final metric's scores: move the cross-fitted ones onto their scale first
    # (a monotone shift: the same pairs are served and certified; only the threshold's value moves).
    shift = metric.crossfit_shift(crossfit[0], fn(weights, cal)[0], sel_fit.threshold)
    report["crossfit_shift"] = shift
    calibration = (crossfit[0] - shift, *crossfit[1:])
    return MetricChoice(weights, calibration, tune.select(*calibration[:2], *args), sel_cos, report)


@dataclass
class QueryChoice:
    gate: Optional[local.Gate]  # None = the global threshold stays (not fitted, or not better)
    report: dict


def choose_query_threshold(cfg, seed: int, pairs: Pairs, vecs: np.ndarray, cal: np.ndarray, choice: MetricChoice,
                           batch_ratio: float) -> QueryChoice:
    """cache.adaptive: query (toolkit/cache/local.py): a gate on the chosen similarity and the query's
    neighbourhood among the calibration queries, its threshold set with the same bound on cross-fitted gate
    scores. Exported only when those serve more calibration pairs within the bound than the global threshold;
    the held-out pairs never enter the decision."""
    s_cal, y_cal, c_cal = choice.calibration
    qids = pairs.query[cal]
    fold = fold_ids(len(cal), local.FOLDS, np.random.default_rng(seed), mirror_groups(qids, c_cal))
    served_global = choice.selection.served if choice.selection.feasible else 0
    entries = vecs[c_cal] if cfg.query_entry else None  # None: the query's features only
    report = {"features": list(local.FEATURES if cfg.query_entry else local.QUERY_FEATURES), "folds": local.FOLDS}
    try:
        oof = local.crossfit_scores(s_cal, vecs[qids], entries, y_cal, qids, c_cal, fold)
        sel = tune.select(oof, y_cal, cfg.epsilon, cfg.confidence, cfg.selection, cfg.bound, batch_ratio)
        gate = (local.fit(s_cal, vecs[qids], entries, y_cal, qids, c_cal, sel.threshold, choice.selection.threshold)
                if sel.feasible else None)
    except local.Unfit as exc:
        return QueryChoice(None, {**report, "exported": False, "reason": f"not exported: the gate cannot be fitted "
                                                                         f"({exc})"})
    served = sel.served if sel.feasible else 0
    better = gate is not None and served > served_global
    reason = (f"cross-fitted on the calibration pairs the query threshold serves {served} of {len(cal)} within "
              f"the bound, the global threshold {served_global}")
    report.update(exported=better, reason=("exported: " if better else "not exported: ") + reason,
                  calibration_served={"global": served_global, "query_crossfit": served},
                  certify=sel.to_dict())
    if gate is not None:
        report.update(offset=gate.offset, slopes=dict(zip(report["features"], gate.slopes.tolist())),
                      support=gate.support, fallback=gate.fallback)
    return QueryChoice(gate if better else None, report)


def run(ctx) -> dict:
    from toolkit.models import load_embedder, model_revision

    cfg = ctx.config
    loaded = []

    def embedder():
        if not loaded:
            loaded.append(static_embedder(ctx) if cfg.embedding == "static" else load_embedder(cfg.embedder))
        return loaded[0]

    pairs, vecs = load_pairs(ctx, embedder)
    pairs = drop_mirrors(pairs)  # a pair and its mirror are one observation: counted once by the bound
    embedder = embedder()
    cosine = metric.scores(vecs[pairs.query], vecs[pairs.cached], None)
    tune.check_inputs(cosine, pairs.labels, cfg.epsilon, cfg.confidence, pairs.source)
    cal, held = split(pairs, cfg.holdout, ctx.recipe.seed)
    if len(held) == 0 or len(cal) == 0:
        raise OptkitError(f"cache: {len(pairs.labels)} pairs are too few to split with cache.holdout={cfg.holdout}")
    tune.check_inputs(cosine[cal], pairs.labels[cal], cfg.epsilon, cfg.confidence, "calibration pairs")

    # The future batch of realized / audit bounds: the user's (cache.batch), else a held-out-sized one, so the
    # held-out check below tests exactly what was promised.
    batch = cfg.batch or len(held)
    batch_ratio = batch / len(cal)
    # The similarity (cosine or learned) and the global threshold on its scores: the promise. Every number below
    # is on those scores: calibration (cross-fitted when learned) and held-out pairs, the latter under the metric
    # finally exported.
    choice = choose_metric(cfg, ctx.recipe.seed, pairs, vecs, cal, batch_ratio)
    weights, (s_cal, y_cal, c_cal), sel, metric_report = (choice.weights, choice.calibration, choice.selection,
                                                          choice.report)
    fn = pair_fn(pairs, vecs)
    s_held, y_held, c_held = fn(weights, held)
    if not sel.feasible:
        log.warning("cache: no threshold has a false-hit upper bound <= %.3g on %d calibration pairs (best "
                    "achievable: %.3f at t=%.3f); exporting an exact-match-only cache", cfg.epsilon, sel.n,
                    sel.best_bound, sel.best_bound_threshold)
    held_eval = tune.evaluate(s_held, y_held, sel.threshold, cfg.confidence)
    threshold_ci = tune.bootstrap_threshold(s_cal, y_cal, cfg.epsilon, cfg.confidence, cfg.selection,
                                           cfg.bound, batch_ratio, seed=ctx.recipe.seed)
    served_ci = tune.interval(sel.false_hits, sel.served)

    # The F1-optimal threshold, only as a reference for how wrong the usual choice is.
    f1_t = tune.f1_threshold(s_cal, y_cal)
    f1_ref = {"threshold": f1_t, "calibration": tune.evaluate(s_cal, y_cal, f1_t, cfg.confidence),
              "heldout": tune.evaluate(s_held, y_held, f1_t, cfg.confidence)}
    hindsight = tune.hindsight_best(s_held, y_held, held_eval["fhr"])
    if weights is not None:  # what the plain cosine threshold would have done on the same held-out queries
        s_cos, y_cos, _ = fn(None, held)
        metric_report["heldout_cosine"] = tune.evaluate(s_cos, y_cos, choice.cosine_selection.threshold,
                                                        cfg.confidence)
        metric_report["heldout_cosine_hindsight_best"] = tune.hindsight_best(s_cos, y_cos, cfg.epsilon)

    limit = 1.0 if weights is None else float(np.max(weights))  # the similarity's range, as cachefile checks it
    adaptive = (_adaptive(ctx, (s_cal, y_cal, vecs[c_cal]), (s_held, y_held, vecs[c_held]), held_eval,
                          batch_ratio, limit, mirror_groups(pairs.query[cal], c_cal))
                if cfg.adaptive == "cluster" else None)
    query = (choose_query_threshold(cfg, ctx.recipe.seed, pairs, vecs, cal, choice, batch_ratio)
             if cfg.adaptive == "query" else None)
    if query is not None:  # the held-out check, every pair reading only what a runtime query could
        q_held = pairs.query[held]
        query.report["global_heldout_hit_rate"] = held_eval["hit_rate"]
        if query.gate is not None:
            skip = local.pair_skip(q_held, c_held, pairs.query[cal], c_cal)
            query.report["heldout"] = tune.rates(query.gate.served(s_held, vecs[q_held], vecs[c_held], skip), y_held,
                                                 cfg.confidence)
    stress_report = _stress(embedder, sel.threshold, weights) if cfg.stress else None

    report = {
        "definitions": {"similarity": similarity_spec(weights)["definition"] + " (higher = closer)", "false_hit_rate":
                        FHR_DEFINITION, "hit_rate": HIT_RATE_DEFINITION,
                        "bound": f"one-sided {cfg.confidence:.0%} upper bound from the calibration pairs on the "
                                 f"{BOUND_ON[cfg.bound].format(batch=batch)}; threshold search: {cfg.selection}"},
        "metric": metric_report,
        "pairs": {"source": pairs.source, "total": int(len(pairs.labels)), "positives": int(pairs.labels.sum()),
                  "calibration": int(len(cal)), "heldout": int(len(held)), "excluded": pairs.excluded},
        "selection": sel.to_dict(), "threshold_ci95_bootstrap": threshold_ci,
        "calibration_fhr_ci95": list(served_ci), "heldout": held_eval,
        "heldout_hindsight_best_static": hindsight, "f1_reference": f1_ref,
        "adaptive": adaptive, "query_threshold": query.report if query else None, "stress": stress_report,
        "curves": {"calibration": {**tune.curve_table(s_cal, y_cal, cfg.confidence), "n": int(len(cal))},
                   "heldout": {**tune.curve_table(s_held, y_held, cfg.confidence), "n": int(len(held))}},
    }
    metrics = {**_headline(sel, held_eval, f1_ref, adaptive), "metric_learned": int(weights is not None)}
    if query is not None:
        metrics["query_threshold_exported"] = int(query.gate is not None)
        if query.gate is not None:
            metrics.update(query_heldout_fhr=query.report["heldout"]["fhr"],
                           query_heldout_hit_rate=query.report["heldout"]["hit_rate"])
    cache_cfg = {
        "format": FORMAT,
        "embedder": {"model": cfg.embedder, "revision": model_revision(cfg.embedder), "dim": int(vecs.shape[1]),
                     "embedding": cfg.embedding, **({"files": STATIC_DIR} if cfg.embedding == "static" else {}),
                     "normalize": True, "probes": list(PROBES),
                     "probe_vectors": np.round(probe_vectors(embedder), 6).tolist()},
        "similarity": similarity_spec(weights), "false_hit_rate": FHR_DEFINITION,
        "threshold": sel.threshold, "feasible": sel.feasible, "epsilon": cfg.epsilon,
        "confidence": cfg.confidence, "bound": sel.bound, "bound_on": cfg.bound,
        "batch": batch if cfg.bound != "rate" else None, "selection": cfg.selection,
        "threshold_ci95": threshold_ci,
        "calibration": {"pairs": sel.n, "served": sel.served, "false_hits": sel.false_hits},
        "adaptive": (adaptive or {}).get("config"),
        "query_threshold": (local.spec(query.gate, local.save_reference(ctx.dir / local.REFERENCE_FILE, query.gate),
                                       query.report["reason"]) if query and query.gate is not None else None),
        "runtime": {"ttl_s": cfg.ttl_s, "max_entries": cfg.max_entries,
                    "max_entries_per_namespace": cfg.max_entries_per_namespace, "ann": cfg.ann,
                    "ann_min_entries": cfg.ann_min_entries},
        "metrics": metrics,
    }
    if adaptive:
        adaptive.pop("config", None)
    if cache_cfg["query_threshold"] is None:  # a re-run without the query threshold: no stale reference file
        (ctx.dir / local.REFERENCE_FILE).unlink(missing_ok=True)
    write_json(ctx.dir / REPORT_JSON, report)
    plot_curves(ctx.dir / CURVES_PNG, report["curves"]["calibration"], report["curves"]["heldout"], sel, f1_t,
                cfg.epsilon, "cosine similarity" if weights is None else "learned similarity (diagonal metric)")
    write_json(ctx.dir / CACHE_JSON, cache_cfg)  # last: its presence means the others are complete

    ctx.log_metrics(metrics)
    log_curve(ctx, report["curves"]["calibration"])
    for name in (CACHE_JSON, REPORT_JSON, CURVES_PNG):
        ctx.log_artifact(ctx.dir / name)
    ctx.extra["cache"] = {"threshold": sel.threshold, "feasible": sel.feasible, "pairs": int(len(pairs.labels))}
    return metrics


def _headline(sel: tune.Selection, held: dict, f1_ref: dict, adaptive: Optional[dict]) -> dict:
    m = {"feasible": int(sel.feasible), "calibration_pairs": sel.n,
         "bound": sel.bound if sel.feasible else sel.best_bound, "calibration_hit_rate": sel.hit_rate,
         "heldout_fhr": held["fhr"], "heldout_fhr_upper": held["fhr_upper"], "heldout_hit_rate": held["hit_rate"],
         "heldout_recall": held["recall"], "f1_threshold": f1_ref["threshold"],
         "f1_heldout_fhr": f1_ref["heldout"]["fhr"], "f1_heldout_hit_rate": f1_ref["heldout"]["hit_rate"]}
    if sel.feasible:  # no NaN placeholders: an infeasible run simply has no threshold
        m.update(threshold=sel.threshold, calibration_fhr=sel.fhr)
    if adaptive:
        m.update(adaptive_exported=int(adaptive["exported"]), adaptive_heldout_fhr=adaptive["heldout"]["fhr"],
                 adaptive_heldout_hit_rate=adaptive["heldout"]["hit_rate"])
    return m


def _adaptive(ctx, cal: tuple, held: tuple, global_held: dict, ratio: float, limit: float,
              groups: Optional[np.ndarray]) -> dict:
    """Per-cluster thresholds, exported only when they beat the global threshold on the calibration pairs
    (cross-fitted: adaptive.decide). The held-out pairs never enter the decision, so their check below stays
    an independent report of whatever was exported."""
    from toolkit.cache import adaptive

    cfg = ctx.config
    try:
        res = adaptive.calibrate(*cal, cfg.epsilon, cfg.confidence, cfg.clusters, ctx.recipe.seed, cfg.selection,
                                 cfg.bound, ratio, limit=limit, groups=groups)
    except adaptive.Unfit as exc:
        raise OptkitError(f"cache.adaptive: cluster: per-cluster curves cannot be fitted on half of the "
                          f"{len(cal[0])} calibration pairs ({exc}); lower cache.clusters or set cache.adaptive: "
                          "none") from None
    decision = adaptive.decide(*cal, cfg.epsilon, cfg.confidence, cfg.clusters, ctx.recipe.seed, cfg.selection,
                               cfg.bound, ratio, limit=limit, groups=groups)
    exported = bool(res.selection.feasible and decision["exported"])
    reason = decision["reason"] if res.selection.feasible else "not exported: no tau met the bound"
    held_eval = tune.rates(res.served(held[0], held[2]), held[1], cfg.confidence)
    config = {**res.export(), "exported": exported}
    return {"exported": exported, "reason": reason, "clusters": len(res.thresholds),
            "decision": {k: v for k, v in decision.items() if k not in ("exported", "reason")},
            "heldout": held_eval, "global_heldout_hit_rate": global_held["hit_rate"],
            "certify": res.selection.to_dict(), "thresholds": res.thresholds, "config": config}


def _stress(embedder, threshold: Optional[float], weights: Optional[np.ndarray]) -> dict:
    rows = stress.pairs()
    a = embed_texts(embedder, [r["query"] for r in rows])
    b = embed_texts(embedder, [r["cached_query"] for r in rows])
    return stress.report(metric.scores(a, b, weights), threshold)
