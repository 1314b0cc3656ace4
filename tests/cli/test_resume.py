"""Durable checkpoints and ``rollback-rl train --resume``: killed runs come back, nothing unsafe is loaded.

Runs that must die are forked from this process (no interpreter start-up, so many kills fit in a few
seconds) and killed with SIGKILL; resumes run in-process where nothing needs killing.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import multiprocessing
import os
import pickle
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_YAML, assert_states_equal, copy_training_state
from stable_baselines3.common.callbacks import BaseCallback
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import metadata as custom_scalar_metadata
from torch.utils.tensorboard import SummaryWriter

from rollback_rl import cli
from rollback_rl.persistence import resume
from rollback_rl.training import TrainingPlan, build_envs
from rollback_rl.callbacks.rollback import RollbackCallback, RollbackEvent
from rollback_rl.persistence.checkpoints import LATEST, CheckpointStore
from rollback_rl.cli import main
from rollback_rl.core.detectors import Score, SignificantDrop
from rollback_rl.plotting import read_scalars
from rollback_rl.persistence.resume import (
    MODEL_FILE,
    REPLAY_BUFFER_FILE,
    SNAPSHOTS_FILE,
    STATE_FILE,
    evaluation_state,
    hold_run_lock,
    load_resume_point,
    restore_evaluation_state,
    run_metadata,
)
from rollback_rl.persistence.run_logs import carry_events_over, cut_progress_csv
from rollback_rl.persistence.safe_io import (
    CorruptFileError,
    from_json_and_tensors,
    load_tensors,
    save_tensors,
)

torch.set_num_threads(1)

FREQ = 200  # checkpoint and evaluation frequency
TRAIN_FREQ = 4  # a checkpoint is written at the first rollout start at or after each multiple of FREQ
FORK = multiprocessing.get_context("fork")


def train_arguments(tmp_path: Path, run_name: str, steps: int, *extra: str) -> list[str]:
    hyperparams = tmp_path / "tiny.yml"
    hyperparams.write_text(TINY_YAML)
    return ["train", "--hyperparams", str(hyperparams), "--logdir", str(tmp_path / "runs"), "--run-name", run_name,
            "--steps", str(steps), "--eval-freq", str(FREQ), "--eval-episodes", "2",
            "--checkpoint-freq", str(FREQ), "--no-progress", *extra]


# -- running the CLI in a forked child that can be killed -------------------------------------------

class ReportProgress(BaseCallback):
    """Publishes ``num_timesteps`` after every step, for the parent to read when it kills the child."""

    def __init__(self, shared) -> None:
        super().__init__()
        self.shared = shared

    def _on_step(self) -> bool:
        self.shared.value = self.num_timesteps
        return True


def pause_forever(marker: Path) -> None:
    marker.write_text(str(os.getpid()))
    time.sleep(600)


def install_pause(phase: str, marker: Path) -> None:
    """Make the child stop (until killed) at one precise moment of a checkpoint write or a resume."""
    if phase == "checkpoint-files":  # the temporary directory half written
        write_ring = resume.save_snapshot_ring

        def write_then_pause(path, ring):
            write_ring(path, ring)
            pause_forever(marker)
        resume.save_snapshot_ring = write_then_pause
    elif phase == "checkpoint-latest":  # the new checkpoint in place, LATEST still naming the previous one
        from rollback_rl.persistence import checkpoints
        write = checkpoints.atomic_write_bytes

        def pause_before_latest(path, data):
            if Path(path).name == LATEST:
                pause_forever(marker)
            write(path, data)
        checkpoints.atomic_write_bytes = pause_before_latest
    elif phase == "checkpoint-prune":  # an old checkpoint half deleted
        from rollback_rl.persistence import checkpoints
        rmtree = shutil.rmtree

        def remove_one_file_then_pause(path, *args, **kwargs):
            files = sorted(Path(path).iterdir()) if "-pruned-" in str(path) else []
            if files:
                files[0].unlink()
                pause_forever(marker)
            rmtree(path, *args, **kwargs)
        checkpoints.shutil.rmtree = remove_one_file_then_pause
    elif phase == "final-files":  # the model staged, the zip and run.json not yet: waits for a ".go" file
        from rollback_rl import training
        save_sb3_zip = training.save_sb3_zip

        def pause_then_save(model, path):
            marker.write_text(str(os.getpid()))
            deadline = time.monotonic() + 60
            while not marker.with_suffix(".go").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            return save_sb3_zip(model, path)
        training.save_sb3_zip = pause_then_save
    elif phase == "resume-events":  # events copied into the new file, the old files not yet deleted
        unlink = Path.unlink

        def pause_before_deleting_events(self, *args, **kwargs):
            if self.name.startswith("events.out.tfevents"):
                pause_forever(marker)
            unlink(self, *args, **kwargs)
        Path.unlink = pause_before_deleting_events
    else:
        raise ValueError(phase)


def child_main(argv: list[str], log: str, progress, pause: str | None, marker: str) -> None:
    sys.stdout = sys.stderr = open(log, "a", buffering=1)  # noqa: SIM115 - the child ends with os._exit
    # A forked child inherits the test process's signal handlers, which other tests or plugins may have
    # changed (Ctrl-C then never stopped training); a real rollback-rl process starts with the defaults.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run_training = cli.run_training
    cli.run_training = lambda session, *args, extra_callbacks=(), **kwargs: run_training(
        session, *args, extra_callbacks=[*extra_callbacks, ReportProgress(progress)], **kwargs)
    if pause is not None:
        install_pause(pause, Path(marker))
    try:
        code = main(argv)
    except BaseException:  # noqa: BLE001 - reported in the log, seen by the parent as exit status 99
        import traceback
        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    os._exit(code)


def warm_up_torch() -> None:
    """Import what torch imports on first building an optimizer (seconds, torch._dynamo) before forking,
    so that children start at once."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


