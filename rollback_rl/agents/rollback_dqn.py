"""RollbackDQN: Stable-Baselines3's DQN that can undo its last gradient steps exactly and roll back.

Every change DQN makes to its networks goes through :meth:`RollbackDQN._gradient_step` (SB3's DQN
loss, gradient clipping and optimizer step, for one minibatch) or :meth:`RollbackDQN._sync_target`
(SB3's target-network update). Both run through an :class:`~rollback_rl.core.undo.UndoLog`, which records
their inputs and can therefore replay them after restoring an older full copy: ``undo(n)`` and
``undo_to(mark)`` are exact. A step whose loss is not finite is skipped; one that leaves non-finite
weights is undone, so training never goes on from NaN or infinite weights.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch as th
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBufferSamples
from stable_baselines3.common.type_aliases import TensorDict
from stable_baselines3.common.utils import polyak_update, update_learning_rate
from torch.nn import functional as F

from rollback_rl.sb3_state import sb3_training_state
from rollback_rl.core.snapshots import Snapshot, SnapshotRing, TrainingState
from rollback_rl.core.undo import UndoLog, UndoMark, UndoUnavailableError


class _AgentSnapshotRing(SnapshotRing):
    """A snapshot ring that tells its agent whenever it restores, so the undo log anchors the new state."""

    def __init__(self, capacity: int, on_restore: Callable[[], None]) -> None:
        super().__init__(capacity)
        self._on_restore = on_restore

    def restore(self, state: TrainingState, snapshot: Snapshot) -> None:
        super().restore(state, snapshot)
        self._on_restore()


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class RollbackDQN(DQN):
    """DQN with an exact undo log, a ring of good snapshots and a guard against non-finite steps.

    Use it like SB3's ``DQN`` (same arguments, ``learn``, ``save``/``load``, callbacks). On top:

    - ``undo(n)`` puts the Q-network, target network and Adam state back bitwise to just before the
      n-th most recent gradient step; ``mark = undo_mark()`` then ``undo_to(mark)`` reverts everything
      since the mark, e.g. a whole ``learn()`` call.
    - ``snapshot(score)`` keeps the current weights in ``rollback_snapshots``; ``rollback()`` restores
      the newest. ``RollbackCallback`` uses this ring when it trains a RollbackDQN.
    - A gradient step whose loss is NaN or infinite is skipped, one that leaves NaN or infinite weights
      (a non-finite gradient or learning rate) is undone; both are counted in ``nonfinite_steps``
      (logged as ``rollback/nonfinite_steps``). ``max_nonfinite_streak`` of them in a row trigger
      ``rollback()`` if a snapshot exists. While the undo log can take a whole ``train()`` call back,
      the weights are checked once at its end (a NaN or infinite weight stays so through later steps);
      if they are not finite, the call is undone exactly and redone with a check after every step, so
      the result is the same as checking every step, at a fraction of the cost.

    The undo log and the snapshots live in memory only: ``save()`` leaves them out and ``load()``
    starts with empty ones. Change the networks only through this class (``rollback``,
    ``restore_snapshot``, ``set_parameters``), or call ``undo_log.note_external_change()`` afterwards.
    Undoing puts back the training state only: ``num_timesteps``, ``_n_updates``, the schedules, the
    replay buffer and the random generators keep going. The log keeps each minibatch the replay buffer
    returns (SB3's buffers return fresh copies), so a custom buffer must not reuse its output tensors.

    :param policy: as for ``DQN``; any further positional and keyword arguments go to ``DQN``
    :param env: as for ``DQN``
    :param undo_depth: gradient steps that can be undone; ``0`` turns the undo log off
    :param undo_memory_budget: bytes the undo log may hold (full copies plus recorded minibatches)
    :param undo_anchor_interval: recorded operations (gradient steps and target syncs) between two
        full copies in the undo log; ``undo`` replays up to this many
    :param snapshot_capacity: how many good snapshots ``rollback_snapshots`` keeps
    :param max_nonfinite_streak: non-finite gradient steps in a row that trigger ``rollback()``
    """

    undo_log: UndoLog | None
    rollback_snapshots: SnapshotRing

    def __init__(self, policy: Any, env: Any, *args: Any, undo_depth: int = 1_000,
                 undo_memory_budget: int = 64 * 2**20, undo_anchor_interval: int = 100,
                 snapshot_capacity: int = 3, max_nonfinite_streak: int = 5, **kwargs: Any) -> None:
        # Set before DQN.__init__, which calls _setup_model().
        self.undo_depth = _check_int("undo_depth", undo_depth, 0)
        self.undo_memory_budget = _check_int("undo_memory_budget", undo_memory_budget, 1)
        self.undo_anchor_interval = _check_int("undo_anchor_interval", undo_anchor_interval, 1)
        self.snapshot_capacity = _check_int("snapshot_capacity", snapshot_capacity, 1)
        self.max_nonfinite_streak = _check_int("max_nonfinite_streak", max_nonfinite_streak, 1)
        self.nonfinite_steps = 0
        self.nonfinite_rollbacks = 0
        self._nonfinite_streak = 0
        self.undo_log = None
        super().__init__(policy, env, *args, **kwargs)

    def _setup_model(self) -> None:
        super()._setup_model()
        self._q_parameters = list(self.q_net.parameters())
        self.rollback_snapshots = _AgentSnapshotRing(self.snapshot_capacity, on_restore=self._note_external_change)
        self.undo_log = None
        if self.undo_depth > 0:
            self.undo_log = UndoLog(sb3_training_state(self), max_depth=self.undo_depth,
                                    max_bytes=self.undo_memory_budget, anchor_interval=self.undo_anchor_interval)

    def _excluded_save_params(self) -> list[str]:
        # In-memory history only: load() rebuilds both empty in _setup_model().
        return [*super()._excluded_save_params(), "undo_log", "rollback_snapshots", "_q_parameters"]

    # -- the two operations that change the networks ----------------------------------------------

    def _gradient_step(self, batch: ReplayBufferSamples, learning_rate: float) -> tuple[float, bool]:
        """One DQN update on ``batch``, exactly as SB3's ``DQN.train`` does it; skipped (the state left
        untouched) if the loss is not finite. A non-finite gradient norm makes the clipped gradient, and
        so the weights, non-finite: the caller's weight check catches it.

        :return: the loss, and whether the optimizer stepped
        """
        update_learning_rate(self.policy.optimizer, learning_rate)
        # For n-step replay, discount factor is gamma**n_steps (when no early termination)
        discounts = batch.discounts if batch.discounts is not None else self.gamma
        with th.no_grad():
            next_q_values, _ = self.q_net_target(batch.next_observations).max(dim=1)
            next_q_values = next_q_values.reshape(-1, 1)
            target_q_values = batch.rewards + (1 - batch.dones) * discounts * next_q_values
        current_q_values = th.gather(self.q_net(batch.observations), dim=1, index=batch.actions.long())
        loss = F.smooth_l1_loss(current_q_values, target_q_values)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            return loss_value, False
        self.policy.optimizer.zero_grad()
        loss.backward()
        th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        self.policy.optimizer.step()
        return loss_value, True

    def _sync_target(self, tau: float) -> None:
        """SB3's target-network update (Polyak with ``tau``; batch-norm statistics copied)."""
        polyak_update(self.q_net.parameters(), self.q_net_target.parameters(), tau)
        polyak_update(self.batch_norm_stats, self.batch_norm_stats_target, 1.0)  # see SB3 issue #996

    def _apply(self, operation: Callable[..., Any], *arguments: Any, gradient_step: bool = True) -> Any:
        if self.undo_log is None:
            return operation(*arguments)
        return self.undo_log.apply(operation, *arguments, gradient_step=gradient_step)

    # -- SB3 hooks, rewritten to go through the two operations ------------------------------------

    def _on_step(self) -> None:
        """SB3's ``DQN._on_step`` with the target update recorded in the undo log."""
        self._n_calls += 1
        if self._n_calls % max(self.target_update_interval // self.n_envs, 1) == 0:
            self._apply(self._sync_target, self.tau, gradient_step=False)
        self.exploration_rate = self.exploration_schedule(self._current_progress_remaining)
        self.logger.record("rollout/exploration_rate", self.exploration_rate)

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        learning_rate = self.lr_schedule(self._current_progress_remaining)
        batches = (self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
                   for _ in range(gradient_steps))
        losses = self._run_gradient_steps(batches, gradient_steps, learning_rate)
        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        if losses:
            self.logger.record("train/loss", np.mean(losses))
        self.logger.record("rollback/nonfinite_steps", self.nonfinite_steps)
        self.logger.record("rollback/nonfinite_rollbacks", self.nonfinite_rollbacks)

    def _run_gradient_steps(self, batches: Iterator[ReplayBufferSamples], n_steps: int,
                            learning_rate: float) -> list[float]:
        """The gradient steps of one ``train()`` call, none of them left with non-finite weights.

        :return: the losses of the steps kept
        """
        losses: list[float] = []
        first = next(batches, None)
        if first is None:
            return losses
        to_check: Iterator[ReplayBufferSamples] = itertools.chain([first], batches)
        if self.undo_log is not None:
            mark = self.undo_log.mark()
            if self.undo_log.keeps_current_state_over(n_steps, (first, learning_rate)):
                to_check = self._run_checking_once(mark, to_check, learning_rate, losses)
        for batch in to_check:
            loss = self._checked_gradient_step(batch, learning_rate)
            if loss is not None:
                losses.append(loss)
        return losses

    def _run_checking_once(self, mark: UndoMark, batches: Iterator[ReplayBufferSamples], learning_rate: float,
                           losses: list[float]) -> Iterator[ReplayBufferSamples]:
        """Run gradient steps unchecked until one is skipped (non-finite loss) or the batches run out, then
        check the weights once; return the batches still to run with a check after every step.

        Checking after every step costs a few percent of the step; one check covers them all because a
        NaN or infinite weight stays so through later optimizer steps. If it fails, the undo log goes
        back to ``mark`` and the returned batches include these steps again: redone with a check after
        each, they give exactly what checking all along would have given.
        """
        log = self._require_undo_log()
        unchecked, skipped = [], None
        for batch in batches:
            loss, stepped = log.apply(self._gradient_step, batch, learning_rate)
            if not stepped:
                log.forget_last()  # nothing changed: spend no undo depth on it
                skipped = batch
                break
            unchecked.append(batch)
            losses.append(loss)
        if unchecked and not self._weights_finite():
            losses.clear()
            try:
                log.undo_to(mark)
            except UndoUnavailableError:  # only if the state outgrew the log's estimate: no step to blame
                self._restore_last_good_or_warn()
                self._count_nonfinite_step()
                unchecked = []
            return itertools.chain(unchecked, [skipped] if skipped is not None else [], batches)
        if unchecked:
            self._nonfinite_streak = 0
        if skipped is not None:
            self._count_nonfinite_step()
        return batches

    def _checked_gradient_step(self, batch: ReplayBufferSamples, learning_rate: float) -> float | None:
        """One gradient step that never leaves non-finite weights; returns its loss, or None if skipped or undone."""
        loss, stepped = self._apply(self._gradient_step, batch, learning_rate)
        if stepped and self._weights_finite():
            self._nonfinite_streak = 0
            return loss
        if stepped:
            self._undo_nonfinite_step()
        elif self.undo_log is not None:
            self.undo_log.forget_last()  # nothing changed: spend no undo depth on it
        self._count_nonfinite_step()
        return None

    def _count_nonfinite_step(self) -> None:
        self.nonfinite_steps += 1
        self._nonfinite_streak += 1
        if self._nonfinite_streak >= self.max_nonfinite_streak and self.rollback_snapshots.last_good is not None:
            snapshot = self.rollback()
            self.nonfinite_rollbacks += 1
            self._nonfinite_streak = 0
            if self.verbose >= 1:
                print(f"RollbackDQN: {self.max_nonfinite_streak} non-finite gradient steps in a row, "
                      f"restored the snapshot of timestep {snapshot.timestep}")

    def _weights_finite(self) -> bool:
        # One fused norm over all Q-network tensors: NaN or inf anywhere makes it non-finite.
        return math.isfinite(th.stack(th._foreach_norm(self._q_parameters)).sum().item())

    def _undo_nonfinite_step(self) -> None:
        if self.undo_log is not None and self.undo_log.depth >= 1:
            self.undo(1)
        else:
            self._restore_last_good_or_warn()

    def _restore_last_good_or_warn(self) -> None:
        if self.rollback_snapshots.last_good is not None:
            self.rollback()
        else:
            warnings.warn("RollbackDQN: a gradient step left non-finite weights and neither the undo log "
                          "(undo_depth=0, or a memory budget too small for one step) nor a snapshot can bring "
                          "back finite ones", RuntimeWarning, stacklevel=3)

    # -- undo ----------------------------------------------------------------------------------------

    def _require_undo_log(self) -> UndoLog:
        if self.undo_log is None:
            raise RuntimeError("the undo log is off (undo_depth=0): create the model with undo_depth > 0")
        return self.undo_log

    def _replaying(self, go_back: Callable[[], None]) -> None:
        was_training = self.policy.training
        self.policy.set_training_mode(True)  # as during train(): replayed steps must compute the same
        try:
            go_back()
        finally:
            self.policy.set_training_mode(was_training)

    def undo(self, n: int = 1) -> None:
        """Put the networks and optimizer back bitwise to just before the n-th most recent gradient step
        (target syncs after it are undone too).

        :raises ValueError: if ``n`` is more than ``undo_depth``
        :raises UndoUnavailableError: if fewer than ``n`` steps are still in the log (memory budget)
        """
        log = self._require_undo_log()
        self._replaying(lambda: log.undo(n))

    def undo_mark(self) -> UndoMark:
        """A handle to the current training state, for :meth:`undo_to`."""
        return self._require_undo_log().mark()

    def undo_to(self, mark: UndoMark) -> None:
        """Put the networks and optimizer back bitwise to what they were at ``mark``.

        :raises UndoUnavailableError: if more than ``undo_depth`` gradient steps (or the memory budget)
            separate the mark from now, or an undo already went back past it
        """
        log = self._require_undo_log()
        self._replaying(lambda: log.undo_to(mark))

    # -- snapshots -----------------------------------------------------------------------------------

    def snapshot(self, score: float = float("nan"), timestep: int | None = None) -> Snapshot:
        """Keep a copy of the current training state in ``rollback_snapshots`` (it becomes the last good).

        :param score: how well these weights did (e.g. a mean evaluation return)
        :param timestep: environment timesteps so far (default: ``num_timesteps``)
        :raises NonFiniteStateError: if the weights or optimizer state hold NaN or inf
        """
        timestep = self.num_timesteps if timestep is None else timestep
        return self.rollback_snapshots.take(sb3_training_state(self), timestep=timestep, score=score)

    def rollback(self) -> Snapshot:
        """Restore the last good snapshot and return it.

        :raises RuntimeError: if no snapshot was taken
        """
        snapshot = self.rollback_snapshots.last_good
        if snapshot is None:
            raise RuntimeError("no snapshot to roll back to: call snapshot() first (or train with RollbackCallback)")
        self.restore_snapshot(snapshot)
        return snapshot

    def restore_snapshot(self, snapshot: Snapshot) -> None:
        """Restore any snapshot of this model's training state (the undo log anchors the result)."""
        self.rollback_snapshots.restore(sb3_training_state(self), snapshot)

    def set_parameters(self, load_path_or_dict: str | TensorDict, exact_match: bool = True,
                       device: th.device | str = "auto") -> None:
        super().set_parameters(load_path_or_dict, exact_match=exact_match, device=device)
        self._note_external_change()

    def _note_external_change(self) -> None:
        if self.undo_log is not None:
            self.undo_log.note_external_change()
