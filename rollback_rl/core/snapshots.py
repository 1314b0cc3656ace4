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
import itertools
import math
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


def _optimizer_tensor_ids(optimizers: list[torch.optim.Optimizer]) -> list[int]:
    """Identities of the optimizers' parameter lists and state tensors: they change when an optimizer
    creates, loads or replaces its state (read in the state's own order: no tensor hashing)."""
    ids: list[int] = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            ids += (id(group["params"]), len(group["params"]))
        for parameter, entries in optimizer.state.items():
            ids.append(id(parameter))
            ids += [id(v) for v in entries.values() if isinstance(v, torch.Tensor)]
    return ids


def _optimizer_value_ids(optimizers: list[torch.optim.Optimizer]) -> list[Any] | None:
    """A quicker stand-in for :func:`_optimizer_tensor_ids`, read without a Python loop per value:
    the identities of every state value, tensor or not, in the state's order. Equal as long as the
    tensors are (a Python number in the state may change it without harm: then compare the tensor
    ids). ``None`` if a parameter's state is not a dict."""
    ids: list[Any] = []
    try:
        for optimizer in optimizers:
            ids += [(id(group["params"]), len(group["params"])) for group in optimizer.param_groups]
            ids.append(tuple(map(id, itertools.chain.from_iterable(map(dict.values, optimizer.state.values())))))
    except TypeError:
        return None
    return ids


class _Layout:
    """A training state flattened into named live tensors, built once and reused while it still holds.

    Modules are assumed to keep their parameter and buffer objects (``load_state_dict`` and ``.to()``
    do); optimizer state is re-read whenever its tensors change identity.
    """

    def __init__(self, state: TrainingState) -> None:
        self.objects = tuple(state.values())
        self.optimizers = {name: obj for name, obj in state.items() if isinstance(obj, torch.optim.Optimizer)}
        self.optimizer_list = list(self.optimizers.values())
        self.optimizer_tensor_ids = _optimizer_tensor_ids(self.optimizer_list)
        self.optimizer_value_ids = _optimizer_value_ids(self.optimizer_list)
        self.tensors: dict[str, torch.Tensor] = {}
        self.extras: dict[str, Any] = {}  # per optimizer: the tensor keys of each parameter's state
        self.parameter_index: dict[str, dict[int, int]] = {}  # per optimizer: id(parameter) -> its index
        self.tensors_only: dict[str, bool] = {}  # per optimizer: whether its state holds nothing but tensors
        self.no_small_values: dict[str, list[dict[str, Any]]] = {}  # per optimizer: an empty dict per parameter
        for name, obj in state.items():
            if isinstance(obj, nn.Module):
                for key, tensor in obj.state_dict(keep_vars=True).items():
                    self.tensors[f"{name}/{key}"] = tensor.detach()
            elif isinstance(obj, torch.optim.Optimizer):
                per_parameter = []
                self.parameter_index[name] = {id(p): index for index, p in enumerate(_optimizer_parameters(obj))}
                for index, parameter in enumerate(_optimizer_parameters(obj)):
                    entries = obj.state.get(parameter, {})
                    tensor_keys = [k for k, v in entries.items() if isinstance(v, torch.Tensor)]
                    for key in tensor_keys:
                        self.tensors[f"{name}/state/{index}/{key}"] = entries[key]
                    per_parameter.append(tensor_keys)
                self.extras[name] = per_parameter
                self.no_small_values[name] = [{} for _ in per_parameter]
                self.tensors_only[name] = all(len(entries) == len(tensor_keys) for entries, tensor_keys in
                                              zip(map(obj.state.get, _optimizer_parameters(obj), itertools.repeat({})),
                                                  per_parameter))
            elif isinstance(obj, torch.Tensor):
                self.tensors[name] = obj.detach()
            else:
                raise TypeError(f"training state entry {name!r} is a {type(obj).__name__}; "
                                "expected an nn.Module, a torch optimizer or a tensor")
        self.keys = list(self.tensors)
        self.live = list(self.tensors.values())

    def holds_for(self, state: TrainingState) -> bool:
        if len(state) != len(self.objects):
            return False
        for obj, known in zip(state.values(), self.objects):
            if obj is not known:
                return False
        if not self.optimizer_list:
            return True
        value_ids = _optimizer_value_ids(self.optimizer_list)
        if value_ids is not None and value_ids == self.optimizer_value_ids:
            return True
        if _optimizer_tensor_ids(self.optimizer_list) != self.optimizer_tensor_ids:
            return False
        self.optimizer_value_ids = value_ids  # only non-tensor values changed (or were added)
        self.tensors_only = dict.fromkeys(self.optimizers, False)
        return True


