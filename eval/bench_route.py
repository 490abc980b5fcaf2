"""Benchmark of the route stage on real routing labels (RouteLLM's MMLU: Mixtral-8x7B vs GPT-4-1106 correctness).

    python eval/bench_route.py [--data ../shared/data/routing_routellm/mmlu_routing_10k.jsonl] [--models logreg,knn]

Splits the 10k labeled prompts by hash into fit / calibration / held-out, trains each router model with the
shipped stage code, calibrates the threshold for "keep >= X of GPT-4's quality at 95% confidence", and reports
on the held-out part: APGR, CPT(50%), CPT(80%), cost at the target vs the baselines (random, always-weak,
always-strong, prompt length, oracle); whether the quality guarantee holds under bootstrap; and latency of the
numpy runtime (classifier alone, embed + classify one query, batched throughput); the model selection
(route.select: cross-validated APGR on the fit part vs the length / constant baselines); and the shift table
(held-out MMLU vs GSM8K word problems, strong calls and quality ratio with and without the shift guard):
    python eval/bench_route.py --models logreg,knn --bootstrap 200 --latency-queries 50 \
        --embedding transformer --out eval/results/bench_route_shift_transformer   (and --embedding static)
Results go to eval/results/route_mmlu.{json,md} by default. Timings on a shared machine are noisy: rerun before quoting them.

Cascade vs pre-generation router (the MMLU labels carry no student log-probs, so this row is measured on a pipeline
run whose route stage ran with route.mode=cascade: its labels, the student's answer confidences and its router):
    python eval/bench_route.py --cascade-run RUN_DIR --out eval/results/bench_route_cascade_quickstart
Both are calibrated on the run's calibration part for the same goals and measured on its test part.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "../shared/data/routing_routellm/mmlu_routing_10k.jsonl"))
    p.add_argument("--models", default="logreg,mlp,knn,mf")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--calibration", type=float, default=0.25, help="share of the non-held-out prompts")
    p.add_argument("--min-quality", type=float, default=0.95)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--embedding", choices=["transformer", "static"], default="transformer",
                   help="static = MiniLM distilled into token vectors (toolkit/route/static.py)")
    p.add_argument("--eval-size", type=int, default=None,
                   help="route.target.eval_size: the batch the realized-quality guarantee is for (default: held-out size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--latency-queries", type=int, default=300)
    p.add_argument("--shift-data", default=str(ROOT / "../shared/data/routing_routellm/gsm8k_test_first500_routing.jsonl"),
                   help="out-of-distribution labeled set for the shift table ('' = skip)")
    p.add_argument("--alpha", type=float, default=0.01, help="route.shift.alpha")
    p.add_argument("--select", default="logreg,knn,length,constant",
                   help="model-selection candidates (cross-validated APGR on the fit part; '' = skip)")
    p.add_argument("--cache", default=str(Path.home() / ".cache/optkit/bench_route"))
    p.add_argument("--out", default=str(ROOT / "eval/results/route_mmlu"))
    p.add_argument("--cascade-run", default=None, help="a run dir whose route stage ran in cascade mode: measure "
                   "cascade vs router there (and nothing else)")
    p.add_argument("--cascade-goals", default="min_quality=0.9,min_quality=0.95,max_strong_fraction=0.5",
                   help="calibration goals compared (route.target)")
    return p.parse_args()


def cascade_table(args) -> dict:
    """Cascade (student answers, escalates below a confidence threshold) vs the run's router, each calibrated on
    the run's calibration prompts for the same goal, measured on its test prompts."""
    from toolkit.config import RouteTargetConfig
    from toolkit.errors import OptkitError
    from toolkit.io import read_jsonl
    from toolkit.route.calibrate import calibrate
    from toolkit.route.cascade import CONFIDENCE_JSONL, at_threshold, calibrate_cascade
    from toolkit.route.runtime import Router, decide

    route_dir = Path(args.cascade_run) / "route"
    router = Router.load(route_dir)
    conf = {r["id"]: (-np.inf if r["confidence"] is None else r["confidence"])
            for r in read_jsonl(route_dir / CONFIDENCE_JSONL)}
    rows = [r for r in read_jsonl(route_dir / "labels.jsonl") if r["part"] in ("cal", "test")]
    s_idx, costs, cost_norm = router.models.index(router.strong), router.costs, np.asarray(router.spec["cost_norm"])
    parts = {}
    for part in ("cal", "test"):
        sel = [r for r in rows if r["part"] == part]
        S = np.array([[r["scores"][m] for m in router.models] for r in sel])
        parts[part] = (S, np.array([conf[r["id"]] for r in sel]), router.predict_quality([r["prompt"] for r in sel]))
    w = 1 - s_idx
    c_weak, c_strong = costs[router.models[w]], costs[router.models[s_idx]]
    out = {"run": f"run '{Path(args.cascade_run).name}' (its recipe.yaml, route.mode=cascade)", "models": router.models, "strong": router.strong, "costs": costs,
           "confidence": json.loads((route_dir / "cascade.json").read_text())["confidence"],
           "n": {p: int(len(v[0])) for p, v in parts.items()}, "goals": {}}
    (S_c, conf_c, P_c), (S_t, conf_t, P_t) = parts["cal"], parts["test"]
    for goal in args.cascade_goals.split(","):
        key, value = goal.split("=")
        target = RouteTargetConfig(**{key: float(value)})
        row = {}
        try:
            t = calibrate(P_c, S_c, cost_norm, s_idx, target).threshold
            strong = decide(P_t, cost_norm, t) == s_idx
            q = np.where(strong, S_t[:, s_idx], S_t[:, w])
            row["router"] = {"strong_fraction": float(strong.mean()), "quality_ratio": float(q.mean() / S_t[:, s_idx].mean()),
                             "cost_per_query": float(c_weak * (1 - strong.mean()) + c_strong * strong.mean())}
        except OptkitError as exc:
            row["router"] = {"infeasible": str(exc)[:200]}
        try:
            t = calibrate_cascade(conf_c, S_c, s_idx, target)[0]
            c = at_threshold(conf_t, S_t, s_idx, t, costs, router.models)
            row["cascade"] = {"strong_fraction": c["escalation_fraction"], "quality_ratio": c["quality_ratio"],
                              "cost_per_query": c["cost_per_query"]}
        except OptkitError as exc:
            row["cascade"] = {"infeasible": str(exc)[:200]}
        out["goals"][goal] = row
    out["always_weak_quality_ratio"] = float(S_t[:, w].mean() / S_t[:, s_idx].mean())
    return out


