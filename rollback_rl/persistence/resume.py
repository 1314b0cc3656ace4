"""Durable checkpoints of a training run, and resuming the run from the newest one that loads.

:class:`RunCheckpoints` (a callback) writes a checkpoint every ``checkpoint_freq`` timesteps, at the
start of a rollout: the previous rollout's gradient steps are done and the next ones not begun, so
nothing is half done. It goes through :class:`~rollback_rl.persistence.checkpoints.CheckpointStore` (written
atomically, previous checkpoint kept) into ``<run>/checkpoints/checkpoint-<timestep>/``::

    manifest.json                size and SHA-256 of each file below; the run's settings, timestep,
                                 wall time so far and resume history
    model.safetensors            safe_model.save_model: networks, optimizer state, settings, counters
                                 (num_timesteps, _n_updates, _episode_num, _n_calls, exploration rate,
                                 _current_progress_remaining, _total_timesteps, the episode-info buffer)
    snapshots.safetensors        the rollback callback's good snapshots with their scores
    retired_snapshot.safetensors the snapshot it set aside (``max_restores``), if any
    training_state.safetensors   random-generator states (torch, numpy, Python, the action space's,
                                 each env's), the envs' counters (schedules, Monitor episode records,
                                 non-finite counts) and the evaluation callback's state (scores,
                                 rollbacks, detector patience, best and floor scores...)
    replay_buffer.npz            with save_replay_buffer=True only

Before writing, the logs are flushed to disk (:func:`~rollback_rl.persistence.run_logs.flush_logs`), so a
checkpoint at timestep ``s`` guarantees the logs up to ``s``.

:func:`load_resume_point` reads the newest checkpoint that verifies and loads, skipping (and
reporting) any that is incomplete, corrupted or refused as unsafe; nothing it reads can run code.
Given to :class:`RunCheckpoints` as ``resume_from``, its state is put back when training starts. The
environments are reset (an episode in progress at the checkpoint is not continued), and without the
replay buffer, training waits until the buffer holds ``learning_starts`` new transitions (at least a
batch).

RollbackCallback's state goes through its ``state_dict()``/``load_state_dict()``; EvalCallback's is
read and written here through its public attributes.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.vec_env import VecEnv

from rollback_rl.callbacks.rollback import RollbackCallback
from rollback_rl.persistence.checkpoints import (
    Checkpoint,
    CheckpointStore,
    CheckpointWriteError,
    capture_rng_state,
    load_replay_buffer,
    restore_rng_state,
    save_replay_buffer,
)
from rollback_rl.persistence.run_logs import flush_logs
from rollback_rl.persistence.safe_io import (
    CorruptFileError,
    SafeLoadError,
    WriteFailedWarning,
    load_snapshot_ring,
    save_snapshot_ring,
    save_tensors,
)
from rollback_rl.persistence.safe_model import load_model, save_model
from rollback_rl.core.snapshots import SnapshotRing

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
SNAPSHOTS_FILE = "snapshots.safetensors"
RETIRED_FILE = "retired_snapshot.safetensors"
STATE_FILE = "training_state.safetensors"
REPLAY_BUFFER_FILE = "replay_buffer.npz"
LOCK_FILE = ".lock"

# Per-env attributes carried over when present: this package's non-stationary CartPoles' schedule
# counters, NonFiniteGuard's counts, and the Monitor's episode records (run.json's online return).
ENV_ATTRIBUTES = ("num_steps", "num_episodes_started", "nonfinite_observations", "nonfinite_rewards",
                  "episode_returns", "episode_lengths", "episode_times", "total_steps")
_BIT_GENERATORS = {cls.__name__: cls for cls in (np.random.PCG64, np.random.PCG64DXSM, np.random.MT19937,
                                                 np.random.Philox, np.random.SFC64)}

EvaluationCallback = RollbackCallback | EvalCallback


class NoCheckpointError(Exception):
    """The run folder holds no checkpoint that verifies and loads; the message says why."""


class RunInUseError(Exception):
    """Another process is writing the run folder."""


def _open_lock_file(run_dir: Path, create: bool) -> int:
    """A descriptor of ``run_dir``'s lock file, never through a link (a planted one is removed first
    when creating: the lock file is ours, and opening it must not create or open a file elsewhere)."""
    path = run_dir / LOCK_FILE
    if create and path.is_symlink():
        path.unlink()
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags | os.O_CREAT, 0o666) if create else os.open(path, flags)


def run_in_use(run_dir: Path) -> bool:
    """Whether another process holds ``run_dir``'s lock now (checked without creating anything)."""
    try:
        import fcntl
        descriptor = _open_lock_file(run_dir, create=False)
    except (ImportError, OSError):  # no fcntl, or no lock file (or a link): nobody is writing with a lock
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)
    return False


