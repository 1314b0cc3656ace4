"""Writes into a run folder replace what was planted there (a link, a hard link) instead of writing
through it: a file outside the folder is never changed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from stable_baselines3 import DQN

from rollback_rl.persistence.checkpoints import CheckpointStore, CheckpointWriteError
from rollback_rl.persistence.resume import hold_run_lock, run_in_use
from rollback_rl.persistence.run_logs import ProgressCSV, cut_progress_csv, open_run_logger
from rollback_rl.persistence.safe_io import UnsafeFileError, atomic_write_bytes, save_tensors
from rollback_rl.persistence.safe_model import load_model, save_model, save_sb3_zip

torch.set_num_threads(1)
ORIGINAL = b"the user's own file, which must stay as it is\n"


@pytest.fixture
def run_dir(tmp_path) -> Path:
    (tmp_path / "run").mkdir()
    return tmp_path / "run"


@pytest.fixture
def outside(tmp_path) -> Path:
    path = tmp_path / "bashrc"
    path.write_bytes(ORIGINAL)
    return path


def plant(kind: str, path: Path, outside: Path) -> None:
    """Put a link to ``outside`` at ``path``: a symbolic or a hard one."""
    if kind == "symlink":
        path.symlink_to(outside)
    else:
        os.link(outside, path)


def assert_replaced(path: Path, outside: Path) -> None:
    assert outside.read_bytes() == ORIGINAL
    assert not path.is_symlink() and path.is_file() and not path.samefile(outside)


def small_dqn() -> DQN:
    return DQN("MlpPolicy", "CartPole-v1", buffer_size=100, learning_starts=0, policy_kwargs=dict(net_arch=[8]), seed=0)


WRITERS = {
    "run.json": lambda run: atomic_write_bytes(run / "run.json", b"{}\n"),
    "snapshots.safetensors": lambda run: save_tensors(run / "snapshots.safetensors", {"x": torch.zeros(2)}, {}),
    "model.safetensors": lambda run: save_model(small_dqn(), run / "model"),
    "model.zip": lambda run: save_sb3_zip(small_dqn(), run / "model.zip"),
    "progress.csv": lambda run: ProgressCSV(run / "progress.csv").close(),
}


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
@pytest.mark.parametrize("name", WRITERS)
def test_a_planted_link_is_replaced_not_written_through(run_dir, outside, name, kind):
    plant(kind, run_dir / name, outside)
    WRITERS[name](run_dir)
    assert_replaced(run_dir / name, outside)


def test_the_model_written_over_a_planted_link_loads(run_dir, outside):
    plant("symlink", run_dir / "model.safetensors", outside)
    model = small_dqn()
    assert save_model(model, run_dir / "model") == run_dir / "model.safetensors"
    assert load_model(run_dir / "model.safetensors").buffer_size == 100
    assert save_sb3_zip(model, run_dir / "model") == run_dir / "model.zip"


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_checkpoint_pointer_planted_as_a_link_is_replaced(run_dir, outside, kind):
    store = CheckpointStore(run_dir / "checkpoints")
    store.run_dir.mkdir()
    plant(kind, store.run_dir / "LATEST", outside)
    store.save(100, {"weights.bin": b"1234"})
    assert_replaced(store.run_dir / "LATEST", outside)
    assert store.latest().step == 100


def test_a_checkpoint_folder_planted_as_a_link_is_not_written_through(run_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run_dir / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(CheckpointWriteError, match="symbolic link"):
        CheckpointStore(run_dir / "checkpoints").save(100, {"weights.bin": b"1234"})
    assert list(elsewhere.iterdir()) == []


def test_progress_csv_planted_as_a_link_is_refused_on_resume(run_dir, outside):
    plant("symlink", run_dir / "progress.csv", outside)
    with pytest.raises(UnsafeFileError, match="outside its folder"):
        cut_progress_csv(run_dir / "progress.csv", 100)
    assert outside.read_bytes() == ORIGINAL


def test_rows_are_never_appended_through_a_link(run_dir, outside):
    (run_dir / "progress.csv").write_text("time/total_timesteps\n100\n")
    header = cut_progress_csv(run_dir / "progress.csv", 100)
    (run_dir / "progress.csv").unlink()
    plant("symlink", run_dir / "progress.csv", outside)  # planted between the cut and the reopening
    with pytest.raises(OSError):
        ProgressCSV(run_dir / "progress.csv", header=header)
    assert outside.read_bytes() == ORIGINAL


def test_the_run_lock_is_never_taken_through_a_planted_link(run_dir, tmp_path):
    missing = tmp_path / "created-elsewhere"
    (run_dir / ".lock").symlink_to(missing)
    with hold_run_lock(run_dir):
        assert (run_dir / ".lock").is_file()
    assert not missing.exists() and not (run_dir / ".lock").is_symlink()


def test_checking_the_lock_does_not_wait_on_a_planted_pipe(run_dir, tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (run_dir / ".lock").symlink_to(tmp_path / "pipe")
    started = time.perf_counter()
    assert run_in_use(run_dir) is False
    assert time.perf_counter() - started < 1.0


def test_resuming_removes_planted_event_links_without_reading_them(run_dir):
    (run_dir / "progress.csv").write_text("time/total_timesteps\n100\n")
    (run_dir / "events.out.tfevents.1.planted").symlink_to("/dev/zero")
    started = time.perf_counter()
    logger = open_run_logger(run_dir, to_stdout=False, resume_timestep=100)
    logger.close()
    assert time.perf_counter() - started < 5.0
    assert not (run_dir / "events.out.tfevents.1.planted").is_symlink()
