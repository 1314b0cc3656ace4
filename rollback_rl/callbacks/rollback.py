"""RollbackCallback: notice a performance collapse during SB3 training and restore the last good weights.

The callback is the SB3 side of :class:`rollback_rl.core.policy.RollbackPolicy`: it obtains a score
(its own evaluation, its EvalCallback parent's, or the training episodes), asks the policy what to do,
and carries out the answer on the model (snapshots, restores, fresh evaluations, logs, messages, the
``callback_on_rollback`` remedies). The decision itself lives in the policy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback, EventCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv, sync_envs_normalization

from rollback_rl.callbacks.schedules import scale_learning_rate
from rollback_rl.core.detectors import CollapseDetector, Score, ScoreHistory
from rollback_rl.core.policy import (Action, CheckSnapshot, KeptFinalWeights, PutBackCurrent, Rebase, RescoreSnapshot,
                                     Restore, RollbackEvent, RollbackPolicy, RolledBack, SetAside, TakeSnapshot)
from rollback_rl.core.schedules import ScaledSchedule
from rollback_rl.core.snapshots import NonFiniteStateError, Snapshot, SnapshotRing
from rollback_rl.evaluation import EVAL_SEED_OFFSET, make_eval_env, reward_threshold
from rollback_rl.sb3_state import sb3_training_state
from rollback_rl.tensorboard_layout import (BASELINE_TAG, BEST_TAG, END_RESTORE_TAG, EVAL_TAG, EVAL_TIMESTEPS_TAG,
                                            EVENT_TAG, LEARNING_RATE_TAG, NONFINITE_SNAPSHOT_REFUSED_TAG, REBASES_TAG,
                                            REFERENCE_TAG, REFERENCE_TIMESTEP_TAG, RETIRED_TAG, ROLLBACKS_TAG,
                                            SCORE_TAG, SNAPSHOT_BYTES_TAG, VERIFY_TAG)

__all__ = ["RollbackCallback", "RollbackEvent", "SelfRestoringModel"]


@runtime_checkable
class SelfRestoringModel(Protocol):
    """A model that keeps its own snapshot ring and restores snapshots itself (e.g. ``RollbackDQN``,
    whose undo log must hear of every restore). ``RollbackCallback`` snapshots into that ring and
    restores through ``restore_snapshot``; any other model gets a ring of the callback's own."""

    rollback_snapshots: SnapshotRing

    def restore_snapshot(self, snapshot: Snapshot) -> None:
        """Copy ``snapshot`` back into the model's live training state, bitwise."""


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _metadata(snapshot: Snapshot | None) -> Score | None:
    """What the policy needs of a snapshot: its timestep, score and episode returns."""
    if snapshot is None:
        return None
    returns = None if snapshot.episode_returns is None else tuple(snapshot.episode_returns)
    return Score(timestep=snapshot.timestep, mean=snapshot.score, episode_returns=returns)