class Child:
    """``rollback-rl`` running in a forked child process."""

    def __init__(self, argv: list[str], log: Path, pause: str | None = None) -> None:
        warm_up_torch()
        self.progress = FORK.Value("q", -1, lock=False)
        self.marker = log.with_name(f"paused-{time.monotonic_ns()}")
        self.process = FORK.Process(target=child_main, args=(argv, str(log), self.progress, pause, str(self.marker)))
        self.process.start()

    def kill(self) -> int:
        """SIGKILL it; returns the last timestep it reported (-1: none)."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(timeout=60)
        assert self.process.exitcode == -signal.SIGKILL
        return self.progress.value

    def wait_until(self, condition, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.is_alive(), f"the child exited with status {self.process.exitcode}"
            assert time.monotonic() < deadline, "timed out waiting for the child"
            time.sleep(0.005)

    def kill_at_random_moment(self, rng: random.Random, resumes_from: int, last_timestep: int) -> int:
        """SIGKILL it after a random time (often while it loads), or once it passes a random timestep up to
        two checkpoint intervals on, whichever comes first; never after ``last_timestep``, so it cannot
        finish the run however fast the machine is."""
        deadline = time.monotonic() + rng.uniform(0.0, 1.0)
        cap = min(resumes_from + rng.randint(1, 2 * FREQ), last_timestep)
        while time.monotonic() < deadline and self.progress.value < cap:
            assert self.process.is_alive(), f"the child exited with status {self.process.exitcode}"
            time.sleep(0.002)
        return self.kill()

    def wait_for_pause(self, timeout: float = 60.0) -> None:
        self.wait_until(self.marker.exists, timeout)

    def finish(self, timeout: float = 300) -> int:
        self.process.join(timeout=timeout)
        assert self.process.exitcode is not None, "the child did not finish"
        return self.process.exitcode


def assert_every_checkpoint_reads(store: CheckpointStore) -> None:
    for step in store.steps():
        checkpoint = store.load(step)  # sizes and SHA-256 of every file
        for name in checkpoint.files:
            if name.endswith(".safetensors"):
                load_tensors(checkpoint.file(name))


def resume_step(store: CheckpointStore) -> int:
    """The timestep ``--resume`` continues from (LATEST's checkpoint if it verifies, else the newest)."""
    for step in store.candidate_steps():
        try:
            store.load(step)
            return step
        except CorruptFileError:
            continue
    raise AssertionError("no checkpoint verifies")


def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "progress.csv", newline="") as file:
        return list(csv.DictReader(file))


