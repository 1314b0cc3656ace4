"""Statistics for reporting RL results honestly: IQM with stratified bootstrap intervals, Wilson intervals.

The definitions follow rliable (Agarwal et al., 2021, "Deep RL at the Edge of the Statistical
Precipice"): the interquartile mean (IQM) is the mean of the middle 50% of all runs; its 95% interval
comes from a stratified bootstrap, which resamples seeds within each task so every task keeps its
number of runs. Written on numpy/scipy rather than depending on rliable itself, which pulls in arch,
statsmodels, pandas and seaborn for these few lines. This module does not import SB3.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import stats


def iqm(scores: Sequence[float] | np.ndarray) -> float:
    """Interquartile mean: the mean of the middle 50% of ``scores`` (rliable's ``aggregate_iqm``)."""
    values = np.sort(np.asarray(scores, dtype=float).ravel())
    if values.size == 0:
        raise ValueError("iqm of no scores")
    cut = int(0.25 * values.size)  # as scipy.stats.trim_mean(values, 0.25), without its overhead
    return float(values[cut:values.size - cut].mean())


def stratified_bootstrap_interval(
    scores_by_task: Mapping[str, Sequence[float]],
    statistic: Callable[[np.ndarray], float] = iqm,
    confidence: float = 0.95,
    resamples: int = 2_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Point estimate and percentile interval of ``statistic`` over all tasks' runs pooled.

    Each resample draws, within every task, as many runs as it has, with replacement; the statistic
    is computed on the pooled resample. Returns ``(estimate, low, high)``.
    """
    if not scores_by_task:
        raise ValueError("no tasks to bootstrap")
    tasks = [np.asarray(v, dtype=float).ravel() for v in scores_by_task.values()]
    if any(t.size == 0 for t in tasks):
        raise ValueError("every task needs at least one run")
    rng = np.random.default_rng(seed)
    estimate = statistic(np.concatenate(tasks))
    draws = np.empty(resamples)
    for r in range(resamples):
        draws[r] = statistic(np.concatenate([t[rng.integers(0, t.size, t.size)] for t in tasks]))
    tail = (1 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1 - tail])
    return float(estimate), float(low), float(high)


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """Proportion ``successes / trials`` with its Wilson score interval: ``(rate, low, high)``."""
    if trials <= 0:
        raise ValueError("a Wilson interval needs at least one trial")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    z = stats.norm.ppf(1 - (1 - confidence) / 2)
    rate = successes / trials
    denominator = 1 + z**2 / trials
    centre = (rate + z**2 / (2 * trials)) / denominator
    half_width = z * np.sqrt(rate * (1 - rate) / trials + z**2 / (4 * trials**2)) / denominator
    return rate, float(max(0.0, centre - half_width)), float(min(1.0, centre + half_width))


def normalised_area_under_curve(timesteps: Sequence[float], scores: Sequence[float],
                                low: float, high: float) -> float:
    """Area under an evaluation curve, scores rescaled to [0, 1] between ``low`` and ``high``, per timestep.

    1 means the task's best score at every evaluation; 0 the reference low score throughout.
    """
    t = np.asarray(timesteps, dtype=float)
    s = (np.asarray(scores, dtype=float) - low) / (high - low)
    if t.size < 2:
        return float(s.mean()) if s.size else float("nan")
    return float(np.trapezoid(s, t) / (t[-1] - t[0]))


def performance_profile(scores: Sequence[float], thresholds: Sequence[float]) -> np.ndarray:
    """Fraction of runs whose score exceeds each threshold (rliable's run-score distribution)."""
    values = np.asarray(scores, dtype=float).ravel()
    return np.array([(values > tau).mean() for tau in thresholds])
