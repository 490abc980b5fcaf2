"""The route stage: labels -> features -> fit -> calibrate -> report -> save router.json + router.safetensors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np

from toolkit.errors import OptkitError
from toolkit.io import atomic_write_bytes, atomic_write_json, finite_or_null, write_jsonl
from toolkit.route import labels as L
from toolkit.route.calibrate import calibrate, check_enough
from toolkit.route.models import contiguous
from toolkit.route.report import build_report, plot_curves
from toolkit.route.spec import check_router, threshold_bound
from toolkit.route.runtime import FORMAT_VERSION, ROUTER_JSON, ROUTER_WEIGHTS, TEXT_FEATURES, Router, text_features

log = logging.getLogger("optkit.route")


def run(ctx) -> dict:
    cfg, recipe = ctx.config, ctx.recipe
    # --- setup: labels and costs
    table, source = _labels(ctx)
    costs, strong = resolve_costs(cfg, recipe, table.models, default_strong=L.TEACHER if source == "pipeline" else None)
    s_idx = table.models.index(strong)
    L.check_learnable(table, s_idx)
    check_enough(len(table.select("cal")), cfg.target)
    cost_norm = normalized(costs, table.models)

    # --- features (embeddings cached in work/ so an interrupted run does not embed twice)
    emb = embed_cached(cfg, table.prompts, ctx.work_dir)
    raw = _raw_features(cfg, table.prompts, emb)
    fit_idx, cal_idx, test_idx = table.select("fit"), table.select("cal"), table.select("test")
    mean, scale = standardizer(raw[fit_idx])
    x = ((raw - mean) / scale).astype(np.float32)

    # --- choose the router model by cross-validation on `fit` (never worse than its baselines), fit it there
    from toolkit.route.select import cross_validate, fit_candidate

    selection = cross_validate(x[fit_idx], emb[fit_idx], table.scores[fit_idx], cost_norm, s_idx, cfg, recipe.seed)
    chosen = selection["chosen"]
    log.info("route: exporting %s (%s)", chosen, selection["reason"])
    head, weights = fit_candidate(chosen, x[fit_idx], emb[fit_idx], table.scores[fit_idx], cfg, recipe.seed)
    spec = router_spec(cfg, table, costs, cost_norm, strong, head)
    spec["model"], spec["selection"] = chosen, selection
    weights = {"feat.mean": mean, "feat.scale": scale, **{f"head.{k}": v for k, v in weights.items()}}
    guard_flags = _fit_guard(cfg, spec, weights, table.prompts, emb, fit_idx, cal_idx, recipe.seed)
    router = Router(spec, weights)
    P = router.predict_from_features(x, emb)
    cal = _calibrate(P[cal_idx], table.scores[cal_idx], cost_norm, s_idx, cfg.target, chosen)
    spec["threshold"] = router.threshold = cal.threshold
    spec["calibration"] = {**cal.as_dict(), "data_sha256": table.digest("cal"), "fit_data_sha256": table.digest("fit")}
    log.info("route: threshold %.4g (%s)", cal.threshold, cal.as_dict())

    report = build_report(table, P, cost_norm, s_idx, cal, cfg, test_idx, raw_lengths=raw_lengths(table.prompts),
                          seed=recipe.seed)
    report["selection"] = selection
    report["router"]["model"] = chosen
    if guard_flags is not None:
        report["shift"] = _shift_section(ctx, cfg, router, table, P, guard_flags, cost_norm, s_idx, test_idx)
        spec["shift"]["report"] = {k: v for k, v in report["shift"].items() if k != "reading"}
        if router.shift_guard.action == "strong":  # what the runtime pays: flagged prompts go to the strong model
            report["at_threshold"]["with_shift_guard"] = report["shift"]["in_domain"]["with_guard"]
    spec["metrics"] = report["router"]
    if cfg.mode == "cascade":  # the student answers first; its confidence decides (toolkit/route/cascade.py)
        from toolkit.route.cascade import run_cascade

        report["cascade"] = run_cascade(ctx, table, s_idx, costs, _runtime_at(report))
    else:  # a cascade file left by an earlier cascade-mode run must not ship with this router
        for name in ("cascade.json", "cascade_confidence.jsonl"):
            (ctx.dir / name).unlink(missing_ok=True)

    # --- save
    if cfg.embedding == "static":  # the router directory carries its own embedder
        import shutil

        from toolkit.route.static import cached_vectors

        for name in spec["features"]["static_files"]:
            shutil.copy(cached_vectors(cfg.embedder) / name, ctx.dir / name)
    save_router(ctx.dir, spec, router.weights)
    atomic_write_json(ctx.dir / "report.json", report)
    write_jsonl(ctx.dir / "labels.jsonl", table.rows())
    png = plot_curves(report, ctx.dir / "curve.png")
    _log(ctx, report, png)
    ctx.extra["route"] = {"models": table.models, "strong": strong, "threshold": cal.threshold, "model": chosen,
                          "labels": source, "n": {p: int((table.part == p).sum()) for p in ("fit", "cal", "test")}}
    return _headline(report, cal)


def _calibrate(P, S, cost_norm, s_idx, target, chosen: str):
    """calibrate(); a `constant` router (no routing signal won the selection) that cannot meet the goal by
    always taking the cheapest model is exported as always-strong instead of failing."""
    try:
        return calibrate(P, S, cost_norm, s_idx, target)
    except OptkitError:
        if chosen != "constant":
            raise
    from toolkit.route.calibrate import Calibration

    lam = float((P[:, s_idx] - P[:, 1 - s_idx]).min() - 1.0) if P.shape[1] == 2 else -1e3
    lam = max(lam, -threshold_bound(cost_norm.tolist()))
    return Calibration(lam, "min_quality", target.min_quality, target.confidence, len(P), 1.0, 1.0, 1.0, 1.0,
                       notes=["no router beat the constant baseline and always-weak misses the goal: every prompt "
                              "goes to the strong model"], eval_size=target.eval_size or len(P))


def _fit_guard(cfg, spec: dict, weights: dict, prompts: list[str], emb: np.ndarray, fit_idx, cal_idx, seed: int):
    """Calibrate the shift guard (reference = fit prompts, conformal threshold on cal prompts) into spec and
    weights; returns its verdict on every labeled prompt, or None when it is off or cannot be calibrated."""
    if not cfg.shift.enabled:
        return None
    from toolkit.route.shift import ShiftGuard, fit_guard

    t = text_features(prompts) if cfg.text_features else None
    shift_spec, tensors = fit_guard(emb[fit_idx], emb[cal_idx], cfg.shift, seed, None if t is None else t[fit_idx],
                                    None if t is None else t[cal_idx])
    if shift_spec is None:
        log.warning("route.shift: %d calibration prompts are too few to flag at alpha=%g (need >= %d); no guard",
                    len(cal_idx), cfg.shift.alpha, int(np.ceil(1 / cfg.shift.alpha)) - 1)
        spec["selection"]["shift_note"] = (f"no shift guard: {len(cal_idx)} calibration prompts are too few for "
                                           f"route.shift.alpha={cfg.shift.alpha:g}")
        return None
    spec["shift"] = shift_spec
    weights.update(tensors)
    return ShiftGuard(shift_spec, tensors).flags(prompts, emb)


def _shift_section(ctx, cfg, router, table, P, flags, cost_norm, s_idx, test_idx) -> dict:
    """The guard on the held-out test part (in domain) and on route.shift.eval_path (shifted) when given."""
    from toolkit.route.shift_report import effect, eval_set

    g = router.shift_guard
    goal = cfg.target.min_quality
    out = {"reading": router.spec["shift"]["reading"], "threshold": g.threshold, "alpha": cfg.shift.alpha,
           "action": g.action, "in_domain": effect(P[test_idx], table.scores[test_idx], flags[test_idx], cost_norm,
                                                   s_idx, router.threshold, g.action, goal)}
    if cfg.shift.eval_path:
        prompts, S, path = eval_set(ctx, cfg, table.models)
        emb = embed_cached(cfg, prompts)
        x, _ = router.features(prompts, emb)
        flags = g.flags(prompts, emb)
        out["shifted"] = {"path": path, **effect(router.predict_from_features(x, emb), S, flags, cost_norm, s_idx,
                                                 router.threshold, g.action, goal)}
    return out


def _labels(ctx) -> tuple[L.LabelTable, str]:
    cfg = ctx.config
    if cfg.labels.source == "file":
        table, path = L.from_file(cfg, ctx.recipe, ctx.recipe.seed)
        ctx.add_input(path)
        return table, "file"
    if ctx.recipe.collect is None or ctx.recipe.distill is None:
        raise OptkitError("route.labels.source=pipeline needs the collect and distill sections in the recipe "
                          "(or use route.labels.source=file)")
    from toolkit.route.label_prompts import extra_records

    extra = extra_records(ctx)  # route.label_prompts: more labeled prompts (teacher + student answers, cached)
    ctx.extra["label_prompts"] = len(extra)
    return L.from_pipeline(cfg, ctx.upstream("collect"), ctx.upstream("distill"), ctx.recipe.seed, extra), "pipeline"


def resolve_costs(cfg, recipe, models: list[str], default_strong: Optional[str] = None) -> tuple[dict, str]:
    """Per-model relative cost and the strong model's name; unknown or missing names are errors."""
    if cfg.strong is not None and cfg.strong not in models:
        raise OptkitError(f"route.strong: unknown model '{cfg.strong}' (models: {', '.join(models)})")
    if cfg.costs:
        for name in cfg.costs:
            if name not in models:
                raise OptkitError(f"route.costs.{name}: unknown model '{name}' (models: {', '.join(models)})")
        missing = [m for m in models if m not in cfg.costs]
        if missing:
            raise OptkitError(f"route.costs: no cost for model(s) {', '.join(missing)}")
        costs = {m: float(cfg.costs[m]) for m in models}
    elif all(m in recipe.pricing for m in models) and any(
            recipe.pricing[m].input_per_1m + recipe.pricing[m].output_per_1m > 0 for m in models):
        costs = {m: recipe.pricing[m].input_per_1m + recipe.pricing[m].output_per_1m for m in models}
    elif len(models) == 2 and (cfg.strong or default_strong):
        strong = cfg.strong or default_strong
        costs = {m: float(m == strong) for m in models}
    else:
        raise OptkitError("route.costs: give every model a relative cost (or route.strong, for two models)")
    strong = cfg.strong or max(models, key=lambda m: costs[m])
    if costs[strong] <= min(costs.values()) and len(set(costs.values())) == 1:
        raise OptkitError("route.costs: every model costs the same; there is nothing to save by routing")
    if costs[strong] < max(costs.values()):
        raise OptkitError(f"route.strong: '{strong}' is not the costliest model ({costs})")
    return costs, strong