class _CopyPlan:
    """How one snapshot's buffers map onto one layout's live tensors, worked out once per (slot, layout).

    ``gather``: for each flat buffer, the live tensors (flattened) that a single ``torch.cat`` writes
    into it back to back, or ``None`` where the buffers are not laid out that way (e.g. a snapshot read
    from a file): then every tensor is copied on its own. ``views``: the snapshot's tensor for each
    live tensor, in the layout's order, which is what a restore copies back.
    """

    def __init__(self, layout: _Layout, snapshot: Snapshot) -> None:
        self.views = [snapshot.tensors[key] for key in layout.keys]
        self.gather = self._gather(layout, snapshot)

    @staticmethod
    def _gather(layout: _Layout, snapshot: Snapshot) -> list[tuple[torch.Tensor, list[torch.Tensor]]] | None:
        members: dict[int, list[tuple[int, torch.Tensor]]] = {id(storage): [] for storage in snapshot.flat}
        owner = {storage.untyped_storage().data_ptr(): storage for storage in snapshot.flat}
        for live, view in zip(layout.live, [snapshot.tensors[key] for key in layout.keys]):
            storage = owner.get(view.untyped_storage().data_ptr())
            if (storage is None or view.numel() == 0 or not view.is_contiguous() or not live.is_contiguous()
                    or live.device != storage.device or live.dtype != storage.dtype):
                return None
            members[id(storage)].append((view.storage_offset(), live))
        gather = []
        for storage in snapshot.flat:
            entries = sorted(members[id(storage)], key=lambda entry: entry[0])
            offset = storage.storage_offset()
            for start, live in entries:
                if start != offset:
                    return None
                offset += live.numel()
            if not entries or storage.dim() != 1 or offset != storage.storage_offset() + storage.numel():
                return None
            gather.append((storage, [live.view(-1) for _, live in entries]))
        return gather

    def fill(self, layout: _Layout) -> None:
        """Copy the live tensors into the snapshot's buffers."""
        if self.gather is None:
            _copy_all(self.views, layout.live)
            return
        for storage, live in self.gather:
            torch.cat(live, out=storage)  # one copy per buffer, no per-tensor dispatch (live: detached)


_IMMUTABLE_TYPES = frozenset({int, float, str, bool, tuple, type(None)})


def _immutable_copy(value: Any) -> Any:
    # Hyperparameters are almost always numbers, strings, bools, None or tuples of them: no copy needed.
    if value is None or isinstance(value, (int, float, str, bool, tuple)):
        return value
    return copy.deepcopy(value)


def _hyperparameters(param_group: dict[str, Any]) -> dict[str, Any]:
    """A copy of a param group without its parameters."""
    values = dict(param_group)
    del values["params"]
    if not set(map(type, values.values())) <= _IMMUTABLE_TYPES:
        values = {k: _immutable_copy(v) for k, v in values.items()}
    return values


def _put_back_hyperparameters(optimizer: torch.optim.Optimizer, values: dict[str, Any]) -> None:
    for group, saved in zip(optimizer.param_groups, values["param_groups"]):
        group.update(saved if set(map(type, saved.values())) <= _IMMUTABLE_TYPES
                     else {key: _immutable_copy(value) for key, value in saved.items()})


def _small_optimizer_values(layout: _Layout) -> dict[str, Any]:
    """Each optimizer's param groups (hyperparameters) and non-tensor per-parameter state."""
    values = {}
    for name, optimizer in layout.optimizers.items():
        groups = [_hyperparameters(group) for group in optimizer.param_groups]
        tensor_keys = layout.extras[name]
        if layout.tensors_only[name]:
            per_parameter = layout.no_small_values[name]  # read-only, shared: nothing to copy
        else:
            per_parameter = [{} for _ in tensor_keys]
            index_of = layout.parameter_index[name]
            for parameter, entries in optimizer.state.items():
                index = index_of.get(id(parameter))
                if index is not None and len(entries) != len(tensor_keys[index]):  # some entries are not tensors
                    per_parameter[index] = {k: _immutable_copy(v) for k, v in entries.items()
                                            if not isinstance(v, torch.Tensor)}
        values[name] = {"param_groups": groups, "per_parameter": per_parameter}
    return values