ROLLBACK_TAGS = ("eval/mean_reward", "rollback/score", "rollback/n_rollbacks", "rollback/best_score")


def assert_logs_hold_each_step_once(run_dir: Path, evaluation_steps: list[int], tags=ROLLBACK_TAGS) -> None:
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    events = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.TENSORS: 0})
    events.Reload()
    assert len(events.Tensors(custom_scalar_metadata.CONFIG_SUMMARY_TAG)) == 1  # the layout, carried over once
    scalars = read_scalars(run_dir)
    for tag, series in scalars.items():
        steps = [step for step, _ in series]
        assert steps == sorted(steps), f"{tag}: steps go back (logged twice?): {steps}"
    for tag in tags:
        assert [step for step, _ in scalars[tag]] == evaluation_steps, tag
    rows = csv_rows(run_dir)
    timesteps = [float(row["time/total_timesteps"]) for row in rows]
    assert timesteps == sorted(timesteps)
    assert [int(float(row["time/total_timesteps"])) for row in rows if row.get("eval/mean_reward")] == evaluation_steps


# -- the kill test ---------------------------------------------------------------------------------

KILL_STEPS = 3_000
RANDOM_KILLS = 20
PAUSED_KILLS = {3: "checkpoint-files", 7: "checkpoint-latest", 11: "checkpoint-prune", 15: "resume-events",
                18: "checkpoint-files"}


def test_a_run_killed_again_and_again_resumes_to_completion(tmp_path, capsys):
    """SIGKILL at random moments and inside checkpoint writes and resumes; every time, every checkpoint
    reads, at most one checkpoint interval is lost, and the run finally completes with logs that hold
    each step once."""
    rng = random.Random(0)
    argv = train_arguments(tmp_path, "killed", KILL_STEPS)
    run_dir = tmp_path / "runs" / "killed"
    store = CheckpointStore(run_dir / "checkpoints")
    resume_argv = ["train", "--resume", str(run_dir), "--no-progress"]
    log = tmp_path / "children.log"
    started = time.monotonic()

    last_timestep = KILL_STEPS - FREQ
    first = Child(argv, log)
    first.wait_until(lambda: (store.run_dir / LATEST).exists())
    kills = [(first.kill_at_random_moment(rng, 0, last_timestep), "random")]
    assert_every_checkpoint_reads(store)
    for index in range(1, RANDOM_KILLS + len(PAUSED_KILLS)):
        phase = PAUSED_KILLS.get(index)
        child = Child(resume_argv, log, pause=phase)
        if phase is None:
            progress = child.kill_at_random_moment(rng, resume_step(store), last_timestep)
        else:
            child.wait_for_pause()
            progress = child.kill()
        kills.append((progress, phase or "random"))
        assert_every_checkpoint_reads(store)
        if progress >= 0:
            lost = progress - resume_step(store)
            assert lost <= FREQ + TRAIN_FREQ, f"kill {index} ({phase or 'random'}) lost {lost} timesteps"

    assert Child(resume_argv, log).finish() == 0, log.read_text()[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["timesteps_done"] == KILL_STEPS and not info["interrupted"]
    evaluation_steps = list(range(FREQ, KILL_STEPS + 1, FREQ))
    assert [e["timestep"] for e in info["evaluations"]] == evaluation_steps
    assert info["resumes"], "the finished run never went through a resume"
    assert_logs_hold_each_step_once(run_dir, evaluation_steps)
    assert main(["evaluate", str(run_dir), "--episodes", "1"]) == 0
    with capsys.disabled():
        print(f"\n{len(kills)} SIGKILLs survived ({sum(1 for _, p in kills if p != 'random')} inside checkpoint "
              f"writes or resumes, the others at random moments) in {time.monotonic() - started:.0f} s")
    assert len(kills) >= 20


# -- resuming keeps the run's state ----------------------------------------------------------------

def kill_after_checkpoint(argv: list[str], log: Path, timestep: int) -> None:
    """Run ``argv`` in a child and SIGKILL it as soon as its checkpoint at ``timestep`` is complete."""
    child = Child(argv, log)
    store_dir = Path(argv[argv.index("--logdir") + 1]) / argv[argv.index("--run-name") + 1] / "checkpoints"
    child.wait_until(lambda: (store_dir / LATEST).exists()
                     and (store_dir / LATEST).read_text().strip() == f"checkpoint-{timestep}")
    child.kill()


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> Path:
    """A run of 1,000 steps (replay buffer checkpointed) killed after its checkpoint at 600."""
    tmp_path = tmp_path_factory.mktemp("killed")
    argv = train_arguments(tmp_path, "killed", 1_000, "--checkpoint-replay-buffer")
    kill_after_checkpoint(argv, tmp_path / "child.log", 600)
    return tmp_path / "runs" / "killed"


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / run_dir.name))