def normalized(costs: dict, models: list[str]) -> np.ndarray:
    c = np.array([costs[m] for m in models], dtype=np.float64)
    return (c - c.min()) / (c.max() - c.min())


def embed_cached(cfg, prompts: list[str], work_dir: Optional[Path] = None) -> np.ndarray:
    """Unit-norm embeddings [n, dim] float32, cached across runs per (embedder, revision, truncation, text)
    in the optkit cache (toolkit/route/embcache.py). `work_dir` is unused (kept for callers)."""
    from toolkit.models import load_embedder, model_revision, set_truncation

    if cfg.embedding == "static":  # fast enough to need no cache; the vectors themselves are cached
        from toolkit.route.runtime import StaticEmbedder
        from toolkit.route.static import cached_vectors

        return StaticEmbedder(cached_vectors(cfg.embedder)).encode(prompts)
    from toolkit.route.embcache import cached_embed

    def encode(texts: list[str]) -> np.ndarray:
        model = load_embedder(cfg.embedder)
        set_truncation(model, cfg.max_seq_length, "route.max_seq_length")
        return model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False)

    return cached_embed(prompts, encode, cfg.embedder, model_revision(cfg.embedder), cfg.max_seq_length)


def _raw_features(cfg, prompts: list[str], emb: np.ndarray) -> np.ndarray:
    return np.concatenate([emb, text_features(prompts)], axis=1) if cfg.text_features else emb