def cascade_markdown(r: dict) -> str:
    weak = [m for m in r["models"] if m != r["strong"]][0]
    lines = [f"# Cascade vs pre-generation router: {r['run']}", "",
             f"Calibrated on {r['n']['cal']} calibration prompts, measured on {r['n']['test']} test prompts "
             f"(small: a few prompts move each figure by ~1%). Cascade: {weak} answers every prompt, escalates to "
             f"{r['strong']} when its answer's {r['confidence']} is below the calibrated threshold (cost = {weak} "
             f"always + {r['strong']} on escalations); router: decides from the prompt before any generation. "
             f"Costs per query: {r['costs']}. Always-{weak} quality ratio on test: {r['always_weak_quality_ratio']:.3f}.",
             "", "| goal | router: strong calls | router: quality ratio | router: cost/query | cascade: escalations | "
             "cascade: quality ratio | cascade: cost/query |", "|---|---|---|---|---|---|---|"]
    for goal, row in r["goals"].items():
        cells = []
        for kind in ("router", "cascade"):
            m = row[kind]
            cells += (["infeasible", "", ""] if "infeasible" in m else
                      [_f(m["strong_fraction"], 1), _f(m["quality_ratio"]), f"{m['cost_per_query']:.4g}"])
        lines.append(f"| {goal} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load(path: str):
    from toolkit.io import read_jsonl

    rows = read_jsonl(Path(path))
    prompts = [r["prompt"] for r in rows]
    S = np.array([[float(r["mixtral_8x7b_correct"]), float(r["gpt4_1106_correct"])] for r in rows])
    return rows, prompts, S


def config(args, model: str):
    from toolkit.config import RouteConfig

    return RouteConfig.model_validate({
        "labels": {"source": "file", "path": args.data, "score_columns": {"mixtral_8x7b": "mixtral_8x7b_correct",
                                                                          "gpt4_1106": "gpt4_1106_correct"}},
        "model": model, "k": args.k, "embedding": args.embedding, "costs": {"mixtral_8x7b": 0.05, "gpt4_1106": 1.0},
        "target": {"min_quality": args.min_quality, "confidence": args.confidence, "eval_size": args.eval_size},
        "holdout": args.holdout, "calibration": args.calibration, "bootstrap": args.bootstrap})


def coverage(P: np.ndarray, S: np.ndarray, cost_norm, strong: int, cfg, resamples: int, seed: int) -> dict:
    """Does the calibration procedure keep its promise? Treat the held-out set as the population: calibrate
    on a bootstrap resample of it, then check the chosen threshold's quality on the whole held-out set.
    A valid 95% bound holds on >= 95% of resamples."""
    from toolkit.errors import OptkitError
    from toolkit.route.calibrate import calibrate
    from toolkit.route.runtime import decide

    rng = np.random.default_rng(seed)
    n, ok, costs = len(P), 0, []
    rows = np.arange(n)
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        try:
            cal = calibrate(P[idx], S[idx], cost_norm, strong, cfg.target)
            choice = decide(P, cost_norm, cal.threshold)
        except OptkitError:  # infeasible on this resample: the router falls back to always-strong
            choice = np.full(n, strong)
        ratio = S[rows, choice].mean() / S[:, strong].mean()
        ok += ratio >= cfg.target.min_quality
        costs.append(cost_norm[choice].mean())
    return {"resamples": resamples, "holds_fraction": ok / resamples, "mean_cost": float(np.mean(costs))}


def shift_table(args, routers: dict, prompts, emb, x, S, fit, cal_i, test, cost_norm) -> dict:
    """Per router: in-domain (held-out MMLU) and shifted (GSM8K) strong-call share and quality ratio, with and
    without the shift guard calibrated on the fit / calibration parts (toolkit/route/shift.py)."""
    from toolkit.config.route import RouteShiftConfig
    from toolkit.io import read_jsonl
    from toolkit.route.shift import ShiftGuard, fit_guard
    from toolkit.route.shift_report import effect
    from toolkit.route.stage import embed_cached
    from toolkit.route.runtime import text_features

    rows = read_jsonl(Path(args.shift_data))
    g_prompts = [r["question"] for r in rows]
    g_S = np.array([[float(r["mixtral_8x7b_correct"]), float(r["gpt4_1106_correct"])] for r in rows])
    cfg0 = config(args, "logreg")
    g_emb = embed_cached(cfg0, g_prompts)
    t, g_t = text_features(prompts), text_features(g_prompts)
    shift_cfg = RouteShiftConfig(alpha=args.alpha)
    spec, tensors = fit_guard(emb[fit], emb[cal_i], shift_cfg, args.seed, t[fit], t[cal_i])
    guard = ShiftGuard(spec, tensors)
    flags_in, flags_out = guard.flags([prompts[i] for i in test], emb[test]), guard.flags(g_prompts, g_emb)
    out = {"guard": spec, "n_shifted": len(rows), "routers": {}}
    for name, router in routers.items():
        g_x, _ = router.features(g_prompts, g_emb)
        out["routers"][name] = {
            "in_domain": effect(router.predict_from_features(x[test], emb[test]), S[test], flags_in, cost_norm, 1,
                                router.threshold, "strong", args.min_quality),
            "shifted": effect(router.predict_from_features(g_x, g_emb), g_S, flags_out, cost_norm, 1,
                              router.threshold, "strong", args.min_quality)}
    return out


def classifier_latency(router, x: np.ndarray, emb: np.ndarray, reps: int = 2000) -> dict:
    """One query's precomputed features -> model name, timed one by one."""
    from toolkit.route.runtime import decide

    cost_norm = np.asarray(router.spec["cost_norm"])
    t = []
    for i in range(reps):
        j = i % len(x)
        t0 = time.perf_counter()
        P = router.predict_from_features(x[j:j + 1], emb[j:j + 1])
        router.models[decide(P, cost_norm, router.threshold)[0]]
        t.append(time.perf_counter() - t0)
    us = 1e6 * np.asarray(t)
    return {"p50": float(np.median(us)), "p99": float(np.quantile(us, 0.99))}


def latency(router, prompts: list[str], x: np.ndarray, emb: np.ndarray, n_queries: int) -> dict:
    cls = classifier_latency(router, x, emb)
    router.route(prompts[0])  # warm-up: loads the embedder
    t_one = []
    for p in prompts[:n_queries]:
        t0 = time.perf_counter()
        router.route(p)
        t_one.append(time.perf_counter() - t0)
    batch = prompts[:max(n_queries, 512)]
    t0 = time.perf_counter()
    router.route_batch(batch)
    qps = len(batch) / (time.perf_counter() - t0)
    ms = 1e3 * np.asarray(t_one)
    return {"classifier_us_p50": cls["p50"], "classifier_us_p99": cls["p99"],
            "one_query_ms_p50": float(np.median(ms)), "one_query_ms_p99": float(np.quantile(ms, 0.99)),
            "one_query_mean_chars": float(np.mean([len(p) for p in prompts[:n_queries]])),
            "batched_qps": float(qps), "batched_n": len(batch)}


def main() -> None:
    args = parse_args()
    if args.cascade_run:
        res = cascade_table(args)
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(res, indent=2, allow_nan=False) + "\n")
        out.with_suffix(".md").write_text(cascade_markdown(res))
        print(cascade_markdown(res))
        return
    import torch

    torch.set_num_threads(args.threads)
    from toolkit.route import labels as L
    from toolkit.route.calibrate import calibrate
    from toolkit.route.models import FITTERS
    from toolkit.route.report import build_report, plot_curves
    from toolkit.route.runtime import Router
    from toolkit.route.stage import (embed_cached, normalized, raw_lengths, router_spec, save_router,
                                     standardizer, text_features)

    rows, prompts, S = load(args.data)
    models = ["mixtral_8x7b", "gpt4_1106"]
    cfg0 = config(args, "logreg")
    part = np.array([L._assign(r["id"], cfg0, args.seed) for r in rows], dtype=object)
    table = L.LabelTable([r["id"] for r in rows], prompts, S, models, part)
    fit, cal_i, test = table.select("fit"), table.select("cal"), table.select("test")
    print(f"{len(rows)} prompts: fit {len(fit)}, calibration {len(cal_i)}, held-out {len(test)}", flush=True)
    args.eval_size = args.eval_size or len(test)  # the guarantee is checked on a held-out batch of this size

    t0 = time.time()
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    emb = embed_cached(cfg0, prompts, Path(args.cache))
    print(f"embeddings {emb.shape} in {time.time() - t0:.0f}s (cached in {args.cache})", flush=True)
    raw = np.concatenate([emb, text_features(prompts)], axis=1)
    mean, scale = standardizer(raw[fit])
    x = ((raw - mean) / scale).astype(np.float32)
    cost_norm = normalized(cfg0.costs, models)
    strong = 1

    results, best, routers = {}, None, {}
    for name in args.models.split(","):
        cfg = config(args, name)
        t0 = time.time()
        head, weights = FITTERS[name](x[fit], emb[fit], S[fit], cfg, args.seed)
        fit_s = time.time() - t0
        spec = router_spec(cfg, table, cfg.costs, cost_norm, "gpt4_1106", head)
        router = Router(spec, {"feat.mean": mean, "feat.scale": scale, **{f"head.{k}": v for k, v in weights.items()}})
        P = router.predict_from_features(x, emb)
        cal = calibrate(P[cal_i], S[cal_i], cost_norm, strong, cfg.target)
        router.threshold = spec["threshold"] = cal.threshold
        rep = build_report(table, P, cost_norm, strong, cal, cfg, test, raw_lengths(prompts), args.seed)
        cov = coverage(P[test], S[test], cost_norm, strong, cfg, args.bootstrap, args.seed)
        results[name] = {"fit_seconds": round(fit_s, 2), "router": rep["router"], "at_threshold": rep["at_threshold"],
                         "calibration": rep["calibration"], "bootstrap_fixed_threshold": rep.get("bootstrap"),
                         "bootstrap_procedure_coverage": cov, "beats_baselines": rep["beats_baselines"]}
        print(f"{name:7s} APGR {rep['router']['apgr']:.3f}  CPT50 {rep['router']['cpt50']:.3f}  "
              f"CPT80 {rep['router']['cpt80']:.3f}  held-out ratio {rep['at_threshold']['quality_ratio']:.4f} at "
              f"{rep['at_threshold']['strong_fraction']:.1%} strong  coverage {cov['holds_fraction']:.3f}  "
              f"fixed-threshold bootstrap {rep['bootstrap']['holds_fraction']:.3f}", flush=True)
        if best is None or rep["router"]["apgr"] > results[best[0]]["router"]["apgr"]:
            best = (name, rep, router, weights)
        routers[name] = router
    selection = None
    if args.select:
        from toolkit.route.select import cross_validate

        t0 = time.time()
        sel_cfg = config(args, "logreg").model_copy(update={"select": args.select.split(",")})
        selection = cross_validate(x[fit], emb[fit], S[fit], cost_norm, strong, sel_cfg, args.seed)
        selection["seconds"] = round(time.time() - t0, 1)
        print("selection:", selection["chosen"], "-", selection["reason"], flush=True)
    shift = shift_table(args, routers, prompts, emb, x, S, fit, cal_i, test, cost_norm) if args.shift_data else None
    name, rep, router, weights = best
    with tempfile.TemporaryDirectory() as d:  # latency of the saved-and-reloaded runtime, as served
        if args.embedding == "static":
            import shutil

            from toolkit.route.static import cached_vectors

            for f in router.spec["features"]["static_files"]:
                shutil.copy(cached_vectors(cfg0.embedder) / f, Path(d) / f)
        save_router(Path(d), router.spec, router.weights)
        served = Router.load(d)
        sample = np.random.default_rng(args.seed).permutation(test)  # held-out prompts in random order
        lat = latency(served, [prompts[i] for i in sample], x[sample], emb[sample], args.latency_queries)
    for other, r in routers.items():  # the classifier alone, every model (kNN scans its memory: slower)
        results[other]["classifier_us"] = classifier_latency(r, x[test], emb[test])
    results_all = {
        "data": str(args.data), "n": {"fit": len(fit), "calibration": len(cal_i), "held_out": len(test)},
        "settings": {k: v for k, v in vars(args).items() if k not in ("cache", "out")},
        "baselines": rep["baselines"], "model_quality_held_out": rep["model_quality"], "routers": results,
        "best": name, "latency_best": lat, "threads": args.threads, "selection": selection, "shift": shift,
        "machine_note": "shared 2-core CPU with other jobs running: timings are noisy",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results_all, indent=2, allow_nan=False, default=str) + "\n")
    plot_curves(rep, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(results_all))
    print(markdown(results_all))


