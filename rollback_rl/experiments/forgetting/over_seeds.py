"""Statistics over seeds: the independent unit of every forgetting experiment.

Every interval here resamples *seeds*, never events within a run: two collapses of one seed share its
network, its buffer and its history, so treating them as independent (as an earlier analysis of the
stationary collapses did) makes intervals too narrow. Each function takes one value per seed.

- :func:`interval`: a statistic (IQM, mean) of per-seed values with a 95% percentile bootstrap interval;
- :func:`paired_difference`: arm minus reference over the seeds both have (same seed: same network
  initialisation and, until the arms diverge, the same data), with a bootstrap interval of the mean
  difference, the ratio of the means, win/tie/loss counts and a one-sided Wilcoxon signed-rank p.

For example, steps to relearn A of five seeds, label-free bank ``{0: 2500, 1: 2500, 2: 5000, 3: 2500,
4: 15000}`` against vanilla ``{0: 7500, 1: 10000, 2: 5000, 3: 15000, 4: 15000}`` (lower is better):
mean difference -5,000, wins/ties/losses 3/2/0, ratio of means 5,500 / 10,500 = 0.52.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from rollback_rl.core.statistics import iqm, stratified_bootstrap_interval

BOOTSTRAP_RESAMPLES = 2_000
CONFIDENCE = 0.95


def mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def finite_values(values: Mapping[int, float | None]) -> dict[int, float]:
    """The seeds whose value is a finite number (``None``: undefined, e.g. a run that never solved)."""
    return {seed: float(value) for seed, value in values.items() if value is not None and math.isfinite(value)}


def interval(values: Sequence[float], statistic: Callable[[np.ndarray], float] = iqm,
             resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, float]:
    """``statistic`` of the per-seed ``values`` with a 95% bootstrap interval (resampling seeds)."""
    estimate, low, high = stratified_bootstrap_interval({"seeds": list(values)}, statistic=statistic,
                                                        confidence=CONFIDENCE, resamples=resamples)
    return {"estimate": estimate, "low": low, "high": high}


def describe(values: Mapping[int, float | None], resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Per-seed values of one metric: how many are defined, the values by seed, their mean with its
    interval, their IQM with its interval and their median (no interval without a defined value)."""
    defined = finite_values(values)
    entry: dict[str, Any] = {"n": len(defined), "undefined": len(values) - len(defined),
                             "values": {str(seed): defined[seed] for seed in sorted(defined)}}
    if defined:
        numbers = [defined[seed] for seed in sorted(defined)]
        entry.update(mean=interval(numbers, mean, resamples), iqm=interval(numbers, iqm, resamples),
                     median=float(np.median(numbers)))
    return entry


def paired_difference(arm: Mapping[int, float | None], reference: Mapping[int, float | None], better: str | None,
                      resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any] | None:
    """``arm - reference`` over the seeds where both are defined; ``None`` without such a seed.

    :param better: ``"lower"`` or ``"higher"``: which direction of the metric is better (for the
        win/tie/loss counts and the one-sided test); ``None`` for a metric that describes rather than
        scores (e.g. the mean age of sampled transitions): no counts, no test
    :return: ``n``; ``mean_difference`` (estimate, 95% bootstrap interval over seeds); ``median_difference``;
        ``ratio_of_means`` (mean of the arm over mean of the reference, resampling the pairs; ``None`` when
        the reference's mean is 0); ``wins``, ``ties``, ``losses``; ``wilcoxon_p_one_sided`` (H1: the arm is
        better; ``None`` when every difference is 0)
    """
    if better not in ("lower", "higher", None):
        raise ValueError(f"better must be 'lower', 'higher' or None, got {better!r}")
    a, r = finite_values(arm), finite_values(reference)
    seeds = sorted(set(a) & set(r))
    if not seeds:
        return None
    arm_values = np.array([a[s] for s in seeds])
    reference_values = np.array([r[s] for s in seeds])
    differences = arm_values - reference_values
    wins = ties = losses = p = None
    if better is not None:
        sign = 1.0 if better == "higher" else -1.0
        wins, losses = int(np.sum(sign * differences > 0)), int(np.sum(sign * differences < 0))
        ties = len(seeds) - wins - losses
        if np.any(differences != 0):
            p = float(stats.wilcoxon(sign * differences, alternative="greater", zero_method="wilcox").pvalue)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(seeds), (resamples, len(seeds)))
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(differences[draws].mean(axis=1), [tail, 1 - tail])
    ratio = None
    if reference_values.mean() != 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = arm_values[draws].mean(axis=1) / reference_values[draws].mean(axis=1)
        ratios = ratios[np.isfinite(ratios)]  # a resample whose reference mean is 0 has no ratio
        ratio_low, ratio_high = np.quantile(ratios, [tail, 1 - tail]) if ratios.size else (math.nan, math.nan)
        ratio = {"estimate": float(arm_values.mean() / reference_values.mean()), "low": float(ratio_low),
                 "high": float(ratio_high)}
    return {"n": len(seeds), "seeds": seeds,
            "mean_difference": {"estimate": float(differences.mean()), "low": float(low), "high": float(high)},
            "median_difference": float(np.median(differences)), "ratio_of_means": ratio,
            "wins": wins, "ties": ties, "losses": losses, "wilcoxon_p_one_sided": p}