class RollbackCallback(EventCallback):
    """Restore the last good weights when the agent's performance collapses, then keep learning.

    After each score as good as the best so far (within ``tolerance``; equal scores count, so the
    newest good weights are kept) it snapshots the training state: every network (target networks
    included), every optimizer state. When ``detector`` reports a collapse it restores the last good
    snapshot at once, before the next gradient step, and runs the recovery remedies
    (``callback_on_rollback``, none by default; see :mod:`rollback_rl.callbacks.recovery`). Once a score
    first reaches the task's reward threshold, the learning rate is multiplied by ``cool_on_solve`` (0.1)
    for the rest of training: weights that solve the task are consolidated rather than pushed on at full
    speed (on its own, without rollback, this cut made training fail less often in docs/results.md; with
    rollback it did not). The
    replay buffer and the exploration schedule are left as they are. (0.3.0 reset Adam and cooled the
    learning rate x0.1 after every restore, with no limit on restores; on evaluation seeds that froze 12 of
    20 CartPole runs below the threshold.)

    Rollback loops and false alarms are guarded against. Where an evaluation env exists, the restored
    weights are evaluated afresh at once and stay only if they beat the current score by more than
    ``tolerance``; if not (the environment changed, or the snapshot's best score was a lucky one), the
    current weights are put back and the fresh score becomes the reference. Without one, the current
    level becomes the reference after ``max_consecutive_rollbacks`` rollbacks in a row. With
    ``max_restores`` set (2 by default), a snapshot restored that many times is set aside at its next
    collapse, unless that one falls to the floor (the current score becomes the reference: a rebase);
    it comes back as soon as the weights fall to the floor, and
    when training ends (``check_at_end``) if it still beats the final weights on a fresh evaluation.
    These decisions are made by ``policy``
    (:class:`~rollback_rl.core.policy.RollbackPolicy`, whose docstring works through an example); the
    callback obtains the scores and carries the decisions out.

    Scores come from one of three places:

    - ``eval_env`` given: ``n_eval_episodes`` episodes every ``eval_freq`` training timesteps;
    - used as ``EvalCallback(callback_after_eval=RollbackCallback())``: EvalCallback's evaluation (give
      it a ``log_path`` so the episode returns, not just their mean, reach the detector);
    - neither (also when built from keyword arguments alone, as the RL Zoo does): the training
      episodes that ended in the last ``eval_freq`` timesteps (at least ``n_eval_episodes`` of them),
      read from the ``Monitor`` episode info.

    Every rollback is appended to ``rollbacks`` (``RollbackEvent``), logged as ``rollback/*`` values
    and printed when ``verbose >= 1``.

    :param eval_env: environment to evaluate on (a gym.Env, a VecEnv or an env id); ``None`` for the
        EvalCallback-child or online modes
    :param eval_freq: evaluate every this many training timesteps (summed over envs)
    :param n_eval_episodes: episodes per evaluation (online mode: minimum episodes per score)
    :param deterministic: evaluate the greedy/deterministic policy
    :param detector: collapse rule; default ``SignificantDrop(drop=0.5, alpha=0.05, patience=1)``
    :param tolerance: fraction of the learned range (best minus lowest score) within which a score
        still counts as good
    :param max_snapshots: good snapshots kept in memory
    :param max_consecutive_rollbacks: online mode only: rollbacks in a row (no good score between)
        before the current level is accepted as the new reference
    :param max_restores: restores of one snapshot after which the next collapse from it is a rebase,
        unless that collapse reaches the floor (then it is restored however often it was before);
        ``None``: no limit. Without a limit rollback-rl 0.1 restored the same early snapshot up to 17
        times, each time training collapsed again (docs/results.md)
    :param min_delta: a fall counts as a collapse only from a level that beats the floor (the untrained
        policy's score where the callback evaluates it itself; else the lowest score seen before) by more
        than this many return units and by more than 10% of the way to the task's reward threshold (where
        its gymnasium spec has one), and significantly where episode returns are known (one-sided Welch
        test at 5%), or reaches that threshold: early dips of an agent that has learned nothing yet are not
        collapses (``None``: every level counts)
    :param check_at_end: evaluate once more when training ends and roll back if collapsed, so that
        ``learn()`` does not return collapsed weights; a snapshot set aside by ``max_restores`` comes
        back if a fresh evaluation says it is better (with an ``eval_env`` only: EvalCallback does not
        tell its child when training ends)
    :param callback_on_rollback: callback run right after each restore, or ``None`` (the default) for
        nothing: any callback, e.g. a ``CallbackList`` of remedies from ``rollback_rl.callbacks.recovery``
        (each can read the rollback from ``self.parent.rollbacks[-1]``). 0.3.0's default remedy was
        ``CallbackList([ResetOptimizer(), CoolLearningRate(0.1)])``
    :param cool_on_solve: multiply the learning rate by this, once, at the first score (the weights training
        produced, before any restore decision) that reaches the task's reward threshold
        (``spec.reward_threshold``; never where the env has none); through ``model.lr_schedule``, so SB3
        does not overwrite it. ``None``: never. The same schedule without rollback is the hard control of
        docs/protocol.md
    :param verbose: 0 silent, 1 one line per rollback, 2 also one line per score
    """

    def __init__(
        self,
        eval_env: gym.Env | VecEnv | str | None = None,
        eval_freq: int = 5_000,
        n_eval_episodes: int = 5,
        deterministic: bool = True,
        detector: CollapseDetector | None = None,
        tolerance: float = 0.05,
        max_snapshots: int = 3,
        max_consecutive_rollbacks: int = 3,
        max_restores: int | None = 2,
        min_delta: float | None = 0.0,
        check_at_end: bool = True,
        callback_on_rollback: BaseCallback | None = None,
        cool_on_solve: float | None = 0.1,
        verbose: int = 0,
    ) -> None:
        if callback_on_rollback is not None and not isinstance(callback_on_rollback, BaseCallback):
            raise ValueError(f"callback_on_rollback must be a callback or None, got {callback_on_rollback!r} (0.3.0's "
                             f'"default" was CallbackList([ResetOptimizer(), CoolLearningRate(0.1)]))')
        super().__init__(callback_on_rollback, verbose=verbose)
        if isinstance(callback_on_rollback, CallbackList):
            for child in callback_on_rollback.callbacks:  # remedies read the rollback from their parent
                child.parent = self
        self.eval_freq = _positive_int("eval_freq", eval_freq)
        self.n_eval_episodes = _positive_int("n_eval_episodes", n_eval_episodes)
        self.max_snapshots = _positive_int("max_snapshots", max_snapshots)
        max_consecutive_rollbacks = _positive_int("max_consecutive_rollbacks", max_consecutive_rollbacks)
        max_restores = None if max_restores is None else _positive_int("max_restores", max_restores)
        self.policy = RollbackPolicy(detector, tolerance, max_restores, max_consecutive_rollbacks, min_delta=min_delta)
        self.eval_env = make_eval_env(eval_env) if eval_env is not None else None
        self.deterministic = deterministic
        self.check_at_end = check_at_end
        if cool_on_solve is not None and (isinstance(cool_on_solve, bool) or not isinstance(cool_on_solve, (int, float))
                                          or not 0 < cool_on_solve <= 1):
            raise ValueError(f"cool_on_solve must be a factor in (0, 1] or None, got {cool_on_solve!r}")
        self.cool_on_solve = cool_on_solve
        self.cooled_at: int | None = None  # the timestep of the score that first reached the reward threshold

        self.baseline: Score | None = None  # the untrained policy's evaluation (own eval env only)
        self.eval_timesteps = 0  # environment steps spent evaluating
        self.eval_seconds = 0.0  # wall time spent evaluating
        self.ring: SnapshotRing | None = None
        self.retired = SnapshotRing(1, check_finite=False)  # the best snapshot set aside by max_restores
        self._current = SnapshotRing(1, check_finite=False)  # the weights in place, while a snapshot is checked
        self._next_check = 0
        self._online_returns: list[float] = []

    # -- what the policy keeps ------------------------------------------------------------------

    @property
    def scores(self) -> list[Score]:
        """Every score, in order (the untrained policy's ``baseline`` aside)."""
        return self.policy.scores

    @scores.setter
    def scores(self, scores: list[Score]) -> None:
        self.policy.scores = scores

    @property
    def rollbacks(self) -> list[RollbackEvent]:
        """Every rollback, in order (remedies read the one that triggered them as ``rollbacks[-1]``)."""
        return self.policy.rollbacks

    @rollbacks.setter
    def rollbacks(self, rollbacks: list[RollbackEvent]) -> None:
        self.policy.rollbacks = rollbacks

    @property
    def rebases(self) -> int:
        """How many collapses or false alarms made the current level the reference instead of a rollback."""
        return self.policy.rebases

    @rebases.setter
    def rebases(self, rebases: int) -> None:
        self.policy.rebases = rebases

    @property
    def history(self) -> ScoreHistory:
        """The best score and the floor of the learned range."""
        return self.policy.history

    @property
    def detector(self) -> CollapseDetector:
        """The collapse rule."""
        return self.policy.detector

    # -- set-up ---------------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """Where scores come from: ``"evaluate"``, ``"eval_callback"`` or ``"online"``."""
        if isinstance(self.parent, EvalCallback):
            return "eval_callback"
        return "evaluate" if self.eval_env is not None else "online"

    def _init_callback(self) -> None:
        super()._init_callback()
        if self.mode == "eval_callback" and self.eval_env is not None:
            raise ValueError("RollbackCallback inside EvalCallback reuses its evaluation: do not give it an eval_env")
        if isinstance(self.model, SelfRestoringModel):
            self.ring = self.model.rollback_snapshots
        else:
            self.ring = SnapshotRing(self.max_snapshots)
        self.policy.checks_restores = self.mode != "online"  # online mode cannot evaluate a restored snapshot
        if self.policy.solved_score is None:
            self.policy.solved_score = reward_threshold(self.training_env)
        if self.eval_env is not None and self.model.seed is not None:
            self.eval_env.seed(self.model.seed + EVAL_SEED_OFFSET)

    def _on_training_start(self) -> None:
        super()._on_training_start()
        self._next_check = self._next_multiple(self.num_timesteps)
        if self.mode == "evaluate" and self.num_timesteps == 0 and not self.scores:
            # The untrained policy's score is the floor of the learned range: without it, the first
            # evaluations (already partly trained) would set a floor so high that any dip looks total.
            self.baseline = self._evaluate()
            self.policy.on_baseline(self.baseline)
            self.logger.record(BASELINE_TAG, self.baseline.mean)

    def _next_multiple(self, timestep: int) -> int:
        return (timestep // self.eval_freq + 1) * self.eval_freq

    # -- scoring --------------------------------------------------------------------------------

    def _on_step(self) -> bool:
        if self.mode == "eval_callback":
            self._handle(self._score_from_parent())
            return True
        if self.mode == "online":
            self._collect_training_episodes()
        if self.num_timesteps >= self._next_check:
            score = self._scheduled_evaluation() if self.mode == "evaluate" else self._online_score()
            if score is not None:
                self._next_check = self._next_multiple(self.num_timesteps)
                self._handle(score)
        return True

    def _collect_training_episodes(self) -> None:
        for info in self.locals.get("infos", []):
            episode = info.get("episode")
            if episode is not None:
                self._online_returns.append(float(episode["r"]))

    def _online_score(self) -> Score | None:
        if len(self._online_returns) < self.n_eval_episodes:
            return None  # wait for more episodes to end
        score = Score.from_returns(self.num_timesteps, self._online_returns)
        self._online_returns = []
        return score

    def _evaluation_setup(self) -> tuple[VecEnv, int, bool]:
        """The env, episode count and policy mode to evaluate with (not in online mode)."""
        if self.mode == "eval_callback":
            parent = self.parent
            assert isinstance(parent, EvalCallback)
            return parent.eval_env, parent.n_eval_episodes, parent.deterministic
        assert self.eval_env is not None, "online mode has nothing to evaluate with"
        return self.eval_env, self.n_eval_episodes, self.deterministic

    def _evaluate(self) -> Score:
        env, n_episodes, deterministic = self._evaluation_setup()
        if self.model.get_vec_normalize_env() is not None:
            sync_envs_normalization(self.training_env, env)
        started = time.perf_counter()
        returns, lengths = evaluate_policy(
            self.model, env, n_eval_episodes=n_episodes, deterministic=deterministic, return_episode_rewards=True,
        )
        self.eval_seconds += time.perf_counter() - started
        self.eval_timesteps += int(np.sum(lengths))
        return Score.from_returns(self.num_timesteps, returns)

    def _scheduled_evaluation(self) -> Score:
        score = self._evaluate()
        self.logger.record(EVAL_TAG, score.mean)
        return score

    def _score_from_parent(self) -> Score:
        parent = self.parent
        assert isinstance(parent, EvalCallback)
        if parent.evaluations_timesteps and parent.evaluations_timesteps[-1] == self.num_timesteps:
            return Score.from_returns(self.num_timesteps, parent.evaluations_results[-1])
        return Score(timestep=self.num_timesteps, mean=float(parent.last_mean_reward))

    # -- carrying out the policy's answer -------------------------------------------------------

    def _handle(self, score: Score) -> None:
        """Ask the policy about a new score, carry out its answer, and log."""
        assert self.ring is not None
        last_good, set_aside = _metadata(self.ring.last_good), _metadata(self.retired.last_good)
        self._carry_out(self.policy.on_score(score, last_good, set_aside))
        self._cool_if_solved(score)
        self._log(score)

    def _cool_if_solved(self, score: Score) -> None:
        """``cool_on_solve``: the learning rate x factor, once, at the first score at the reward threshold."""
        threshold = self.policy.solved_score
        if self.cool_on_solve is None or self.cooled_at is not None or threshold is None or score.mean < threshold:
            return
        if getattr(self.model, "lr_schedule", None) is None:
            return
        scale_learning_rate(self.model, float(self.cool_on_solve))
        self.cooled_at = self.num_timesteps
        if self.verbose >= 1:
            print(f"Solved at timestep {self.num_timesteps} (score {score.mean:.2f} >= {threshold:g}): learning rate "
                  f"x{self.cool_on_solve:g} from now on")

    def _carry_out(self, actions: list[Action]) -> None:
        """Do what the policy asked, in order."""
        for action in actions:
            match action:
                case TakeSnapshot(score=score):
                    self._take_snapshot(score)
                case CheckSnapshot():
                    self._check_snapshot(action)
                case Restore(snapshot_timestep=timestep):
                    self._restore(self._snapshot_at(timestep))
                case PutBackCurrent():
                    self._restore(self._current.last_good)
                case RescoreSnapshot(snapshot_timestep=timestep, score=score, set_aside=set_aside):
                    stored = self.retired.last_good if set_aside else self._snapshot_at(timestep)
                    stored.score = score.mean
                    returns = score.episode_returns
                    stored.episode_returns = None if returns is None else np.asarray(returns)
                case SetAside(snapshot=candidate, replaces_kept=replaces_kept):
                    if replaces_kept:
                        self.retired.clear()
                        self.retired.add(self._snapshot_at(candidate.timestep).clone())
                    self.logger.record(RETIRED_TAG, self.retired.last_good.score)
                case Rebase(reason=reason, reference=reference, snapshot_failed=snapshot_failed):
                    if self.verbose >= 1:
                        print(f"Rollback: none at timestep {self.num_timesteps} ({reason}); the reference score "
                              f"is now {reference:.2f}")
                    if snapshot_failed:
                        self._lift_cooling()
                case RolledBack(event=event, at_end=False):
                    self._announce_rollback(event)
                case RolledBack(event=event, at_end=True):
                    self._announce_end_restore(event)
                case KeptFinalWeights():
                    self.logger.dump(self.num_timesteps)
                    if self.verbose >= 1:
                        print(f"Rollback: kept the final weights (score {action.final_score:.2f}); the snapshot of "
                              f"timestep {action.snapshot_timestep} set aside earlier now scores "
                              f"{action.snapshot_fresh_score:.2f}")
                case _:
                    raise TypeError(f"RollbackCallback cannot carry out {action!r}")

    def _snapshot_at(self, timestep: int) -> Snapshot:
        """The newest snapshot of ``timestep`` in the ring."""
        assert self.ring is not None
        for snapshot in reversed(list(self.ring)):
            if snapshot.timestep == timestep:
                return snapshot
        raise LookupError(f"no snapshot of timestep {timestep} in the ring")

    def _take_snapshot(self, score: Score) -> None:
        assert self.ring is not None
        try:
            self.ring.take(sb3_training_state(self.model), self.num_timesteps, score.mean, score.episode_returns)
        except NonFiniteStateError as error:
            self.logger.record(NONFINITE_SNAPSHOT_REFUSED_TAG, 1)
            if self.verbose >= 1:
                print(f"Rollback: not snapshotting at timestep {self.num_timesteps}: {error}")
            return
        self.policy.on_snapshot_taken()

    def _restore(self, snapshot: Snapshot) -> None:
        if isinstance(self.model, SelfRestoringModel):
            self.model.restore_snapshot(snapshot)  # it keeps its own bookkeeping (e.g. an undo log) consistent
        else:
            assert self.ring is not None
            self.ring.restore(sb3_training_state(self.model), snapshot)

    def _check_snapshot(self, check: CheckSnapshot) -> None:
        """Keep the weights in place aside, put the snapshot in, evaluate it afresh; the policy decides the rest."""
        snapshot = self.retired.last_good if check.set_aside else self._snapshot_at(check.snapshot.timestep)
        assert snapshot is not None
        self._current.take(sb3_training_state(self.model), self.num_timesteps, check.current)
        self._restore(snapshot)
        fresh = self._evaluate()
        self.logger.record(VERIFY_TAG, fresh.mean)
        self._carry_out(self.policy.on_check(fresh))

    def _announce_rollback(self, event: RollbackEvent) -> None:
        self._online_returns = []  # episodes played by the collapsed weights say nothing about the restored ones
        checked = f", {event.verified_score:.2f} when checked)" if event.verified_score is not None else ")"
        message = (f"Rollback at timestep {event.timestep}: score {event.score:.2f} "
                   f"(best {self.history.best:.2f}), restored the snapshot of timestep "
                   f"{event.restored_timestep} (score {event.restored_score:.2f}" + checked)
        self.logger.record(EVENT_TAG, message, exclude=("stdout", "log", "json", "csv"))
        if self.verbose >= 1:
            print(message)
        if self.callback is not None:
            self._on_event()

    def _announce_end_restore(self, event: RollbackEvent) -> None:
        message = (f"Rollback at the end of training: score {event.score:.2f}, restored the snapshot of timestep "
                   f"{event.restored_timestep} set aside earlier (score {event.restored_score:.2f}, "
                   f"{event.verified_score:.2f} when checked)")
        self.logger.record(EVENT_TAG, message, exclude=("stdout", "log", "json", "csv"))
        # Its own tag: the final step already holds this run's last rollback/n_rollbacks (and a second point
        # at one step reads as a duplicated log, e.g. after a resume).
        self.logger.record(END_RESTORE_TAG, event.verified_score)
        self.logger.dump(self.num_timesteps)
        if self.verbose >= 1:
            print(message)

    def _log(self, score: Score) -> None:
        assert self.ring is not None
        reference = self.ring.last_good
        self.logger.record(SCORE_TAG, score.mean)
        self.logger.record(BEST_TAG, self.history.best)
        if reference is not None:
            self.logger.record(REFERENCE_TAG, reference.score)
            self.logger.record(REFERENCE_TIMESTEP_TAG, reference.timestep)
        self.logger.record(ROLLBACKS_TAG, len(self.rollbacks))
        self.logger.record(REBASES_TAG, self.rebases)
        self.logger.record(EVAL_TIMESTEPS_TAG, self.eval_timesteps)
        self.logger.record(SNAPSHOT_BYTES_TAG, self.ring.nbytes)
        if self.verbose >= 2:
            print(f"Rollback: score {score.mean:.2f} at timestep {self.num_timesteps} (best {self.history.best:.2f})")
        self.logger.dump(self.num_timesteps)

    def _lift_cooling(self) -> None:
        """Undo ``cool_on_solve`` when the solved weights no longer hold (their snapshot failed its fresh check:
        the environment may have changed): a task to learn again gets the full learning rate, and the cooling
        comes back at the next score at the reward threshold."""
        if self.cooled_at is None or self.cool_on_solve is None:
            return
        schedule = self.model.lr_schedule
        if isinstance(schedule, ScaledSchedule) and schedule.factor == self.cool_on_solve:
            self.model.lr_schedule = schedule.schedule  # nothing wrapped it since: unwrap, exactly
        else:
            self.model.lr_schedule = ScaledSchedule(schedule, 1.0 / float(self.cool_on_solve))
        self.cooled_at = None
        self.logger.record(LEARNING_RATE_TAG, self.model.lr_schedule(self.model._current_progress_remaining))
        if self.verbose >= 1:
            print(f"Rollback: the solved weights no longer hold; learning rate x{1 / self.cool_on_solve:g} back")

    # -- saving progress ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Progress as plain (JSON-able) values, for a checkpoint; the snapshots are saved from ``ring``."""
        return {**self.policy.state_dict(), "eval_timesteps": self.eval_timesteps, "eval_seconds": self.eval_seconds,
                "next_check": self._next_check, "online_returns": list(self._online_returns),
                "cooled_at": self.cooled_at}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Put back ``state_dict()``; call after training started (which sets the next check itself).

        :raises KeyError, TypeError, ValueError: if ``state`` is malformed
        """
        self.policy.load_state_dict(state)
        self.eval_timesteps, self.eval_seconds = int(state["eval_timesteps"]), float(state["eval_seconds"])
        self._next_check = int(state["next_check"])
        self._online_returns = [float(r) for r in state["online_returns"]]
        cooled_at = state.get("cooled_at")  # absent in checkpoints of 0.3.0 and before, which had no such cooling
        self.cooled_at = None if cooled_at is None else int(cooled_at)

    # -- end of training ------------------------------------------------------------------------

    def _on_training_end(self) -> None:
        if self.check_at_end:
            self.check_end_of_training()

    def check_end_of_training(self) -> None:
        """Evaluate once more (unless the last evaluation was at this timestep), roll back if collapsed, and
        put back a snapshot set aside by ``max_restores`` if it is clearly better. What ``learn()`` does at
        its end with ``check_at_end=True``; call it yourself after ``learn()`` with ``check_at_end=False``
        to score the final weights both before and after the check. Own evaluation env only."""
        if self.mode != "evaluate":
            return
        if not (self.scores and self.scores[-1].timestep == self.num_timesteps):
            self._handle(self._scheduled_evaluation())
        self._carry_out(self.policy.on_training_end(self.num_timesteps, _metadata(self.retired.last_good)))