@contextlib.contextmanager
def hold_run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (its ``.lock`` file) while writing it.

    The lock goes with the process, so a killed run leaves none behind. Where ``fcntl`` does not
    exist (Windows), no lock is taken.

    :raises RunInUseError: if another process holds it (e.g. the run is still going)
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = _open_lock_file(run_dir, create=True)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUseError(f"{run_dir} is being written by another rollback-rl process "
                                f"(wait for it to end, or stop it)") from None
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


# -- environments ----------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def env_states(env: VecEnv) -> list[dict[str, Any]]:
    """Each env's random-generator state and the :data:`ENV_ATTRIBUTES` it has."""
    states: list[dict[str, Any]] = [{} for _ in range(env.num_envs)]
    for index, generator in enumerate(env.get_attr("np_random")):
        states[index]["np_random"] = generator.bit_generator.state
    for name in ENV_ATTRIBUTES:
        if env.has_attr(name):
            for index, value in enumerate(env.get_attr(name)):
                states[index][name] = _plain(value)
    return states


def _generator(state: Mapping[str, Any]) -> np.random.Generator:
    kind = _BIT_GENERATORS.get(str(state.get("bit_generator")))
    if kind is None:
        raise CorruptFileError(f"unknown random bit generator {state.get('bit_generator')!r}")
    bit_generator = kind()
    bit_generator.state = dict(state)
    return np.random.Generator(bit_generator)


def restore_env_states(env: VecEnv, states: list[dict[str, Any]]) -> Any:
    """Put back :func:`env_states` and start fresh episodes from them; returns the observations."""
    if len(states) != env.num_envs:
        raise ValueError(f"the checkpoint holds {len(states)} envs, the run has {env.num_envs}")
    env.reset()  # uses up the seeds given for the first reset, which would overwrite the generators
    for index, state in enumerate(states):
        for name, value in state.items():
            value = _generator(value) if name == "np_random" else value
            env.set_attr(name, list(value) if isinstance(value, list) else value, indices=[index])
    return env.reset()


# -- the evaluation callback -------------------------------------------------------------------------

def evaluation_state(callback: EvaluationCallback) -> dict[str, Any]:
    """What a resumed run needs of ``callback`` (RollbackCallback or EvalCallback), as plain values."""
    if isinstance(callback, RollbackCallback):
        return {"kind": "RollbackCallback", "n_calls": callback.n_calls, **callback.state_dict()}
    return {
        "kind": "EvalCallback",
        "evaluations_timesteps": [int(t) for t in callback.evaluations_timesteps],
        "evaluations_results": _plain(callback.evaluations_results),
        "evaluations_length": _plain(callback.evaluations_length),
        "evaluations_successes": _plain(callback.evaluations_successes),
        "best_mean_reward": float(callback.best_mean_reward),
        "last_mean_reward": float(callback.last_mean_reward),
        "n_calls": callback.n_calls,
    }


def _checked_evaluation_state(state: Any) -> dict[str, Any]:
    """``state`` with its scores and rollbacks rebuilt as objects; CorruptFileError if malformed."""
    try:
        if state["kind"] == "RollbackCallback":
            RollbackCallback().load_state_dict(state)  # parses every field: a malformed one raises here
            return dict(state)
        if state["kind"] == "EvalCallback":
            return {**state, "evaluations_timesteps": [int(t) for t in state["evaluations_timesteps"]]}
        raise ValueError(f"unknown evaluation callback {state['kind']!r}")
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptFileError(f"malformed evaluation state ({type(error).__name__}: {error})") from None


