"""A disk that fills up (or a folder that turns read-only) in the middle of training: every write of
the persistence layer fails cleanly, leaves what was there whole, and lets training go on."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import pytest
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.logger import Logger

from rollback_rl.persistence import checkpoints, run_logs, safe_io
from rollback_rl.persistence.checkpoints import CheckpointStore, CheckpointWriteError
from rollback_rl.persistence.resume import RunCheckpoints
from rollback_rl.persistence.run_logs import GuardedTensorBoardOutputFormat, ProgressCSV, flush_logs
from rollback_rl.persistence.safe_io import WriteFailedWarning

torch.set_num_threads(1)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_once(function):
    """``function``, except that its first call fails with ENOSPC."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            disk_full()
        return function(*args, **kwargs)
    return wrapper


_real_open = os.open


def creating_fails(path, flags, *args, **kwargs):
    """``os.open``, except that creating a file fails with ENOSPC (opening one to delete it works)."""
    if flags & os.O_CREAT:
        disk_full()
    return _real_open(path, flags, *args, **kwargs)


def full_disk_writer(path: Path) -> None:
    path.write_bytes(b"half a file")
    disk_full()


# Where the disk fills up during CheckpointStore.save: (what to patch, how).
FAULTS = {
    "file-writer": None,  # a checkpoint file's writer fails
    "fsync": (safe_io.os, "fsync"),  # flushing a file to disk
    "rename-of-the-folder": (checkpoints.os, "replace"),
    "create-a-file": (safe_io.os, "open", creating_fails),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint_latest(tmp_path, monkeypatch, fault):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(100, {"weights.bin": b"old"}, {"timestep": 100})
    files = {"weights.bin": b"new"}
    if FAULTS[fault] is None:
        files["state.bin"] = full_disk_writer
    else:
        module, name, *replacement = FAULTS[fault]
        monkeypatch.setattr(module, name, replacement[0] if replacement else disk_full)
    with pytest.raises(CheckpointWriteError, match="No space left on device.*checkpoint-100 is kept") as caught:
        store.save(200, files, {"timestep": 200})
    assert caught.value.errno == errno.ENOSPC and "\n" not in str(caught.value)
    monkeypatch.undo()
    latest = store.latest()
    assert latest.step == 100 and latest.file("weights.bin").read_bytes() == b"old"
    assert sorted(p.name for p in store.run_dir.iterdir()) == ["LATEST", "checkpoint-100"]
    assert store.save(300, {"weights.bin": b"later"}).step == 300 and store.latest().step == 300


def test_replacing_a_checkpoint_of_the_same_step_puts_the_old_one_back_on_failure(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path / "checkpoints")
    store.save(100, {"weights.bin": b"old"})
    real_replace = os.replace

    def fail_the_second_rename(source, target):  # the old one is moved aside, then the new one fails
        if Path(target) == store.path_of(100) and ".tmp-checkpoint-100-replaced" not in str(source):
            disk_full()
        real_replace(source, target)

    monkeypatch.setattr(checkpoints.os, "replace", fail_the_second_rename)
    with pytest.raises(CheckpointWriteError):
        store.save(100, {"weights.bin": b"new"})
    monkeypatch.undo()
    assert store.latest().file("weights.bin").read_bytes() == b"old"


def test_training_goes_on_when_a_periodic_checkpoint_cannot_be_written(tmp_path, monkeypatch):
    model = DQN("MlpPolicy", "CartPole-v1", buffer_size=500, learning_starts=50, train_freq=25, batch_size=16,
                policy_kwargs=dict(net_arch=[8]), seed=0)
    callback = RunCheckpoints(tmp_path / "checkpoints", checkpoint_freq=100, metadata={})
    monkeypatch.setattr(CheckpointStore, "_write", fail_once(CheckpointStore._write))
    with pytest.warns(WriteFailedWarning, match="No space left on device.*training goes on"):
        model.learn(400, callback=callback)
    assert model.num_timesteps == 400
    assert len(callback.write_failures) == 1 and "step 0" in callback.write_failures[0]
    assert callback.store.latest().step >= 300


# -- the logs -----------------------------------------------------------------------------------------

ROW = {"time/total_timesteps": 100, "train/loss": 0.5}


def test_a_row_that_cannot_be_written_is_dropped_whole_with_one_warning(tmp_path, monkeypatch):
    path = tmp_path / "progress.csv"
    writer = ProgressCSV(path)
    writer.write(ROW, {})
    real_write = os.write

    def write_half_then_fail(descriptor, data):
        real_write(descriptor, bytes(data[:len(data) // 2]))
        disk_full()

    monkeypatch.setattr(run_logs.os, "write", write_half_then_fail)
    with pytest.warns(WriteFailedWarning, match="progress.csv.*No space left") as caught:
        for step in (200, 300, 400):
            writer.write({**ROW, "time/total_timesteps": step}, {})
    assert len(caught) == 1 and writer.failed_writes == 3
    assert path.read_text() == "time/total_timesteps,train/loss\n100,0.5\n"
    monkeypatch.undo()
    writer.write({**ROW, "time/total_timesteps": 500}, {})
    writer.close()
    assert path.read_text() == "time/total_timesteps,train/loss\n100,0.5\n500,0.5\n"


def test_a_new_column_that_cannot_be_written_leaves_the_file_and_is_added_later(tmp_path, monkeypatch):
    path = tmp_path / "progress.csv"
    writer = ProgressCSV(path)
    writer.write(ROW, {})
    monkeypatch.setattr(safe_io.os, "replace", disk_full)
    with pytest.warns(WriteFailedWarning):
        writer.write({**ROW, "rollback/restores": 1}, {})
    assert path.read_text() == "time/total_timesteps,train/loss\n100,0.5\n"
    monkeypatch.undo()
    writer.write({**ROW, "time/total_timesteps": 300, "rollback/restores": 2}, {})
    writer.close()
    assert path.read_text() == "time/total_timesteps,train/loss,rollback/restores\n100,0.5,\n300,0.5,2\n"


def test_tensorboard_write_errors_become_one_warning(tmp_path, monkeypatch):
    output = GuardedTensorBoardOutputFormat(str(tmp_path))
    monkeypatch.setattr(output.writer, "add_scalar", disk_full)
    with pytest.warns(WriteFailedWarning, match="TensorBoard.*No space left") as caught:
        for step in range(3):
            output.write({"train/loss": 0.5}, {"train/loss": None}, step)
    assert len(caught) == 1 and output.failed_writes == 3
    monkeypatch.setattr(output.writer, "close", disk_full)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output.close()  # warned once already: no second warning, no exception


def test_flushing_the_logs_on_a_full_disk_warns_and_returns(tmp_path, monkeypatch):
    logger = Logger(folder=str(tmp_path), output_formats=[ProgressCSV(tmp_path / "progress.csv"),
                                                         GuardedTensorBoardOutputFormat(str(tmp_path))])
    logger.record("train/loss", 0.5)
    logger.dump(100)
    monkeypatch.setattr(run_logs.os, "fsync", disk_full)
    with pytest.warns(WriteFailedWarning):
        flush_logs(logger)
    monkeypatch.undo()
    logger.close()