def raw_lengths(prompts: list[str]) -> np.ndarray:
    return np.array([len(p) for p in prompts], dtype=np.float64)


def standardizer(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0).astype(np.float32)
    scale = x.std(0).astype(np.float32)
    scale[scale < 1e-6] = 1.0  # constant columns (e.g. no prompt has code) stay as they are
    return mean, scale


def router_spec(cfg, table: L.LabelTable, costs: dict, cost_norm: np.ndarray, strong: str, head: str) -> dict:
    from toolkit.models import model_revision

    return {
        "format_version": FORMAT_VERSION,
        "models": table.models,
        "strong": strong,
        "costs": costs,
        "cost_norm": cost_norm.tolist(),
        "threshold": None,
        "threshold_units": ("predicted quality gain of the strong model over the other (score units); route "
                            "strong iff score >= threshold" if len(table.models) == 2 else
                            "predicted quality per unit of normalized cost; choose argmax(quality - threshold * "
                            "cost_norm)"),
        "quality_units": "per-prompt score in [0, 1] (mean = accuracy for 0/1 labels)",
        "model": cfg.model,
        "head": head,
        "knn_weights": "distance",
        "features": {"embedder": cfg.embedder, "embedder_revision": model_revision(cfg.embedder),
                     "embedding": cfg.embedding,
                     "static_files": ["static_embedder.safetensors", "tokenizer.json"] if cfg.embedding == "static"
                     else [],
                     "max_seq_length": cfg.max_seq_length, "normalize_embeddings": True, "dim": None,
                     "text_features": cfg.text_features,
                     "text_feature_names": list(TEXT_FEATURES) if cfg.text_features else [],
                     "order": ["embedding"] + (["text"] if cfg.text_features else []),
                     "scaling": "(x - feat.mean) / feat.scale, fit on the training part"},
        "labels": {"source": cfg.labels.source, "metric": cfg.labels.metric if cfg.labels.source == "pipeline"
                   else None, "n": {p: int((table.part == p).sum()) for p in ("fit", "cal", "test")}},
    }


