"""The rollback decision: when to snapshot, when to restore, when to check a restore, when to stop trying.

``RollbackPolicy`` is fed the scores of the weights in place (``Score``: a mean return and the episode
returns behind it) and what the caller learns while acting (whether a snapshot was taken, the fresh
score of a restored snapshot). It answers with a list of actions (``TakeSnapshot``, ``CheckSnapshot``,
``Restore``, ``PutBackCurrent``, ``Rebase``, ``SetAside``, ...) and keeps the bookkeeping: the scores,
the rollbacks, the best score and the floor (``ScoreHistory``), the detector's patience, how often each
snapshot was restored, the rollbacks in a row and the score of the weights in place. It never touches
weights: ``rollback_rl.callbacks.RollbackCallback`` carries the actions out on an SB3 model. This module
does not import Stable-Baselines3 (nor torch), so the decision can be read and tested with lists of
numbers.

The snapshots themselves live in the caller's snapshot rings, which checkpoints save and reload; the
caller passes their metadata in (``last_good``: the newest good snapshot's timestep, score and episode
returns; ``set_aside``: the snapshot put aside by ``max_restores``), so the policy and the rings can never
disagree, e.g. after a resumed run refilled its rings.

The decision, one score at a time:

1. A score as good as the best so far (within ``tolerance`` of the learned range ``best - floor``;
   equal scores count, so the newest good weights are kept) asks for a snapshot.
2. A fall counts only from a level actually learned (``ScoreHistory.has_learned``: above the floor as
   it stood before this score by more than ``min_delta`` and 10% of the way to ``solved_score``, and
   significantly; or at ``solved_score``). When the detector then judges the score a collapse from the
   last good snapshot's score, the snapshot is put back, unless it was already restored ``max_restores``
   times (default: no limit) and the score has not fallen to the floor (lost more than ``FLOOR_DROP`` of
   the learned range): then it is set aside and the current level becomes the reference (a *rebase*).
   A set-aside snapshot is checked again as soon as the weights fall to the floor: giving up is never
   final, and a fall to the floor is repaired at once however many restores came before.
3. Where the caller can evaluate (``checks_restores``), the restored snapshot is scored afresh before
   it stays: its recorded score was the best of many noisy evaluations (biased upward) and, if the
   environment changed, no longer holds at all. Unless the fresh score beats the collapsed one by more
   than ``tolerance`` of the learned range, the current weights go back and the fresh score becomes the
   reference (a false alarm, also a rebase). If it stays, both evaluations of the snapshot are pooled
   into its score. Without evaluation (online mode) there is no such check; ``max_consecutive_rollbacks``
   rollbacks in a row with no good score between make the current level the reference instead.
4. When training ends, a snapshot set aside comes back if it beats the final weights' score by more
   than ``tolerance``, on a fresh check as in 3.

Worked example: CartPole-v1 (scores from 9 to 500), an evaluation every 500 steps,
``SignificantDrop(drop=0.5)``, ``tolerance=0.05`` and ``max_restores=2`` (``RollbackCallback``'s default;
the policy's own is no limit):

======== ======== ==============================================================================
timestep score    decision
======== ======== ==============================================================================
0        9.4      the untrained policy: the floor
500      500      best so far: ``TakeSnapshot``
1,000    500      equal to the best: ``TakeSnapshot`` (the newest good weights)
1,500    12       fell (500 - 12) / (500 - 9.4) = 99% of the learned range, more than 50%, and
                  significantly (Welch t-test): ``CheckSnapshot`` of timestep 1,000; it scores 500 afresh,
                  more than 5% of the range above 12, so it stays (restored once, its score now the
                  mean of both evaluations)
2,000    9.8      collapsed again: restored a second time the same way
2,500    150      fell 71% of the range, not to the floor (90%), and the snapshot of 1,000 was restored
                  twice: ``SetAside`` and ``Rebase``; 150 is now the best, so ``TakeSnapshot`` of the
                  weights in place (a fall to 10 would have been restored a third time)
end      150      the snapshot set aside scores 500 > 150: ``CheckSnapshot`` confirms it, it comes back
======== ======== ==============================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Union

import numpy as np

from rollback_rl.core.detectors import CollapseDetector, Score, ScoreHistory, SignificantDrop, normalised_drop


@dataclass(frozen=True)
class RollbackEvent:
    """One rollback: when it happened, the score that triggered it, and the snapshot put back.

    All timesteps are environment timesteps of training.
    """

    timestep: int
    score: float
    restored_timestep: int
    restored_score: float
    verified_score: float | None = None  # the restored weights' fresh evaluation (None in online mode)


# -- what the policy asks its caller to do ------------------------------------------------------------

@dataclass(frozen=True)
class TakeSnapshot:
    """Snapshot the weights in place, recorded with ``score``; report success with ``on_snapshot_taken()``."""

    score: Score


@dataclass(frozen=True)
class Restore:
    """Put the last good snapshot's weights in place (no fresh check: online mode)."""

    snapshot_timestep: int


