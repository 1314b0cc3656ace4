"""ReplayBufferDiagnostics: what an off-policy agent's replay buffer holds and what training draws from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecEnv

from rollback_rl.buffers import transition_ages
from rollback_rl.evaluation import EVAL_SEED_OFFSET, make_eval_env
from rollback_rl.core.detectors import Score
from rollback_rl.tensorboard_layout import (
    BUFFER_FAILURE_SHARE_TAG,
    BUFFER_MEAN_SAMPLE_AGE_TAG,
    BUFFER_SAMPLED_FAILURE_SHARE_TAG,
    BUFFER_TRANSITIONS_TAG,
    task_score_tag,
)


@dataclass(frozen=True)
class BufferRecord:
    """The replay buffer at one timestep, and the minibatches sampled since the previous record.

    :param timestep: training timesteps (summed over envs) when the record was made
    :param transitions: transitions held in the buffer (SB3 calls callbacks before it stores the current
        step's transitions, so a record made during training leaves out the last ``n_envs``)
    :param failures: of those, true terminations (``done`` and not a time-limit truncation)
    :param sampled: transitions drawn for training since the previous record
    :param sampled_failures: of those, true terminations
    :param mean_sample_age: mean age of the transitions drawn since the previous record, in training
        timesteps between being written and being drawn (``nan`` if none was drawn); see
        :func:`rollback_rl.buffers.transition_ages`
    """

    timestep: int
    transitions: int
    failures: int
    sampled: int
    sampled_failures: int
    mean_sample_age: float

    @property
    def failure_share(self) -> float:
        """Fraction of the buffer's transitions that are true terminations (``nan`` when empty)."""
        return self.failures / self.transitions if self.transitions else float("nan")

    @property
    def sampled_failure_share(self) -> float:
        """Fraction of the sampled transitions that are true terminations (``nan`` if none was drawn)."""
        return self.sampled_failures / self.sampled if self.sampled else float("nan")


@dataclass(frozen=True)
class BufferSummary:
    """A run's replay buffer in a few numbers, from its :class:`BufferRecord` list.

    :param records: records summarised
    :param sampled: transitions drawn for training over those records
    :param mean_sample_age: mean age, in training timesteps, of those transitions, each draw counted once
        (``nan`` if none was drawn)
    :param failure_share: the buffer's failure share averaged over the records (records of an empty
        buffer left out; ``nan`` if none is left)
    :param sampled_failure_share: fraction of the drawn transitions that were true terminations
    """

    records: int
    sampled: int
    mean_sample_age: float
    failure_share: float
    sampled_failure_share: float


def summarize_buffer_records(records: Sequence[BufferRecord], start_timestep: int = 0) -> BufferSummary:
    """Summarise the records made at or after ``start_timestep`` (e.g. the first evaluation that solved
    the task, to describe the buffer after solving)."""
    kept = [record for record in records if record.timestep >= start_timestep]
    sampled = sum(record.sampled for record in kept)
    age_sum = sum(record.mean_sample_age * record.sampled for record in kept if record.sampled)
    shares = [record.failure_share for record in kept if record.transitions]
    sampled_failures = sum(record.sampled_failures for record in kept)
    return BufferSummary(records=len(kept), sampled=sampled,
                         mean_sample_age=age_sum / sampled if sampled else float("nan"),
                         failure_share=float(np.mean(shares)) if shares else float("nan"),
                         sampled_failure_share=sampled_failures / sampled if sampled else float("nan"))


def buffer_failures(buffer: ReplayBuffer) -> tuple[int, int]:
    """``(transitions, failures)`` held by ``buffer``: failures are ``done`` without a time-limit truncation,
    the same rule SB3 uses to cut the bootstrap target.

    It counts every row held rather than a sample of them: one vectorised pass over the flags (well under
    a millisecond for 100,000 rows) is cheap, and a share estimated from a few hundred rows would carry
    sampling noise (about 0.01) far larger than the differences it is meant to show.
    """
    rows = buffer.buffer_size if buffer.full else buffer.pos
    dones = buffer.dones[:rows]
    failures = dones * (1 - buffer.timeouts[:rows]) if buffer.handle_timeout_termination else dones
    return rows * buffer.n_envs, int(np.count_nonzero(failures))


class _SampleRecorder:
    """Wraps a replay buffer's ``_get_samples`` (which every ``sample`` call goes through) to record the
    age and the termination flag of every transition drawn, without changing what is returned."""

    def __init__(self, buffer: ReplayBuffer) -> None:
        self.buffer = buffer
        self.original = buffer._get_samples
        self.count = 0
        self.failures = 0
        self.age_sum = 0.0
        buffer._get_samples = self  # an instance attribute: the class and other buffers are untouched

    def __call__(self, batch_inds: np.ndarray, *args: Any, **kwargs: Any) -> Any:
        samples = self.original(batch_inds, *args, **kwargs)
        ages = transition_ages(self.buffer, batch_inds)
        self.count += len(batch_inds)
        self.age_sum += float(ages.sum())
        self.failures += int(np.count_nonzero(samples.dones.cpu().numpy()))  # SB3 already masked timeouts
        return samples

    def take(self) -> tuple[int, int, float]:
        """``(count, failures, mean age)`` since the last call, and start counting afresh."""
        counts = (self.count, self.failures, self.age_sum / self.count if self.count else float("nan"))
        self.count, self.failures, self.age_sum = 0, 0, 0.0
        return counts

    def detach(self) -> None:
        if self.buffer.__dict__.get("_get_samples") is self:
            del self.buffer._get_samples


class ReplayBufferDiagnostics(BaseCallback):
    """Log what the replay buffer holds and what training samples from it; optionally score every task.

    Every ``log_freq`` training timesteps it records (and logs under ``buffer/``):

    - ``buffer/failure_share``: fraction of the transitions in the buffer that are true terminations
      (``done`` and not a time-limit truncation), i.e. failures on CartPole;
    - ``buffer/sampled_failure_share``: the same fraction among the transitions sampled for training
      since the previous record;
    - ``buffer/mean_sample_age``: mean age of those sampled transitions, in training timesteps between
      being written and being drawn. The buffer's ``_get_samples`` is wrapped for the length of training
      to see the rows actually drawn, and each row's age comes from
      :func:`rollback_rl.buffers.transition_ages`: exact for the buffers of :mod:`rollback_rl.buffers`
      (FIFO, reservoir, half reservoir), which record when each row was written, and for SB3's FIFO.

    :meth:`summary` gives the run's numbers (mean sample age and failure share over all records).

    With ``task_eval_envs`` (e.g. ``{"A": env_a, "B": env_b}``) it also scores the greedy policy on
    each of them every ``eval_freq`` training timesteps and logs ``eval_task/<name>``, so forgetting of a
    task that is not being trained on shows up while it happens. Records are kept in ``records``
    (``BufferRecord``) and ``task_scores`` (name to a list of ``Score``).

    Use it with any SB3 off-policy algorithm whose buffer is a ``ReplayBuffer`` (DQN, SAC, TD3).

    :param log_freq: training timesteps between two buffer records
    :param task_eval_envs: task name to evaluation environment (a gym.Env, a VecEnv or an env id);
        ``None``: no per-task evaluation
    :param eval_freq: training timesteps between two per-task evaluations (default: ``log_freq``)
    :param n_eval_episodes: greedy episodes per task and evaluation
    :param deterministic: evaluate the greedy/deterministic policy
    :param verbose: 0 silent, 1 one line per record
    """

    def __init__(
        self,
        log_freq: int = 2_500,
        task_eval_envs: Mapping[str, gym.Env | VecEnv | str] | None = None,
        eval_freq: int | None = None,
        n_eval_episodes: int = 5,
        deterministic: bool = True,
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose=verbose)
        if log_freq < 1 or (eval_freq is not None and eval_freq < 1) or n_eval_episodes < 1:
            raise ValueError("log_freq, eval_freq and n_eval_episodes must be positive integers, got "
                             f"{log_freq}, {eval_freq}, {n_eval_episodes}")
        self.log_freq = log_freq
        self.eval_freq = eval_freq if eval_freq is not None else log_freq
        self.n_eval_episodes = n_eval_episodes
        self.deterministic = deterministic
        self.task_eval_envs = {name: make_eval_env(env) for name, env in (task_eval_envs or {}).items()}
        self.records: list[BufferRecord] = []
        self.task_scores: dict[str, list[Score]] = {name: [] for name in self.task_eval_envs}
        self.eval_timesteps = 0  # environment steps spent on per-task evaluation
        self._recorder: _SampleRecorder | None = None
        self._next_record = 0
        self._next_eval = 0

    def _init_callback(self) -> None:
        buffer = getattr(self.model, "replay_buffer", None)
        if not isinstance(buffer, ReplayBuffer):
            raise TypeError("ReplayBufferDiagnostics needs an off-policy model with a ReplayBuffer "
                            f"(DQN, SAC, TD3), got {type(self.model).__name__}")
        if self.model.seed is not None:
            for env in self.task_eval_envs.values():
                env.seed(self.model.seed + EVAL_SEED_OFFSET)

    def _on_training_start(self) -> None:
        self._recorder = _SampleRecorder(self.model.replay_buffer)
        self._next_record = (self.num_timesteps // self.log_freq + 1) * self.log_freq
        self._next_eval = (self.num_timesteps // self.eval_freq + 1) * self.eval_freq

    def _on_step(self) -> bool:
        recorded = False
        if self.num_timesteps >= self._next_record:
            self._next_record = (self.num_timesteps // self.log_freq + 1) * self.log_freq
            self.record_buffer()
            recorded = True
        if self.task_eval_envs and self.num_timesteps >= self._next_eval:
            self._next_eval = (self.num_timesteps // self.eval_freq + 1) * self.eval_freq
            self.evaluate_tasks()
            recorded = True
        if recorded:
            self.logger.dump(self.num_timesteps)
        return True

    def _on_training_end(self) -> None:
        if self._recorder is not None:
            self._recorder.detach()
            self._recorder = None

    def record_buffer(self) -> BufferRecord:
        """Record the buffer now (and the samples drawn since the last record), log it and return it."""
        assert self._recorder is not None, "record_buffer() is called during training"
        transitions, failures = buffer_failures(self.model.replay_buffer)
        sampled, sampled_failures, mean_age = self._recorder.take()
        record = BufferRecord(self.num_timesteps, transitions, failures, sampled, sampled_failures, mean_age)
        self.records.append(record)
        self.logger.record(BUFFER_FAILURE_SHARE_TAG, record.failure_share)
        self.logger.record(BUFFER_TRANSITIONS_TAG, transitions)
        if sampled:
            self.logger.record(BUFFER_SAMPLED_FAILURE_SHARE_TAG, record.sampled_failure_share)
            self.logger.record(BUFFER_MEAN_SAMPLE_AGE_TAG, mean_age)
        if self.verbose >= 1:
            print(f"Buffer at timestep {self.num_timesteps}: {transitions} transitions, failure share "
                  f"{record.failure_share:.4f}, mean sample age {mean_age:.0f}")
        return record

    def summary(self, start_timestep: int = 0) -> BufferSummary:
        """The run's buffer numbers over the records made at or after ``start_timestep``
        (see :func:`summarize_buffer_records`)."""
        return summarize_buffer_records(self.records, start_timestep)

    def evaluate_tasks(self) -> dict[str, Score]:
        """Score the current policy on every task's evaluation env, log ``eval_task/<name>`` and return the scores."""
        scores = {}
        for name, env in self.task_eval_envs.items():
            returns, lengths = evaluate_policy(self.model, env, n_eval_episodes=self.n_eval_episodes,
                                               deterministic=self.deterministic, return_episode_rewards=True)
            self.eval_timesteps += int(np.sum(lengths))
            score = Score.from_returns(self.num_timesteps, returns)
            self.task_scores[name].append(score)
            self.logger.record(task_score_tag(name), score.mean)
            scores[name] = score
        return scores
