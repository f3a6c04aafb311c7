"""Statistics for comparing two models on the same eval images: one copy for the gate, the
report and the seed-noise calibration. NumPy and the standard library only."""
from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0  # the gate's verdict must not change between two runs on the same inputs


def binomial_at_least_p(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (exact big-integer sums cost
    seconds at the 10,000-image scale)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    terms = [base - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq
             for j in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def mcnemar_worse_p(worse: int, better: int) -> float:
    """One-sided exact McNemar test on discordant pairs: the probability of seeing at least
    `worse` images that production got right and the candidate got wrong, out of
    `worse + better` discordant images, if both models were equally good (Binomial(n, 1/2))."""
    n = worse + better
    if n == 0 or worse == 0:
        return 1.0
    if n > 1000:  # 2**n as an exact integer gets slow; log space is exact to ~1e-12 relative
        return binomial_at_least_p(worse, n, 0.5)
    return min(1.0, sum(math.comb(n, k) for k in range(worse, n + 1)) / 2 ** n)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sane at 0/n and n/n, unlike the Wald one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the confidence-weighted gap between how sure the model is
    and how often it is right, over equal-width confidence bins."""
    if len(confidence) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(float(confidence[mask].mean()) - float(correct[mask].mean()))
    return float(total)


def bootstrap_beyond_p(statistic, n: int, margin: float, *, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> float:
    """Paired bootstrap over eval images for a non-inferiority question: the share of resamples
    in which the drop (`statistic(idx)`, production-better-by) is within `margin`. Small means
    the candidate is worse by more than the margin beyond what resampling noise explains."""
    rng = np.random.default_rng(seed)
    within = sum(1 for _ in range(samples) if statistic(rng.integers(0, n, n)) <= margin)
    return (within + 1) / (samples + 1)


def bootstrap_mean_beyond_p(diff: np.ndarray, margin: float, *,
                            samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> float:
    """`bootstrap_beyond_p` for a mean of per-image differences (accuracy, recall), vectorised:
    `diff[i]` = production right - candidate right on image i (-1, 0 or 1)."""
    if len(diff) == 0:
        return 1.0
    rng = np.random.default_rng(seed)
    drops = diff[rng.integers(0, len(diff), (samples, len(diff)))].mean(1)
    return (int((drops <= margin + 1e-12).sum()) + 1) / (samples + 1)
