"""A stacked cache gate against issue 15's goal -- a study, not (yet) a cache.metric of the product.

The gate: serve the nearest cached entry by cosine (the index is unchanged) and accept it when a logistic score on
[cos(q, c), r5(q), r50(q), r5(c), r50(c), diag(q, c)] clears a threshold set with the product's own bound
(toolkit.cache.tune.select: `realized`, 2,000 calibration pairs, a batch of 857 lookups, eps 0.05, 95%).
  r_k(x)  mean cosine of x to its k nearest texts of a FIXED reference set R = the calibration pairs' query texts
          (x itself excluded): how crowded x's region is. R would ship with cache.json, so the feature never depends
          on what the cache holds at serving time; r(c) is one matrix-vector product per candidate.
  diag    the learned per-dimension reweighted cosine (toolkit/cache/metric.py, cache.metric: diagonal).
No held-out label touches a fit or a threshold: the calibration scores are 5-fold cross-fitted (the diag feature of
each training set 4-fold again), a mirrored pair counts once (toolkit.cache.pairs.drop_mirrors, as the stage), and the
model fitted on all calibration pairs scores the held-out ones. The ratio is against the hindsight-best static
COSINE threshold of each split's held-out pairs, as in `bench_cache.py --parts bound`.

    python eval/bench_cache_stack.py --splits 100        (~15 min on one core, after bench_cache's embeddings)
    -> eval/results/bench_cache_stack.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "eval"))

EPS, CONF, NCAL, NHELD = 0.05, 0.95, 2000, 857
KS = (5, 50)
METHODS = ("grid", "scan")


def crowding(sims_to_ref: np.ndarray) -> np.ndarray:
    """[n, len(KS)]: mean of each row's k largest similarities to the reference set."""
    top = -np.sort(-np.partition(-sims_to_ref, max(KS) - 1, axis=1)[:, :max(KS)], axis=1)
    return np.stack([top[:, :k].mean(1) for k in KS], 1).astype(np.float64)


def folds_of(rows: np.ndarray, qi, ci, k: int, seed: int) -> list[np.ndarray]:
    from toolkit.cache.pairs import fold_ids, mirror_groups

    fold = fold_ids(len(rows), k, np.random.default_rng(seed), mirror_groups(qi[rows], ci[rows]))
    return [rows[fold == j] for j in range(k)]


def study(pairs, vecs: np.ndarray, splits: int, ablate: bool) -> dict:
    from toolkit.cache import local, metric, tune

    V = vecs.astype(np.float32)
    qi, ci, y0 = pairs.query, pairs.cached, pairs.labels
    cos0 = np.sum(V[qi] * V[ci], 1).astype(np.float64)
    S = V @ V.T
    variants = ["stack"] + (["stack_no_r"] if ablate else [])
    rec = {f"{v}/{m}": {"ok": [], "hit": []} for v in ["cosine", *variants] for m in METHODS}
    hind, coefs = [], []
    for r in range(splits):
        perm = np.random.default_rng(1000 + r).permutation(len(y0))  # bench_cache's splits
        cal, held = perm[:NCAL], perm[NCAL:NCAL + NHELD]
        hind.append(tune.hindsight_best(cos0[held], y0[held], EPS)["hit_rate"])
        to_ref = S[:, np.unique(qi[cal])].copy()
        to_ref[to_ref >= 1 - 1e-6] = -np.inf  # a text is not its own neighbour
        crowd = crowding(to_ref)

        def features(rows, w_diag, diag=None, no_r=False):
            q, c = qi[rows], ci[rows]
            d = metric.scores(V[q], V[c], w_diag) if diag is None else diag
            rq, rc = (np.zeros((len(rows), len(KS))),) * 2 if no_r else (crowd[q], crowd[c])
            return np.concatenate([cos0[rows][:, None], rq, rc, d[:, None]], 1)

        def train(rows, no_r):
            diag = np.empty(len(rows))  # out-of-fold diag feature: the logistic never sees the diag fit's optimism
            for part in folds_of(np.arange(len(rows)), qi[rows], ci[rows], 4, r + 7):
                rest = rows[np.setdiff1d(np.arange(len(rows)), part)]
                diag[part] = metric.scores(V[qi[rows[part]]], V[ci[rows[part]]],
                                           metric.fit(V[qi[rest]], V[ci[rest]], y0[rest]))
            w_diag = metric.fit(V[qi[rows]], V[ci[rows]], y0[rows])
            w, b = local.logistic(features(rows, w_diag, diag, no_r), y0[rows])
            return w, b, w_diag

        def score(model, rows, no_r):
            w, b, w_diag = model
            return features(rows, w_diag, no_r=no_r) @ w + b

        def record(name, s_cal, y_cal, s_held):
            for m in METHODS:
                sel = tune.select(s_cal, y_cal, EPS, CONF, m, "realized", NHELD / NCAL)
                served = s_held >= sel.threshold if sel.feasible else np.zeros(len(held), bool)
                h = tune.rates(served, y0[held], CONF)
                rec[f"{name}/{m}"]["ok"].append(h["fhr"] <= EPS)
                rec[f"{name}/{m}"]["hit"].append(h["hit_rate"])

        record("cosine", cos0[cal], y0[cal], cos0[held])
        for v in variants:
            no_r = v == "stack_no_r"
            parts = folds_of(cal, qi, ci, 5, r)
            s_cal = np.concatenate([score(train(np.setdiff1d(cal, p), no_r), p, no_r) for p in parts])
            y_cal = np.concatenate([y0[p] for p in parts])
            final = train(cal, no_r)
            if v == "stack":
                coefs.append([*final[0].tolist(), final[1]])
            record(v, s_cal, y_cal, score(final, held, no_r))
    h = float(np.mean(hind))
    return {"pairs": int(len(y0)), "splits": splits, "hindsight_cosine_hit_rate": h,
            "mean_coefficients": dict(zip(["cos", "r5_q", "r50_q", "r5_c", "r50_c", "diag", "intercept"],
                                          np.mean(coefs, 0).round(3).tolist())),
            "policies": {k: {"coverage": float(np.mean(v["ok"])), "hit_ratio_vs_cosine_hindsight":
                             float(np.mean(v["hit"]) / h) if h else None, "mean_hit_rate": float(np.mean(v["hit"]))}
                         for k, v in rec.items()}}