def _f(v, pct=False):
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def markdown(r: dict) -> str:
    b = r["baselines"]
    lines = [f"# Route benchmark: MMLU routing (Mixtral-8x7B vs GPT-4-1106), {r['n']['held_out']} held-out prompts, "
             f"{r['settings']['embedding']} embeddings",
             "", f"fit {r['n']['fit']} / calibration {r['n']['calibration']} / held-out {r['n']['held_out']}; "
             f"goal: >= {r['settings']['min_quality']:g} of GPT-4 quality at {r['settings']['confidence']:.0%} "
             "confidence.", "",
             "| router | APGR | CPT(50%) | CPT(80%) | strong calls to reach goal (held-out curve) | classifier p99 µs |",
             "|---|---|---|---|---|---|"]
    for name, res in r["routers"].items():
        m = res["router"]
        lines.append(f"| {name} | {_f(m['apgr'])} | {_f(m['cpt50'], 1)} | {_f(m['cpt80'], 1)} | "
                     f"{_f(m.get('cost_at_target'), 1)} | {res['classifier_us']['p99']:.1f} |")
    for name in ("random", "length", "oracle"):
        m = b[name]
        lines.append(f"| baseline: {name} | {_f(m['apgr'])} | {_f(m['cpt50'], 1)} | {_f(m['cpt80'], 1)} | "
                     f"{_f(m.get('cost_at_target'), 1)} | |")
    lines.append(f"| baseline: always-weak | quality {_f(b['always_weak']['quality'])} | | | "
                 f"{'meets goal' if b['always_weak']['meets_goal'] else 'misses goal'} |")
    lines.append(f"| baseline: always-strong | quality {_f(b['always_strong']['quality'])} | | | 100.0% | |")
    lines += ["", f"Guarantee: realized quality ratio on a batch of {r['settings']['eval_size']} prompts "
              "(route.target.eval_size = held-out size).", "",
              "| router | calibrated threshold | calibration bound | held-out quality ratio | held-out strong calls | "
              "GUARANTEE: fixed shipped threshold, held-out bootstrap resamples with ratio >= goal (target >= "
              f"{r['settings']['confidence']:.0%}) | procedure coverage (recalibrate on held-out resamples, check "
              "the held-out mean) |", "|---|---|---|---|---|---|---|"]
    for name, res in r["routers"].items():
        at = res["at_threshold"]
        lines.append(f"| {name} | {at['threshold']:.4f} | {_f(res['calibration']['lower_bound'])} | "
                     f"{at['quality_ratio']:.4f} | {_f(at['strong_fraction'], 1)} | "
                     f"{_f((res['bootstrap_fixed_threshold'] or {}).get('holds_fraction'), 1)} | "
                     f"{_f(res['bootstrap_procedure_coverage']['holds_fraction'], 1)} |")
    if r.get("selection"):
        sel = r["selection"]
        lines += ["", f"Model selection (route.select, cross-validated APGR on the fit part, {sel.get('seconds')} s): "
                  f"exported **{sel['chosen']}**: {sel['reason']}.", ""]
    if r.get("shift"):
        sh = r["shift"]
        lines += ["", f"Shift guard (alpha {sh['guard']['alpha']:g}, k {sh['guard']['k']}; fit on the fit part, "
                  f"thresholds on the calibration part). In domain: the held-out MMLU prompts; shifted: "
                  f"{sh['n_shifted']} GSM8K prompts, same routers and thresholds. Goal: quality ratio >= "
                  f"{r['settings']['min_quality']:g}.", "",
                  "| router | set | flagged | strong calls (no guard) | quality ratio (no guard) | strong calls (guard) "
                  "| quality ratio (guard) |", "|---|---|---|---|---|---|---|"]
        for name, res in sh["routers"].items():
            for part in ("in_domain", "shifted"):
                e = res[part]
                lines.append(f"| {name} | {part.replace('_', ' ')} | {_f(e['flagged'], 1)} | "
                             f"{_f(e['without_guard']['strong_fraction'], 1)} | {_f(e['without_guard']['quality_ratio'])} | "
                             f"{_f(e['with_guard']['strong_fraction'], 1)} | {_f(e['with_guard']['quality_ratio'])} |")
    lat = r["latency_best"]
    lines += ["", f"Latency of the best router ({r['best']}, saved and reloaded, numpy runtime, {r['threads']} threads; "
              f"{r['machine_note']}):", "",
              f"- classifier alone: p50 {lat['classifier_us_p50']:.1f} µs, p99 {lat['classifier_us_p99']:.1f} µs",
              f"- embed + classify one query (mean {lat['one_query_mean_chars']:.0f} chars): p50 "
              f"{lat['one_query_ms_p50']:.1f} ms, p99 {lat['one_query_ms_p99']:.1f} ms",
              f"- batched: {lat['batched_qps']:.0f} queries/s ({lat['batched_n']} queries, batch 64)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
