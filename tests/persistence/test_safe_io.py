"""Safe file format: bitwise round trips, atomic writes, and refusal of pickles and damaged files."""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rollback_rl.persistence.safe_io import (
    CorruptFileError,
    SafeLoadError,
    UnsafeFileError,
    atomic_write,
    atomic_write_bytes,
    from_json_and_tensors,
    load_snapshot_ring,
    load_tensors,
    load_torch_file,
    save_snapshot_ring,
    save_tensors,
    to_json_and_tensors,
)
from rollback_rl.core.snapshots import SnapshotRing

torch.set_num_threads(1)


class WritesMarker:
    """A pickle that, when unpickled, runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def malicious_pickle(marker: Path) -> bytes:
    """The pickle of ``WritesMarker(marker)``, checked to be live: unpickling it writes the marker."""
    payload = pickle.dumps(WritesMarker(marker))
    pickle.loads(payload)
    assert marker.read_text() == "pwned"
    marker.unlink()
    return payload


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(4, 3, generator=generator)
    weights[0, 0], weights[0, 1], weights[0, 2] = float("nan"), float("inf"), -0.0
    return {
        "net/weight": weights,
        "net/bias": torch.randn(3, generator=generator, dtype=torch.float64),
        "half": torch.randn(5, generator=generator).to(torch.bfloat16),
        "count": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "rng": torch.get_rng_state(),
    }


def sample_metadata() -> dict:
    return {"betas": (0.9, 0.999), "per_index": {0: "a", 3: [1, 2]}, "lr": 1e-4, "big": 2**80,
            "nan": float("nan"), "inf": -math.inf, "array": np.arange(6, dtype=np.uint32).reshape(2, 3),
            "scalar": np.float32(0.1), "nothing": None, "flag": True}


def assert_same(expected, actual) -> None:
    """Equal values of the same types (NaN equal to NaN)."""
    assert type(expected) is type(actual), f"{type(expected)} != {type(actual)}"
    if isinstance(expected, torch.Tensor):
        assert expected.dtype == actual.dtype and expected.shape == actual.shape
        # Compared as bytes: NaN equals NaN, and -0.0 differs from 0.0.
        assert torch.equal(expected.reshape(-1).view(torch.uint8), actual.reshape(-1).view(torch.uint8))
    elif isinstance(expected, np.ndarray):
        assert expected.dtype == actual.dtype and np.array_equal(expected, actual)
    elif isinstance(expected, dict):
        assert list(expected) == list(actual)
        for key in expected:
            assert_same(expected[key], actual[key])
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual)
        for e, a in zip(expected, actual):
            assert_same(e, a)
    elif isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual)
    else:
        assert expected == actual


# -- tensors and metadata -----------------------------------------------------------------------

def test_tensors_and_metadata_round_trip_bitwise(tmp_path):
    tensors, metadata = sample_tensors(), sample_metadata()
    save_tensors(tmp_path / "f.safetensors", tensors, metadata)
    loaded, loaded_metadata = load_tensors(tmp_path / "f.safetensors")
    assert_same(tensors, {k: loaded[k] for k in tensors})
    assert_same(metadata, loaded_metadata)


def test_nested_values_keep_their_types_and_tensors():
    value = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
             "param_groups": [{"betas": (0.9, 0.999), "params": [0, 1], "foreach": None}]}
    skeleton, tensors = to_json_and_tensors(value, "opt")
    assert set(tensors) == {"opt/state/0/step", "opt/state/0/exp_avg"}
    assert_same(value, from_json_and_tensors(skeleton, tensors))


def test_values_that_need_pickling_are_refused():
    with pytest.raises(TypeError, match="without pickling"):
        to_json_and_tensors({"activation": nn.ReLU}, "kwargs")
    with pytest.raises(TypeError, match="without pickling"):
        to_json_and_tensors([lambda x: x], "schedules")


# -- atomic writes ------------------------------------------------------------------------------

def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError, match="crash"), atomic_write(path) as file:
        file.write(b"half of the new")
        raise RuntimeError("crash")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left


# -- refusal of pickles and damaged files -------------------------------------------------------

def test_pickle_files_are_refused_without_running_them(tmp_path):
    marker = tmp_path / "marker"
    payload = malicious_pickle(marker)
    raw = tmp_path / "raw.pth"
    raw.write_bytes(payload)
    archive = tmp_path / "archive.pth"
    torch.save(WritesMarker(marker), archive)  # torch.save's zip format, holding the same pickle

    for path in (raw, archive):
        with pytest.raises(UnsafeFileError, match="pickle content detected") as error:
            load_tensors(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)
        with pytest.raises(UnsafeFileError, match="could run code"):
            load_torch_file(path)
        with pytest.raises(UnsafeFileError):
            load_torch_file(io.BytesIO(path.read_bytes()), "in-memory")
    assert not marker.exists()


def test_torch_weights_are_still_readable_with_weights_only(tmp_path):
    state = nn.Linear(3, 2).state_dict()
    torch.save(state, tmp_path / "weights.pth")
    assert_same(dict(state), dict(load_torch_file(tmp_path / "weights.pth")))


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -20, -1])
def test_truncated_file_is_refused_with_a_clear_error(tmp_path, keep):
    path = tmp_path / "f.safetensors"
    save_tensors(path, sample_tensors(), sample_metadata())
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(CorruptFileError, match="truncated|bad safetensors header|checksum") as error:
        load_tensors(path)
    assert str(path) in str(error.value)


def test_every_flipped_byte_is_detected(tmp_path):
    path = tmp_path / "f.safetensors"
    save_tensors(path, {"w": torch.arange(8, dtype=torch.float32)}, {"lr": 0.001, "betas": (0.9, 0.999)})
    data = path.read_bytes()
    for position in range(len(data)):
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[position] ^= bit
            path.write_bytes(bytes(damaged))
            with pytest.raises(SafeLoadError):
                load_tensors(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    import safetensors.torch

    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CorruptFileError, match="not a rollback-rl file"):
        load_tensors(path)


# -- snapshot rings -----------------------------------------------------------------------------

def small_training_state() -> dict:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    return {"net": net, "optimizer": optimizer, "log_coef": torch.zeros(1, requires_grad=True)}


def train_a_little(state: dict, steps: int) -> None:
    for _ in range(steps):
        loss = state["net"](torch.randn(5, 3)).pow(2).mean() + state["log_coef"].sum()
        state["optimizer"].zero_grad()
        loss.backward()
        state["optimizer"].step()
        with torch.no_grad():
            state["log_coef"].add_(0.01)


def copy_of(state: dict) -> dict:
    optimizer = state["optimizer"].state_dict()
    return {"net": {k: v.clone() for k, v in state["net"].state_dict().items()},
            "optimizer_state": {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer["state"].items()},
            "param_groups": [dict(g) for g in optimizer["param_groups"]],
            "log_coef": state["log_coef"].detach().clone()}


def test_loaded_snapshot_ring_restores_bitwise_like_the_original(tmp_path):
    state = small_training_state()
    ring = SnapshotRing(capacity=3)
    ring.take(state, timestep=0, score=9.0)  # before the optimizer's first step: no Adam state yet
    for timestep in (100, 200, 300):  # the ring wraps: the first snapshot is dropped
        train_a_little(state, 3)
        ring.take(state, timestep=timestep, score=timestep / 2, episode_returns=[timestep / 2 - 1, timestep / 2 + 1])
    state["optimizer"].param_groups[0]["lr"] = 0.5  # changed after the snapshots: restore puts 1e-3 back
    save_snapshot_ring(tmp_path / "ring.safetensors", ring)
    loaded = load_snapshot_ring(tmp_path / "ring.safetensors")

    assert loaded.capacity == 3 and len(loaded) == 3
    for original, copy in zip(ring, loaded):
        assert (copy.timestep, copy.score) == (original.timestep, original.score)
        assert np.array_equal(copy.episode_returns, original.episode_returns)
        ring.restore(state, original)
        expected = copy_of(state)
        train_a_little(state, 2)  # move away, then restore the loaded copy
        loaded.restore(state, copy)
        assert_same(expected, copy_of(state))


def test_loaded_ring_keeps_the_newest_and_takes_new_snapshots(tmp_path):
    state = small_training_state()
    ring = SnapshotRing(capacity=3)
    for timestep in (1, 2, 3):
        train_a_little(state, 1)
        ring.take(state, timestep=timestep, score=float(timestep))
    save_snapshot_ring(tmp_path / "ring.safetensors", ring)
    smaller = load_snapshot_ring(tmp_path / "ring.safetensors", SnapshotRing(capacity=2))
    assert [s.timestep for s in smaller] == [2, 3]
    for timestep in (4, 5, 6):  # wraps around, reusing the loaded buffers
        train_a_little(state, 1)
        smaller.take(state, timestep=timestep, score=float(timestep))
    assert [s.timestep for s in smaller] == [5, 6]
    expected = copy_of(state)
    train_a_little(state, 1)
    smaller.restore_last_good(state)
    assert_same(expected, copy_of(state))


def test_empty_ring_round_trips(tmp_path):
    save_snapshot_ring(tmp_path / "ring.safetensors", SnapshotRing(capacity=4))
    loaded = load_snapshot_ring(tmp_path / "ring.safetensors", 4)
    assert len(loaded) == 0 and loaded.capacity == 4


def test_a_tensor_file_is_not_taken_for_a_ring(tmp_path):
    save_tensors(tmp_path / "f.safetensors", {"w": torch.zeros(1)}, {"kind": "other"})
    with pytest.raises(CorruptFileError, match="not a snapshot ring"):
        load_snapshot_ring(tmp_path / "f.safetensors")
