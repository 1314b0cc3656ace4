"""RollbackCallback: notice a performance collapse during SB3 training and restore the last good weights."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback, EventCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.save_util import recursive_getattr
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, sync_envs_normalization

from rollback_rl.detectors import CollapseDetector, Score, ScoreHistory, SignificantDrop, normalised_drop
from rollback_rl.snapshots import NonFiniteStateError, Snapshot, SnapshotRing
from rollback_rl.tensorboard_layout import END_RESTORE_TAG

EVAL_SEED_OFFSET = 10_000  # evaluation episodes never share seeds with the training env's


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


def sb3_training_state(model: BaseAlgorithm) -> dict[str, Any]:
    """What a rollback must put back for an SB3 model: the objects SB3 itself saves.

    Uses ``model._get_torch_save_params()``, so every algorithm is covered the way ``model.save()``
    covers it: the policy (with DQN's target network, SAC/TD3's target critics), every optimizer, and
    extra tensors such as SAC's ``log_ent_coef``.
    """
    state_dicts, tensors = model._get_torch_save_params()
    return {name: recursive_getattr(model, name) for name in [*state_dicts, *tensors]}


def make_eval_env(env: gym.Env | VecEnv | str) -> VecEnv:
    """A one-env VecEnv for evaluation from an env id, a gym.Env or a VecEnv (returned as is)."""
    if isinstance(env, VecEnv):
        return env
    if isinstance(env, str):
        try:
            gym.spec(env)
        except gym.error.Error as error:
            raise ValueError(f"unknown env id {env!r}: {error}") from None
        return DummyVecEnv([lambda: Monitor(gym.make(env))])
    if isinstance(env, gym.Env):
        return DummyVecEnv([lambda: Monitor(env)])
    raise TypeError(f"eval_env must be a gym.Env, a VecEnv or an env id string, got {type(env).__name__}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class RollbackCallback(EventCallback):
    """Restore the last good weights when the agent's performance collapses, then keep learning.

    After each score as good as the best so far (within ``tolerance``; equal scores count, so the
    newest good weights are kept) it snapshots the training state: every network (target networks
    included), every optimizer state. When ``detector`` reports a collapse it restores the last good
    snapshot at once, before the next gradient step. The replay buffer, exploration schedule and
    learning-rate schedule are left as they are (pass ``callback_on_rollback`` to change them).

    Rollback loops and false alarms are guarded against: where an evaluation env exists, the restored
    weights are evaluated afresh at once; unless they still beat the current score by more than
    ``tolerance`` (if not, the environment changed, or the snapshot's best score was a lucky one), the
    current weights stay and the fresh score becomes the reference. Without an evaluation env, the current level
    becomes the reference after ``max_consecutive_rollbacks`` rollbacks in a row with no good score
    in between. Restoring weights does not restore the replay buffer, so training from a snapshot can
    collapse again the same way: once a snapshot has been restored ``max_restores`` times, the next
    collapse keeps the current weights and makes their score the reference (a rebase) instead of
    restoring it a third time, and the snapshot is set aside; when training ends (``check_at_end``), it
    comes back if it still scores better than the final weights on a fresh evaluation.

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
    :param max_restores: restores of one snapshot after which the next collapse from it is a rebase
        (``None``: no limit). Measured on four tasks (README, benchmarks/results): without a limit the
        same early snapshot was restored up to 17 times, each time training collapsed again, and the run
        never got past it (Acrobot-v1 ended at -500 where vanilla DQN ended at -95)
    :param check_at_end: evaluate once more when training ends and roll back if collapsed, so that
        ``learn()`` does not return collapsed weights; a snapshot set aside by ``max_restores`` comes
        back if a fresh evaluation says it is better (with an ``eval_env`` only: EvalCallback does not
        tell its child when training ends)
    :param callback_on_rollback: callback run right after each restore (e.g. to change a schedule)
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
        check_at_end: bool = True,
        callback_on_rollback: BaseCallback | None = None,
        verbose: int = 0,
    ) -> None:
        super().__init__(callback_on_rollback, verbose=verbose)
        if isinstance(callback_on_rollback, CallbackList):
            for child in callback_on_rollback.callbacks:  # remedies read the rollback from their parent
                child.parent = self
        self.eval_freq = _positive_int("eval_freq", eval_freq)
        self.n_eval_episodes = _positive_int("n_eval_episodes", n_eval_episodes)
        self.max_snapshots = _positive_int("max_snapshots", max_snapshots)
        self.max_consecutive_rollbacks = _positive_int("max_consecutive_rollbacks", max_consecutive_rollbacks)
        self.max_restores = None if max_restores is None else _positive_int("max_restores", max_restores)
        if detector is not None and not isinstance(detector, CollapseDetector):
            raise TypeError(f"detector must be a CollapseDetector, got {type(detector).__name__}")
        self.detector = detector if detector is not None else SignificantDrop()
        self.history = ScoreHistory(tolerance)
        self.eval_env = make_eval_env(eval_env) if eval_env is not None else None
        self.deterministic = deterministic
        self.check_at_end = check_at_end

        self.rollbacks: list[RollbackEvent] = []
        self.scores: list[Score] = []
        self.baseline: Score | None = None  # the untrained policy's evaluation (own eval env only)
        self.rebases = 0
        self.eval_timesteps = 0  # environment steps spent evaluating
        self.eval_seconds = 0.0  # wall time spent evaluating
        self.ring: SnapshotRing | None = None
        self._current = SnapshotRing(1, check_finite=False)  # the collapsed weights, while a restore is checked
        self.retired = SnapshotRing(1, check_finite=False)  # the best snapshot set aside by max_restores
        self._restore_counts: dict[int, int] = {}  # snapshot timestep -> times restored
        self._in_place = math.nan  # the score of the weights in place now
        self._consecutive_rollbacks = 0
        self._next_check = 0
        self._online_returns: list[float] = []

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
        own_ring = getattr(self.model, "rollback_snapshots", None)
        self.ring = own_ring if own_ring is not None else SnapshotRing(self.max_snapshots)
        if self.eval_env is not None and self.model.seed is not None:
            self.eval_env.seed(self.model.seed + EVAL_SEED_OFFSET)

    def _on_training_start(self) -> None:
        super()._on_training_start()
        self._next_check = self._next_multiple(self.num_timesteps)
        if self.mode == "evaluate" and self.num_timesteps == 0 and not self.scores:
            # The untrained policy's score is the floor of the learned range: without it, the first
            # evaluations (already partly trained) would set a floor so high that any dip looks total.
            self.baseline = self._evaluate()
            self.history.observe(self.baseline)
            self.logger.record("rollback/baseline_score", self.baseline.mean)

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

    def _evaluation_setup(self) -> tuple[VecEnv, int, bool] | None:
        """The env, episode count and policy mode to evaluate with, or ``None`` in online mode."""
        if self.mode == "eval_callback":
            parent = self.parent
            assert isinstance(parent, EvalCallback)
            return parent.eval_env, parent.n_eval_episodes, parent.deterministic
        if self.eval_env is not None:
            return self.eval_env, self.n_eval_episodes, self.deterministic
        return None

    def _evaluate(self) -> Score:
        setup = self._evaluation_setup()
        assert setup is not None
        env, n_episodes, deterministic = setup
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
        assert score.episode_returns is not None
        self.logger.record("eval/mean_reward", score.mean)
        return score

    def _score_from_parent(self) -> Score:
        parent = self.parent
        assert isinstance(parent, EvalCallback)
        if parent.evaluations_timesteps and parent.evaluations_timesteps[-1] == self.num_timesteps:
            return Score.from_returns(self.num_timesteps, parent.evaluations_results[-1])
        return Score(timestep=self.num_timesteps, mean=float(parent.last_mean_reward))

    # -- deciding -------------------------------------------------------------------------------

    def _handle(self, score: Score) -> None:
        assert self.ring is not None
        self.scores.append(score)
        self._in_place = score.mean
        reference = self.ring.last_good
        self.history.observe(score)
        if reference is not None and self.detector.update(self._score_of(reference), score, self.history.floor):
            self._rollback(score)
        elif self.history.is_good(score):
            self._snapshot(score)
        self._log(score)

    @staticmethod
    def _score_of(snapshot: Snapshot) -> Score:
        returns = None if snapshot.episode_returns is None else tuple(snapshot.episode_returns)
        return Score(timestep=snapshot.timestep, mean=snapshot.score, episode_returns=returns)

    def _snapshot(self, score: Score) -> None:
        assert self.ring is not None
        try:
            self.ring.take(sb3_training_state(self.model), self.num_timesteps, score.mean, score.episode_returns)
        except NonFiniteStateError as error:
            self.logger.record("rollback/nonfinite_snapshot_refused", 1)
            if self.verbose >= 1:
                print(f"Rollback: not snapshotting at timestep {self.num_timesteps}: {error}")
            return
        self.detector.reset()
        self._consecutive_rollbacks = 0

    def _restore(self, snapshot: Snapshot) -> None:
        restore = getattr(self.model, "restore_snapshot", None)
        if restore is not None:
            restore(snapshot)  # an agent with its own bookkeeping (e.g. an undo log) restores itself
        else:
            assert self.ring is not None
            self.ring.restore(sb3_training_state(self.model), snapshot)

    def _rollback(self, score: Score) -> None:
        """Restore the last good snapshot, after checking that it is still better than the current weights.

        Where an evaluation env exists, the snapshot is evaluated afresh once restored: its recorded
        score was the best of many noisy evaluations (biased upward), and if the environment changed
        it no longer holds at all. Unless the fresh score beats the current one by more than
        ``tolerance`` of the learned range, this was a false alarm: the current weights are put back
        and the fresh score becomes the reference. Without an evaluation env (online mode) no such check is possible; there,
        ``max_consecutive_rollbacks`` rollbacks in a row make the current level the reference.
        """
        assert self.ring is not None
        snapshot = self.ring.last_good
        assert snapshot is not None
        recorded_score = snapshot.score
        restores = self._restore_counts.get(snapshot.timestep, 0)
        if self.max_restores is not None and restores >= self.max_restores:
            self._retire(snapshot)
            self._rebase(score, f"the snapshot of timestep {snapshot.timestep} was restored {restores} times "
                                "and training collapsed again")
            return
        if self._evaluation_setup() is None:
            if self._consecutive_rollbacks >= self.max_consecutive_rollbacks:
                self._rebase(score, f"{self._consecutive_rollbacks} rollbacks in a row")
                return
            self._restore(snapshot)
            verified = None
        else:
            # The detector already judged the fall from the recorded score real; now the snapshot only
            # has to be clearly better than the current weights (by more than the "good" tolerance).
            fresh, better = self._restore_if_better(snapshot, score.mean)
            verified = fresh.mean
            if not better:
                snapshot.score, snapshot.episode_returns = fresh.mean, np.asarray(fresh.episode_returns)
                self._rebase(score, f"the snapshot of timestep {snapshot.timestep} now scores {fresh.mean:.2f}",
                             new_best=fresh)
                return
            # Both evaluations of the snapshot inform the next comparison (less biased than the best one alone).
            pooled = np.concatenate([snapshot.episode_returns if snapshot.episode_returns is not None
                                     else [snapshot.score], fresh.episode_returns])
            snapshot.score, snapshot.episode_returns = float(pooled.mean()), pooled
        self._in_place = snapshot.score if verified is None else verified
        self._restore_counts[snapshot.timestep] = restores + 1
        self.detector.reset()
        self._consecutive_rollbacks += 1
        self._online_returns = []  # episodes played by the collapsed weights say nothing about the restored ones
        event = RollbackEvent(self.num_timesteps, score.mean, snapshot.timestep, recorded_score, verified)
        self.rollbacks.append(event)
        message = (f"Rollback at timestep {event.timestep}: score {event.score:.2f} "
                   f"(best {self.history.best:.2f}), restored the snapshot of timestep "
                   f"{event.restored_timestep} (score {event.restored_score:.2f}"
                   + (f", {verified:.2f} when checked)" if verified is not None else ")"))
        self.logger.record("rollback/event", message, exclude=("stdout", "log", "json", "csv"))
        if self.verbose >= 1:
            print(message)
        if self.callback is not None:
            self._on_event()

    def _restore_if_better(self, snapshot: Snapshot, current: float) -> tuple[Score, bool]:
        """Restore ``snapshot`` and evaluate it afresh; unless it beats ``current`` (the score of the
        weights in place) by more than ``tolerance``, put those weights back. Returns the fresh score and
        whether the snapshot stayed."""
        self._current.take(sb3_training_state(self.model), self.num_timesteps, current)
        self._restore(snapshot)
        fresh = self._evaluate()
        self.logger.record("rollback/verify_score", fresh.mean)
        if normalised_drop(fresh.mean, current, self.history.floor) <= self.history.tolerance:
            self._restore(self._current.last_good)
            return fresh, False
        return fresh, True

    def _retire(self, snapshot: Snapshot) -> None:
        """Set ``snapshot`` aside for the end of training, if it scored better than the one set aside so far."""
        kept = self.retired.last_good
        if kept is None or snapshot.score > kept.score:
            self.retired.clear()
            self.retired.add(snapshot.clone())
        self.logger.record("rollback/retired_score", self.retired.last_good.score)

    def _rebase(self, score: Score, reason: str, new_best: Score | None = None) -> None:
        """No rollback: take ``new_best`` (default: the current score) as the level to hold from now on."""
        self.rebases += 1
        self.history.rebase(new_best or score)
        if self.verbose >= 1:
            print(f"Rollback: none at timestep {self.num_timesteps} ({reason}); the reference score is now "
                  f"{self.history.best:.2f}")
        if self.history.is_good(score):
            self._snapshot(score)
        self.detector.reset()
        self._consecutive_rollbacks = 0

    def _log(self, score: Score) -> None:
        assert self.ring is not None
        reference = self.ring.last_good
        self.logger.record("rollback/score", score.mean)
        self.logger.record("rollback/best_score", self.history.best)
        if reference is not None:
            self.logger.record("rollback/reference_score", reference.score)
            self.logger.record("rollback/reference_timestep", reference.timestep)
        self.logger.record("rollback/n_rollbacks", len(self.rollbacks))
        self.logger.record("rollback/n_rebases", self.rebases)
        self.logger.record("rollback/eval_timesteps", self.eval_timesteps)
        self.logger.record("rollback/snapshot_bytes", self.ring.nbytes)
        if self.verbose >= 2:
            print(f"Rollback: score {score.mean:.2f} at timestep {self.num_timesteps} (best {self.history.best:.2f})")
        self.logger.dump(self.num_timesteps)

    # -- saving progress ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Progress as plain (JSON-able) values, for a checkpoint; the snapshots are saved from ``ring``."""
        return {"scores": [{**asdict(s), "episode_returns": None if s.episode_returns is None
                            else list(s.episode_returns)} for s in self.scores],
                "rollbacks": [asdict(e) for e in self.rollbacks],
                "best": self.history.best, "floor": self.history.floor,
                "bad_in_a_row": self.detector.bad_in_a_row, "rebases": self.rebases,
                "eval_timesteps": self.eval_timesteps, "eval_seconds": self.eval_seconds,
                "consecutive_rollbacks": self._consecutive_rollbacks, "next_check": self._next_check,
                "online_returns": list(self._online_returns), "in_place": self._in_place,
                "restore_counts": {str(t): n for t, n in self._restore_counts.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Put back ``state_dict()``; call after training started (which sets the next check itself).

        :raises KeyError, TypeError, ValueError: if ``state`` is malformed
        """
        self.scores = [Score(int(s["timestep"]), float(s["mean"]), None if s["episode_returns"] is None
                             else tuple(float(r) for r in s["episode_returns"])) for s in state["scores"]]
        self.rollbacks = [RollbackEvent(**event) for event in state["rollbacks"]]
        self.history.best, self.history.floor = float(state["best"]), float(state["floor"])
        self.detector.bad_in_a_row = int(state["bad_in_a_row"])
        self.rebases, self.eval_timesteps = int(state["rebases"]), int(state["eval_timesteps"])
        self.eval_seconds = float(state["eval_seconds"])
        self._consecutive_rollbacks, self._next_check = int(state["consecutive_rollbacks"]), int(state["next_check"])
        self._online_returns = [float(r) for r in state["online_returns"]]
        self._in_place = float(state.get("in_place", math.nan))  # absent from checkpoints of version 0.1
        self._restore_counts = {int(t): int(n) for t, n in state.get("restore_counts", {}).items()}

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
        self._bring_back_retired()

    def _bring_back_retired(self) -> None:
        """End of training: put back the snapshot set aside by ``max_restores`` if it is clearly better."""
        retired = self.retired.last_good
        if retired is None or not math.isfinite(self._in_place) or \
                normalised_drop(retired.score, self._in_place, self.history.floor) <= self.history.tolerance:
            return
        fresh, better = self._restore_if_better(retired, self._in_place)
        if not better:
            self.logger.dump(self.num_timesteps)
            if self.verbose >= 1:
                print(f"Rollback: kept the final weights (score {self._in_place:.2f}); the snapshot of timestep "
                      f"{retired.timestep} set aside earlier now scores {fresh.mean:.2f}")
            return
        event = RollbackEvent(self.num_timesteps, self._in_place, retired.timestep, retired.score, fresh.mean)
        self.rollbacks.append(event)
        self._in_place = fresh.mean
        message = (f"Rollback at the end of training: score {event.score:.2f}, restored the snapshot of timestep "
                   f"{event.restored_timestep} set aside earlier (score {event.restored_score:.2f}, "
                   f"{fresh.mean:.2f} when checked)")
        self.logger.record("rollback/event", message, exclude=("stdout", "log", "json", "csv"))
        # Its own tag: the final step already holds this run's last rollback/n_rollbacks (and a second point
        # at one step reads as a duplicated log, e.g. after a resume).
        self.logger.record(END_RESTORE_TAG, fresh.mean)
        self.logger.dump(self.num_timesteps)
        if self.verbose >= 1:
            print(message)
