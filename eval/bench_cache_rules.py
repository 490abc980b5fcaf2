"""Which search for the query gate's threshold keeps issue 15's goal -- a study of the `scan` search's optimism.

`cache.adaptive: query, selection: scan` sits at the coverage line on CLINC150's labelled pairs (0.94 and 0.96 on two
sets of 300 fresh splits). This runs the product's own calibration once per split (stage.choose_metric, then
local.crossfit_scores: the expensive part) and applies several threshold searches to the SAME cross-fitted gate
scores, each with the stage's export rule (the gate only when, cross-fitted, it serves more calibration pairs within
the bound than the global threshold found by the same search), so the columns differ only by the search:

  scan    the shipped search: the lowest threshold whose `realized` bound is <= eps (95%)
  c96     scan at 96% instead of 95%: the cost of a flat safety margin
  c975    scan at 97.5%
  stable  scan, but every threshold serving down to 5% fewer pairs must pass too (no isolated lucky dip)
  fs      fixed_sequence: high to low, stop at the first failure
  grid    grid (served counts ~10% apart)
  g05     grid with served counts ~5% apart: between grid and scan
  boot    scan with the search's optimism added back: the mean, over 100 bootstrap resamples of the calibration
          pairs, of (false-hit share of all pairs - the resample's own) at the resample's scan pick, added to the
          false-hit rate before the bound (Efron's optimism bootstrap)

Every search is also scored as before metric.crossfit_shift (the learned metric's cross-fitted calibration scores
NOT moved onto the final metric's scale): the same gate and thresholds, applied to the held-out scores minus the
shift, which is exactly what the unshifted calibration exports (every step is shift-equivariant), so the two tables
are side by side on the same splits.

Also, for `scan`, where its failures come from: the held-out batch's own hindsight hit rate and the share the gate
served on the failing splits against all splits, and how many of scan's failing splits each other search fails too.

    python eval/bench_cache_rules.py --datasets clinc150_pairs --first-split 400 --splits 300
    -> eval/results/bench_cache_rules_<datasets>.{json,md}        (~3 s per split and dataset on one core)
    --entry: the gate with cache.query_entry (the entry's crowding too) -> bench_cache_rules_entry_<datasets>.*
    --pool A.json B.json ... --out X: one table over several runs (coverage with its exact interval) -> X.md
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

EPS, CONF, NCAL, NHELD, BOOT = 0.05, 0.95, 2000, 857, 100


def passing(c, false_hits, ratio: float) -> np.ndarray:
    """Per threshold of curve c: is its `realized` bound with these false-hit counts <= eps."""
    from toolkit.cache import tune

    return tune.bounds(false_hits, c.served, CONF, "realized", ratio, above=EPS) <= EPS


def lowest_passing(c, false_hits, ratio: float):
    """Index of scan's pick on curve c with these false-hit counts (None: nothing passes)."""
    ok = np.nonzero(passing(c, false_hits, ratio))[0]
    return int(ok[-1]) if len(ok) else None


def by_select(method: str, conf: float = CONF):
    def rule(s, y, ratio, seed):
        from toolkit.cache import tune

        sel = tune.select(s, y, EPS, conf, method, "realized", ratio)
        return sel.threshold if sel.feasible else None
    return rule


def stable(s, y, ratio, seed, window: float = 0.05):
    from toolkit.cache import tune

    c = tune.curve(s, y)
    ok = passing(c, c.false_hits, ratio)
    for i in np.nonzero(ok)[0][::-1]:
        if ok[np.searchsorted(c.served, c.served[i] * (1 - window)):i + 1].all():
            return float(c.thresholds[i])
    return None


def grid_step(log_step: float):
    """grid with another spacing: the lowest passing threshold among those whose served counts are exp(log_step)
    apart (the shipped grid: 0.1, ~10%; scan: every threshold)."""
    def rule(s, y, ratio, seed):
        from toolkit.cache import tune

        c = tune.curve(s, y)
        idx = tune.grid_indices(c.served, log_step)
        ok = idx[passing(c, c.false_hits, ratio)[idx]]
        return float(c.thresholds[ok[-1]]) if len(ok) else None
    return rule