def restore_evaluation_state(callback: EvaluationCallback, state: dict[str, Any]) -> None:
    """Put back what :func:`evaluation_state` took (checked by the loader); call after training started."""
    expected = "RollbackCallback" if isinstance(callback, RollbackCallback) else "EvalCallback"
    if state["kind"] != expected:
        raise ValueError(f"the checkpoint holds a {state['kind']}'s state, the run has a {expected}")
    callback.n_calls = state["n_calls"]
    if isinstance(callback, RollbackCallback):
        callback.load_state_dict(state)
        return
    callback.evaluations_timesteps = list(state["evaluations_timesteps"])
    callback.evaluations_results = list(state["evaluations_results"])
    callback.evaluations_length = list(state["evaluations_length"])
    callback.evaluations_successes = list(state["evaluations_successes"])
    callback.best_mean_reward = state["best_mean_reward"]
    callback.last_mean_reward = state["last_mean_reward"]


# -- reading a checkpoint back -----------------------------------------------------------------------

@dataclass
class ResumePoint:
    """A checkpoint read back: the model built from it and the state to put back when training starts.

    :param checkpoint: the verified checkpoint
    :param model: the model, on the run's training env, with the checkpoint's weights, optimizer,
        settings, counters and (if saved) replay buffer
    :param snapshots: the good snapshots (``None`` without a rollback callback)
    :param state: the decoded metadata of ``training_state.safetensors``
    :param rng_tensors: its tensors (the torch generator states)
    """

    checkpoint: Checkpoint
    model: BaseAlgorithm
    snapshots: SnapshotRing | None
    state: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    retired: SnapshotRing | None = None

    @property
    def timestep(self) -> int:
        return self.checkpoint.step


def run_metadata(store: CheckpointStore) -> dict[str, Any]:
    """The manifest metadata of the newest checkpoint that verifies (the run's settings are in it).

    :raises NoCheckpointError: if there is none
    """
    for step in store.candidate_steps():
        try:
            return store.load(step).metadata
        except (SafeLoadError, OSError, KeyError, TypeError, ValueError):
            continue
    raise NoCheckpointError(f"no complete checkpoint in {store.run_dir}")


def _read(checkpoint: Checkpoint, env: VecEnv, device: str | torch.device) -> ResumePoint:
    model = load_model(checkpoint.file(MODEL_FILE), env=env, device=device)
    if model.num_timesteps != checkpoint.step:
        raise CorruptFileError(f"{checkpoint.file(MODEL_FILE)}: model at timestep {model.num_timesteps}, "
                               f"checkpoint at {checkpoint.step}")
    snapshots = None
    if SNAPSHOTS_FILE in checkpoint.files:
        snapshots = load_snapshot_ring(checkpoint.file(SNAPSHOTS_FILE), device=model.device)
    retired = None
    if RETIRED_FILE in checkpoint.files:
        retired = load_snapshot_ring(checkpoint.file(RETIRED_FILE), device=model.device)
    rng_tensors, state = checkpoint.load_tensors(STATE_FILE)
    for states in state["envs"].values():
        for env_state in states:
            _generator(env_state["np_random"])  # refuse a bad generator state now, not when training starts
    if state.get("evaluation") is not None:
        state["evaluation"] = _checked_evaluation_state(state["evaluation"])
    if REPLAY_BUFFER_FILE in checkpoint.files:
        load_replay_buffer(checkpoint.file(REPLAY_BUFFER_FILE), model.replay_buffer)
    return ResumePoint(checkpoint, model, snapshots, state, rng_tensors, retired)


def load_resume_point(store: CheckpointStore, env: VecEnv, device: str | torch.device = "cpu",
                      on_skip: Callable[[str], None] | None = None) -> ResumePoint:
    """The newest checkpoint of ``store`` that verifies and loads, read onto ``env``.

    :param env: the run's training env (as ``rollback-rl train`` builds it)
    :param on_skip: called with one line for each newer checkpoint skipped, saying why
    :raises NoCheckpointError: if none loads
    """
    reasons = []
    for step in store.candidate_steps():
        try:
            return _read(store.load(step), env, device)
        except (SafeLoadError, OSError, AttributeError, KeyError, OverflowError, TypeError, ValueError) as error:
            detail = str(error) if isinstance(error, (SafeLoadError, OSError)) else f"{type(error).__name__}: {error}"
            reason = f"skipping checkpoint {store.path_of(step)}: {detail}"
            reasons.append(reason)
            if on_skip is not None:
                on_skip(reason)
    if not reasons:
        raise NoCheckpointError(f"no checkpoint in {store.run_dir}")
    raise NoCheckpointError(f"no checkpoint in {store.run_dir} loads ({len(reasons)} tried; newest: {reasons[0]})")


