"""Replay buffers that are not recency-biased, as drop-in SB3 buffers for DQN, SAC and TD3.

SB3's ``ReplayBuffer`` is first in, first out (FIFO): once full, each new transition overwrites the oldest,
so training only ever sees the last ``buffer_size`` timesteps. That is a recency bias, and a candidate
cause of forgetting: whatever the agent did well long ago is no longer in the data it learns from. These
buffers keep old experience, so the bias can be switched off while the buffer size stays the same:

- :class:`ReservoirReplayBuffer` keeps a uniform sample of every transition ever offered to it
  (reservoir sampling);
- :class:`HalfReservoirReplayBuffer` keeps the most recent half (FIFO) and a uniform sample of everything
  older in the other half, as the replay memories of CLEAR (Rolnick et al. 2019) and of Isele & Cosgun
  2018 ("Selective experience replay for lifelong learning", arXiv 1802.10269) do;
- :class:`FifoReplayBuffer` is SB3's FIFO unchanged, for the comparison arm.

What each holds, in numbers: a buffer of 10,000 after 50,000 CartPole timesteps. The FIFO holds
timesteps 40,001 to 50,000 (mean age 5,000 timesteps); the reservoir holds about 10,000 timesteps drawn
uniformly from 1 to 50,000 (mean age about 25,000); the half buffer holds 45,001 to 50,000 and about
5,000 drawn from 1 to 45,000 (mean age about (2,500 + 27,500) / 2 = 15,000). Until the buffer is first
full all three hold exactly what SB3's buffer holds, and a DQN trains identically with any of them.

All three record in ``insertion_step`` the timestep each row was written at, so :func:`transition_ages`
measures how old the transitions that training samples are; for SB3's own buffer it derives the ages
from the write position.

Use them as SB3 does any buffer class: ``DQN(..., replay_buffer_class=ReservoirReplayBuffer)``, or
``rollback-rl train --set replay_buffer_class=ReservoirReplayBuffer``. They sample exactly as SB3 does
(uniformly over the rows held, with NumPy's global generator); only the choice of what to keep is
theirs, drawn from their own generator (see ``seed``).

Rows and envs: SB3 stores ``buffer_size // n_envs`` rows, each holding the ``n_envs`` transitions of one
vectorised step. These buffers keep or drop whole rows, so with several envs a row is the unit of the
reservoir; each transition is still kept with the same probability. Timesteps are counted as SB3 counts
them, summed over envs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer


class FifoReplayBuffer(ReplayBuffer):
    """SB3's ``ReplayBuffer`` (first in, first out) that also records the timestep each row was written at.

    It keeps and samples exactly what SB3's buffer does; ``insertion_step`` and ``timesteps_offered`` are
    added so that :func:`transition_ages` is exact. The other buffers of this module build on it.

    ``pos`` and ``full`` mean what they mean in SB3 (the next row written, and whether every row holds a
    transition) unless a subclass says otherwise.

    :param buffer_size: transitions held, summed over envs (``buffer_size // n_envs`` rows)
    :param observation_space: observation space (a ``Box`` or ``Discrete``; ``Dict`` spaces are refused)
    :param action_space: action space
    :param device: PyTorch device the samples are put on
    :param n_envs: number of parallel environments
    :param optimize_memory_usage: must be False (refused otherwise: these buffers store each next
        observation in its own row)
    :param handle_timeout_termination: as in SB3: a transition cut by a time limit
        (``info["TimeLimit.truncated"]``) is not sampled as a termination
    """

    insertion_step: np.ndarray
    rows_offered: int

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
    ) -> None:
        if optimize_memory_usage:
            raise ValueError(f"{type(self).__name__} does not support optimize_memory_usage=True (it keeps each "
                             f"transition's next observation in its own row); build the model with "
                             f"optimize_memory_usage=False")
        if isinstance(observation_space, spaces.Dict):
            raise TypeError(f"{type(self).__name__} stores array observations; a Dict observation space needs "
                            f"SB3's DictReplayBuffer")
        super().__init__(buffer_size, observation_space, action_space, device=device, n_envs=n_envs,
                         optimize_memory_usage=False, handle_timeout_termination=handle_timeout_termination)
        self.insertion_step = np.full(self.buffer_size, -1, dtype=np.int64)  # -1: never written
        self.rows_offered = 0

    @property
    def timesteps_offered(self) -> int:
        """Transitions offered to :meth:`add` since the buffer was made or reset, summed over envs (kept
        or not): SB3's ``num_timesteps`` for a buffer made when training started."""
        return self.rows_offered * self.n_envs

    def add(
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        """Offer one vectorised step's transitions (one per env); the buffer decides whether to keep them."""
        self.rows_offered += 1
        row = self._make_room()
        if row is None:
            return
        self.pos = row
        super().add(obs, next_obs, action, reward, done, infos)  # writes row ``row``, then moves pos and full on
        self.insertion_step[row] = self.timesteps_offered

    def _make_room(self) -> int | None:
        """The row the step being offered goes to (``None``: it is not kept); moves out what the row
        held where the buffer keeps it elsewhere. ``rows_offered`` already counts the step."""
        return self.pos

    def reset(self) -> None:
        super().reset()
        self.insertion_step.fill(-1)
        self.rows_offered = 0


class _SampledReplayBuffer(FifoReplayBuffer):
    """A FIFO-filled buffer that decides by a seeded generator (``keep_generator``) which old steps it keeps.

    :param seed: seed of that generator; ``None`` (what a model gets): drawn from NumPy's global
        generator, which SB3 seeds from the model's ``seed`` just before it builds the buffer, without
        advancing it, so every other random draw of the run is the same as with SB3's buffer
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__(buffer_size, observation_space, action_space, device=device, n_envs=n_envs,
                         optimize_memory_usage=optimize_memory_usage,
                         handle_timeout_termination=handle_timeout_termination)
        self.keep_generator = np.random.default_rng(_seed_from_global_generator() if seed is None else seed)


class ReservoirReplayBuffer(_SampledReplayBuffer):
    """A replay buffer that holds a uniform sample of every transition ever offered to it (reservoir sampling).

    Until it is full it keeps everything, like SB3's buffer. After that the n-th step offered replaces a
    uniformly chosen row with probability ``rows / n`` and is dropped otherwise (Vitter's algorithm R),
    so at any time each step offered so far is held with the same probability. Old experience is never
    pushed out by age: use it to train without the recency bias of a FIFO of the same size.

    ``pos`` and ``full`` keep SB3's meaning while the buffer fills. Once full, ``full`` stays True and
    ``pos`` is one past the row written last (``pos - 1`` is the newest row held, as in SB3); it does not
    move when a step is dropped. Sampling reads neither once the buffer is full.

    :param seed: seed of the generator that decides what is kept. ``None`` (what a model gets): a seed
        drawn from NumPy's global generator, which SB3 seeds from the model's ``seed`` just before it
        builds the buffer; it is read without advancing that generator, so every other random draw of
        the run is the same as with SB3's buffer. Pass ``replay_buffer_kwargs=dict(seed=...)`` to set it.
    :param buffer_size, observation_space, action_space, device, n_envs, optimize_memory_usage,
        handle_timeout_termination: as in :class:`FifoReplayBuffer`
    """

    def _make_room(self) -> int | None:
        if not self.full:
            return self.pos
        candidate = int(self.keep_generator.integers(self.rows_offered))
        return candidate if candidate < self.buffer_size else None


class HalfReservoirReplayBuffer(_SampledReplayBuffer):
    """A replay buffer half recent, half old: the newest transitions in one half (FIFO), a uniform sample
    of everything older in the other (reservoir sampling).

    It is the replay memory of CLEAR (Rolnick et al. 2019) and of Isele & Cosgun 2018 (a FIFO short-term
    memory next to a reservoir long-term one). Here the reservoir draws from the steps that have left
    the FIFO half, so no transition is held twice and every row holds a different step; training samples
    uniformly over both halves, so about half of each minibatch is recent.

    Layout: rows ``[0, reservoir_rows)`` are the reservoir, rows ``[reservoir_rows, rows)`` the FIFO
    (``fifo_rows = rows // 2``). The buffer fills in order as SB3's does (``pos`` and ``full`` with SB3's
    meaning): the first steps become the reservoir's starting content, the next ones the FIFO's. Once
    full, each new step overwrites the FIFO's oldest row, and that row's step joins the old history:
    when it is the m-th step to leave the FIFO, it replaces a uniformly chosen reservoir row with
    probability ``reservoir_rows / m``. ``pos`` is then the FIFO row written next (never a reservoir row).

    :param seed: seed of the generator that decides what the reservoir keeps; ``None``: drawn from
        NumPy's global generator without advancing it, as in :class:`ReservoirReplayBuffer`
    :param buffer_size, observation_space, action_space, device, n_envs, optimize_memory_usage,
        handle_timeout_termination: as in :class:`FifoReplayBuffer` (at least 2 rows)
    """

    def __init__(self, buffer_size: int, observation_space: spaces.Space, action_space: spaces.Space,
                 device: th.device | str = "auto", n_envs: int = 1, optimize_memory_usage: bool = False,
                 handle_timeout_termination: bool = True, seed: int | None = None) -> None:
        super().__init__(buffer_size, observation_space, action_space, device=device, n_envs=n_envs,
                         optimize_memory_usage=optimize_memory_usage,
                         handle_timeout_termination=handle_timeout_termination, seed=seed)
        if self.buffer_size < 2:
            raise ValueError(f"{type(self).__name__} needs room for two rows (buffer_size >= 2 * n_envs), got "
                             f"buffer_size={buffer_size} with n_envs={n_envs}")
        self.fifo_rows = self.buffer_size // 2
        self.reservoir_rows = self.buffer_size - self.fifo_rows

    def _make_room(self) -> int | None:
        if not self.full:
            return self.pos
        leaving = self.pos  # the FIFO's oldest row
        steps_left_fifo = self.rows_offered - self.fifo_rows  # this one included
        candidate = int(self.keep_generator.integers(steps_left_fifo))
        if candidate < self.reservoir_rows:
            self._copy_row(leaving, candidate)
        return leaving

    def add(
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        super().add(obs, next_obs, action, reward, done, infos)
        if self.full and self.pos == 0:  # the FIFO half wrapped around: its oldest row is its first
            self.pos = self.reservoir_rows

    def _copy_row(self, source: int, target: int) -> None:
        for array in (self.observations, self.next_observations, self.actions, self.rewards, self.dones,
                      self.timeouts, self.insertion_step):
            array[target] = array[source]


def _seed_from_global_generator() -> int:
    """A seed drawn from NumPy's global generator, which is then put back as it was.

    Why not simply draw: SB3 seeds the global generator from the model's seed right before it builds the
    buffer, and everything after (exploration, minibatch indices) draws from it. Leaving it untouched
    makes a run with these buffers identical to one with SB3's until the buffer is first full.
    """
    state = np.random.get_state()
    seed = int(np.random.randint(0, 2**31 - 1))
    np.random.set_state(state)
    return seed


def transition_ages(buffer: ReplayBuffer, rows: np.ndarray) -> np.ndarray:
    """Age, in timesteps summed over envs, of the transitions held in ``rows`` of ``buffer``: the
    timesteps offered to the buffer since each was written (a transition written at the last step is 0).

    Exact for this module's buffers (from ``insertion_step``). SB3's own ``ReplayBuffer`` does not
    record it: its ages are derived from the write position, which is exact for a FIFO.

    :param rows: row indices (as ``sample`` draws them: ``batch_inds``)
    :return: int64 array of ages, one per entry of ``rows``
    """
    rows = np.asarray(rows)
    if isinstance(buffer, FifoReplayBuffer):
        return buffer.timesteps_offered - buffer.insertion_step[rows]
    # Row pos - 1 is the newest; each row holds one transition per env, added together.
    return (buffer.pos - 1 - rows) % buffer.buffer_size * buffer.n_envs


# The three kinds compared by the forgetting experiments (``rollback-rl forgetting --buffer-kinds``), by
# short name: what each keeps once full (the newest, a uniform sample of all, half of each).
BUFFER_KINDS: dict[str, type[FifoReplayBuffer]] = {
    "fifo": FifoReplayBuffer,
    "reservoir": ReservoirReplayBuffer,
    "half": HalfReservoirReplayBuffer,
}

# The buffer classes a hyperparameter file or ``--set replay_buffer_class=`` may name: an allow-list, so
# nothing is ever imported from a string.
REPLAY_BUFFER_CLASSES: dict[str, type[ReplayBuffer]] = {
    cls.__name__: cls for cls in (ReplayBuffer, FifoReplayBuffer, ReservoirReplayBuffer, HalfReservoirReplayBuffer)
}