def boot(s, y, ratio, seed):
    from toolkit.cache import tune

    rng = np.random.default_rng(seed)
    optimism = []
    for _ in range(BOOT):
        idx = rng.integers(0, len(s), len(s))
        cb = tune.curve(s[idx], y[idx])
        i = lowest_passing(cb, cb.false_hits, ratio)
        if i is not None:
            optimism.append((1 - y[s >= cb.thresholds[i]].mean()) - cb.fhr[i])
    c = tune.curve(s, y)
    delta = max(0.0, float(np.mean(optimism))) if optimism else 0.0
    i = lowest_passing(c, c.false_hits + delta * c.served, ratio)
    return None if i is None else float(c.thresholds[i])


RULES = {"scan": by_select("scan"), "c96": by_select("scan", 0.96), "c975": by_select("scan", 0.975), "stable": stable,
         "fs": by_select("fixed_sequence"), "grid": by_select("grid"), "g05": grid_step(0.05), "boot": boot}


def study(pairs, vecs: np.ndarray, first: int, splits: int, entry: bool = False, rules: dict = RULES) -> dict:
    from toolkit.cache import local, stage, tune
    from toolkit.cache.pairs import fold_ids, mirror_groups
    from toolkit.config.cache import CacheConfig

    cfg = CacheConfig(metric="auto", epsilon=EPS, confidence=CONF, selection="scan", bound="realized",
                      adaptive="query", query_entry=entry)
    cosine = np.sum(vecs[pairs.query] * vecs[pairs.cached], 1).astype(np.float64)
    rec = {k: {"ok": [], "hit": []} for k in rules}
    before = {k: {"ok": [], "hit": []} for k in rules}  # without metric.crossfit_shift
    hind = []
    for r in range(first, first + splits):
        perm = np.random.default_rng(1000 + r).permutation(len(cosine))  # the splits of bench_cache --parts bound
        cal, held = perm[:NCAL], perm[NCAL:NCAL + NHELD]
        ratio = len(held) / len(cal)
        hind.append(tune.hindsight_best(cosine[held], pairs.labels[held], EPS)["hit_rate"])
        choice = stage.choose_metric(cfg, r, pairs, vecs, cal, ratio)
        s_cal, y_cal, c_cal = choice.calibration
        s_held, y_held, c_held = stage.pair_fn(pairs, vecs)(choice.weights, held)
        shift = choice.report.get("crossfit_shift", 0.0)  # 0: the cosine, its calibration scores are final
        qids, q = pairs.query[cal], pairs.query[held]
        fold = fold_ids(len(cal), local.FOLDS, np.random.default_rng(r), mirror_groups(qids, c_cal))
        entries = vecs[c_cal] if entry else None  # as stage.choose_query_threshold
        oof = local.crossfit_scores(s_cal, vecs[qids], entries, y_cal, qids, c_cal, fold)
        skip = local.pair_skip(q, c_held, qids, c_cal)  # what a runtime query could read, as the stage's check
        for name, rule in rules.items():
            t_global, tau = rule(s_cal, y_cal, ratio, r), rule(oof, y_cal, ratio, r)
            n_global = int((s_cal >= t_global).sum()) if t_global is not None else 0
            gate = None
            if tau is not None and int((oof >= tau).sum()) > n_global:  # the stage's export rule
                try:
                    gate = local.fit(s_cal, vecs[qids], entries, y_cal, qids, c_cal, tau, t_global)
                except local.Unfit:
                    pass
            for out, s in ((rec, s_held), (before, s_held - shift)):
                if gate is not None:
                    served = gate.served(s, vecs[q], vecs[c_held], skip)
                else:
                    served = s >= t_global if t_global is not None else np.zeros(len(held), bool)
                h = tune.rates(served, y_held, CONF)
                out[name]["ok"].append(bool(h["fhr"] <= EPS))
                out[name]["hit"].append(h["hit_rate"])
    hind = np.array(hind)
    # per split too, for paired comparisons of searches on the same splits (--pool needs only the aggregates)
    out = {"first_split": first, "splits": splits, "hindsight_mean_hit_rate": float(hind.mean()), "rules": {},
           "per_split": {"hindsight_hit_rate": [round(h, 6) for h in hind.tolist()],
                         **{name: {"ok": [int(o) for o in v["ok"]], "hit": [round(h, 6) for h in v["hit"]]}
                            for name, v in rec.items()}}}
    fail = ~np.array(rec["scan"]["ok"]) if "scan" in rec else np.zeros(splits, bool)
    for name, v in rec.items():
        ok, hit = np.array(v["ok"]), np.array(v["hit"])
        out["rules"][name] = {"coverage": float(ok.mean()), "hit_ratio_vs_hindsight": float(hit.mean() / hind.mean()),
                              "fails_of_scans_fails": int((~ok & fail).sum())}
    out["unshifted"] = {name: {"coverage": float(np.mean(v["ok"])),
                               "hit_ratio_vs_hindsight": float(np.mean(v["hit"]) / hind.mean())}
                        for name, v in before.items()}
    scan_hit = np.array(rec["scan"]["hit"]) if "scan" in rec else np.zeros(splits)
    out["scan_failures"] = {"n": int(fail.sum()),
                            "hindsight_hit_rate": {"failing": float(hind[fail].mean()) if fail.any() else None,
                                                   "all": float(hind.mean())},
                            "served": {"failing": float(scan_hit[fail].mean()) if fail.any() else None,
                                       "all": float(scan_hit.mean())}}
    return out


