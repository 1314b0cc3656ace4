import math

import pytest
import torch
from torch import nn

from helpers import assert_states_equal, states_equal
from rollback_rl.core.snapshots import NonFiniteStateError, SnapshotRing


def make_model_and_optimizer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.BatchNorm1d(16), nn.Linear(16, 2))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 4, generator=generator)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    import copy
    return {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict())}


def test_restore_brings_back_weights_and_optimizer_state_bitwise():
    model, optimizer = make_model_and_optimizer()
    train_steps(model, optimizer, 5)
    ring = SnapshotRing(capacity=2)
    state = {"model": model, "optimizer": optimizer}
    ring.take(state, timestep=100, score=1.0)
    saved = full_state(model, optimizer)
    train_steps(model, optimizer, 7)
    assert not states_equal(saved, full_state(model, optimizer))
    restored = ring.restore_last_good(state)
    assert restored.timestep == 100 and restored.score == 1.0
    assert_states_equal(saved, full_state(model, optimizer))


def test_restore_keeps_optimizer_bound_to_the_live_parameters():
    model, optimizer = make_model_and_optimizer()
    train_steps(model, optimizer, 3)
    twin_model, twin_optimizer = make_model_and_optimizer()
    train_steps(twin_model, twin_optimizer, 3)
    ring = SnapshotRing()
    ring.take({"model": model, "optimizer": optimizer}, 0, 0.0)
    train_steps(model, optimizer, 4, seed=9)
    ring.restore_last_good({"model": model, "optimizer": optimizer})
    # Training on from the restore must follow exactly the path of a model that never left.
    train_steps(model, optimizer, 4, seed=2)
    train_steps(twin_model, twin_optimizer, 4, seed=2)
    assert_states_equal(full_state(twin_model, twin_optimizer), full_state(model, optimizer))


def test_snapshot_taken_before_first_optimizer_step_clears_optimizer_state_on_restore():
    model, optimizer = make_model_and_optimizer()
    ring = SnapshotRing()
    state = {"model": model, "optimizer": optimizer}
    ring.take(state, 0, 0.0)
    saved = full_state(model, optimizer)
    train_steps(model, optimizer, 2)
    assert len(optimizer.state) > 0
    ring.restore_last_good(state)
    assert len(optimizer.state) == 0
    assert_states_equal(saved, full_state(model, optimizer))


def test_bare_tensors_are_snapshotted_in_place():
    log_coefficient = torch.zeros(1, requires_grad=True)
    ring = SnapshotRing()
    ring.take({"log_coefficient": log_coefficient}, 0, 0.0)
    with torch.no_grad():
        log_coefficient.add_(3.0)
    ring.restore_last_good({"log_coefficient": log_coefficient})
    assert log_coefficient.item() == 0.0 and log_coefficient.requires_grad


def test_ring_keeps_the_newest_snapshots_and_reuses_their_buffers():
    model, optimizer = make_model_and_optimizer()
    train_steps(model, optimizer, 1)
    state = {"model": model, "optimizer": optimizer}
    ring = SnapshotRing(capacity=2)
    first = ring.take(state, 1, 1.0)
    first_pointers = {k: t.data_ptr() for k, t in first.tensors.items()}
    for timestep in (2, 3):
        ring.take(state, timestep, float(timestep))
    fourth = ring.take(state, 4, 4.0)  # capacity + 1 slots in all: the extra one takes each new snapshot
    assert [s.timestep for s in ring] == [3, 4]
    assert {k: t.data_ptr() for k, t in fourth.tensors.items()} == first_pointers
    assert ring.last_good.timestep == 4


