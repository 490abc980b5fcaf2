"""95% intervals for the evaluate table, and the words a report may use about them.

- A rate (gold accuracy, agreement: one 0/1 score per prompt): Wilson score interval (scipy's binomtest).
  Scores that are not 0/1 (token F1, ROUGE-L, a judge's 0-1 score): bootstrap interval of the mean.
- A variant against the teacher on the same prompts: paired bootstrap (prompts resampled with both answers kept
  together), percentile intervals of the difference of means and of their ratio from one set of resamples, so
  that the two agree on the sign.
- "better"/"worse" only when the paired interval of the difference excludes 0 -- and, for 0/1 scores, when the
  exact McNemar test on the prompts where only one of the two is right agrees (p < 0.05): with few such prompts a
  bootstrap interval can exclude 0 on 4 of 153 prompts all one way, where McNemar's p is 0.125. Otherwise "not
  distinguishable at n=...". A point estimate alone never decides; fewer than 2 paired prompts give no interval.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

LEVEL = 0.95
RESAMPLES = 4000
SEED = 0  # fixed: the same run gives the same intervals


def _clean(scores: Sequence[Optional[float]]) -> np.ndarray:
    return np.asarray([float(s) for s in scores if s is not None], dtype=float)


def wilson(k: int, n: int, level: float = LEVEL) -> Optional[tuple[float, float]]:
    """Wilson score interval of a binomial rate k / n (None when n = 0)."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _bootstrap(data: tuple, statistic, level: float, seed: int):
    """scipy's bootstrap, BCa where it is defined, the percentile interval where BCa is not (degenerate data)."""
    import warnings

    from scipy.stats import bootstrap

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore")  # DegenerateDataWarning: handled by the fallback below
            res = bootstrap(data, statistic, vectorized=True, n_resamples=RESAMPLES,
                            confidence_level=level, method=method, rng=np.random.default_rng(seed))
        low, high = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
        if np.all(np.isfinite(low)) and np.all(np.isfinite(high)):
            return low, high
    return low, high


def mean_ci(scores: Sequence[Optional[float]], level: float = LEVEL, seed: int = SEED
            ) -> Optional[tuple[float, float]]:
    """Interval of a mean score: Wilson for 0/1 scores, else a bootstrap of the mean."""
    x = _clean(scores)
    if x.size == 0:
        return None
    if np.all((x == 0) | (x == 1)):
        return wilson(int(x.sum()), int(x.size), level)
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    low, high = _bootstrap((x,), lambda a, axis: np.mean(a, axis=axis), level, seed)
    return float(low[0]), float(high[0])


def paired(variant: Sequence[float], teacher: Sequence[float], level: float = LEVEL, seed: int = SEED) -> dict:
    """Paired comparison of per-prompt scores (same prompts, same order; None pairs dropped):
    {n, diff, diff_lo, diff_hi, ratio, ratio_lo, ratio_hi}; the ratio (of means) is None when the teacher's mean
    is 0."""
    pairs = [(float(a), float(b)) for a, b in zip(variant, teacher) if a is not None and b is not None]
    out = {"n": len(pairs), "diff": None, "diff_lo": None, "diff_hi": None,
           "ratio": None, "ratio_lo": None, "ratio_hi": None}
    if not pairs:
        return out
    a, b = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    out["diff"] = float(a.mean() - b.mean())
    if b.mean() > 0:
        out["ratio"] = float(a.mean() / b.mean())
    if np.all(a == b):  # identical answers on every prompt: no sampling variation in the difference
        out.update(diff_lo=0.0, diff_hi=0.0, ratio_lo=1.0 if out["ratio"] else None,
                   ratio_hi=1.0 if out["ratio"] else None)
        return out
    if len(pairs) < 2:
        return out
    out.update(_percentile(a, b, level, seed))
    if np.all(np.isin(a, (0.0, 1.0))) and np.all(np.isin(b, (0.0, 1.0))):
        out.update(mcnemar(int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))))
    if out["ratio"] is None:
        out.update(ratio_lo=None, ratio_hi=None)
    return out


def mcnemar(wins: int, losses: int) -> dict:
    """Exact McNemar test (two-sided binomial on the discordant prompts: the variant right alone on `wins`, the
    teacher right alone on `losses`)."""
    from scipy.stats import binomtest

    p = binomtest(wins, wins + losses).pvalue if wins + losses else 1.0
    return {"wins": wins, "losses": losses, "mcnemar_p": float(p)}


def _percentile(a: np.ndarray, b: np.ndarray, level: float, seed: int) -> dict:
    """Percentile intervals of the difference and of the ratio of means, from the same resamples."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(RESAMPLES, len(a)))
    ma, mb = a[idx].mean(axis=1), b[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    d_lo, d_hi = np.percentile(ma - mb, [tail, 100 - tail])
    out = {"diff_lo": float(d_lo), "diff_hi": float(d_hi), "ratio_lo": None, "ratio_hi": None}
    if np.all(mb > 0):
        r_lo, r_hi = np.percentile(ma / mb, [tail, 100 - tail])
        out.update(ratio_lo=float(r_lo), ratio_hi=float(r_hi))
    return out


def verdict(diff_lo: Optional[float], diff_hi: Optional[float], n: int, cmp: Optional[dict] = None) -> str:
    """What may be said about a variant against the teacher, from the paired interval of the difference (and, for
    0/1 scores, the exact McNemar test in `cmp`, paired()'s result)."""
    if diff_lo is None or diff_hi is None:
        return "n/a"
    p = (cmp or {}).get("mcnemar_p")
    if (diff_lo > 0 or diff_hi < 0) and p is not None and p >= 0.05:
        return (f"not distinguishable at n={n} (right alone: {cmp['wins']} vs {cmp['losses']} prompts, "
                f"exact McNemar p={p:.2g})")
    if diff_lo > 0:
        return "better"
    if diff_hi < 0:
        return "worse"
    return f"not distinguishable at n={n}"
