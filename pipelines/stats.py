"""Statistics for comparing two models on the same eval images: one copy for the gate, the
report and the seed-noise calibration. NumPy and the standard library only."""
from __future__ import annotations

import math

import numpy as np

ECE_BINS = 15
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0  # the gate's verdict must not change between two runs on the same inputs


def mcnemar_worse_p(worse: int, better: int) -> float:
    """One-sided exact McNemar test on discordant pairs: the probability of seeing at least
    `worse` images that production got right and the candidate got wrong, out of
    `worse + better` discordant images, if both models were equally good (Binomial(n, 1/2))."""
    n = worse + better
    if n == 0 or worse == 0:
        return 1.0
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


def bootstrap_worse_p(statistic, n: int, *, samples: int = BOOTSTRAP_SAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> float:
    """Paired bootstrap over eval images: the share of resamples in which the candidate is not
    worse (`statistic(idx) <= 0`, where statistic is production-better-by). Small = the
    candidate is worse beyond resampling noise. Used where McNemar does not apply (precision,
    calibration: not paired proportions)."""
    rng = np.random.default_rng(seed)
    not_worse = 0
    for _ in range(samples):
        idx = rng.integers(0, n, n)
        if statistic(idx) <= 0:
            not_worse += 1
    return (not_worse + 1) / (samples + 1)