def save_router(directory: Path, spec: dict, weights: dict[str, np.ndarray]) -> None:
    """router.safetensors (C-contiguous arrays) + router.json. The weights go first: a router.json present
    means its weights file is complete."""
    from safetensors.numpy import save

    weights = contiguous(weights)
    spec = dict(spec)
    spec["features"] = {**spec["features"], "dim": int(weights["feat.mean"].shape[0])}
    spec["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in weights.items()}
    check_router(finite_or_null(spec), weights, Path(directory) / ROUTER_JSON)  # never write what load refuses
    atomic_write_bytes(Path(directory) / ROUTER_WEIGHTS, save(weights))
    atomic_write_json(Path(directory) / ROUTER_JSON, spec)


def _log(ctx, report: dict, png: Path) -> None:
    for i, (x, q) in enumerate(zip(report["curve"]["router"]["x"], report["curve"]["router"]["quality"])):
        ctx.log_metrics({"curve_quality": q, "curve_strong_pct": 100 * x}, step=i)
    ctx.log_artifact(png)
    ctx.log_artifact(ctx.dir / "report.json")
    ctx.log_artifact(ctx.dir / ROUTER_JSON)


def _runtime_at(report: dict) -> dict:
    """The router's test figures as the runtime routes: with the shift guard's escalations when it acts."""
    at = report["at_threshold"]
    if "with_shift_guard" not in at:
        return at
    alone = {k: v for k, v in at.items() if k not in ("model_share", "with_shift_guard")}  # shares: router alone
    return {**alone, **at["with_shift_guard"], "shift_guard": "included"}


def _headline(report: dict, cal) -> dict:
    r, at = report["router"], _runtime_at(report)
    out = {"apgr": r["apgr"], "cpt50": r["cpt50"], "cpt80": r["cpt80"], "threshold": cal.threshold,
           "test_quality_ratio": at["quality_ratio"], "test_strong_fraction": at["strong_fraction"],
           "test_cost": at["cost"]}
    if "with_shift_guard" in report["at_threshold"]:  # the router alone, without the guard's escalations
        out["test_cost_without_guard"] = report["at_threshold"]["cost"]
    if "bootstrap" in report:
        out["guarantee_holds_fraction"] = report["bootstrap"]["holds_fraction"]
    if "cascade" in report and "test" in report["cascade"]:  # route.mode = cascade, beside the router's test_*
        c = report["cascade"]["test"]
        out.update(cascade_threshold=report["cascade"]["threshold"], cascade_test_quality_ratio=c["quality_ratio"],
                   cascade_test_escalation_fraction=c["escalation_fraction"], cascade_test_cost=c["cost"])
    if "shift" in report:
        out["shift_flagged_test"] = report["shift"]["in_domain"]["flagged"]
        if "shifted" in report["shift"]:
            out["shift_flagged_eval"] = report["shift"]["shifted"]["flagged"]
    return {k: v for k, v in out.items() if v is not None}
