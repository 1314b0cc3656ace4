"""A bounded ring of in-memory snapshots of a model's training state, restored bitwise.

A *training state* is a mapping from names to the live objects that training changes: torch modules
(every parameter and buffer of their ``state_dict``), optimizers (their per-parameter state and their
param groups) and bare tensors (e.g. SAC's log entropy coefficient). The ring copies them into
buffers that are allocated once per slot and reused: taking a snapshot is a series of tensor copies,
not a ``deepcopy``. Restoring copies the buffers back into the same live tensors, so optimizers keep
their references and, after a restore, weights and optimizer state are bitwise equal to the snapshot.

This module does not import Stable-Baselines3; ``rollback_rl.callbacks`` maps an SB3 model to a
training state.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from torch import nn

TrainingState = Mapping[str, Union[nn.Module, torch.optim.Optimizer, torch.Tensor]]


class NonFiniteStateError(ValueError):
    """Raised when a snapshot is asked of a state holding NaN or inf values."""


def _copy_all(destinations: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    if not destinations:
        return
    with torch.no_grad():
        # One fused call instead of a Python loop: it matters for networks with many small tensors.
        torch._foreach_copy_(destinations, sources)


def _optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _live_tensors(state: TrainingState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten a training state into named live tensors plus the small non-tensor parts."""
    tensors: dict[str, torch.Tensor] = {}
    extras: dict[str, Any] = {}
    for name, obj in state.items():
        if isinstance(obj, nn.Module):
            for key, tensor in obj.state_dict(keep_vars=True).items():
                tensors[f"{name}/{key}"] = tensor
        elif isinstance(obj, torch.optim.Optimizer):
            per_parameter: list[dict[str, Any]] = []
            for index, parameter in enumerate(_optimizer_parameters(obj)):
                values = {}
                for key, value in obj.state.get(parameter, {}).items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"{name}/state/{index}/{key}"] = value
                    else:
                        values[key] = value
                tensor_keys = [k for k, v in obj.state.get(parameter, {}).items() if isinstance(v, torch.Tensor)]
                per_parameter.append({"tensor_keys": tensor_keys, "values": values})
            groups = [{k: v for k, v in group.items() if k != "params"} for group in obj.param_groups]
            extras[name] = {"per_parameter": per_parameter, "param_groups": groups}
        elif isinstance(obj, torch.Tensor):
            tensors[name] = obj
        else:
            raise TypeError(f"training state entry {name!r} is a {type(obj).__name__}; "
                            "expected an nn.Module, a torch optimizer or a tensor")
    return tensors, extras


