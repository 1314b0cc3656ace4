"""SB3 models saved and loaded without pickles: bitwise round trips, SB3 .zip files read safely."""

from __future__ import annotations

import base64
import io
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.noise import NormalActionNoise

from helpers import assert_states_equal, copy_training_state
from rollback_rl.agents import RollbackDQN
from rollback_rl.persistence.safe_io import CorruptFileError, UnsafeFileError, save_tensors
from rollback_rl.persistence.safe_model import load_model, load_sb3_zip_safely, read_model_metadata, save_model

torch.set_num_threads(1)



def small() -> dict:
    return dict(policy_kwargs=dict(net_arch=[8]), seed=0)  # fresh each time: SAC adds to policy_kwargs


MODELS = {
    "DQN": lambda: DQN("MlpPolicy", "CartPole-v1", learning_starts=16, batch_size=8, buffer_size=500,
                       learning_rate=3e-4, train_freq=(2, "step"), exploration_fraction=0.3, **small()),
    "PPO": lambda: PPO("MlpPolicy", "CartPole-v1", n_steps=32, batch_size=16, n_epochs=1, clip_range=0.15,
                       **small()),
    "SAC": lambda: SAC("MlpPolicy", "Pendulum-v1", learning_starts=16, batch_size=8, buffer_size=500, **small()),
    "TD3": lambda: TD3("MlpPolicy", "Pendulum-v1", learning_starts=16, batch_size=8, buffer_size=500,
                       action_noise=NormalActionNoise(np.zeros(1), 0.1 * np.ones(1)), **small()),
    "A2C": lambda: A2C("MlpPolicy", "CartPole-v1", n_steps=8, **small()),
    "RollbackDQN": lambda: RollbackDQN("MlpPolicy", "CartPole-v1", learning_starts=16, batch_size=8,
                                       buffer_size=500, undo_depth=10, **small()),
}
SETTINGS = ("gamma", "learning_rate", "batch_size", "buffer_size", "train_freq", "n_steps", "n_epochs",
            "exploration_fraction", "exploration_rate", "tau", "ent_coef", "target_entropy", "undo_depth",
            "_n_updates", "num_timesteps", "_episode_num", "_current_progress_remaining")


class WritesMarker:
    """A pickle that, when unpickled, runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def trained(name: str):
    model = MODELS[name]()
    model.learn(48)
    return model


def assert_same_model(original, loaded) -> None:
    assert type(loaded) is type(original)
    assert_states_equal(copy_training_state(original), copy_training_state(loaded))
    for name in SETTINGS:
        if hasattr(original, name):
            assert getattr(loaded, name) == getattr(original, name), name
    if hasattr(original, "clip_range"):
        assert loaded.clip_range(1.0) == original.clip_range(1.0)
    assert loaded.lr_schedule(0.5) == original.lr_schedule(0.5)
    observations = np.stack([original.observation_space.sample() for _ in range(16)])
    for deterministic in (True, False):
        actions = []
        for model in (original, loaded):  # the same random draws for both (sampled actions, DQN's epsilon)
            torch.manual_seed(0), np.random.seed(0), model.action_space.seed(0)
            actions.append(model.predict(observations, deterministic=deterministic)[0])
        assert np.array_equal(*actions)


def sb3_zip_with(source: Path, target: Path, replace: dict[str, bytes]) -> None:
    """Copy an SB3 .zip, replacing some entries."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for name in archive.namelist():
            out.writestr(name, replace.get(name, archive.read(name)))


# -- rollback-rl's own model files ---------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_save_model_load_model_round_trip_bitwise(tmp_path, name):
    original = trained(name)
    path = save_model(original, tmp_path / "model")
    assert path.name == "model.safetensors"
    for env in (None, original.get_env()):
        assert_same_model(original, load_model(tmp_path / "model", env=env))
    metadata = read_model_metadata(path)
    assert (metadata["algorithm"], metadata["num_timesteps"]) == (name, original.num_timesteps)
    assert metadata["env_id"] == original.get_env().get_attr("spec")[0].id


def test_loaded_model_trains_on(tmp_path):
    original = trained("DQN")
    save_model(original, tmp_path / "model")
    loaded = load_model(tmp_path / "model.safetensors", env="CartPole-v1")
    loaded.learn(16, reset_num_timesteps=False)
    assert loaded.num_timesteps == original.num_timesteps + 16


def test_load_model_refuses_files_it_did_not_write(tmp_path):
    original = trained("DQN")
    path = save_model(original, tmp_path / "model")
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(CorruptFileError, match="truncated|checksum"):
        load_model(path)
    original.save(tmp_path / "sb3.zip")
    with pytest.raises(UnsafeFileError, match="load_sb3_zip_safely"):
        load_model(tmp_path / "sb3.zip")
    save_tensors(tmp_path / "evil.safetensors", {}, {"kind": "sb3_model", "algorithm": "os.system"})
    with pytest.raises(ValueError, match="unsupported algorithm 'os.system'"):
        load_model(tmp_path / "evil.safetensors")