@dataclass
class Snapshot:
    """One saved training state: tensor buffers plus when and how well it scored.

    :param timestep: environment timesteps done when the snapshot was taken
    :param score: the evaluation score that made these weights worth keeping
    :param episode_returns: the episode returns behind ``score``, if known
    """

    timestep: int
    score: float
    episode_returns: np.ndarray | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    optimizer_tensor_keys: dict[str, list[list[str]]] = field(default_factory=dict, repr=False)
    optimizer_values: dict[str, Any] = field(default_factory=dict, repr=False)
    flat: list[torch.Tensor] = field(default_factory=list, repr=False)  # the storage behind ``tensors``
    layout: object = field(default=None, repr=False)  # the _Layout these buffers were last filled from
    plan: _CopyPlan | None = field(default=None, init=False, repr=False, compare=False)  # how, for ``layout``

    @property
    def nbytes(self) -> int:
        """Bytes held by this snapshot's tensor buffers."""
        return sum(t.numel() * t.element_size() for t in self.flat)

    def clone(self) -> Snapshot:
        """An independent copy (new buffers), e.g. to keep a snapshot after its ring slot is reused."""
        flat = [storage.clone() for storage in self.flat]
        tensors: dict[str, torch.Tensor] = {}
        for key, view in self.tensors.items():
            for old, new in zip(self.flat, flat):
                offset = view.storage_offset() - old.storage_offset()
                if (old.dim() == 1 and view.is_contiguous() and view.dtype == old.dtype
                        and view.untyped_storage().data_ptr() == old.untyped_storage().data_ptr()
                        and 0 <= offset <= old.numel() - view.numel()):
                    tensors[key] = new[offset:offset + view.numel()].view(view.shape)
                    break
            else:
                break
        if tensors.keys() != self.tensors.keys():
            # Not views of flat buffers (e.g. a snapshot read from a file): copy tensor by tensor.
            tensors = {key: tensor.clone() for key, tensor in self.tensors.items()}
            flat = [tensor.view(-1) for tensor in tensors.values()]
        returns = None if self.episode_returns is None else self.episode_returns.copy()
        return Snapshot(self.timestep, self.score, returns, tensors, copy.deepcopy(self.optimizer_tensor_keys),
                        copy.deepcopy(self.optimizer_values), flat)


