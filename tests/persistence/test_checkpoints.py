"""Durable checkpoints: atomic saves, fallback past corrupted ones, RNG states and replay buffers."""

from __future__ import annotations

import pickle
import random
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import DictReplayBuffer, ReplayBuffer

from helpers import assert_states_equal, copy_training_state
from rollback_rl.persistence.checkpoints import (
    LATEST,
    CheckpointStore,
    capture_rng_state,
    load_replay_buffer,
    restore_rng_state,
    save_replay_buffer,
)
from rollback_rl.persistence.safe_io import CorruptFileError, UnsafeFileError, load_tensors, save_tensors
from rollback_rl.persistence.safe_model import load_model, save_model

torch.set_num_threads(1)


class WritesMarker:
    """A pickle that, when unpickled, runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def save_three(store: CheckpointStore) -> None:
    for step in (100, 200, 300):
        store.save(step, {"weights.bin": f"weights at {step}".encode(),
                          "state.safetensors": lambda path, step=step: save_tensors(path, {"w": torch.full((3,), float(step))}, {"step": step})},
                   metadata={"num_timesteps": step, "rollbacks": [{"timestep": step - 50, "returns": (9.0, 10.0)}]})


# -- the store ------------------------------------------------------------------------------------

def test_save_then_latest_gives_back_files_and_metadata(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    save_three(store)
    latest = store.latest()
    assert latest.step == 300
    assert latest.metadata == {"num_timesteps": 300, "rollbacks": [{"timestep": 250, "returns": (9.0, 10.0)}]}
    assert latest.file("weights.bin").read_bytes() == b"weights at 300"
    tensors, metadata = latest.load_tensors("state.safetensors")
    assert torch.equal(tensors["w"], torch.full((3,), 300.0)) and metadata == {"step": 300}
    assert (tmp_path / LATEST).read_text().strip() == "checkpoint-300"


def test_only_the_newest_keep_checkpoints_remain(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    save_three(store)
    assert store.steps() == [200, 300]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "checkpoint-200", "checkpoint-300"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_file", "delete_manifest", "garble_manifest"])
def test_latest_falls_back_to_the_previous_good_checkpoint(tmp_path, damage):
    store = CheckpointStore(tmp_path, keep=2)
    save_three(store)
    newest = tmp_path / "checkpoint-300"
    target = newest / "state.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x04
        target.write_bytes(bytes(data))
    elif damage == "delete_file":
        target.unlink()
    elif damage == "delete_manifest":
        (newest / "manifest.json").unlink()
    else:
        (newest / "manifest.json").write_text('{"step": 300, "fil')
    with pytest.warns(UserWarning, match="skipping checkpoint .*checkpoint-300"):
        latest = store.latest()
    assert latest.step == 200
    assert load_tensors(latest.file("state.safetensors"))[1] == {"step": 200}
    with pytest.raises(CorruptFileError, match="checkpoint-300"):
        store.load(300)


def test_a_crash_during_save_leaves_the_previous_checkpoint_latest(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    save_three(store)

    def crashing_writer(path: Path) -> None:
        path.write_bytes(b"half a file")
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        store.save(400, {"weights.bin": b"complete", "state.safetensors": crashing_writer})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip: the half-written checkpoint is not visible
        assert store.latest().step == 300
    assert store.steps() == [200, 300]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "checkpoint-200", "checkpoint-300"]


def test_a_leftover_temporary_directory_is_never_taken_for_a_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    save_three(store)
    leftover = tmp_path / ".tmp-checkpoint-400-deadbeef"  # as a killed process leaves it
    leftover.mkdir()
    (leftover / "weights.bin").write_bytes(b"half")
    assert store.latest().step == 300
    store.save(500, {"weights.bin": b"w"})
    assert not leftover.exists()


def test_latest_follows_the_pointer_after_resuming_from_an_older_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    save_three(store)
    store.save(250, {"weights.bin": b"resumed from 200"})  # a run resumed from 200 saves again
    assert store.latest().step == 250


def test_saving_the_same_step_again_replaces_it(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    store.save(100, {"weights.bin": b"first"})
    store.save(100, {"weights.bin": b"second"})
    assert store.latest().file("weights.bin").read_bytes() == b"second"
    assert store.steps() == [100]


def test_an_empty_store_has_no_latest(tmp_path):
    assert CheckpointStore(tmp_path / "missing").latest() is None


def test_bad_file_names_and_metadata_are_refused_before_writing(tmp_path):
    store = CheckpointStore(tmp_path)
    for name in ("../escape", "manifest.json", ".hidden"):
        with pytest.raises(ValueError, match="bad checkpoint file name"):
            store.save(1, {name: b"x"})
    with pytest.raises(TypeError, match="without pickling"):
        store.save(1, {"a": b"x"}, metadata={"model": object()})
    with pytest.raises(TypeError, match="cannot hold tensors"):
        store.save(1, {"a": b"x"}, metadata={"weights": torch.zeros(1)})
    assert store.steps() == []


# -- random-number generators --------------------------------------------------------------------

def draws(generator: np.random.Generator) -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(), generator.random(3).tolist())


def test_rng_states_round_trip_through_a_file(tmp_path):
    generator = np.random.default_rng(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in numpy's legacy state
    tensors, metadata = capture_rng_state({"action_space": generator})
    save_tensors(tmp_path / "rng.safetensors", tensors, metadata)
    expected = draws(generator)

    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    other = np.random.default_rng(99)
    restore_rng_state(*load_tensors(tmp_path / "rng.safetensors"), {"action_space": other})
    assert draws(other) == expected


# -- replay buffers ------------------------------------------------------------------------------

def filled_buffer(seed: int, buffer_class=ReplayBuffer, size: int = 16):
    if buffer_class is DictReplayBuffer:
        observation_space = gym.spaces.Dict({"position": gym.spaces.Box(-1, 1, (2,)), "image": gym.spaces.Box(0, 255, (2, 2), np.uint8)})
    else:
        observation_space = gym.spaces.Box(-1, 1, (3,))
    buffer = buffer_class(size, observation_space, gym.spaces.Discrete(2), device="cpu")
    observation_space.seed(seed)
    for index in range(size + 5):  # wraps around: full, pos 5
        buffer.add(observation_space.sample(), observation_space.sample(), np.array([index % 2]),
                   np.array([float(index)]), np.array([index % 7 == 0]), [{"TimeLimit.truncated": index % 5 == 0}])
    return buffer


@pytest.mark.parametrize("buffer_class", [ReplayBuffer, DictReplayBuffer])
def test_replay_buffer_round_trips(tmp_path, buffer_class):
    original = filled_buffer(0, buffer_class)
    save_replay_buffer(tmp_path / "buffer.npz", original)
    copy = buffer_class(16, original.observation_space, original.action_space, device="cpu")
    load_replay_buffer(tmp_path / "buffer.npz", copy)
    assert (copy.pos, copy.full) == (5, True)
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        expected, actual = getattr(original, name), getattr(copy, name)
        if isinstance(expected, dict):
            for key in expected:
                assert np.array_equal(expected[key], actual[key])
        else:
            assert np.array_equal(expected, actual) and expected.dtype == actual.dtype


def test_replay_buffer_file_with_pickles_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "marker"
    buffer = filled_buffer(0)
    (tmp_path / "pickle.npz").write_bytes(pickle.dumps(WritesMarker(marker)))
    objects = np.empty(1, dtype=object)
    objects[0] = WritesMarker(marker)
    arrays = {name: getattr(buffer, name) for name in ("next_observations", "actions", "rewards", "dones", "timeouts")}
    np.savez(tmp_path / "objects.npz", observations=objects, pos=np.int64(0), full=np.bool_(False), **arrays)
    for name in ("pickle.npz", "objects.npz"):
        with pytest.raises(UnsafeFileError, match="pickle"):
            load_replay_buffer(tmp_path / name, buffer)
    assert not marker.exists()


def test_truncated_or_mismatched_replay_buffer_gives_a_clear_error(tmp_path):
    buffer = filled_buffer(0)
    save_replay_buffer(tmp_path / "buffer.npz", buffer)
    data = (tmp_path / "buffer.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated or corrupted"):
        load_replay_buffer(tmp_path / "truncated.npz", buffer)
    smaller = ReplayBuffer(8, buffer.observation_space, buffer.action_space, device="cpu")
    with pytest.raises(CorruptFileError, match="the buffer's is"):
        load_replay_buffer(tmp_path / "buffer.npz", smaller)


# -- everything together ------------------------------------------------------------------------

def test_a_model_checkpoint_falls_back_to_the_previous_model_when_the_newest_is_corrupted(tmp_path):
    model = DQN("MlpPolicy", "CartPole-v1", learning_starts=16, batch_size=8, train_freq=4, buffer_size=200,
                policy_kwargs=dict(net_arch=[8]), seed=0)
    store = CheckpointStore(tmp_path, keep=2)
    states = {}
    for step in (64, 128):
        model.learn(64, reset_num_timesteps=False)
        states[step] = copy_training_state(model)
        rng_tensors, rng_metadata = capture_rng_state({"action_space": model.action_space.np_random})
        store.save(model.num_timesteps, {
            "model.safetensors": lambda path: save_model(model, path),
            "rng.safetensors": lambda path, t=rng_tensors, m=rng_metadata: save_tensors(path, t, m),
            "replay_buffer.npz": lambda path: save_replay_buffer(path, model.replay_buffer),
        }, metadata={"num_timesteps": model.num_timesteps})
    model_file = tmp_path / "checkpoint-128" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-100])

    with pytest.warns(UserWarning, match="checkpoint-128"):
        checkpoint = store.latest()
    assert checkpoint.step == 64 and checkpoint.metadata == {"num_timesteps": 64}
    restored = load_model(checkpoint.file("model.safetensors"), env="CartPole-v1")
    assert restored.num_timesteps == 64
    assert_states_equal(states[64], copy_training_state(restored))
    load_replay_buffer(checkpoint.file("replay_buffer.npz"), restored.replay_buffer)
    assert restored.replay_buffer.pos == 64
    restore_rng_state(*checkpoint.load_tensors("rng.safetensors"), {"action_space": restored.action_space.np_random})
    restored.learn(8, reset_num_timesteps=False)  # it trains on