def markdown(res: dict) -> str:
    gate = "query and entry features (cache.query_entry)" if res["query_entry"] else "query features"
    lines = [f"# Query-gate threshold searches (eps {EPS}, {NCAL} calibration / {NHELD} held-out pairs; {gate})", "",
             "Cell: share of splits whose realized held-out false-hit share is <= eps / hit rate / hindsight-best "
             "static cosine threshold's / of scan's failing splits, how many this search fails too.", "",
             "| dataset | splits | " + " | ".join(res["rules"]) + " |", "|---|---|" + "---|" * len(res["rules"])]
    for name, d in res["datasets"].items():
        cells = [f"{r['coverage']:.3f} / {r['hit_ratio_vs_hindsight']:.3f} / {r['fails_of_scans_fails']}"
                 for r in d["rules"].values()]
        lines.append(f"| {name} | {d['first_split']}-{d['first_split'] + d['splits'] - 1} | " + " | ".join(cells) + " |")
    lines += ["", "Before metric.crossfit_shift (the same splits; coverage / hit ratio):", "",
              "| dataset | splits | " + " | ".join(res["rules"]) + " |", "|---|---|" + "---|" * len(res["rules"])]
    for name, d in res["datasets"].items():
        cells = [f"{r['coverage']:.3f} / {r['hit_ratio_vs_hindsight']:.3f}" for r in d["unshifted"].values()]
        lines.append(f"| {name} | {d['first_split']}-{d['first_split'] + d['splits'] - 1} | " + " | ".join(cells) + " |")
    lines += ["", "scan's failing splits: held-out hindsight hit rate and the share served, failing / all splits:", ""]
    for name, d in res["datasets"].items():
        f = d["scan_failures"]
        if f["n"]:
            lines.append(f"- {name}: {f['n']} failing; hindsight {f['hindsight_hit_rate']['failing']:.3f} / "
                         f"{f['hindsight_hit_rate']['all']:.3f}; served {f['served']['failing']:.3f} / "
                         f"{f['served']['all']:.3f}")
    return "\n".join(lines) + "\n"


