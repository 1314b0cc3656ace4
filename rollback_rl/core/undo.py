"""An exact undo log of training steps: go back n gradient steps, bitwise, for a small fraction of a copy.

Storing what each Adam step changed costs as much as a full copy: every step changes every weight and
both moment estimates (``benchmarks/undo_cost.py`` measures it). Instead the log keeps an *anchor*
(a full copy of the training state, see ``rollback_rl.core.snapshots``) every ``anchor_interval``
operations, and for every operation since then only its inputs: for a gradient step the minibatch and
learning rate, for a target-network sync nothing but the call itself. Undoing restores the newest
anchor at or before the wanted point and replays the recorded operations up to it with the same
functions. On the same device and torch thread count, with deterministic kernels (DQN's are on CPU; on
CUDA see ``torch.use_deterministic_algorithms``), replay recomputes every tensor bitwise.

Every change to the training state must either go through :meth:`UndoLog.apply` or be announced with
:meth:`UndoLog.note_external_change` (e.g. after restoring a snapshot or loading parameters);
otherwise replay starts from a state that no longer matches. This module does not import
Stable-Baselines3; ``rollback_rl.agents.RollbackDQN`` drives it for DQN.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rollback_rl.core.snapshots import SnapshotRing, TrainingState


class UndoUnavailableError(LookupError):
    """Raised when the state asked for is no longer in the undo log (it fell off, or was undone)."""


@dataclass(frozen=True)
class UndoMark:
    """A point in the training history that :meth:`UndoLog.undo_to` can go back to."""

    version: int


@dataclass(slots=True)
class _Record:
    """One operation as applied: replaying ``operation(*arguments)`` on the state before it redoes it."""

    operation: Callable[..., Any]
    arguments: tuple[Any, ...]
    gradient_step: bool
    version: int  # the state's version right after the operation
    nbytes: int


@dataclass
class _Segment:
    """An anchor (a full copy of the state at ``version``) and the operations applied after it."""

    anchor: SnapshotRing
    anchor_bytes: int
    version: int
    records: list[_Record] = field(default_factory=list)
    gradient_steps: int = 0


def _argument_bytes(value: Any) -> int:
    """Bytes of the tensors and arrays held by an operation's arguments (tuples, lists, dicts nested)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, (tuple, list)):  # e.g. a minibatch: its tensors counted here, without a call each
        total = 0
        for item in value:
            total += item.nbytes if isinstance(item, torch.Tensor) else _argument_bytes(item)
        return total
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(map(_argument_bytes, value.values()))
    return 0