def model_counters(path: Path) -> dict:
    settings = load_tensors(path)[1]["settings"]
    names = ("num_timesteps", "_total_timesteps", "_n_updates", "_n_calls", "exploration_rate",
             "_current_progress_remaining", "learning_starts")
    return {name: settings[name] for name in names}


def test_a_resumed_run_continues_counters_schedules_and_evaluations(killed_run, tmp_path, capsys):
    run_dir = copy_of(killed_run, tmp_path)
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert "Resuming" in capsys.readouterr().out
    assert main(train_arguments(tmp_path, "uninterrupted", 1_000, "--checkpoint-replay-buffer")) == 0
    resumed, uninterrupted = run_dir, tmp_path / "runs" / "uninterrupted"

    # Same number of gradient steps and target syncs, the same point of every schedule.
    assert model_counters(resumed / "model.safetensors") == model_counters(uninterrupted / "model.safetensors")
    info = json.loads((resumed / "run.json").read_text())
    reference = json.loads((uninterrupted / "run.json").read_text())
    assert [e["timestep"] for e in info["evaluations"]] == [e["timestep"] for e in reference["evaluations"]]
    # The evaluations before the checkpoint are the killed run's own (the eval env's seeds continue).
    assert info["evaluations"][:3] == reference["evaluations"][:3]
    assert [r["timestep"] for r in info["resumes"]] == [600]
    assert info["online_return"]["episodes"] >= reference["online_return"]["episodes"] - 5
    assert info["command"][:2] == ["rollback-rl", "train"] and "--checkpoint-replay-buffer" in info["command"]
    assert_logs_hold_each_step_once(resumed, [200, 400, 600, 800, 1_000])


@pytest.mark.parametrize("arguments", [["--algo", "a2c"], ["--no-rollback"]], ids=["a2c", "dqn-vanilla"])
def test_on_policy_and_vanilla_runs_resume_too(tmp_path, arguments):
    argv = train_arguments(tmp_path, "run", 600, *arguments)
    if "--algo" in arguments:
        argv.remove("--hyperparams")  # the tiny file holds DQN settings
        argv.remove(str(tmp_path / "tiny.yml"))
    kill_after_checkpoint(argv, tmp_path / "child.log", 400)
    run_dir = tmp_path / "runs" / "run"
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    info = json.loads((run_dir / "run.json").read_text())
    assert [e["timestep"] for e in info["evaluations"]] == [200, 400, 600]
    assert [r["timestep"] for r in info["resumes"]] == [400] and info["timesteps_done"] >= 600
    tags = ["eval/mean_reward"] if "--no-rollback" in arguments else ROLLBACK_TAGS
    assert_logs_hold_each_step_once(run_dir, [200, 400, 600], tags)


