"""Choosing the threshold for the recipe's goal on calibration data (prompts the router was not fit on).

Goal "min_quality = X", promised for what a batch of m prompts (target.eval_size, default the calibration
size n) will REALIZE, not only for the long-run mean. Per prompt, d_i = q_routed_i - X * q_strong_i; a batch
realizes quality(routed) / quality(strong) >= X exactly when its mean(d) >= 0. That batch mean is
~ N(mu, sigma^2 / m), so it is >= 0 with probability >= c (c = confidence) when mu >= z_c * sigma / sqrt(m).
We test that hypothesis with a one-sided t bound on the calibration data:
    mean(d) - t_c * sd / sqrt(n) - z_c * sd / sqrt(m) >= 0.
Reading: with confidence c over the calibration sample, a fresh batch of m prompts at the shipped threshold
meets the goal with probability >= c (a tolerance-style (c, c) guarantee). It is what a held-out check with
the threshold kept fixed measures: the bootstrap of m held-out prompts estimates P(batch mean(d) >= 0), and
that estimate is >= c in about c of the runs. The bound on mu alone (without the sqrt(m) term) covered
only the calibration noise: realized batch quality then sat below X up to half of the time at the boundary.
The prediction-interval form mean - z * sd * sqrt(1/n + 1/m) is tighter but promises only "P(batch >= X)
>= c" averaged over calibration samples, which a single held-out bootstrap cannot confirm. Thresholds are tested in a fixed sequence from
"always strong" (d_i >= 0 by construction) towards cheaper ones, stopping at the first that fails: fixed-
sequence testing keeps the error rate at 1 - confidence without a multiple-testing correction (the
"Learn then Test" argument, Angelopoulos et al. 2021), so the chosen threshold is not the luckiest of many.

Goal "max_strong_fraction = Y": the lowest threshold whose strong-call count k on n calibration prompts
satisfies (k + 1) / (n + 1) <= Y (the conformal quantile: a new exchangeable prompt goes strong with
probability <= Y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from toolkit.errors import OptkitError
from toolkit.route.runtime import decide


@dataclass
class Calibration:
    threshold: float
    goal: str
    goal_value: float
    confidence: float
    n: int
    quality_ratio: float  # routed / always-strong quality on calibration data, at the threshold
    lower_bound: float  # one-sided bound on the ratio a batch of eval_size prompts realizes (min_quality), else nan
    strong_fraction: float
    cost: float  # mean normalized cost (0 = always cheapest, 1 = always strong)
    notes: list[str] = field(default_factory=list)
    eval_size: int | None = None  # min_quality: the batch size the bound is for (realized quality)

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


def min_examples(min_quality: float, confidence: float) -> int:
    """Fewest calibration prompts that could certify the goal at all: with n prompts that are all perfect,
    the exact (Clopper-Pearson) one-sided bound on a success rate is (1 - confidence) ** (1 / n)."""
    if min_quality >= 1:
        return 10
    return max(10, math.ceil(math.log(1 - confidence) / math.log(min_quality)))


def check_enough(n: int, target) -> None:
    """Too few calibration prompts for the requested confidence: say so before any work is done."""
    if target.min_quality is None:
        return
    need = min_examples(target.min_quality, target.confidence)
    if n < need:
        raise OptkitError(f"route.calibration: {n} calibration prompts cannot certify target.min_quality="
                          f"{target.min_quality:g} at confidence {target.confidence:g} (needs >= {need}); add labeled "
                          "data, raise route.calibration or lower the target")


def candidate_thresholds(P: np.ndarray, cost_norm: np.ndarray, strong: int) -> np.ndarray:
    """Thresholds in increasing order = from always-strong to always-cheapest."""
    if P.shape[1] == 2:
        score = P[:, strong] - P[:, 1 - strong]
        uniq = np.unique(score)
        return np.concatenate([[uniq[0] - 1.0], uniq, [uniq[-1] + 1.0]])
    pairs = [(P[:, a] - P[:, b]) / (cost_norm[a] - cost_norm[b])
             for a in range(P.shape[1]) for b in range(P.shape[1]) if cost_norm[a] > cost_norm[b]]
    ratios = np.concatenate(pairs)
    return np.unique(np.concatenate([[ratios.min() - 1], np.quantile(ratios, np.linspace(0, 1, 1001)),
                                     [ratios.max() + 1]]))


def _t_quantile(confidence: float, dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(confidence, max(dof, 1)))


def _z_quantile(confidence: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(confidence))


def calibrate(P: np.ndarray, S: np.ndarray, cost_norm: np.ndarray, strong: int, target) -> Calibration:
    """P: predicted quality [n, M] on calibration prompts; S: their true scores; target: RouteTargetConfig."""
    n = len(P)
    rows = np.arange(n)
    q_strong = S[:, strong]
    if q_strong.mean() <= 0:
        raise OptkitError("route.labels: the strong model scores 0 on every calibration prompt; "
                          "a quality goal relative to it is meaningless (check the labels)")
    lams = candidate_thresholds(P, cost_norm, strong)
    if target.min_quality is not None:
        return _for_quality(lams, P, S, cost_norm, strong, target)
    choices = (decide(P, cost_norm, lam) for lam in lams)  # lazily: the sequence usually stops early
    return _for_fraction(lams, choices, S, q_strong, cost_norm, strong, rows, target)


def _point(lam, choice, S, q_strong, cost_norm, strong, rows) -> tuple[float, float, float]:
    q = S[rows, choice]
    return float(q.mean() / q_strong.mean()), float((choice == strong).mean()), float(cost_norm[choice].mean())


def _d_moments(lams, P, S, cost_norm, strong, X) -> tuple[np.ndarray, np.ndarray]:
    """Sum and sum of squares of d_i = q_routed_i - X * q_strong_i at every candidate threshold."""
    q_strong = S[:, strong]
    if P.shape[1] != 2:  # N models: route at each threshold
        rows = np.arange(len(P))
        d = [S[rows, decide(P, cost_norm, lam)] - X * q_strong for lam in lams]
        return np.array([v.sum() for v in d]), np.array([(v * v).sum() for v in d])
    # Two models, vectorized: at threshold lam the k prompts with score >= lam go strong, and those are the
    # first k in decreasing score order, so the sums are running sums.
    weak = 1 - strong
    score = P[:, strong] - P[:, weak]
    d_strong, d_weak = (1 - X) * q_strong, S[:, weak] - X * q_strong
    order = np.argsort(-score, kind="stable")
    cum = np.concatenate([[0.0], np.cumsum((d_strong - d_weak)[order])])
    cum2 = np.concatenate([[0.0], np.cumsum((d_strong ** 2 - d_weak ** 2)[order])])
    k = len(score) - np.searchsorted(np.sort(score), lams, side="left")
    return d_weak.sum() + cum[k], (d_weak ** 2).sum() + cum2[k]


def _for_quality(lams, P, S, cost_norm, strong, target) -> Calibration:
    X, conf, n = target.min_quality, target.confidence, len(P)
    check_enough(n, target)
    q_strong = S[:, strong]
    total, total2 = _d_moments(lams, P, S, cost_norm, strong, X)
    mean = total / n
    sd = np.sqrt(np.clip((total2 - n * mean ** 2) / max(n - 1, 1), 0, None))
    m = target.eval_size or n
    lcb = mean - _t_quantile(conf, n - 1) * sd / math.sqrt(n) - _z_quantile(conf) * sd / math.sqrt(m)
    lcb_ratio = X + lcb / q_strong.mean()
    # Fixed sequence from always-strong (index 0: its ratio is exactly 1, nothing to test) towards cheaper.
    failed = np.flatnonzero(lcb[1:] < 0)
    last = int(failed[0]) if len(failed) else len(lams) - 1  # index of the last accepted threshold
    lam = lams[last]
    choice = decide(P, cost_norm, lam)
    ratio, frac, cost = _point(lam, choice, S, q_strong, cost_norm, strong, np.arange(n))
    if cost >= 1.0 - 1e-12:
        cheaper = np.flatnonzero([cost_norm[decide(P, cost_norm, v)].mean() < 1 - 1e-12 for v in lams[:last + 3]])
        best = f"; the first cheaper threshold's bound is {lcb_ratio[cheaper[0]]:.4f}" if len(cheaper) else ""
        raise OptkitError(f"route.target.min_quality={X:g} is infeasible: no threshold that sends any of the {n} "
                          f"calibration prompts to a cheaper model keeps the {conf:.0%} lower bound on quality "
                          f">= {X:g}{best} (always-strong is the only way). Lower the target or add labeled data")
    bound = 1.0 if last == 0 else float(lcb_ratio[last])
    return Calibration(float(lam), "min_quality", X, conf, n, ratio, bound, frac, cost, eval_size=m)


def _for_fraction(lams, choices, S, q_strong, cost_norm, strong, rows, target) -> Calibration:
    Y, n = target.max_strong_fraction, len(rows)
    for lam, choice in zip(lams, choices):  # from always-strong down: the first that fits is the best quality
        k = int((choice == strong).sum())
        if (k + 1) / (n + 1) <= Y or k == 0:
            ratio, frac, cost = _point(lam, choice, S, q_strong, cost_norm, strong, rows)
            notes = [] if k or Y >= 1 / (n + 1) else [
                f"max_strong_fraction={Y:g} is below 1/(n+1) for n={n} calibration prompts: nothing goes strong"]
            return Calibration(float(lam), "max_strong_fraction", Y, target.confidence, n, ratio, float("nan"),
                               frac, cost, notes)
    raise AssertionError("unreachable: the last threshold sends nothing to the strong model")