def _allocate(layout: _Layout, device: torch.device | None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """One flat buffer per (dtype, device), with a view of it for each live tensor."""
    groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
    for key, tensor in layout.tensors.items():
        groups.setdefault((tensor.dtype, device or tensor.device), []).append(key)
    flat, views = [], {}
    for (dtype, where), keys in groups.items():
        storage = torch.empty(sum(layout.tensors[k].numel() for k in keys), dtype=dtype, device=where)
        offset = 0
        for key in keys:
            shape = layout.tensors[key].shape
            views[key] = storage[offset:offset + layout.tensors[key].numel()].view(shape)
            offset += layout.tensors[key].numel()
        flat.append(storage)
    return flat, {key: views[key] for key in layout.keys}


def _same_shapes(buffers: dict[str, torch.Tensor], live: dict[str, torch.Tensor]) -> bool:
    return buffers.keys() == live.keys() and all(
        buffers[k].shape == t.shape and buffers[k].dtype == t.dtype for k, t in live.items())


class SnapshotRing:
    """Keeps the last ``capacity`` snapshots of a training state; the newest is the last good one.

    Each slot is one flat buffer per dtype, allocated the first time the slot is filled and reused when
    the ring wraps around (reallocated only if the state's layout changed, e.g. when an optimizer
    creates its state on its first step). A new snapshot is copied into a spare slot and checked
    before it replaces the oldest one, so a refused snapshot never costs a good one.

    :param capacity: how many snapshots to keep; the oldest is overwritten first
    :param device: where to keep the buffers (``None``: on the device of each live tensor; ``"cpu"``
        keeps GPU models' snapshots in host memory)
    :param check_finite: refuse (``NonFiniteStateError``) to snapshot a state holding NaN or inf, so a
        diverged model can never become the "last good" one
    """

    def __init__(self, capacity: int = 3, device: str | torch.device | None = None,
                 check_finite: bool = True) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.device = torch.device(device) if device is not None else None
        self.check_finite = check_finite
        self._slots: list[Snapshot] = []  # in order of age, newest last
        self._spare: Snapshot | None = None  # a slot's buffers, ready for the next snapshot
        self._layout: _Layout | None = None

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
        """Bytes held by all snapshot buffers, including the spare slot."""
        spare = self._spare.nbytes if self._spare is not None else 0
        return sum(s.nbytes for s in self._slots) + spare

    def _layout_of(self, state: TrainingState) -> _Layout:
        if self._layout is None or not self._layout.holds_for(state):
            self._layout = _Layout(state)
        return self._layout

    def take(self, state: TrainingState, timestep: int, score: float,
             episode_returns: np.ndarray | list[float] | tuple[float, ...] | None = None) -> Snapshot:
        """Copy ``state`` into a slot and return that snapshot (now the last good one)."""
        layout = self._layout_of(state)
        slot = self._spare
        if slot is None or (slot.layout is not layout and not _same_shapes(slot.tensors, layout.tensors)):
            flat, views = _allocate(layout, self.device)
            slot = Snapshot(timestep=0, score=0.0, tensors=views, flat=flat)
        if slot.layout is not layout or slot.plan is None:
            slot.layout, slot.plan = layout, _CopyPlan(layout, slot)
        slot.plan.fill(layout)
        if self.check_finite:
            # A sum is NaN or inf whenever any element is (it may also overflow for absurdly large weights).
            for storage in slot.flat:
                if storage.is_floating_point() and not math.isfinite(storage.sum().item()):
                    self._spare = slot
                    raise NonFiniteStateError("refusing to snapshot a state with non-finite (NaN or inf) values")
        slot.timestep, slot.score = int(timestep), float(score)
        slot.episode_returns = None if episode_returns is None else np.asarray(episode_returns, dtype=np.float64)
        slot.optimizer_tensor_keys = layout.extras  # a new layout builds new lists: sharing is safe
        slot.optimizer_values = _small_optimizer_values(layout)
        self._slots.append(slot)
        self._spare = self._slots.pop(0) if len(self._slots) > self.capacity else None
        return slot

    def add(self, snapshot: Snapshot) -> None:
        """Append an existing snapshot (e.g. one loaded from disk) as the newest; the oldest beyond capacity goes."""
        self._slots.append(snapshot)
        if len(self._slots) > self.capacity:
            self._spare = self._slots.pop(0)

    def restore(self, state: TrainingState, snapshot: Snapshot) -> None:
        """Copy ``snapshot`` back into the live objects of ``state``, bitwise."""
        layout = self._layout_of(state)
        if snapshot.layout is layout and snapshot.plan is not None:
            # Taken from this very layout: the optimizers still hold the tensors it copied, so only their
            # hyperparameters and non-tensor state need putting back before the one fused copy.
            for name, optimizer in layout.optimizers.items():
                if layout.tensors_only[name] and snapshot.optimizer_values[name]["per_parameter"] is \
                        layout.no_small_values[name]:
                    _put_back_hyperparameters(optimizer, snapshot.optimizer_values[name])  # nothing else to do
                else:
                    self._prepare_optimizer(name, optimizer, snapshot, same_tensors=True)
            sources = snapshot.plan.views
        else:
            for name, obj in state.items():
                if isinstance(obj, torch.optim.Optimizer):
                    self._prepare_optimizer(name, obj, snapshot, same_tensors=False)
            layout = self._layout_of(state)
            if layout.tensors.keys() != snapshot.tensors.keys():
                missing = sorted(layout.tensors.keys() ^ snapshot.tensors.keys())
                raise ValueError(f"snapshot does not match the training state (e.g. {missing[0]!r})")
            sources = [snapshot.tensors[k] for k in layout.keys]
        if self.device is not None:
            sources = [t.to(live.device) for t, live in zip(sources, layout.live)]
        _copy_all(layout.live, sources)

    @staticmethod
    def _prepare_optimizer(name: str, optimizer: torch.optim.Optimizer, snapshot: Snapshot,
                           same_tensors: bool) -> None:
        """Give the optimizer exactly the per-parameter state the snapshot has, then its param groups.

        :param same_tensors: the optimizer holds the very state tensors the snapshot was taken from
            (its layout still holds): only non-tensor entries can differ
        """
        if name not in snapshot.optimizer_tensor_keys:
            raise ValueError(f"snapshot does not match the training state (no optimizer {name!r})")
        tensor_keys = snapshot.optimizer_tensor_keys[name]
        values = snapshot.optimizer_values[name]
        state = optimizer.state
        for index, parameter in enumerate(_optimizer_parameters(optimizer)):
            wanted, small = tensor_keys[index], values["per_parameter"][index]
            current = state.get(parameter)
            if same_tensors and not small and (current is None or len(current) == len(wanted)):
                continue  # nothing but the wanted tensors: the fused copy restores them
            if not wanted and not small:
                state.pop(parameter, None)
                continue
            current = state[parameter]
            for key in [k for k in current if k not in wanted and k not in small]:
                del current[key]
            if not same_tensors:
                for key in wanted:
                    buffer = snapshot.tensors[f"{name}/state/{index}/{key}"]
                    value = current.get(key)
                    if (not isinstance(value, torch.Tensor) or value.shape != buffer.shape
                            or value.dtype != buffer.dtype):
                        # The optimizer had no such state (snapshot taken after its first step): make room.
                        current[key] = torch.empty_like(buffer, device=parameter.device)
            for key, value in small.items():
                current[key] = _immutable_copy(value)
        _put_back_hyperparameters(optimizer, values)

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
