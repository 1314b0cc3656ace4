"""TaskSnapshotBank: keep the last good weights of every task, and put them back when that task returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv

from rollback_rl.callbacks.rollback import EVAL_SEED_OFFSET, make_eval_env, sb3_training_state
from rollback_rl.detectors import Score, ScoreHistory
from rollback_rl.snapshots import NonFiniteStateError, SnapshotRing


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
        if eval_freq < 1 or n_eval_episodes < 1:
            raise ValueError(f"eval_freq and n_eval_episodes must be positive, got {eval_freq}, {n_eval_episodes}")
        self.eval_envs = {name: make_eval_env(env) for name, env in eval_envs.items()}
        self.eval_freq = eval_freq
        self.n_eval_episodes = n_eval_episodes
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
        self.logger.record("bank/n_restores", len(self.restores))
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
        self.logger.record(f"bank/score_{task}", score.mean)
