"""Collapse detection from a stream of evaluation scores.

Scores can be negative (Acrobot, MountainCar) or change sign (LunarLander), so no rule here uses a
ratio such as "50% of best". Every drop is measured as a fraction of the *learned range*: the distance
between the reference score (the last good snapshot's) and the lowest score seen so far (``floor``,
usually the untrained policy's). On CartPole-v1 with a floor of 9 and a reference of 500, a drop of
0.5 means "below 254.5"; on Acrobot-v1 with a floor of -500 and a reference of -80, "below -290".

A detector is fed one score at a time with ``update(reference, current, floor)`` and answers whether
the agent has collapsed. Detectors keep a patience count; ``reset()`` forgets it (after a rollback or
a new good score). This module does not import Stable-Baselines3.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Score:
    """One evaluation: the mean return at a timestep and, where known, the episode returns behind it.

    :param timestep: environment timesteps of training when the evaluation was made
    :param mean: mean episode return
    :param episode_returns: the individual episode returns (``None`` if only the mean is known)
    """

    timestep: int
    mean: float
    episode_returns: tuple[float, ...] | None = None

    @classmethod
    def from_returns(cls, timestep: int, returns: Sequence[float]) -> Score:
        if len(returns) == 0:
            raise ValueError("a score needs at least one episode return")
        values = tuple(float(r) for r in returns)
        return cls(timestep=int(timestep), mean=float(np.mean(values)), episode_returns=values)


def normalised_drop(reference: float, current: float, floor: float) -> float:
    """How far ``current`` fell below ``reference``, as a fraction of ``reference - floor``.

    0 means no drop, 1 means back to the floor. Returns 0 when nothing has been learned yet
    (``reference <= floor``), since there is nothing to lose.
    """
    learned = reference - floor
    if not learned > 0:
        return 0.0
    return (reference - current) / learned


class CollapseDetector(ABC):
    """Declares a collapse after ``patience`` consecutive bad scores.

    :param patience: consecutive bad scores needed (1: act on the first one)
    """

    def __init__(self, patience: int = 1) -> None:
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive int, got {patience!r}")
        self.patience = patience
        self.bad_in_a_row = 0

    def reset(self) -> None:
        """Forget the patience count (call after a rollback or a new good score)."""
        self.bad_in_a_row = 0

    def update(self, reference: Score, current: Score, floor: float) -> bool:
        """Feed one new score; ``True`` when the agent is judged to have collapsed."""
        if math.isnan(current.mean) or self.is_bad(reference, current, floor):
            self.bad_in_a_row += 1
        else:
            self.bad_in_a_row = 0
        return self.bad_in_a_row >= self.patience

    @abstractmethod
    def is_bad(self, reference: Score, current: Score, floor: float) -> bool:
        """Whether this one score is bad compared with the reference."""


class DropFromBest(CollapseDetector):
    """Bad when the score fell by more than ``drop`` of the learned range below the reference.

    Use it when evaluations are cheap and fairly reliable (deterministic policies, many episodes).

    :param drop: fraction of ``reference - floor`` (0.5: lost half of what was learned)
    :param patience: consecutive bad scores needed
    """

    def __init__(self, drop: float = 0.5, patience: int = 1) -> None:
        super().__init__(patience)
        if not 0 < drop <= 1:
            raise ValueError(f"drop must be a fraction in (0, 1], got {drop!r}")
        self.drop = drop

    def is_bad(self, reference: Score, current: Score, floor: float) -> bool:
        return normalised_drop(reference.mean, current.mean, floor) > self.drop


class SignificantDrop(DropFromBest):
    """Bad when the drop is large (as ``DropFromBest``) *and* statistically significant.

    Compares the episode returns behind the reference score with the current ones by a one-sided
    Welch t-test (are the current returns lower?). This keeps a noisy evaluation, e.g. one unlucky
    episode among five, from triggering a rollback. Where either score lacks its episode returns it
    falls back to the drop rule alone.

    :param drop: fraction of ``reference - floor`` the mean must fall by
    :param alpha: significance level of the one-sided test
    :param patience: consecutive bad scores needed
    """

    def __init__(self, drop: float = 0.5, alpha: float = 0.05, patience: int = 1) -> None:
        super().__init__(drop=drop, patience=patience)
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.alpha = alpha

    def is_bad(self, reference: Score, current: Score, floor: float) -> bool:
        if not super().is_bad(reference, current, floor):
            return False
        if reference.episode_returns is None or current.episode_returns is None:
            return True
        return welch_p_value(reference.episode_returns, current.episode_returns) < self.alpha


def welch_p_value(reference: Sequence[float], current: Sequence[float]) -> float:
    """One-sided p-value that ``current`` returns are lower than ``reference`` ones (Welch's t-test).

    With zero variance on both sides (e.g. five CartPole episodes of 500 against five of 9) the
    t-statistic is undefined; then the means decide (p 0 or 1). With a single episode on either side
    there is no variance estimate and the test cannot reject (p 1).
    """
    ref, cur = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    if len(ref) < 2 or len(cur) < 2:
        return 1.0
    if ref.var() == 0 and cur.var() == 0:
        return 0.0 if cur.mean() < ref.mean() else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # near-identical samples lose precision; harmless
        result = stats.ttest_ind(ref, cur, equal_var=False, alternative="greater")
    return float(result.pvalue)


class ScoreHistory:
    """Best and lowest score so far, and whether a new score is as good as the best.

    :param tolerance: a score counts as good when within this fraction of the learned range
        (``best - floor``) of the best score; equal scores (CartPole's 500 again) always count
    """

    def __init__(self, tolerance: float = 0.05) -> None:
        if not 0 <= tolerance < 1:
            raise ValueError(f"tolerance must be a fraction in [0, 1), got {tolerance!r}")
        self.tolerance = tolerance
        self.best = -math.inf
        self.floor = math.inf
        self.floor_returns: tuple[float, ...] | None = None  # the episode returns behind the floor, if known

    def observe(self, score: Score) -> None:
        if math.isfinite(score.mean):
            self.best = max(self.best, score.mean)
            if score.mean < self.floor:
                self.floor, self.floor_returns = score.mean, score.episode_returns

    def has_learned(self, reference: Score, min_delta: float = 0.0, alpha: float | None = 0.05,
                    solved_score: float | None = None, min_fraction_of_solved: float = 0.1) -> bool:
        """Whether ``reference`` is a level actually reached, so that falling from it can be a collapse.

        A reference at or above ``solved_score`` (the task's reward threshold, where it has one) always
        counts, also for a policy that was good before training. Otherwise it must beat the floor by more
        than ``min_delta`` (in return units, like Keras' EarlyStopping ``min_delta``: a difference, so it
        works for negative returns) and, where ``solved_score`` is known, by more than
        ``min_fraction_of_solved`` of the way from the floor to it (CartPole-v1, floor 9.4, threshold 475:
        46.6), and, where the episode returns of both are known, significantly: a one-sided Welch t-test
        at level ``alpha`` (``None``: no test). Without this, an agent that has learned nothing has a
        "learned range" of noise: on CartPole a reference of 13.0 over a floor of 12.8 made a dip to 9.4
        look like a loss of 1,800% of it, and an exploring policy's 21 over a greedy one's 10 looks real.
        """
        if solved_score is not None and reference.mean >= solved_score:
            return True
        if solved_score is not None and solved_score > self.floor:
            min_delta = max(min_delta, min_fraction_of_solved * (solved_score - self.floor))
        if not reference.mean - self.floor > min_delta:
            return False
        if alpha is None or reference.episode_returns is None or self.floor_returns is None:
            return True
        return welch_p_value(reference.episode_returns, self.floor_returns) < alpha

    def is_good(self, score: Score) -> bool:
        """True if ``score`` (already observed) is within tolerance of the best score so far."""
        if not math.isfinite(score.mean):
            return False
        return normalised_drop(self.best, score.mean, self.floor) <= self.tolerance

    def rebase(self, score: Score) -> None:
        """Make ``score`` the new best (when the old best is no longer reachable, e.g. a new task)."""
        self.best = score.mean