# -- SB3's own .zip files ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["DQN", "PPO", "SAC", "A2C", "RollbackDQN"])
def test_sb3_zip_loads_without_unpickling(tmp_path, name):
    original = trained(name)
    original.save(tmp_path / "model.zip")
    overrides = {"train_freq": original.train_freq} if hasattr(original, "train_freq") else {}
    loaded = load_sb3_zip_safely(tmp_path / "model.zip", name, original.get_env(), **overrides)
    assert_same_model(original, loaded)


def test_sb3_zip_names_the_settings_it_could_not_rebuild(tmp_path):
    original = trained("DQN")
    original.save(tmp_path / "model.zip")
    with pytest.warns(UserWarning, match="train_freq stored only as pickles"):
        loaded = load_sb3_zip_safely(tmp_path / "model.zip", DQN, "CartPole-v1")
    assert_states_equal(copy_training_state(original), copy_training_state(loaded))


def test_malicious_pickle_in_sb3_zip_weights_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker"
    trained("DQN").save(tmp_path / "model.zip")
    raw = pickle.dumps(WritesMarker(marker))
    archive = io.BytesIO()
    torch.save(WritesMarker(marker), archive)
    for index, payload in enumerate((raw, archive.getvalue())):
        for entry in ("policy.pth", "policy.optimizer.pth", "pytorch_variables.pth"):
            crafted = tmp_path / f"crafted-{index}-{entry}.zip"
            sb3_zip_with(tmp_path / "model.zip", crafted, {entry: payload})
            with pytest.raises(UnsafeFileError, match=f"{entry}: refused: it holds pickled objects that could run code"):
                load_sb3_zip_safely(crafted, "DQN", "CartPole-v1", train_freq=4)
    assert not marker.exists()


def test_malicious_pickles_in_sb3_zip_settings_are_never_unpickled(tmp_path):
    marker = tmp_path / "marker"
    original = trained("DQN")
    original.save(tmp_path / "model.zip")
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        data = json.loads(archive.read("data"))
    payload = base64.b64encode(pickle.dumps(WritesMarker(marker))).decode()
    for value in data.values():
        if isinstance(value, dict) and ":serialized:" in value:
            value[":serialized:"] = payload  # every pickled setting now runs code when unpickled
    sb3_zip_with(tmp_path / "model.zip", tmp_path / "crafted.zip", {"data": json.dumps(data).encode()})

    loaded = load_sb3_zip_safely(tmp_path / "crafted.zip", DQN, "CartPole-v1", train_freq=original.train_freq)
    assert not marker.exists()
    assert_same_model(original, loaded)


@pytest.mark.filterwarnings("ignore:.*stored only as pickles")  # the damage is found after the settings are read
def test_damaged_sb3_zip_gives_a_clear_error(tmp_path):
    trained("DQN").save(tmp_path / "model.zip")
    data = (tmp_path / "model.zip").read_bytes()
    (tmp_path / "truncated.zip").write_bytes(data[:len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated.zip: truncated or corrupted zip file"):
        load_sb3_zip_safely(tmp_path / "truncated.zip", DQN, "CartPole-v1")
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        info = archive.getinfo("policy.pth")
    flipped = bytearray(data)
    flipped[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0x10
    (tmp_path / "flipped.zip").write_bytes(bytes(flipped))
    with pytest.raises(CorruptFileError, match="flipped.zip"):
        load_sb3_zip_safely(tmp_path / "flipped.zip", DQN, "CartPole-v1")


def test_sb3_zip_for_another_env_is_refused(tmp_path):
    trained("DQN").save(tmp_path / "model.zip")
    with pytest.raises(ValueError, match="observation_space has shape"):
        load_sb3_zip_safely(tmp_path / "model.zip", DQN, "Acrobot-v1")


def test_only_allow_listed_algorithms_are_built(tmp_path):
    trained("DQN").save(tmp_path / "model.zip")
    with pytest.raises(ValueError, match="unsupported algorithm"):
        load_sb3_zip_safely(tmp_path / "model.zip", "HER", "CartPole-v1")


def test_a_learning_rate_cooled_after_a_rollback_survives_save_and_load(tmp_path):
    # CoolLearningRate installs a ScaledSchedule; a resumed run must go on with the cooled rate.
    from rollback_rl.core.schedules import ScaledSchedule

    original = DQN("MlpPolicy", "CartPole-v1", learning_rate=1e-3, policy_kwargs=dict(net_arch=[8]), seed=0)
    original.lr_schedule = ScaledSchedule(ScaledSchedule(original.lr_schedule, 0.1), 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out of the file
        save_model(original, tmp_path / "model")
    loaded = load_model(tmp_path / "model.safetensors", env="CartPole-v1")
    assert isinstance(loaded.lr_schedule, ScaledSchedule)
    assert loaded.lr_schedule(0.5) == pytest.approx(1e-5)