def markdown(res: dict) -> str:
    names = list(next(iter(res["datasets"].values()))["policies"])
    lines = ["# Stacked cache gate (eval/bench_cache_stack.py)", "",
             f"{res['splits']} random splits per dataset (bench_cache's seeds), {NCAL} calibration / {NHELD} held-out "
             f"pairs, eps {EPS}, confidence {CONF}, bound `realized`, MiniLM-L6. Cell = coverage (share of splits "
             "whose realized held-out false-hit share is <= eps) / mean hit rate divided by that of the "
             "hindsight-best static cosine threshold of the same held-out pairs. Goal (issue 15): >= 0.95 / "
             ">= 0.9. stack_no_r (with --ablate): the same gate without the crowding features.", "", "| dataset | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for ds, r in res["datasets"].items():
        lines.append(f"| {ds} | " + " | ".join(
            f"{p['coverage']:.2f} / {p['hit_ratio_vs_cosine_hindsight']:.2f}" for p in r["policies"].values()) + " |")
    lines += ["", "Mean coefficients of the stacked gate (score = X @ w + b): " + "; ".join(
        f"{ds}: {r['mean_coefficients']}" for ds, r in res["datasets"].items()), "",
        f"Elapsed: {res['elapsed_s']:.0f} s."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--splits", type=int, default=100)
    ap.add_argument("--datasets", default=None, help="comma-separated subset of bench_cache's bound datasets")
    ap.add_argument("--ablate", action="store_true", help="also the gate without the crowding features")
    ap.add_argument("--shared", default=str(REPO / ".." / "shared" / "data"))
    ap.add_argument("--emb-cache", default=str(Path.home() / ".cache" / "optkit" / "bench_cache"))
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "bench_cache_stack"))
    args = ap.parse_args()
    import bench_cache

    data = bench_cache.bound_datasets(Path(args.shared), Path(args.emb_cache))
    names = args.datasets.split(",") if args.datasets else list(data)
    started, out = time.time(), {"splits": args.splits, "datasets": {}}
    for name in names:
        out["datasets"][name] = study(*data[name], args.splits, args.ablate)
        print(name, json.dumps(out["datasets"][name]["policies"]), flush=True)
    out["elapsed_s"] = time.time() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
    Path(args.out + ".md").write_text(markdown(out))
    print(markdown(out))


if __name__ == "__main__":
    main()