# -- the callback ------------------------------------------------------------------------------------

def _refill(ring: SnapshotRing | None, saved: SnapshotRing | None) -> None:
    """Replace the snapshots of the callback's ``ring`` by the ``saved`` ones (when both exist)."""
    if ring is None or saved is None:
        return
    ring.clear()
    for snapshot in saved:
        ring.add(snapshot)


class RunCheckpoints(BaseCallback):
    """Write a durable checkpoint of the whole run every ``checkpoint_freq`` timesteps (and when
    training starts), and put a :class:`ResumePoint`'s state back when a resumed run starts.

    List it after the evaluation callback (``CallbackList([evaluation, checkpoints])``): the
    evaluation callback's state is put back after its own ``on_training_start``.

    :param directory: the checkpoint folder (``<run>/checkpoints``)
    :param checkpoint_freq: timesteps between checkpoints (summed over envs); 0 writes none
    :param metadata: JSON values stored in every manifest (the run's settings); ``timestep`` and
        ``wall_time_s`` (training time so far, all sessions) are added
    :param evaluation_callback: the RollbackCallback or EvalCallback whose state is saved
    :param save_replay_buffer: also save the replay buffer (off-policy algorithms)
    :param resume_from: the checkpoint a resumed run continues from
    :param keep: checkpoints kept on disk

    A periodic checkpoint that cannot be written (disk full, read-only folder) does not stop training:
    it is warned about (:class:`~rollback_rl.persistence.safe_io.WriteFailedWarning`), recorded in
    ``write_failures``, and the next one is tried on schedule; the previous checkpoint stays the latest.
    """

    def __init__(self, directory: str | Path, checkpoint_freq: int, metadata: Mapping[str, Any],
                 evaluation_callback: EvaluationCallback | None = None, save_replay_buffer: bool = False,
                 resume_from: ResumePoint | None = None, keep: int = 2, verbose: int = 0) -> None:
        super().__init__(verbose)
        if isinstance(checkpoint_freq, bool) or not isinstance(checkpoint_freq, int) or checkpoint_freq < 0:
            raise ValueError(f"checkpoint_freq must be an int >= 0, got {checkpoint_freq!r}")
        self.store = CheckpointStore(directory, keep=keep)
        self.checkpoint_freq = checkpoint_freq
        self.metadata = dict(metadata)
        self.evaluation_callback = evaluation_callback
        self.save_replay_buffer = save_replay_buffer
        self.resume_from = resume_from
        self.last_checkpoint: Checkpoint | None = None
        self.write_failures: list[str] = []  # one line per checkpoint that could not be written
        self._next_checkpoint = 0
        self._wall_time_before = 0.0
        self._started = 0.0
        self._base_learning_starts = 0

    def _on_training_start(self) -> None:
        self._started = time.perf_counter()
        self._base_learning_starts = getattr(self.model, "learning_starts", 0)
        if self.resume_from is not None:
            self._restore(self.resume_from)
            self._next_checkpoint = self._next_multiple(self.num_timesteps)

    def _next_multiple(self, timestep: int) -> int | float:
        if self.checkpoint_freq == 0:
            return float("inf")
        return (timestep // self.checkpoint_freq + 1) * self.checkpoint_freq

    def _on_rollout_start(self) -> None:
        if self.checkpoint_freq > 0 and self.num_timesteps >= self._next_checkpoint:
            try:
                self.save()
            except CheckpointWriteError as error:
                self.write_failures.append(str(error))
                warnings.warn(f"{error}; training goes on", WriteFailedWarning, stacklevel=2)
            self._next_checkpoint = self._next_multiple(self.num_timesteps)

    def _on_step(self) -> bool:
        return True

    # -- writing ---------------------------------------------------------------------------------

    @property
    def wall_time(self) -> float:
        """Seconds spent training so far, over every session of the run."""
        return self._wall_time_before + (time.perf_counter() - self._started if self._started else 0.0)

    def _training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        model = self.model
        tensors, rng = capture_rng_state({"action_space": model.action_space.np_random})
        envs = {"train": env_states(self.training_env)}
        if self.evaluation_callback is not None and self.evaluation_callback.eval_env is not None:
            envs["eval"] = env_states(self.evaluation_callback.eval_env)
        state = {
            "rng": rng,
            "envs": envs,
            "evaluation": evaluation_state(self.evaluation_callback) if self.evaluation_callback else None,
            "base_learning_starts": self._base_learning_starts,
        }
        return tensors, state

    def save(self) -> Checkpoint:
        """Write a checkpoint now (the logs are flushed first).

        :raises CheckpointWriteError: if it cannot be written; the previous checkpoint stays the latest
        """
        flush_logs(self.logger)
        tensors, state = self._training_state()
        files: dict[str, Callable[[Path], None]] = {
            MODEL_FILE: lambda path: save_model(self.model, path),
            STATE_FILE: lambda path: save_tensors(path, tensors, state),
        }
        ring = getattr(self.evaluation_callback, "ring", None)
        if ring is not None:
            files[SNAPSHOTS_FILE] = lambda path: save_snapshot_ring(path, ring)
        retired = getattr(self.evaluation_callback, "retired", None)
        if retired is not None and len(retired):
            files[RETIRED_FILE] = lambda path: save_snapshot_ring(path, retired)
        if self.save_replay_buffer and getattr(self.model, "replay_buffer", None) is not None:
            files[REPLAY_BUFFER_FILE] = lambda path: save_replay_buffer(path, self.model.replay_buffer)
        metadata = {**self.metadata, "timestep": int(self.num_timesteps), "wall_time_s": round(self.wall_time, 3)}
        self.last_checkpoint = self.store.save(self.num_timesteps, files, metadata)
        if self.verbose >= 1:
            print(f"Checkpoint at timestep {self.num_timesteps}: {self.last_checkpoint.path}")
        return self.last_checkpoint

    # -- putting a checkpoint back -----------------------------------------------------------------

    def _restore(self, point: ResumePoint) -> None:
        model, state = self.model, point.state
        self._wall_time_before = float(point.checkpoint.metadata.get("wall_time_s", 0.0))
        if self.evaluation_callback is not None and state.get("evaluation") is not None:
            restore_evaluation_state(self.evaluation_callback, state["evaluation"])
            _refill(getattr(self.evaluation_callback, "ring", None), point.snapshots)
            _refill(getattr(self.evaluation_callback, "retired", None), point.retired)
            if self.evaluation_callback.eval_env is not None and "eval" in state["envs"]:
                restore_env_states(self.evaluation_callback.eval_env, state["envs"]["eval"])
        model._last_obs = restore_env_states(self.training_env, state["envs"]["train"])
        model._last_episode_starts = np.ones((self.training_env.num_envs,), dtype=bool)
        if isinstance(model, OffPolicyAlgorithm):
            self._base_learning_starts = int(state.get("base_learning_starts", model.learning_starts))
            self._continue_replay(model, REPLAY_BUFFER_FILE in point.checkpoint.files)
        restore_rng_state(point.rng_tensors, state["rng"], {"action_space": model.action_space.np_random})
        undo_log = getattr(model, "undo_log", None)
        if undo_log is not None:
            undo_log.note_external_change()  # the undo history from before the checkpoint is not in memory

    def _continue_replay(self, model: OffPolicyAlgorithm, buffer_restored: bool) -> None:
        buffer = model.replay_buffer
        if buffer_restored:
            model.learning_starts = self._base_learning_starts
            if model.optimize_memory_usage and (buffer.full or buffer.pos > 0):
                # The episode in progress is not continued: end it, as SB3 does (its issue #46).
                buffer.dones[(buffer.pos - 1) % buffer.buffer_size] = True
        else:
            # An empty buffer: collect learning_starts (at least a batch) of fresh transitions first.
            model.learning_starts = model.num_timesteps + max(self._base_learning_starts, model.batch_size)