def test_nbytes_counts_weights_and_optimizer_moments():
    model, optimizer = make_model_and_optimizer()
    train_steps(model, optimizer, 1)
    ring = SnapshotRing(capacity=3)
    ring.take({"model": model, "optimizer": optimizer}, 0, 0.0)
    assert ring.nbytes == ring.last_good.nbytes
    parameter_bytes = sum(p.numel() * 4 for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    step_bytes = sum(s["step"].numel() * s["step"].element_size() for s in optimizer.state.values())
    assert ring.nbytes == 3 * parameter_bytes + buffer_bytes + step_bytes  # weights + Adam's two moments


def test_drop_last_makes_the_previous_snapshot_last_good():
    model, optimizer = make_model_and_optimizer()
    ring = SnapshotRing(capacity=3)
    state = {"model": model, "optimizer": optimizer}
    ring.take(state, 1, 1.0)
    ring.take(state, 2, 2.0)
    ring.drop_last()
    assert ring.last_good.timestep == 1 and len(ring) == 1


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_never_snapshotted_and_cost_no_good_snapshot(bad_value):
    model, optimizer = make_model_and_optimizer()
    state = {"model": model, "optimizer": optimizer}
    ring = SnapshotRing(capacity=1)
    ring.take(state, 1, 1.0)
    good = {k: t.clone() for k, t in ring.last_good.tensors.items()}
    with torch.no_grad():
        model[0].weight[0, 0] = bad_value
    with pytest.raises(NonFiniteStateError, match="non-finite"):
        ring.take(state, 2, 2.0)
    assert len(ring) == 1 and ring.last_good.timestep == 1
    assert_states_equal(good, ring.last_good.tensors)


def test_restore_into_a_different_architecture_is_refused():
    model, optimizer = make_model_and_optimizer()
    ring = SnapshotRing()
    ring.take({"model": model}, 0, 0.0)
    with pytest.raises(ValueError, match="does not match"):
        ring.restore_last_good({"model": nn.Linear(4, 2)})


def test_restore_without_snapshot_and_bad_capacity_raise_clear_errors():
    with pytest.raises(RuntimeError, match="no snapshot"):
        SnapshotRing().restore_last_good({})
    with pytest.raises(ValueError, match="capacity"):
        SnapshotRing(capacity=0)
    with pytest.raises(TypeError, match="expected an nn.Module"):
        SnapshotRing().take({"oops": 3}, 0, 0.0)


def test_a_clone_survives_its_slot_being_reused_and_restores_bitwise():
    model, optimizer = make_model_and_optimizer()
    train_steps(model, optimizer, 3)
    state = {"model": model, "optimizer": optimizer}
    ring = SnapshotRing(capacity=1)
    original = ring.take(state, timestep=10, score=5.0, episode_returns=[4.0, 6.0])
    saved = full_state(model, optimizer)
    clone = original.clone()
    assert clone.nbytes == original.nbytes and len(clone.flat) == len(original.flat)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(clone.flat, original.flat))
    for _ in range(2):  # the ring wraps: the original slot's buffers are overwritten
        train_steps(model, optimizer, 4)
        ring.take(state, timestep=20, score=1.0)
    assert not states_equal(saved, full_state(model, optimizer))
    ring.restore(state, clone)
    assert_states_equal(saved, full_state(model, optimizer))
    assert (clone.timestep, clone.score, list(clone.episode_returns)) == (10, 5.0, [4.0, 6.0])


def test_restore_puts_back_hyperparameters_and_non_tensor_optimizer_state():
    model, optimizer = make_model_and_optimizer()
    train_steps(model, optimizer, 2)
    parameter = optimizer.param_groups[0]["params"][0]
    optimizer.state[parameter]["note"] = [1, 2]  # a non-tensor entry, as some optimizers keep
    state = {"model": model, "optimizer": optimizer}
    ring = SnapshotRing()
    ring.take(state, 0, 0.0)
    saved = full_state(model, optimizer)
    optimizer.param_groups[0]["lr"] = 0.5
    optimizer.state[parameter]["note"].append(3)
    optimizer.state[optimizer.param_groups[0]["params"][1]]["extra"] = 7
    train_steps(model, optimizer, 3)
    ring.restore_last_good(state)
    assert optimizer.param_groups[0]["lr"] == 1e-2
    assert optimizer.state[parameter]["note"] == [1, 2]
    assert "extra" not in optimizer.state[optimizer.param_groups[0]["params"][1]]
    assert_states_equal(saved, full_state(model, optimizer))


def test_restore_removes_optimizer_state_added_after_the_snapshot():
    model, optimizer = make_model_and_optimizer()
    train_steps(model, optimizer, 2)
    state = {"model": model, "optimizer": optimizer}
    ring = SnapshotRing()
    ring.take(state, 0, 0.0)  # Adam's state: tensors only
    saved = full_state(model, optimizer)
    parameter = optimizer.param_groups[0]["params"][0]
    optimizer.state[parameter]["note"] = 3
    train_steps(model, optimizer, 1)
    ring.restore_last_good(state)
    assert "note" not in optimizer.state[parameter]
    assert_states_equal(saved, full_state(model, optimizer))


def test_a_slot_not_laid_out_as_flat_buffers_is_filled_tensor_by_tensor():
    # A snapshot read from a file holds one tensor per entry; once the ring reuses its slot, take() must
    # still copy every tensor into it.
    model, optimizer = make_model_and_optimizer()
    train_steps(model, optimizer, 2)
    state = {"model": model, "optimizer": optimizer}
    ring = SnapshotRing(capacity=1)
    loaded = ring.take(state, 0, 0.0).clone()
    loaded.tensors = {key: tensor.clone() for key, tensor in loaded.tensors.items()}
    loaded.flat = list(loaded.tensors.values())
    ring.add(loaded)  # the ring's own slot becomes the spare...
    ring.take(state, 1, 1.0)  # ...and is filled; the loaded snapshot becomes the spare
    train_steps(model, optimizer, 3)
    saved = full_state(model, optimizer)
    reused = ring.take(state, 2, 2.0)
    assert reused is loaded
    train_steps(model, optimizer, 3)
    ring.restore_last_good(state)
    assert_states_equal(saved, full_state(model, optimizer))