def pool(paths: list[Path]) -> str:
    """One table over several runs of the same gate: per dataset and search, coverage (with its exact 95% interval)
    and hit ratio over every split run, each split counted once (overlapping split ranges are an error)."""
    from scipy.stats import binomtest

    runs = [(p, json.loads(p.read_text())) for p in paths]
    entry = {r["query_entry"] for _, r in runs}
    if len(entry) != 1:
        sys.exit(f"--pool: mixes runs with and without --entry: {[str(p) for p, _ in runs]}")
    acc: dict = {}  # dataset -> rule -> [ok, n, hit sum, hindsight sum], and the split ranges seen
    for path, r in runs:
        for name, d in r["datasets"].items():
            span = range(d["first_split"], d["first_split"] + d["splits"])
            seen = acc.setdefault(name, {"spans": [], "rules": {}})
            clash = [s for s in seen["spans"] if set(s) & set(span)]
            if clash:
                sys.exit(f"--pool: {path}: {name} splits {span.start}-{span.stop - 1} overlap an earlier file's")
            seen["spans"].append(span)
            n, hind = d["splits"], d["hindsight_mean_hit_rate"]
            for rule, v in d["rules"].items():
                a = seen["rules"].setdefault(rule, [0, 0, 0.0, 0.0])
                # hit_ratio_vs_hindsight = mean hit / mean hindsight, so sums recover exactly
                a[0] += round(v["coverage"] * n)
                a[1] += n
                a[2] += v["hit_ratio_vs_hindsight"] * hind * n
                a[3] += hind * n
    # only the searches every run ran, so that each cell covers the same splits as its row's count
    common = set.intersection(*(set(d["rules"]) for _, r in runs for d in r["datasets"].values()))
    rules = [k for k in RULES if k in common]
    gate = "query and entry features" if entry.pop() else "query features"
    lines = [f"# Query-gate searches pooled over {len(runs)} runs ({gate}; eps {EPS})", "",
             "Cell: coverage [exact 95% interval] / hit ratio against the hindsight-best static cosine threshold.", "",
             "| dataset | splits | " + " | ".join(rules) + " |", "|---|---|" + "---|" * len(rules)]
    for name, seen in acc.items():
        cells = []
        for rule in rules:
            ok, n, hit, hind = seen["rules"][rule]
            ci = binomtest(ok, n).proportion_ci(0.95, "exact")
            cells.append(f"{ok / n:.3f} [{ci.low:.3f}, {ci.high:.3f}] / {hit / hind:.3f}")
        lines.append(f"| {name} | {sum(len(s) for s in seen['spans'])} | " + " | ".join(cells) + " |")
    lines += ["", "Runs: " + ", ".join(p.name for p, _ in runs)]
    return "\n".join(lines) + "\n"


def main():
    import bench_cache as bc

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=str(REPO / ".." / "shared" / "data"))
    ap.add_argument("--datasets", default="clinc150_pairs", help="comma-separated (bench_cache.bound_datasets)")
    ap.add_argument("--first-split", type=int, default=400)
    ap.add_argument("--splits", type=int, default=100)
    ap.add_argument("--entry", action="store_true", help="cache.query_entry: the gate reads the entry's crowding too")
    ap.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, of {','.join(RULES)}")
    ap.add_argument("--emb-cache", default=str(Path.home() / ".cache" / "optkit" / "bench_cache"))
    ap.add_argument("--out", default=str(REPO / "eval" / "results" / "bench_cache_rules"))
    ap.add_argument("--pool", nargs="+", help="result JSONs of this script: one pooled table to OUT.md, no run")
    args = ap.parse_args()
    if args.pool:
        text = pool([Path(p) for p in args.pool])
        Path(f"{args.out}.md").write_text(text)
        print(text)
        return
    data = bc.bound_datasets(Path(args.shared), Path(args.emb_cache))
    names = args.datasets.split(",")
    unknown = sorted(set(names) - set(data))
    if unknown:
        sys.exit(f"--datasets: unknown {unknown}; known: {sorted(data)}")
    rules = {k: RULES[k] for k in args.rules.split(",") if k in RULES}
    if len(rules) != len(args.rules.split(",")):
        sys.exit(f"--rules: unknown {sorted(set(args.rules.split(',')) - set(RULES))}; known: {list(RULES)}")
    t0 = time.time()
    res = {"epsilon": EPS, "confidence": CONF, "calibration": NCAL, "heldout": NHELD, "query_entry": args.entry,
           "rules": list(rules), "datasets": {}}
    for name in names:
        res["datasets"][name] = study(*data[name], args.first_split, args.splits, args.entry, rules)
        print(name, json.dumps(res["datasets"][name]["rules"]), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    out = Path(f"{args.out}{'_entry' if args.entry else ''}_{'_'.join(names)}")
    out.with_suffix(".json").write_text(json.dumps(res, allow_nan=False, separators=(",", ":")) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