class UndoLog:
    """Records the operations applied to a training state so the last n gradient steps can be undone.

    Use it by routing every change of the state through :meth:`apply`::

        log = UndoLog({"net": net, "optimizer": optimizer}, max_depth=1_000)
        for batch in batches:
            log.apply(gradient_step, batch, learning_rate)   # runs gradient_step(batch, learning_rate)
        log.undo(10)   # net and optimizer are now bitwise as they were 10 gradient steps ago

    An operation must be a deterministic function of the training state and its arguments, and must not
    keep or modify its arguments' tensors afterwards (the log keeps them to replay the operation; pass
    fresh copies, e.g. a freshly sampled minibatch). Undoing ``n`` gradient steps also undoes any other
    operation applied after the earliest of them (e.g. a target-network sync).

    Memory: one anchor (the size of the whole training state: weights, target weights, optimizer
    moments) per ``anchor_interval`` operations, plus the recorded arguments (e.g. a minibatch) of
    each operation. Undoing costs one restore plus up to ``anchor_interval`` replayed operations.
    A point in the history stays reachable while at most ``max_depth`` gradient steps were applied
    after it and the memory budget holds it.

    :param state: the training state: names mapped to the live modules, optimizers and tensors
    :param max_depth: how many gradient steps can be undone at most; older records fall off
    :param max_bytes: memory budget for anchors plus recorded arguments (tensor bytes; Python objects'
        own overhead, a few hundred bytes per record, is not counted). The oldest anchors and records
        fall off first; if even one anchor with the records after it does not fit, the log keeps just
        a fresh anchor of the current state (nothing can be undone until the next operations).
    :param anchor_interval: operations (gradient steps and others) between two anchors: larger saves
        memory, smaller makes ``undo`` faster (it replays up to this many operations)
    :param device: where to keep the anchors (``None``: next to each live tensor; ``"cpu"`` keeps a GPU
        model's anchors in host memory)
    """

    def __init__(self, state: TrainingState, max_depth: int = 1_000, max_bytes: int = 256 * 2**20,
                 anchor_interval: int = 100, device: str | torch.device | None = None) -> None:
        for name, value in (("max_depth", max_depth), ("max_bytes", max_bytes), ("anchor_interval", anchor_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.state = state
        self.max_depth = int(max_depth)
        self.max_bytes = int(max_bytes)
        self.anchor_interval = int(anchor_interval)
        self.device = device
        self._segments: deque[_Segment] = deque()  # oldest first
        self._spare: SnapshotRing | None = None  # the anchor buffers of a dropped segment, for reuse
        self._spare_bytes = 0
        # Running totals over all segments, so that apply() costs the same however long the log is.
        self._gradient_steps = 0
        self._nbytes = 0
        self._versions = itertools.count(1)
        self._version = 0  # the version of the live state
        self._anchored = False  # whether the live state's version is in the log
        self._just_applied: _Record | None = None  # what forget_last() may drop

    # -- what the log holds ------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """How many gradient steps can be undone now."""
        return min(self.max_depth, self._gradient_steps)

    @property
    def nbytes(self) -> int:
        """Bytes held: anchors (including a spare one kept for reuse) plus recorded arguments."""
        return self._nbytes + self._spare_bytes

    @property
    def bytes_per_step(self) -> float:
        """``nbytes`` per gradient step in the log (``nan`` while there is none)."""
        return self.nbytes / self._gradient_steps if self._gradient_steps else float("nan")

    @property
    def n_anchors(self) -> int:
        """How many full copies of the state the log holds (not counting a spare one)."""
        return len(self._segments)

    def __len__(self) -> int:
        """Number of recorded operations (gradient steps and others)."""
        return sum(len(s.records) for s in self._segments)

    # -- recording ---------------------------------------------------------------------------------

    def apply(self, operation: Callable[..., Any], *arguments: Any, gradient_step: bool = True) -> Any:
        """Run ``operation(*arguments)`` on the live state, record it, and return what it returned.

        :param gradient_step: whether this operation counts as a gradient step (for ``undo(n)`` and
            ``max_depth``); e.g. a target-network sync does not
        """
        if not self._anchored or len(self._segments[-1].records) >= self.anchor_interval:
            self._anchor()
        result = operation(*arguments)
        record = _Record(operation, arguments, gradient_step, next(self._versions), _argument_bytes(arguments))
        segment = self._segments[-1]
        segment.records.append(record)
        self._add(segment, record, +1)
        self._version = record.version
        self._enforce_limits()
        self._just_applied = record
        return result

    def keeps_current_state_over(self, operations: int, arguments: tuple[Any, ...]) -> bool:
        """Whether ``undo_to(mark())`` is sure to work after ``operations`` more gradient steps through
        :meth:`apply`, each with arguments the size of ``arguments`` (no external change or undo between).

        It is when they fit in ``max_depth`` and, with the anchors they bring, in ``max_bytes``. Anchors
        are counted at twice the newest one's size, in case an optimizer creates its state meanwhile.
        Always ``False`` while the live state is not anchored: call :meth:`mark` first.
        """
        if not self._anchored or operations > self.max_depth:
            return False
        segment = self._segments[-1]  # the live state's version is in it
        held_from_now_on = segment.anchor_bytes + sum(r.nbytes for r in segment.records)
        new_anchors = 1 + operations // self.anchor_interval
        needed = held_from_now_on + new_anchors * 2 * segment.anchor_bytes + operations * _argument_bytes(arguments)
        return needed <= self.max_bytes

    def forget_last(self) -> None:
        """Drop the record of the operation just applied, without touching the live state.

        Only for an operation that turned out to change nothing, e.g. a gradient step skipped because its
        loss was not finite: the log then spends neither memory nor undo depth on it. Call it right after
        :meth:`apply`, at most once.
        """
        record, self._just_applied = self._just_applied, None
        if record is None:
            raise UndoUnavailableError("forget_last() must follow apply() directly")
        segment = self._segments[-1]
        if segment.records and segment.records[-1] is record:  # else the budget already folded it into an anchor
            segment.records.pop()
            self._add(segment, record, -1)
            self._version = segment.records[-1].version if segment.records else segment.version

    def note_external_change(self) -> None:
        """Say that the live state was changed outside :meth:`apply` (e.g. a snapshot was restored).

        The changed state is anchored before the next operation; the history before it stays
        undoable (undoing across the change puts back the state from before it).
        """
        self._version = next(self._versions)
        self._anchored = False
        self._just_applied = None

    def mark(self) -> UndoMark:
        """Return a handle to the live state, for :meth:`undo_to`."""
        if not self._anchored:
            self._anchor()
        return UndoMark(self._version)

    def clear(self) -> None:
        """Forget the whole history and free every buffer."""
        self._segments.clear()
        self._spare, self._spare_bytes = None, 0
        self._gradient_steps = self._nbytes = 0
        self.note_external_change()

    def _add(self, segment: _Segment, record: _Record, sign: int) -> None:
        segment.gradient_steps += sign * int(record.gradient_step)
        self._gradient_steps += sign * int(record.gradient_step)
        self._nbytes += sign * record.nbytes

    def _anchor(self) -> None:
        """Start a new segment with a full copy of the live state."""
        self._just_applied = None
        if self._spare is None and len(self._segments) > 1 \
                and self.nbytes + self._segments[-1].anchor_bytes > self.max_bytes:
            self._drop_oldest()  # its buffers become the spare, reused just below: the budget holds throughout
        if self._spare is not None:
            ring, self._spare, self._spare_bytes = self._spare, None, 0
            ring.drop_last()  # its buffers become the ring's spare slot, which take() fills
        else:
            ring = SnapshotRing(1, device=self.device, check_finite=False)
        ring.take(self.state, timestep=0, score=float("nan"))
        segment = _Segment(anchor=ring, anchor_bytes=ring.nbytes, version=self._version)
        if segment.anchor_bytes > self.max_bytes:
            raise ValueError(f"max_bytes={self.max_bytes} cannot hold even one copy of the training state "
                             f"({segment.anchor_bytes} bytes): raise it")
        self._segments.append(segment)
        self._nbytes += segment.anchor_bytes
        self._anchored = True
        self._enforce_limits()

    def _drop_oldest(self) -> None:
        segment = self._segments.popleft()
        self._gradient_steps -= segment.gradient_steps
        self._nbytes -= segment.anchor_bytes + sum(r.nbytes for r in segment.records)
        if self._spare is None:
            self._spare, self._spare_bytes = segment.anchor, segment.anchor_bytes

    def _enforce_limits(self) -> None:
        # Depth: drop the oldest segment while the newer ones alone still allow undoing max_depth steps.
        while len(self._segments) > 1 and self._gradient_steps - self._segments[0].gradient_steps >= self.max_depth:
            self._drop_oldest()
        if self.nbytes <= self.max_bytes:
            return
        self._spare, self._spare_bytes = None, 0
        while len(self._segments) > 1 and self.nbytes > self.max_bytes:
            self._drop_oldest()
            self._spare, self._spare_bytes = None, 0
        if self.nbytes > self.max_bytes:
            # One anchor and the records after it do not fit: start over from an anchor of the live state.
            self._spare, self._spare_bytes = self._segments[0].anchor, 0  # reused at once, counted there
            self._segments.clear()
            self._gradient_steps = self._nbytes = 0
            self._anchor()

    # -- undoing -----------------------------------------------------------------------------------

    def undo(self, n: int = 1) -> None:
        """Put the state back to just before the n-th most recent gradient step (``n=0`` does nothing).

        :raises ValueError: if ``n`` is negative or more than ``max_depth``
        :raises UndoUnavailableError: if fewer than ``n`` gradient steps are still in the log
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if n > self.max_depth:
            raise ValueError(f"cannot undo {n} gradient steps: the log keeps at most max_depth={self.max_depth}")
        if n == 0:
            return
        if n > self._gradient_steps:
            raise UndoUnavailableError(f"cannot undo {n} gradient steps: only {self._gradient_steps} are in the "
                                       "log (older ones fell off: raise max_depth or max_bytes)")
        remaining = n
        for segment in reversed(self._segments):
            if remaining > segment.gradient_steps:
                remaining -= segment.gradient_steps
                continue
            for index in range(len(segment.records) - 1, -1, -1):
                if segment.records[index].gradient_step:
                    remaining -= 1
                    if remaining == 0:
                        before = segment.records[index - 1].version if index > 0 else segment.version
                        self._go_to(segment, index, before)
                        return
        raise AssertionError("gradient step counts out of sync")  # unreachable

    def undo_to(self, mark: UndoMark) -> None:
        """Put the state back to what it was when ``mark`` was taken.

        :raises UndoUnavailableError: if that state fell off the log or a later undo went back past it
        """
        if mark.version == self._version:
            return
        for segment in reversed(self._segments):
            if segment.version > mark.version:
                continue
            if segment.version == mark.version:
                self._go_to(segment, 0, mark.version)
                return
            for index, record in enumerate(segment.records):
                if record.version == mark.version:
                    self._go_to(segment, index + 1, mark.version)
                    return
            break
        oldest = self._segments[0].version if self._segments else self._version
        reason = ("it fell off the log: raise max_depth or max_bytes" if mark.version < oldest
                  else "an undo went back past it")
        raise UndoUnavailableError(f"cannot go back to {mark}: {reason}")

    def _go_to(self, segment: _Segment, n_records: int, version: int) -> None:
        """Restore ``segment``'s anchor, replay its first ``n_records`` records, forget everything after."""
        while self._segments[-1] is not segment:
            newer = self._segments.pop()
            self._gradient_steps -= newer.gradient_steps
            self._nbytes -= newer.anchor_bytes + sum(r.nbytes for r in newer.records)
        segment.anchor.restore_last_good(self.state)
        for record in segment.records[:n_records]:
            record.operation(*record.arguments)
        for record in segment.records[n_records:]:
            self._add(segment, record, -1)
        del segment.records[n_records:]
        self._version = version
        self._anchored = True
        self._just_applied = None