@dataclass(frozen=True)
class CheckSnapshot:
    """Keep the weights in place aside, put the snapshot's weights in place, evaluate them afresh and
    report the score with ``on_check()``.

    :param snapshot: the snapshot to check (its timestep and recorded score)
    :param current: the score of the weights kept aside
    :param set_aside: the snapshot set aside by ``max_restores`` (else the last good one)
    """

    snapshot: Score
    current: float
    set_aside: bool = False


@dataclass(frozen=True)
class PutBackCurrent:
    """Put back the weights kept aside by ``CheckSnapshot``: the snapshot did not beat them."""


@dataclass(frozen=True)
class RescoreSnapshot:
    """Record ``score`` as the snapshot's score (its fresh score, or both evaluations pooled); the
    snapshot set aside by ``max_restores`` if ``set_aside``."""

    snapshot_timestep: int
    score: Score
    set_aside: bool = False


@dataclass(frozen=True)
class SetAside:
    """Keep a copy of the last good snapshot for the end of training.

    :param snapshot: the snapshot (restored ``max_restores`` times)
    :param replaces_kept: whether it replaces the one set aside so far (``False``: that one scored at
        least as well, and stays)
    """

    snapshot: Score
    replaces_kept: bool


@dataclass(frozen=True)
class Rebase:
    """No rollback: the policy made ``reference`` the score to hold from now on, for ``reason``.
    ``snapshot_failed``: because the snapshot, evaluated afresh, was no better than the collapsed weights
    (what it had learned no longer holds, e.g. the environment changed)."""

    reason: str
    reference: float
    snapshot_failed: bool = False


@dataclass(frozen=True)
class RolledBack:
    """A rollback was made (``event``, also appended to ``rollbacks``): announce it, and unless it came at
    the end of training, run the remedies."""

    event: RollbackEvent
    at_end: bool = False


@dataclass(frozen=True)
class KeptFinalWeights:
    """End of training: the snapshot set aside did not beat the final weights on its fresh check."""

    final_score: float
    snapshot_timestep: int
    snapshot_fresh_score: float


Action = Union[TakeSnapshot, Restore, CheckSnapshot, PutBackCurrent, RescoreSnapshot, SetAside, Rebase,
               RolledBack, KeptFinalWeights]


@dataclass(frozen=True)
class _PendingCheck:
    """A ``CheckSnapshot`` asked for and not yet answered."""

    trigger: Score  # the score of the weights kept aside
    snapshot: Score
    restores: int  # times the snapshot was restored before
    at_end: bool
    set_aside: bool = False  # the snapshot set aside by max_restores, checked during training


FLOOR_DROP = 0.9  # "back at the floor": lost more than 90% of the learned range