class RecordAtCheckpoints(BaseCallback):
    """Deep copies of everything a checkpoint must hold, taken right after each one is written."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[int, dict] = {}

    def _on_rollout_start(self) -> None:
        if self.num_timesteps % FREQ:
            return
        model = self.model
        self.records[self.num_timesteps] = {
            "state": copy_training_state(model),
            "counters": {name: getattr(model, name) for name in ("num_timesteps", "_n_updates", "_n_calls",
                                                                 "_episode_num", "exploration_rate")},
            "torch_rng": torch.get_rng_state().clone(),
            "numpy_rng": np.random.get_state()[1].copy(),
            "action_space_rng": model.action_space.np_random.bit_generator.state,
            "env_rng": model.get_env().get_attr("np_random")[0].bit_generator.state,
            "ring": [(s.timestep, s.score) for s in model.rollback_snapshots],
            "replay": (model.replay_buffer.pos, model.replay_buffer.observations.copy()),
        }

    def _on_step(self) -> bool:
        return True


def test_a_checkpoint_holds_the_exact_training_state(tmp_path, monkeypatch):
    recorder = RecordAtCheckpoints()
    run_training = cli.run_training
    monkeypatch.setattr(cli, "run_training", lambda session, *args, **kwargs: run_training(
        session, *args, extra_callbacks=[recorder], **kwargs))
    assert main(train_arguments(tmp_path, "exact", 600, "--checkpoint-replay-buffer")) == 0
    run_dir = tmp_path / "runs" / "exact"
    store = CheckpointStore(run_dir / "checkpoints")
    assert store.steps() == [200, 400]
    plan = TrainingPlan.from_json(run_metadata(store)["run"], run_dir)
    env, _ = build_envs(plan.env_id, plan.seed, plan.hyperparameters)
    point = load_resume_point(store, env)
    expected = recorder.records[400]
    model = point.model
    assert point.timestep == 400
    assert_states_equal(expected["state"], copy_training_state(model))
    assert {name: getattr(model, name) for name in expected["counters"]} == expected["counters"]
    assert torch.equal(point.rng_tensors["rng/torch"], expected["torch_rng"])
    assert np.array_equal(from_json_and_tensors(point.state["rng"]["numpy"], {})[1], expected["numpy_rng"])
    assert point.state["rng"]["generators"]["action_space"]["state"] == expected["action_space_rng"]["state"]
    assert point.state["envs"]["train"][0]["np_random"]["state"] == expected["env_rng"]["state"]
    assert [(s.timestep, s.score) for s in point.snapshots] == expected["ring"]
    assert model.replay_buffer.pos == expected["replay"][0]
    assert np.array_equal(model.replay_buffer.observations, expected["replay"][1])


def test_rollback_callback_state_round_trips(tmp_path):
    callback = RollbackCallback(detector=SignificantDrop(patience=3))
    callback.scores = [Score(200, 20.5, (20.0, 21.0)), Score(400, 9.0, None)]
    callback.rollbacks = [RollbackEvent(400, 9.0, 200, 20.5, 19.0)]
    callback.history.best, callback.history.floor = 20.5, 9.0
    callback.detector.bad_in_a_row = 2
    callback.rebases, callback.eval_timesteps, callback.eval_seconds = 1, 321, 1.5
    callback.policy.consecutive_rollbacks, callback._next_check, callback._online_returns = 1, 600, [3.0]
    save_tensors(tmp_path / "state.safetensors", {}, {"evaluation": evaluation_state(callback)})
    state = resume._checked_evaluation_state(load_tensors(tmp_path / "state.safetensors")[1]["evaluation"])
    restored = RollbackCallback(detector=SignificantDrop(patience=3))
    restore_evaluation_state(restored, state)
    for name in ("scores", "rollbacks", "rebases", "eval_timesteps", "eval_seconds", "_next_check", "_online_returns"):
        assert getattr(restored, name) == getattr(callback, name), name
    assert restored.policy.consecutive_rollbacks == 1
    assert (restored.history.best, restored.history.floor, restored.detector.bad_in_a_row) == (20.5, 9.0, 2)


# -- damaged and crafted checkpoints ---------------------------------------------------------------

class WritesMarker:
    """A pickle that, when unpickled, runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def replace_checkpoint_file(checkpoint_dir: Path, name: str, data: bytes) -> None:
    """Replace a file and forge the manifest to match, as an attacker with write access would."""
    (checkpoint_dir / name).write_bytes(data)
    manifest = json.loads((checkpoint_dir / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (checkpoint_dir / "manifest.json").write_text(json.dumps(manifest))


def crafted_bytes(name: str, marker: Path, original: Path) -> bytes:
    if name.endswith(".npz"):  # the real arrays, with the observations replaced by a pickled object
        with np.load(original) as archive:
            arrays = {key: archive[key] for key in archive.files}
        arrays["observations"] = np.array([WritesMarker(marker)], dtype=object)
        path = marker.with_name("crafted.npz")
        np.savez(path, **arrays)
        return path.read_bytes()
    if name == MODEL_FILE:
        path = marker.with_name("crafted.pt")
        torch.save({"policy": WritesMarker(marker)}, path)  # a torch.save archive holds a pickle
        return path.read_bytes()
    return pickle.dumps(WritesMarker(marker))


def test_a_truncated_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_previous(killed_run, tmp_path, capsys):
    run_dir = copy_of(killed_run, tmp_path)
    model_file = run_dir / "checkpoints" / "checkpoint-600" / MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:-100])
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "rollback-rl: warning: skipping checkpoint" in captured.err and "checkpoint-600" in captured.err
    assert "truncated" in captured.err and "Traceback" not in captured.err
    assert "Resuming" in captured.out and "from timestep 400" in captured.out
    assert json.loads((run_dir / "run.json").read_text())["timesteps_done"] == 1_000