@dataclass
class Snapshot:
    """One saved training state: preallocated tensor buffers plus when and how well it scored.

    :param timestep: environment timesteps done when the snapshot was taken
    :param score: the evaluation score that made these weights worth keeping
    :param episode_returns: the episode returns behind ``score``, if known
    """

    timestep: int
    score: float
    episode_returns: np.ndarray | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes held by this snapshot's tensor buffers."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class SnapshotRing:
    """Keeps the last ``capacity`` snapshots of a training state; the newest is the last good one.

    Buffers are allocated the first time a slot is filled and reused when the ring wraps around (they
    are reallocated only if the state's layout changed, e.g. when an optimizer creates its state on
    its first step).

    :param capacity: how many snapshots to keep; the oldest is overwritten first
    :param device: where to keep the buffers (``None``: on the device of each live tensor; ``"cpu"``
        keeps GPU models' snapshots in host memory)
    :param check_finite: refuse (``NonFiniteStateError``) to snapshot a state holding NaN or inf, so a
        diverged model can never become the "last good" one
    """

    def __init__(self, capacity: int = 3, device: str | torch.device | None = None,
                 check_finite: bool = True) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.device = torch.device(device) if device is not None else None
        self.check_finite = check_finite
        self._slots: list[Snapshot] = []  # in order of age, newest last
        self._spare: Snapshot | None = None  # buffers of a dropped snapshot, kept for reuse

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[Snapshot]:
        return iter(self._slots)

    @property
    def last_good(self) -> Snapshot | None:
        """The newest snapshot, or ``None`` if none was taken."""
        return self._slots[-1] if self._slots else None

    @property
    def nbytes(self) -> int:
        """Bytes held by all snapshot buffers (including a spare slot kept for reuse)."""
        spare = self._spare.nbytes if self._spare is not None else 0
        return sum(s.nbytes for s in self._slots) + spare

    def take(self, state: TrainingState, timestep: int, score: float,
             episode_returns: np.ndarray | list[float] | None = None) -> Snapshot:
        """Copy ``state`` into the next slot and return that snapshot (now the last good one)."""
        live, extras = _live_tensors(state)
        if self.check_finite:
            bad = [k for k, t in live.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            if bad:
                raise NonFiniteStateError(f"refusing to snapshot a state with non-finite values in {bad[0]!r}")
        if len(self._slots) == self.capacity:
            recycled = self._slots.pop(0)
        elif self._spare is not None:
            recycled, self._spare = self._spare, None
        else:
            recycled = None
        buffers = recycled.tensors if recycled is not None and self._fits(recycled.tensors, live) else None
        if buffers is None:
            buffers = {k: torch.empty_like(t, device=self.device or t.device) for k, t in live.items()}
        _copy_all(list(buffers.values()), [t.detach() for t in live.values()])
        snapshot = Snapshot(
            timestep=int(timestep),
            score=float(score),
            episode_returns=None if episode_returns is None else np.asarray(episode_returns, dtype=np.float64),
            tensors=buffers,
            extras=copy.deepcopy(extras),
        )
        self._slots.append(snapshot)
        return snapshot

    @staticmethod
    def _fits(buffers: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> bool:
        return buffers.keys() == live.keys() and all(
            b.shape == t.shape and b.dtype == t.dtype for b, t in zip(buffers.values(), live.values())
        )

    def restore(self, state: TrainingState, snapshot: Snapshot) -> None:
        """Copy ``snapshot`` back into the live objects of ``state``, bitwise."""
        for name, obj in state.items():
            if isinstance(obj, torch.optim.Optimizer):
                self._prepare_optimizer(name, obj, snapshot)
        live, _ = _live_tensors(state)
        missing = [k for k in snapshot.tensors if k not in live]
        if missing or len(live) != len(snapshot.tensors):
            raise ValueError(f"snapshot does not match the training state (e.g. {missing[:1] or list(live)[:1]})")
        keys = list(snapshot.tensors)
        destinations = [live[k] for k in keys]
        sources = [snapshot.tensors[k].to(live[k].device) for k in keys]
        _copy_all([d.data if isinstance(d, nn.Parameter) else d for d in destinations], sources)

    def _prepare_optimizer(self, name: str, optimizer: torch.optim.Optimizer, snapshot: Snapshot) -> None:
        """Give the optimizer exactly the per-parameter state keys the snapshot has, then its groups."""
        saved = snapshot.extras[name]
        for index, (parameter, entry) in enumerate(zip(_optimizer_parameters(optimizer), saved["per_parameter"])):
            if not entry["tensor_keys"] and not entry["values"]:
                optimizer.state.pop(parameter, None)
                continue
            current = optimizer.state[parameter]
            for key in list(current):
                if key not in entry["tensor_keys"] and key not in entry["values"]:
                    del current[key]
            for key in entry["tensor_keys"]:
                buffer = snapshot.tensors[f"{name}/state/{index}/{key}"]
                value = current.get(key)
                if not isinstance(value, torch.Tensor) or value.shape != buffer.shape or value.dtype != buffer.dtype:
                    # The optimizer had no state yet (snapshot taken after its first step): make room.
                    current[key] = torch.empty_like(buffer, device=parameter.device)
            current.update(copy.deepcopy(entry["values"]))
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
            group.update(copy.deepcopy(saved_group))

    def restore_last_good(self, state: TrainingState) -> Snapshot:
        """Restore the newest snapshot into ``state`` and return it."""
        if not self._slots:
            raise RuntimeError("no snapshot to restore: take() one first")
        snapshot = self._slots[-1]
        self.restore(state, snapshot)
        return snapshot

    def drop_last(self) -> None:
        """Forget the newest snapshot (its buffers are kept for reuse); the one before becomes last good."""
        if self._slots:
            self._spare = self._slots.pop()

    def clear(self) -> None:
        """Forget every snapshot and free the buffers."""
        self._slots.clear()
        self._spare = None

