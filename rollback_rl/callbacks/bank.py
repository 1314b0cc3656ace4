"""Snapshot banks: keep good weights of every task or regime, and put them back when it returns.

- :class:`TaskSnapshotBank` is *told* the task (``info["task"]``): the oracle-label upper bound;
- :class:`LabelFreeSnapshotBank` is told nothing: it follows a ``RollbackCallback``, and takes a rebase
  (a collapse that the newest snapshot cannot undo) as the sign that the environment changed. It then
  tries the weights banked in earlier regimes and continues from the best one if it clearly beats the
  current weights; otherwise the agent is in a regime not seen before, and it opens a new one.

Both keep one snapshot (networks and optimizer state, as ``RollbackCallback`` keeps them) per task or
regime; the replay buffer and the schedules are left as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv

from rollback_rl.callbacks.rollback import RollbackCallback, SelfRestoringModel
from rollback_rl.core.detectors import Score, ScoreHistory, normalised_drop, welch_p_value
from rollback_rl.core.snapshots import NonFiniteStateError, Snapshot, SnapshotRing
from rollback_rl.evaluation import EVAL_SEED_OFFSET, make_eval_env
from rollback_rl.sb3_state import sb3_training_state
from rollback_rl.tensorboard_layout import BANK_RESTORES_TAG, bank_score_tag
from rollback_rl.validation import integer_at_least

BANK_REGIMES_TAG = "bank/n_regimes"  # LabelFreeSnapshotBank: regimes found so far


@dataclass(frozen=True)
class BankRestore:
    """One restore: at ``timestep`` task ``task`` came back and the snapshot of ``restored_timestep`` was put back."""

    timestep: int
    task: str
    restored_timestep: int
    restored_score: float


class TaskSnapshotBank(BaseCallback):
    """When a task the agent has trained on before comes back, restore the last good weights for that task.

    **The agent is told which task it is on**: the bank reads the task name from the training env's
    ``info[task_key]`` (``SwitchingCartPole`` provides ``info["task"]``). This is the oracle-label,
    task-keyed variant: it shows what remembering per task can buy when task identity is known, not
    what an agent can do that must infer it.

    Every ``eval_freq`` training timesteps it scores the greedy policy on the current task's
    evaluation env; a score within ``tolerance`` of that task's best (``ScoreHistory``) replaces the
    task's snapshot (networks and optimizer state, as ``RollbackCallback`` keeps them). At the first
    step of an episode on a different task than the previous step's, it restores that task's snapshot
    if it has one; a task never seen before (or never scored well) keeps the current weights. The
    replay buffer and the schedules are left as they are. Restores are kept in ``restores``.

    :param eval_envs: task name to evaluation environment (a gym.Env, a VecEnv or an env id); every
        task the training env can run must have one
    :param eval_freq: training timesteps between two evaluations of the current task
    :param n_eval_episodes: greedy episodes per evaluation
    :param tolerance: fraction of the task's learned range (best minus lowest score) within which a score
        still counts as good
    :param task_key: the ``info`` key naming the task
    :param verbose: 0 silent, 1 one line per restore
    """

    def __init__(
        self,
        eval_envs: Mapping[str, gym.Env | VecEnv | str],
        eval_freq: int = 2_500,
        n_eval_episodes: int = 5,
        tolerance: float = 0.05,
        task_key: str = "task",
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose=verbose)
        if not eval_envs:
            raise ValueError("TaskSnapshotBank needs an evaluation env for every task, e.g. "
                             "eval_envs={'default': env_a, 'reversed': env_b}")
        self.eval_freq = integer_at_least(1, eval_freq, "eval_freq")
        self.n_eval_episodes = integer_at_least(1, n_eval_episodes, "n_eval_episodes")
        self.eval_envs = {name: make_eval_env(env) for name, env in eval_envs.items()}
        self.tolerance = tolerance
        self.task_key = task_key
        self.snapshots: dict[str, SnapshotRing] = {}  # task name to a one-slot ring: its last good snapshot
        self.histories: dict[str, ScoreHistory] = {}
        self.scores: list[tuple[str, Score]] = []
        self.restores: list[BankRestore] = []
        self.eval_timesteps = 0  # environment steps spent evaluating
        self.current_task: str | None = None
        self._next_eval = 0

    def _init_callback(self) -> None:
        if self.model.seed is not None:
            for env in self.eval_envs.values():
                env.seed(self.model.seed + EVAL_SEED_OFFSET)

    def _on_training_start(self) -> None:
        self._next_eval = (self.num_timesteps // self.eval_freq + 1) * self.eval_freq

    def _on_step(self) -> bool:
        task = self._task_of_this_step()
        if task != self.current_task:
            if self.current_task is not None:
                self._on_task_change(task)
            self.current_task = task
        if self.num_timesteps >= self._next_eval:
            self._next_eval = (self.num_timesteps // self.eval_freq + 1) * self.eval_freq
            self._evaluate_current_task()
        return True

    def _task_of_this_step(self) -> str:
        tasks = {info.get(self.task_key) for info in self.locals["infos"]}
        if None in tasks:
            raise KeyError(f"TaskSnapshotBank reads the task from info[{self.task_key!r}], which the training "
                           "env does not provide (use rollback_rl/SwitchingCartPole-v0, or set task_key)")
        if len(tasks) != 1:
            raise ValueError(f"the training envs run different tasks at once ({sorted(tasks)}); "
                             "TaskSnapshotBank needs them all on the same task")
        task = tasks.pop()
        if task not in self.eval_envs:
            raise KeyError(f"no evaluation env for task {task!r}: give eval_envs an entry for it "
                           f"(it has {sorted(self.eval_envs)})")
        return task

    def _on_task_change(self, task: str) -> None:
        ring = self.snapshots.get(task)
        if ring is None or ring.last_good is None:
            return  # a task never seen (or never learned): nothing to go back to
        snapshot = ring.last_good
        restore = getattr(self.model, "restore_snapshot", None)
        if restore is not None:
            restore(snapshot)  # an agent with its own bookkeeping (e.g. an undo log) restores itself
        else:
            ring.restore(sb3_training_state(self.model), snapshot)
        self.restores.append(BankRestore(self.num_timesteps, task, snapshot.timestep, snapshot.score))
        self.logger.record(BANK_RESTORES_TAG, len(self.restores))
        if self.verbose >= 1:
            print(f"Task bank: task {task!r} is back at timestep {self.num_timesteps}; restored its snapshot "
                  f"of timestep {snapshot.timestep} (score {snapshot.score:.2f})")

    def _evaluate_current_task(self) -> None:
        task = self.current_task
        assert task is not None
        returns, lengths = evaluate_policy(self.model, self.eval_envs[task], n_eval_episodes=self.n_eval_episodes,
                                           deterministic=True, return_episode_rewards=True)
        self.eval_timesteps += int(np.sum(lengths))
        score = Score.from_returns(self.num_timesteps, returns)
        self.scores.append((task, score))
        history = self.histories.setdefault(task, ScoreHistory(self.tolerance))
        history.observe(score)
        if history.is_good(score):
            ring = self.snapshots.setdefault(task, SnapshotRing(1))
            try:
                ring.take(sb3_training_state(self.model), self.num_timesteps, score.mean, score.episode_returns)
            except NonFiniteStateError:
                pass  # a diverged state is never a task's last good one; the previous snapshot stays
        self.logger.record(bank_score_tag(task), score.mean)


# -- without task labels ---------------------------------------------------------------------------------

def pick_banked_snapshot(trials: Mapping[int, Score], current: Score, floor: float, min_gain: float = 0.05,
                         alpha: float | None = 0.05) -> int | None:
    """Which banked snapshot to continue from, given how each scored when tried: the best one if it
    clearly beats the current weights, else ``None`` (keep the current weights).

    Clearly beats: the current score falls short of the best trial's by more than ``min_gain`` of the
    learned range (``normalised_drop(best, current, floor) > min_gain``, the rule by which a
    ``RollbackPolicy`` keeps a restored snapshot) and, where the episode returns of both are known,
    significantly (one-sided Welch test at ``alpha``; ``None``: no test). The test matters: the best
    of several snapshots, each scored on a few episodes, is biased upward.

    :param trials: regime index to the score of that regime's snapshot, evaluated now
    :param current: the score of the weights in place (the one that led to the rebase)
    :param floor: the lowest score seen (the bottom of the learned range), in return units
    """
    if not trials:
        return None
    best = max(trials, key=lambda regime: trials[regime].mean)
    trial = trials[best]
    if not normalised_drop(trial.mean, current.mean, floor) > min_gain:
        return None
    if alpha is not None and trial.episode_returns is not None and current.episode_returns is not None \
            and welch_p_value(trial.episode_returns, current.episode_returns) >= alpha:
        return None
    return best


@dataclass
class Regime:
    """A stretch of training in which the environment is taken to be the same, and its best weights.

    :param index: position in ``LabelFreeSnapshotBank.regimes`` (0: the regime training started in)
    :param started_at: training timestep at which it was first entered
    :param history: its best score and floor (what counts as a good score in this regime)
    :param snapshot: a one-slot ring holding its last good snapshot (empty until a good score)
    :param last_active: training timestep at which it was last entered or scored
    """

    index: int
    started_at: int
    history: ScoreHistory
    snapshot: SnapshotRing = field(default_factory=lambda: SnapshotRing(1))
    last_active: int = 0


@dataclass(frozen=True)
class RegimeSwitch:
    """A rebase the bank acted on: at ``timestep`` it left regime ``left`` for regime ``entered``.

    :param current_score: the score of the weights in place that led to the rebase
    :param trial_scores: regime index to the fresh score of its banked snapshot (every regime tried)
    :param restored_timestep: timestep of the banked snapshot put in place (``None``: none beat the
        current weights, and ``entered`` is a new regime)
    :param restored_score: its fresh score when tried (``None`` with ``restored_timestep``)
    """

    timestep: int
    left: int
    entered: int
    current_score: float
    trial_scores: dict[int, float]
    restored_timestep: int | None = None
    restored_score: float | None = None


class LabelFreeSnapshotBank(BaseCallback):
    """Put back the weights of an earlier regime when the environment seems to have returned to it,
    without being told which task it is on.

    It follows a ``RollbackCallback`` (placed before it in the same ``CallbackList``) and reads, after
    each of its scores, whether that callback rebased: a collapse that the newest snapshot could not
    undo, since it too failed its fresh check (a false alarm: the environment changed), or that had
    been restored ``max_restores`` times. Either way the weights in place begin a new stretch of
    training, so the bank:

    1. banks the regime it leaves (its last good snapshot stays where it is);
    2. tries the snapshot of every other banked regime on ``n_trial_episodes`` greedy episodes, with
       the weights in place kept aside;
    3. continues from the best one if it clearly beats the current weights (:func:`pick_banked_snapshot`):
       the environment is back in that regime; otherwise it puts the current weights back, bitwise,
       and opens a new regime.

    Between rebases it keeps the current regime's last good snapshot, scoring with the
    ``RollbackCallback``'s scores (no evaluation of its own): a score within ``tolerance`` of the
    regime's best replaces its snapshot, unless the weights in place are not the ones scored (the
    callback just restored a snapshot). At most ``max_regimes`` regimes are kept; a new one beyond
    that replaces the one least recently active.

    Compared with :class:`TaskSnapshotBank` it needs no ``info["task"]``, but it only notices a change
    that the rollback callback sees as a collapse: a new environment in which the old weights still do
    well is not a new regime, and a regime's snapshot is then replaced by weights trained on both.
    Switches and restores are kept in ``switches`` and ``restores``.

    Usage::

        rollback = RollbackCallback(eval_env, eval_freq=2_500)
        bank = LabelFreeSnapshotBank(rollback)
        model.learn(60_000, callback=CallbackList([rollback, bank]))

    :param rollback: the ``RollbackCallback`` to follow; it must come before the bank in the callback list
    :param n_trial_episodes: greedy episodes each banked snapshot is scored on when tried
    :param eval_env: environment to try snapshots on (a gym.Env, a VecEnv or an env id); ``None``: the
        rollback callback's own ``eval_env`` (it must have one)
    :param min_gain: fraction of the learned range by which a banked snapshot must beat the current
        score to be kept; ``None``: the rollback callback's ``tolerance``
    :param alpha: significance level of the one-sided Welch test a kept snapshot must also pass
        (``None``: no test)
    :param tolerance: fraction of a regime's learned range within which a score still counts as good
    :param max_regimes: regimes kept in memory (one snapshot each)
    :param verbose: 0 silent, 1 one line per regime switch
    """

    def __init__(
        self,
        rollback: RollbackCallback,
        n_trial_episodes: int = 5,
        eval_env: gym.Env | VecEnv | str | None = None,
        min_gain: float | None = None,
        alpha: float | None = 0.05,
        tolerance: float = 0.05,
        max_regimes: int = 10,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose=verbose)
        if not isinstance(rollback, RollbackCallback):
            raise TypeError(f"LabelFreeSnapshotBank follows a RollbackCallback, got {type(rollback).__name__}: "
                            "LabelFreeSnapshotBank(RollbackCallback(eval_env))")
        self.rollback = rollback
        self.n_trial_episodes = integer_at_least(1, n_trial_episodes, "n_trial_episodes")
        self.max_regimes = integer_at_least(2, max_regimes, "max_regimes")
        self.eval_env = make_eval_env(eval_env) if eval_env is not None else None
        self.min_gain = min_gain
        self.alpha = alpha
        self.tolerance = tolerance
        self.regimes: list[Regime] = []
        self.current: Regime | None = None
        self.switches: list[RegimeSwitch] = []
        self.eval_timesteps = 0  # environment steps spent trying banked snapshots
        self._aside = SnapshotRing(1, check_finite=False)  # the weights in place while snapshots are tried
        self._scores_seen = 0
        self._rebases_seen = 0
        self._rollbacks_seen = 0

    @property
    def restores(self) -> list[RegimeSwitch]:
        """The switches that put a banked snapshot in place."""
        return [switch for switch in self.switches if switch.restored_timestep is not None]

    def _init_callback(self) -> None:
        if getattr(self.rollback, "model", None) is not self.model:
            raise ValueError("LabelFreeSnapshotBank reads its RollbackCallback's scores: put the RollbackCallback "
                             "before it in the same CallbackList, e.g. CallbackList([rollback, bank])")
        if self.eval_env is None:
            if self.rollback.eval_env is None:
                raise ValueError("LabelFreeSnapshotBank tries snapshots on an evaluation env: give it eval_env=..., or "
                                 "give the RollbackCallback one")
            self.eval_env = self.rollback.eval_env  # already seeded by the rollback callback
        elif self.model.seed is not None:
            self.eval_env.seed(self.model.seed + EVAL_SEED_OFFSET)

    def _on_training_start(self) -> None:
        if not self.regimes:
            self.current = self._new_regime()
        self._scores_seen = len(self.rollback.scores)
        self._rebases_seen = self.rollback.rebases
        self._rollbacks_seen = len(self.rollback.rollbacks)

    def _on_step(self) -> bool:
        scores = self.rollback.scores
        if len(scores) == self._scores_seen:
            return True  # no new score: nothing to learn this step
        self._scores_seen = len(scores)
        score = scores[-1]
        rebases, rollbacks = self.rollback.rebases, len(self.rollback.rollbacks)
        rebased, restored = rebases != self._rebases_seen, rollbacks != self._rollbacks_seen
        self._rebases_seen, self._rollbacks_seen = rebases, rollbacks
        if rebased:
            self._on_rebase(score)
        else:
            self._observe(score, scored_weights_in_place=not restored)
        self.logger.record(BANK_REGIMES_TAG, len(self.regimes))
        return True

    # -- between rebases ----------------------------------------------------------------------------

    def _observe(self, score: Score, scored_weights_in_place: bool) -> None:
        regime = self.current
        assert regime is not None
        regime.history.observe(score)
        regime.last_active = self.num_timesteps
        if scored_weights_in_place and regime.history.is_good(score):
            try:
                regime.snapshot.take(sb3_training_state(self.model), self.num_timesteps, score.mean,
                                     score.episode_returns)
            except NonFiniteStateError:
                pass  # a diverged state is never a regime's last good one; the previous snapshot stays

    # -- at a rebase ------------------------------------------------------------------------------------

    def _on_rebase(self, current: Score) -> None:
        left = self.current
        assert left is not None
        banked = [regime for regime in self.regimes if regime is not left and regime.snapshot.last_good is not None]
        trials = self._try(banked, current) if banked else {}
        min_gain = self.rollback.history.tolerance if self.min_gain is None else self.min_gain
        chosen = pick_banked_snapshot(trials, current, self.rollback.history.floor, min_gain, self.alpha)
        if chosen is None:
            if banked:
                self._put_in_place(self._aside)
            entered = self._new_regime()
            self._observe(current, scored_weights_in_place=True)
            restored_timestep = restored_score = None
        else:
            entered = self.regimes[chosen]
            snapshot = self._put_in_place(entered.snapshot)
            self.current = entered
            entered.history.observe(trials[chosen])
            entered.last_active = self.num_timesteps
            restored_timestep, restored_score = snapshot.timestep, trials[chosen].mean
        switch = RegimeSwitch(self.num_timesteps, left.index, entered.index, current.mean,
                              {index: trial.mean for index, trial in trials.items()}, restored_timestep, restored_score)
        self.switches.append(switch)
        self.logger.record(BANK_RESTORES_TAG, len(self.restores))
        if self.verbose >= 1:
            outcome = (f"restored the snapshot of timestep {restored_timestep} from regime {entered.index} (scores "
                       f"{restored_score:.2f} now)" if restored_timestep is not None
                       else f"no banked snapshot beat it; new regime {entered.index}")
            print(f"Label-free bank: rebase at timestep {self.num_timesteps} (score {current.mean:.2f}); {outcome}")

    def _try(self, banked: list[Regime], current: Score) -> dict[int, Score]:
        """Score every banked regime's snapshot afresh, with the weights in place kept aside."""
        self._aside.take(sb3_training_state(self.model), self.num_timesteps, current.mean)
        trials = {}
        for regime in banked:
            self._put_in_place(regime.snapshot)
            returns, lengths = evaluate_policy(self.model, self.eval_env, n_eval_episodes=self.n_trial_episodes,
                                               deterministic=True, return_episode_rewards=True)
            self.eval_timesteps += int(np.sum(lengths))
            trials[regime.index] = Score.from_returns(self.num_timesteps, returns)
        return trials

    def _new_regime(self) -> Regime:
        """A new current regime, in a free place or in place of the one least recently active."""
        regime = Regime(len(self.regimes), self.num_timesteps, ScoreHistory(self.tolerance),
                        last_active=self.num_timesteps)
        if len(self.regimes) >= self.max_regimes:
            oldest = min((r for r in self.regimes if r is not self.current), key=lambda r: r.last_active)
            regime.index = oldest.index
            self.regimes[oldest.index] = regime
        else:
            self.regimes.append(regime)
        self.current = regime
        return regime

    def _put_in_place(self, ring: SnapshotRing) -> Snapshot:
        """Restore the snapshot held by the one-slot ``ring`` into the model, bitwise, and return it."""
        snapshot = ring.last_good
        assert snapshot is not None
        if isinstance(self.model, SelfRestoringModel):
            self.model.restore_snapshot(snapshot)  # it keeps its own bookkeeping (e.g. an undo log) consistent
        else:
            ring.restore(sb3_training_state(self.model), snapshot)
        return snapshot