@pytest.mark.parametrize("name", [MODEL_FILE, SNAPSHOTS_FILE, STATE_FILE, REPLAY_BUFFER_FILE])
def test_a_crafted_checkpoint_file_is_refused_without_running_it(killed_run, tmp_path, name):
    run_dir = copy_of(killed_run, tmp_path)
    marker = tmp_path / "pwned"
    newest = run_dir / "checkpoints" / "checkpoint-600"
    replace_checkpoint_file(newest, name, crafted_bytes(name, marker, newest / name))
    store = CheckpointStore(run_dir / "checkpoints")
    plan = TrainingPlan.from_json(run_metadata(store)["run"], run_dir)
    skipped = []
    point = load_resume_point(store, build_envs(plan.env_id, plan.seed, plan.hyperparameters)[0], on_skip=skipped.append)
    assert point.timestep == 400
    assert len(skipped) == 1 and "checkpoint-600" in skipped[0] and "pickle" in skipped[0]
    assert not marker.exists()


def test_resume_refuses_when_every_checkpoint_is_crafted(killed_run, tmp_path, capsys):
    run_dir = copy_of(killed_run, tmp_path)
    marker = tmp_path / "pwned"
    steps = CheckpointStore(run_dir / "checkpoints").steps()
    for step in steps:
        checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
        replace_checkpoint_file(checkpoint, MODEL_FILE, crafted_bytes(MODEL_FILE, marker, checkpoint / MODEL_FILE))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("rollback-rl: warning:") == len(steps) and "refusing" in err
    error_lines = [line for line in err.splitlines() if line.startswith("rollback-rl: error:")]
    assert len(error_lines) == 1 and "no checkpoint" in error_lines[0] and "Traceback" not in err
    assert not marker.exists()
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before


# -- what --resume refuses -------------------------------------------------------------------------

def assert_usage_error(capsys, code: int, *words: str) -> None:
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.startswith("rollback-rl: error: ") and captured.err.count("\n") == 1, captured.err
    for word in words:
        assert word in captured.err


def test_resume_needs_a_run_folder_with_a_checkpoint(tmp_path, capsys):
    assert_usage_error(capsys, main(["train", "--resume", str(tmp_path / "missing")]), "not found")
    leftover = tmp_path / "empty" / "checkpoints" / ".tmp-checkpoint-200-deadbeef"
    leftover.mkdir(parents=True)
    assert_usage_error(capsys, main(["train", "--resume", str(tmp_path / "empty")]), "no complete checkpoint",
                       "--checkpoint-freq 0")
    assert sorted(p.name for p in (tmp_path / "empty").rglob("*")) == sorted(["checkpoints", leftover.name])


def test_resume_takes_no_other_settings(killed_run, capsys):
    for extra, option in ((["--steps", "5000"], "--steps"), (["Acrobot-v1"], "ENV_ID"),
                          (["--set", "gamma=0.9"], "--set"), (["--checkpoint-freq", "5"], "--checkpoint-freq")):
        assert_usage_error(capsys, main(["train", "--resume", str(killed_run), *extra]), option, "--resume")