class RollbackPolicy:
    """Decides, score by score, when to snapshot and when to restore; see the module docstring.

    :param detector: collapse rule; default ``SignificantDrop(drop=0.5, alpha=0.05, patience=1)``
    :param tolerance: fraction of the learned range (best minus lowest score) within which a score
        still counts as good, and by which a restored snapshot must beat the collapsed weights
    :param max_restores: restores of one snapshot after which the next collapse from it is a rebase
        (``None``: no limit)
    :param max_consecutive_rollbacks: without checks only: rollbacks in a row (no good score between)
        before the current level is accepted as the new reference
    :param checks_restores: whether the caller evaluates a restored snapshot afresh (``CheckSnapshot``);
        ``False`` in online mode, where restores are not checked
    :param min_delta: a fall counts as a collapse only from a reference that beats the floor by more than
        this (return units); see ``ScoreHistory.has_learned``; ``None``: from any reference
    :param learned_alpha: ... and beats it significantly (one-sided Welch test at this level, where the
        episode returns are known; ``None``: no test)
    :param solved_score: a reference at or above this score (the task's reward threshold) counts as
        learned whatever the floor (e.g. a policy already good before training)
    """

    def __init__(self, detector: CollapseDetector | None = None, tolerance: float = 0.05,
                 max_restores: int | None = None, max_consecutive_rollbacks: int = 3,
                 checks_restores: bool = True, min_delta: float | None = 0.0,
                 learned_alpha: float | None = 0.05, solved_score: float | None = None) -> None:
        if detector is not None and not isinstance(detector, CollapseDetector):
            raise TypeError(f"detector must be a CollapseDetector, got {type(detector).__name__}")
        if (max_restores is not None and max_restores < 1) or max_consecutive_rollbacks < 1:
            raise ValueError("max_restores (or None) and max_consecutive_rollbacks must be at least 1, got "
                             f"{max_restores!r} and {max_consecutive_rollbacks!r}")
        self.detector = detector if detector is not None else SignificantDrop()
        self.history = ScoreHistory(tolerance)
        self.max_restores = max_restores
        self.max_consecutive_rollbacks = max_consecutive_rollbacks
        self.checks_restores = checks_restores
        self.min_delta = min_delta
        self.learned_alpha = learned_alpha
        self.solved_score = solved_score
        self.scores: list[Score] = []
        self.rollbacks: list[RollbackEvent] = []
        self.rebases = 0
        self.restore_counts: dict[int, int] = {}  # snapshot timestep -> times restored
        self.consecutive_rollbacks = 0  # rollbacks since the last good score
        self.in_place = math.nan  # the score of the weights in place now
        self._pending: _PendingCheck | None = None

    # -- facts in, actions out ------------------------------------------------------------------

    def on_baseline(self, score: Score) -> None:
        """The untrained policy's score: it sets the floor of the learned range, and is not a score of training."""
        self.history.observe(score)

    def on_score(self, score: Score, last_good: Score | None, set_aside: Score | None = None) -> list[Action]:
        """A new score of the weights in place.

        :param last_good: the newest good snapshot's timestep, score and episode returns (``None``: none yet)
        :param set_aside: the snapshot set aside by ``max_restores`` so far, if any
        """
        self._require_no_pending_check()
        self.scores.append(score)
        self.in_place = score.mean
        # Judged against the floor before this score: a collapse must not lower the floor it is measured from.
        learned = last_good is not None and self._has_learned(last_good)
        self.history.observe(score)
        # Never sit on a policy back at the floor while a snapshot that clearly beats it is at hand; the set-aside
        # snapshot is tried first when it is better than the newest good one (which came after giving up).
        to_floor = set_aside is not None and self._fell_to_floor(set_aside, score)
        if to_floor and (last_good is None or set_aside.mean > last_good.mean):
            return self._check_set_aside(score, set_aside)
        if learned and self.detector.update(last_good, score, self.history.floor):
            return self._roll_back(score, last_good, set_aside)
        if to_floor:
            return self._check_set_aside(score, set_aside)
        if self.history.is_good(score):
            return [TakeSnapshot(score)]
        return []

    def _check_set_aside(self, score: Score, set_aside: Score) -> list[Action]:
        self._pending = _PendingCheck(score, set_aside, self.restore_counts.get(set_aside.timestep, 0),
                                      at_end=False, set_aside=True)
        return [CheckSnapshot(set_aside, score.mean, set_aside=True)]

    def _has_learned(self, reference: Score) -> bool:
        if self.min_delta is None:
            return True  # no gate: every level counts (e.g. a detector injected by a test)
        return self.history.has_learned(reference, self.min_delta, self.learned_alpha, self.solved_score)

    def _fell_to_floor(self, reference: Score, score: Score) -> bool:
        """Whether ``score`` lost more than ``FLOOR_DROP`` of what ``reference`` had learned, significantly."""
        return (self._has_learned(reference)
                and normalised_drop(reference.mean, score.mean, self.history.floor) > FLOOR_DROP
                and SignificantDrop(FLOOR_DROP).is_bad(reference, score, self.history.floor))

    def on_snapshot_taken(self) -> None:
        """The snapshot asked for was taken (not refused, e.g. for non-finite weights): a fresh start."""
        self.detector.reset()
        self.consecutive_rollbacks = 0

    def on_check(self, fresh: Score) -> list[Action]:
        """The fresh score of the snapshot ``CheckSnapshot`` put in place."""
        check = self._pending
        if check is None:
            raise RuntimeError("on_check() without a CheckSnapshot to answer")
        self._pending = None
        # Clearly better: the weights kept aside fall short of the fresh score by more than the "good" tolerance.
        better = normalised_drop(fresh.mean, check.trigger.mean, self.history.floor) > self.history.tolerance
        snapshot = check.snapshot
        if check.at_end:
            if not better:
                return [PutBackCurrent(), KeptFinalWeights(check.trigger.mean, snapshot.timestep, fresh.mean)]
            event = RollbackEvent(check.trigger.timestep, check.trigger.mean, snapshot.timestep, snapshot.mean,
                                  fresh.mean)
            self.rollbacks.append(event)
            self.in_place = fresh.mean
            return [RolledBack(event, at_end=True)]
        if check.set_aside:
            if not better:  # e.g. the environment changed: its fresh score is what it is worth now
                rescored = Score(snapshot.timestep, fresh.mean, fresh.episode_returns)
                return [PutBackCurrent(), RescoreSnapshot(snapshot.timestep, rescored, set_aside=True),
                        Rebase(f"the snapshot of timestep {snapshot.timestep} set aside earlier now scores "
                               f"{fresh.mean:.2f}", self.history.best, snapshot_failed=True)]
            # It becomes the newest good snapshot again (a copy at this timestep), so later collapses fall back to it.
            event = self._restored(check.trigger, snapshot, check.restores, verified=fresh.mean)
            self.history.observe(fresh)
            return [TakeSnapshot(fresh), RolledBack(event)]
        if not better:
            rescored = Score(snapshot.timestep, fresh.mean, fresh.episode_returns)
            return [PutBackCurrent(), RescoreSnapshot(snapshot.timestep, rescored),
                    *self._rebase(check.trigger, f"the snapshot of timestep {snapshot.timestep} now scores "
                                                 f"{fresh.mean:.2f}", new_reference=fresh, snapshot_failed=True)]
        # Both evaluations of the snapshot inform the next comparison (less biased than the best one alone).
        pooled = np.concatenate([snapshot.episode_returns if snapshot.episode_returns is not None else [snapshot.mean],
                                 fresh.episode_returns if fresh.episode_returns is not None else [fresh.mean]])
        pooled_score = Score(snapshot.timestep, float(pooled.mean()), tuple(float(r) for r in pooled))
        event = self._restored(check.trigger, snapshot, check.restores, verified=fresh.mean)
        return [RescoreSnapshot(snapshot.timestep, pooled_score), RolledBack(event)]

    def on_training_end(self, timestep: int, set_aside: Score | None) -> list[Action]:
        """Training ends at ``timestep`` (after the final score): bring back ``set_aside`` if clearly better."""
        self._require_no_pending_check()
        if set_aside is None or not math.isfinite(self.in_place) or \
                normalised_drop(set_aside.mean, self.in_place, self.history.floor) <= self.history.tolerance:
            return []
        self._pending = _PendingCheck(Score(timestep, self.in_place), set_aside, 0, at_end=True)
        return [CheckSnapshot(set_aside, self.in_place, set_aside=True)]

    # -- the decision ---------------------------------------------------------------------------

    def _roll_back(self, score: Score, snapshot: Score, set_aside: Score | None) -> list[Action]:
        restores = self.restore_counts.get(snapshot.timestep, 0)
        # The limit gives up on collapses that keep coming back, never on a fall to the floor: a policy that
        # lost (nearly) everything it learned is repaired now, however many restores came before.
        if self.max_restores is not None and restores >= self.max_restores and not self._fell_to_floor(snapshot, score):
            replaces_kept = set_aside is None or snapshot.mean > set_aside.mean
            return [SetAside(snapshot, replaces_kept),
                    *self._rebase(score, f"the snapshot of timestep {snapshot.timestep} was restored {restores} "
                                         "times and training collapsed again")]
        if self.checks_restores:
            # The detector already judged the fall from the recorded score real; now the snapshot only
            # has to be clearly better than the current weights (by more than the "good" tolerance).
            self._pending = _PendingCheck(score, snapshot, restores, at_end=False)
            return [CheckSnapshot(snapshot, score.mean)]
        if self.consecutive_rollbacks >= self.max_consecutive_rollbacks:
            return self._rebase(score, f"{self.consecutive_rollbacks} rollbacks in a row")
        event = self._restored(score, snapshot, restores, verified=None)
        return [Restore(snapshot.timestep), RolledBack(event)]

    def _restored(self, score: Score, snapshot: Score, restores: int, verified: float | None) -> RollbackEvent:
        """Book a restore of ``snapshot`` (``restores`` times before) triggered by ``score``."""
        self.in_place = snapshot.mean if verified is None else verified
        self.restore_counts[snapshot.timestep] = restores + 1
        self.detector.reset()
        self.consecutive_rollbacks += 1
        event = RollbackEvent(score.timestep, score.mean, snapshot.timestep, snapshot.mean, verified)
        self.rollbacks.append(event)
        return event

    def _rebase(self, score: Score, reason: str, new_reference: Score | None = None,
                snapshot_failed: bool = False) -> list[Action]:
        """No rollback: take ``new_reference`` (default: ``score``) as the level to hold from now on."""
        self.rebases += 1
        self.history.rebase(new_reference if new_reference is not None else score)
        actions: list[Action] = [Rebase(reason, self.history.best, snapshot_failed)]
        if self.history.is_good(score):
            actions.append(TakeSnapshot(score))
        self.detector.reset()
        self.consecutive_rollbacks = 0
        return actions

    def _require_no_pending_check(self) -> None:
        if self._pending is not None:
            raise RuntimeError("a CheckSnapshot is still unanswered: report its fresh score with on_check()")

    # -- saving progress ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The bookkeeping as plain (JSON-able) values, for a checkpoint."""
        return {"scores": [_score_to_json(s) for s in self.scores],
                "rollbacks": [asdict(e) for e in self.rollbacks],
                "best": self.history.best, "floor": self.history.floor,
                "floor_returns": None if self.history.floor_returns is None else list(self.history.floor_returns),
                "bad_in_a_row": self.detector.bad_in_a_row, "rebases": self.rebases,
                "consecutive_rollbacks": self.consecutive_rollbacks, "in_place": self.in_place,
                "restore_counts": {str(t): n for t, n in self.restore_counts.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Put back ``state_dict()``.

        :raises KeyError, TypeError, ValueError: if ``state`` is malformed
        """
        self.scores = [_score_from_json(s) for s in state["scores"]]
        self.rollbacks = [RollbackEvent(**event) for event in state["rollbacks"]]
        self.history.best, self.history.floor = float(state["best"]), float(state["floor"])
        floor_returns = state.get("floor_returns")  # absent from checkpoints before 0.3
        self.history.floor_returns = None if floor_returns is None else tuple(float(r) for r in floor_returns)
        self.detector.bad_in_a_row = int(state["bad_in_a_row"])
        self.rebases = int(state["rebases"])
        self.consecutive_rollbacks = int(state["consecutive_rollbacks"])
        self.in_place = float(state.get("in_place", math.nan))  # absent from checkpoints of version 0.1
        self.restore_counts = {int(t): int(n) for t, n in state.get("restore_counts", {}).items()}
        self._pending = None


def _score_to_json(score: Score) -> dict[str, Any]:
    returns = None if score.episode_returns is None else list(score.episode_returns)
    return {**asdict(score), "episode_returns": returns}


def _score_from_json(value: Mapping[str, Any]) -> Score:
    returns = value["episode_returns"]
    return Score(int(value["timestep"]), float(value["mean"]),
                 None if returns is None else tuple(float(r) for r in returns))