def test_resume_refuses_a_run_another_process_is_writing(killed_run, tmp_path, capsys):
    run_dir = copy_of(killed_run, tmp_path)
    with hold_run_lock(run_dir):
        assert_usage_error(capsys, main(["train", "--resume", str(run_dir)]), "another rollback-rl process")


def test_resuming_a_complete_run_does_nothing(tmp_path, capsys):
    assert main(train_arguments(tmp_path, "done", 200)) == 0
    run_dir = tmp_path / "runs" / "done"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before


# -- the logs, cut back to the checkpoint ----------------------------------------------------------

def test_progress_csv_is_cut_back_to_the_checkpoint(tmp_path):
    path = tmp_path / "progress.csv"
    path.write_text("time/total_timesteps,train/loss\n100,0.5\n200,0.4\n2,0,0,torn\n300,0.3\n400,0.")
    assert cut_progress_csv(path, 300) == ["time/total_timesteps", "train/loss"]
    assert path.read_text() == "time/total_timesteps,train/loss\n100,0.5\n200,0.4\n300,0.3\n"


def write_events(directory: Path, steps: range) -> Path:
    writer = SummaryWriter(str(directory))
    for step in steps:
        writer.add_scalar("eval/mean_reward", float(step), step)
    writer.close()
    return max(directory.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns)


def test_events_after_the_checkpoint_and_a_truncated_record_are_dropped(tmp_path):
    first = write_events(tmp_path, range(100, 701, 100))
    first.write_bytes(first.read_bytes()[:-7])  # the last record (step 700) cut short by the kill
    copy = tmp_path / (first.name + ".copy")  # a copy left by an interrupted earlier resume
    copy.write_bytes(first.read_bytes())
    writer = SummaryWriter(str(tmp_path))
    copied = carry_events_over([first, copy], writer, timestep=400)
    for step in (500, 600):
        writer.add_scalar("eval/mean_reward", -1.0, step)
    writer.close()
    assert copied > 0 and not first.exists() and not copy.exists()
    assert [step for step, _ in read_scalars(tmp_path)["eval/mean_reward"]] == [100, 200, 300, 400, 500, 600]


# -- SIGTERM, a second Ctrl-C, a full disk --------------------------------------------------------

def stop_lines(log: Path, word: str) -> list[str]:
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    return [line for line in text.splitlines() if word in line]


def assert_final_files_agree(run_dir: Path) -> dict:
    """run.json and model.safetensors were written together: the same timestep, nothing staged left."""
    info = json.loads((run_dir / "run.json").read_text())
    assert model_counters(run_dir / "model.safetensors")["num_timesteps"] == info["timesteps_done"]
    assert not list(run_dir.glob(".staged-*"))
    return info


def test_sigterm_stops_a_run_as_ctrl_c_does_and_resume_finishes_it(tmp_path):
    argv = train_arguments(tmp_path, "terminated", 3_000)
    run_dir, log = tmp_path / "runs" / "terminated", tmp_path / "child.log"
    child = Child(argv, log)
    child.wait_until(lambda: child.progress.value >= 2 * FREQ + 50)  # past the checkpoint at 400
    os.kill(child.process.pid, signal.SIGTERM)
    assert child.finish(timeout=120) == 128 + signal.SIGTERM
    [line] = stop_lines(log, "SIGTERM")
    assert line.startswith("Stopped by SIGTERM at timestep ") and f"train --resume {run_dir}" in line
    info = assert_final_files_agree(run_dir)
    assert info["interrupted"] and info["stop_reason"] == "SIGTERM" and 450 <= info["timesteps_done"] < 3_000
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    info = assert_final_files_agree(run_dir)
    assert info["timesteps_done"] == 3_000 and not info["interrupted"] and info["stop_reason"] is None
    assert [r["timestep"] for r in info["resumes"]] and info["resumes"][0]["timestep"] >= 2 * FREQ


def test_a_second_ctrl_c_while_the_final_files_are_written_waits_for_them_and_ends_cleanly(tmp_path):
    argv = train_arguments(tmp_path, "twice", 3_000)
    run_dir, log = tmp_path / "runs" / "twice", tmp_path / "child.log"
    child = Child(argv, log, pause="final-files")
    child.wait_until(lambda: child.progress.value >= FREQ)
    os.kill(child.process.pid, signal.SIGINT)
    # The first Ctrl-C stopped training; the final files are being written. A loaded machine (CI shares
    # its cores) can take more than a minute to get there.
    child.wait_for_pause(timeout=240)
    os.kill(child.process.pid, signal.SIGINT)
    os.kill(child.process.pid, signal.SIGTERM)
    time.sleep(0.2)
    child.marker.with_suffix(".go").write_text("")
    assert child.finish(timeout=120) == 128 + signal.SIGINT
    [line] = stop_lines(log, "Interrupted at timestep")
    assert f"train --resume {run_dir}" in line
    info = assert_final_files_agree(run_dir)
    assert info["interrupted"] and info["stop_reason"] == "SIGINT"
    assert (run_dir / "model.zip").is_file()


class FillTheDisk(BaseCallback):
    """From timestep ``at`` on, every ``fsync`` (atomic writes, checkpoints, flushed logs) fails with
    ENOSPC, as on a full disk; ``full`` says whether it has started."""

    def __init__(self, at: int, monkeypatch) -> None:
        super().__init__()
        self.at, self.full = at, False
        fsync = os.fsync

        def failing_fsync(descriptor):
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return fsync(descriptor)
        monkeypatch.setattr(os, "fsync", failing_fsync)

    def _on_step(self) -> bool:
        self.full = self.full or self.num_timesteps >= self.at
        return True


def test_a_full_disk_is_warned_about_training_goes_on_and_the_newest_checkpoint_is_named(tmp_path, monkeypatch,
                                                                                         capsys):
    disk = FillTheDisk(at=FREQ + 50, monkeypatch=monkeypatch)
    run_training = cli.run_training
    monkeypatch.setattr(cli, "run_training", lambda session, *args, **kwargs: run_training(
        session, *args, extra_callbacks=[disk], **kwargs))
    argv = train_arguments(tmp_path, "full", 3 * FREQ)
    run_dir = tmp_path / "runs" / "full"
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warnings_ = [line for line in err.splitlines() if line.startswith("rollback-rl: warning:")]
    assert any("cannot write the checkpoint of step 400" in line and "checkpoint-200 is kept" in line
               for line in warnings_), err
    [error] = [line for line in err.splitlines() if line.startswith("rollback-rl: error:")]
    assert "No space left on device" in error
    assert f"the newest checkpoint is {run_dir / 'checkpoints' / 'checkpoint-200'}" in error
    assert f"train --resume {run_dir}" in error
    assert not (run_dir / "model.safetensors").exists() and not (run_dir / "run.json").exists()
    assert not list(run_dir.glob(".staged-*"))

    disk.full, disk.at = False, 10**9  # space again: the run resumes from the checkpoint it named
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    info = assert_final_files_agree(run_dir)
    assert info["resumes"][0]["timestep"] == FREQ and info["timesteps_done"] == 3 * FREQ


def test_a_file_sb3_writes_itself_that_fails_stops_training_with_the_run_so_far_saved(tmp_path, monkeypatch, capsys):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "evaluations.npz")

    monkeypatch.setattr(np, "savez", disk_full)  # EvalCallback's evaluations/evaluations.npz (vanilla runs)
    argv = train_arguments(tmp_path, "vanilla", 3 * FREQ, "--no-rollback")
    assert main(argv) == 1
    err = capsys.readouterr().err
    [error] = [line for line in err.splitlines() if line.startswith("rollback-rl: error:")]
    assert "Traceback" not in err and f"training stopped at timestep {FREQ}" in error
    assert "No space left on device: evaluations.npz" in error and "saved" in error
    info = assert_final_files_agree(tmp_path / "runs" / "vanilla")
    assert info["interrupted"] and info["timesteps_done"] == FREQ
