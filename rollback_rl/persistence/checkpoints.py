"""Durable checkpoints on disk: written atomically, verified by checksum, the previous one kept.

A checkpoint is a directory ``checkpoint-<step>/`` of files plus a ``manifest.json`` that lists each
file's size and SHA-256 and any JSON metadata (counters, callback state). :class:`CheckpointStore`
writes it into a temporary directory, fsyncs every file, renames the directory into place and only
then points ``LATEST`` at it and deletes checkpoints beyond ``keep``: a crash at any moment leaves the
previous checkpoint whole, and a half-written one is never taken for the latest. On loading, a
checkpoint whose files are missing, truncated or corrupted is skipped with a warning and the
previous good one is used.

A failed write (disk full, read-only folder) raises :class:`CheckpointWriteError` with the previous
checkpoint left whole and latest, so a training loop can warn and go on. Reading treats the folder as
data: a manifest is read within the size and nesting limits, may only name plain files of its own
checkpoint folder, and a symbolic link that leaves the folder is refused, never read.

Also here, the pieces of training state that are not tensors of the model: random-number-generator
states (:func:`capture_rng_state`) and an SB3-style replay buffer (:func:`save_replay_buffer`), both
stored without pickles. This module does not import Stable-Baselines3.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import uuid
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rollback_rl.persistence.limits import LimitExceeded, check_zip_members, one_line, quote
from rollback_rl.persistence.safe_io import (
    CorruptFileError,
    OutOfRangeError,
    SafeLoadError,
    UnsafeFileError,
    atomic_write,
    atomic_write_bytes,
    from_json_and_tensors,
    fsync_directory,
    load_json_file,
    load_tensors,
    open_regular_file,
    read_file_capped,
    to_json_and_tensors,
)

MANIFEST = "manifest.json"
LATEST = "LATEST"
_NAME = re.compile(r"checkpoint-(\d+)")
_TEMPORARY_PREFIX = ".tmp-checkpoint-"

#: What a checkpoint file is made from: its bytes, or a function that writes it to the path given.
FileContent = bytes | Callable[[Path], None]


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only folder); the previous one is kept and
    still the latest. A training loop can catch it, warn, and go on."""


def _is_plain_name(name: Any) -> bool:
    """Whether ``name`` is a plain file name that stays in its folder (no path, not hidden)."""
    return isinstance(name, str) and name not in (MANIFEST, "") and "/" not in name and "\\" not in name \
        and "\0" not in name and not name.startswith(".")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular_file(path) as file:
        for chunk in iter(lambda: file.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint on disk whose files matched their checksums when it was opened.

    :param step: the step it was saved at (e.g. environment timesteps)
    :param path: its directory
    :param metadata: the JSON metadata given to :meth:`CheckpointStore.save`
    :param files: file name -> SHA-256
    """

    step: int
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def file(self, name: str) -> Path:
        """Path of the checkpoint file ``name``."""
        if name not in self.files:
            raise KeyError(f"checkpoint {self.path} has no file {name!r} (it has {', '.join(sorted(self.files))})")
        return self.path / name

    def load_tensors(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``safe_io.load_tensors`` of the file ``name``."""
        return load_tensors(self.file(name))


class CheckpointStore:
    """Checkpoints of one run in ``run_dir``, the newest ``keep`` of them kept.

    One process writes a run directory at a time.

    :param run_dir: directory holding the ``checkpoint-<step>/`` directories (created if missing)
    :param keep: how many complete checkpoints to keep (2 leaves one to fall back to if the newest
        turns out corrupted)
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        self.run_dir = Path(run_dir)
        self.keep = keep

    def path_of(self, step: int) -> Path:
        return self.run_dir / f"checkpoint-{int(step)}"

    def steps(self) -> list[int]:
        """Steps of the checkpoint directories present (verified or not), oldest first."""
        if not self.run_dir.is_dir():
            return []
        found = [int(m[1]) for p in self.run_dir.iterdir()
                 if not p.is_symlink() and p.is_dir() and (m := _NAME.fullmatch(p.name))]
        return sorted(found)

    # -- writing ------------------------------------------------------------------------------------

    def save(self, step: int, files: Mapping[str, FileContent], metadata: Mapping[str, Any] | None = None) -> Checkpoint:
        """Write a checkpoint for ``step`` and make it the latest.

        :param step: the step to name it by (a non-negative int)
        :param files: file name -> bytes, or a function writing the file to the path it is given
            (e.g. ``lambda path: save_tensors(path, tensors, metadata)``)
        :param metadata: values stored in the manifest (counters, callback state): anything
            :func:`~rollback_rl.persistence.safe_io.to_json_and_tensors` stores except tensors (tuples come back
            as tuples); dataclasses must be turned into dicts first
        :return: the new checkpoint
        :raises CheckpointWriteError: if writing fails (``OSError``: disk full, no permission); nothing
            of the new checkpoint is left, and the previous one is still the latest
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        for name in files:
            if not _is_plain_name(name):
                raise ValueError(f"bad checkpoint file name {name!r}: a plain name, not {MANIFEST!r}")
        metadata = dict(metadata or {})
        encoded_metadata, metadata_tensors = to_json_and_tensors(metadata, "metadata")  # refuse before writing
        if metadata_tensors:
            raise TypeError(f"checkpoint metadata cannot hold tensors ({next(iter(metadata_tensors))}); "
                            "save them in a checkpoint file")
        try:
            return self._write(int(step), files, metadata, encoded_metadata)
        except CheckpointWriteError:
            raise
        except OSError as error:
            previous = self.steps()
            kept = f"checkpoint-{previous[-1]} is kept" if previous else "no earlier checkpoint exists"
            raise CheckpointWriteError(error.errno, f"cannot write the checkpoint of step {int(step)} in "
                                       f"{self.run_dir} ({error.strerror or error}); {kept}") from error

    def _write(self, step: int, files: Mapping[str, FileContent], metadata: dict[str, Any],
               encoded_metadata: Any) -> Checkpoint:
        if self.run_dir.is_symlink():  # planted: writing through it would write outside the run folder
            raise CheckpointWriteError(errno.ELOOP, f"{self.run_dir} is a symbolic link; refusing to write "
                                       "checkpoints through it")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.run_dir / f"{_TEMPORARY_PREFIX}{int(step)}-{uuid.uuid4().hex[:8]}"
        temporary.mkdir()
        try:
            checksums = {}
            for name, content in files.items():
                target = temporary / name
                if isinstance(content, (bytes, bytearray, memoryview)):
                    atomic_write_bytes(target, bytes(content))
                else:
                    content(target)
                    if not target.is_file():
                        raise RuntimeError(f"the writer of checkpoint file {name!r} did not write {target}")
                    _fsync_file(target)
                checksums[name] = {"sha256": _sha256(target), "bytes": target.stat().st_size}
            manifest = {"format": "rollback-rl/checkpoint/1", "step": int(step), "files": checksums,
                        "metadata": encoded_metadata}
            atomic_write_bytes(temporary / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
            fsync_directory(temporary)
            final = self.path_of(step)
            if final.exists():  # saving the same step again: move the old one aside, then drop it
                aside = self.run_dir / f"{_TEMPORARY_PREFIX}{int(step)}-replaced-{uuid.uuid4().hex[:8]}"
                os.replace(final, aside)
                try:
                    os.replace(temporary, final)
                except OSError:
                    os.replace(aside, final)  # put the old one back before giving up
                    raise
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(temporary, final)
            fsync_directory(self.run_dir)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        atomic_write_bytes(self.run_dir / LATEST, f"{final.name}\n".encode())
        self._prune(current=int(step))
        return Checkpoint(int(step), final, metadata, {n: c["sha256"] for n, c in checksums.items()})

    def _prune(self, current: int) -> None:
        """Delete checkpoints beyond the ``keep`` newest (never ``current``) and leftover temporaries.

        A checkpoint that cannot be deleted stays (one more to fall back to); the save still succeeded.
        """
        steps = [s for s in self.steps() if s != current]
        for step in steps[:max(0, len(steps) - (self.keep - 1))]:
            # Renamed first: a crash in the middle of rmtree must not leave a half-deleted checkpoint-<step>.
            doomed = self.run_dir / f"{_TEMPORARY_PREFIX}{int(step)}-pruned-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(self.path_of(step), doomed)
            except OSError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)
        for leftover in self.run_dir.glob(f"{_TEMPORARY_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    # -- reading ------------------------------------------------------------------------------------

    def load(self, step: int) -> Checkpoint:
        """The checkpoint of ``step``, verified: every file present with its size and SHA-256.

        Raises :class:`~rollback_rl.persistence.safe_io.CorruptFileError` if it is incomplete or corrupted.
        """
        path = self.path_of(step)
        if path.is_symlink():
            raise UnsafeFileError(f"{path}: a symbolic link; refusing to read a checkpoint through it")
        manifest_path = path / MANIFEST
        try:
            manifest = load_json_file(manifest_path)
        except FileNotFoundError:
            raise CorruptFileError(f"{path}: incomplete checkpoint (no {MANIFEST})") from None
        if not isinstance(manifest, dict) or manifest.get("step") != int(step) or not isinstance(manifest.get("files"), dict):
            raise CorruptFileError(f"{manifest_path}: corrupted manifest (not a manifest of step {step})")
        for name, expected in manifest["files"].items():
            if not _is_plain_name(name) or not isinstance(expected, dict):
                raise CorruptFileError(f"{manifest_path}: corrupted manifest (it lists {quote(name, 60)}, "
                                       "which is not a plain file name of the checkpoint)")
            file = path / name
            if not file.is_file():
                raise CorruptFileError(f"{file}: missing from its checkpoint")
            size = file.stat().st_size
            if size != expected.get("bytes"):
                raise CorruptFileError(f"{file}: truncated or corrupted ({size} bytes, "
                                       f"{quote(expected.get('bytes'), 24)} written)")
            if _sha256(file) != expected["sha256"]:
                raise CorruptFileError(f"{file}: corrupted (SHA-256 differs from the one written)")
        try:
            metadata = from_json_and_tensors(manifest.get("metadata", {}), {})
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise CorruptFileError(f"{manifest_path}: corrupted manifest metadata ({type(error).__name__})") from None
        return Checkpoint(int(step), path, metadata, {n: e["sha256"] for n, e in manifest["files"].items()})

    def candidate_steps(self) -> Iterator[int]:
        """Steps to try loading, best first: the one ``LATEST`` names (the last save that completed),
        then the others, newest first."""
        pointed = None
        try:
            match = _NAME.fullmatch(read_file_capped(self.run_dir / LATEST, 256, "256 bytes").decode().strip())
            pointed = int(match[1]) if match else None
        except (OSError, UnicodeDecodeError, SafeLoadError):
            pass
        steps = self.steps()
        if pointed in steps:
            yield pointed
        yield from (s for s in reversed(steps) if s != pointed)

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies, or ``None`` if there is none.

        ``LATEST`` names the last checkpoint whose save completed (so a run resumed from an older
        checkpoint continues from its own). A checkpoint that does not verify is skipped with a
        warning, and the next newest is tried.
        """
        for step in self.candidate_steps():
            try:
                return self.load(step)
            except (SafeLoadError, OSError, KeyError, TypeError, ValueError) as error:
                warnings.warn(f"skipping checkpoint {self.path_of(step)}: {error}", stacklevel=2)
        return None


# -- random-number-generator states -------------------------------------------------------------

def capture_rng_state(generators: Mapping[str, np.random.Generator] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The states of torch's, numpy's and Python's global generators, and of ``generators``.

    :param generators: further numpy generators by name, e.g. ``{"action_space":
        model.action_space.np_random}`` (DQN explores with it)
    :return: ``(tensors, metadata)`` for :func:`~rollback_rl.persistence.safe_io.save_tensors`; give both to
        :func:`restore_rng_state`
    """
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{index}"] = state
    metadata = {
        "python": to_json_and_tensors(random.getstate(), "python")[0],
        "numpy": to_json_and_tensors(np.random.get_state(), "numpy")[0],
        "generators": {name: to_json_and_tensors(g.bit_generator.state, name)[0]
                       for name, g in (generators or {}).items()},
        "cuda_devices": sum(1 for name in tensors if name.startswith("rng/cuda/")),
    }
    return tensors, metadata


def restore_rng_state(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any],
                      generators: Mapping[str, np.random.Generator] | None = None) -> None:
    """Put back the states :func:`capture_rng_state` took (into ``generators`` for the named ones)."""
    torch.set_rng_state(tensors["rng/torch"])
    if metadata.get("cuda_devices") and torch.cuda.is_available():
        states = [tensors[f"rng/cuda/{i}"] for i in range(metadata["cuda_devices"])]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
        else:
            warnings.warn(f"CUDA generator states saved for {len(states)} devices, {torch.cuda.device_count()} "
                          "present: not restored", stacklevel=2)
    random.setstate(from_json_and_tensors(metadata["python"], {}))
    np.random.set_state(from_json_and_tensors(metadata["numpy"], {}))
    for name, generator in (generators or {}).items():
        if name not in metadata["generators"]:
            raise KeyError(f"no saved state for generator {name!r} (saved: {sorted(metadata['generators'])})")
        generator.bit_generator.state = from_json_and_tensors(metadata["generators"][name], {})


# -- replay buffers ------------------------------------------------------------------------------

_REPLAY_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


def _replay_arrays(buffer: Any) -> dict[str, np.ndarray]:
    arrays = {}
    for name in _REPLAY_ARRAYS:
        value = getattr(buffer, name, None)
        if isinstance(value, dict):  # DictReplayBuffer
            arrays.update({f"{name}/{key}": array for key, array in value.items()})
        elif value is not None:  # next_observations is None with optimize_memory_usage
            arrays[name] = value
    return arrays


def save_replay_buffer(path: str | os.PathLike, buffer: Any) -> None:
    """Write an SB3 ``ReplayBuffer``'s (or ``DictReplayBuffer``'s) contents to an ``.npz``, atomically.

    Stores the arrays (observations, next_observations, actions, rewards, dones, timeouts) and the
    ``pos`` and ``full`` counters, no pickles; the buffer's settings come from the model.
    """
    arrays = _replay_arrays(buffer)
    with atomic_write(path) as file:
        np.savez(file, pos=np.asarray(buffer.pos, dtype=np.int64), full=np.asarray(buffer.full), **arrays)


def _read_npz_array(archive: zipfile.ZipFile, name: str, expected: np.ndarray, path: str) -> np.ndarray:
    """Array ``name`` of an ``.npz``, its shape and dtype checked against ``expected`` from its header
    before its data is read: a forged header cannot make it allocate more than the buffer holds."""
    member = f"{name}.npy"
    if member not in archive.NameToInfo:
        raise CorruptFileError(f"{path}: no {name!r} array; it does not fit this replay buffer")
    with archive.open(member) as stream:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(stream)
        if dtype.hasobject:
            raise UnsafeFileError(f"{path}: pickle content detected in array {name!r} (Python objects); "
                                  "refusing to load it")
        if tuple(shape) != expected.shape or dtype != expected.dtype:
            raise CorruptFileError(f"{path}: array {name!r} is {dtype}{list(shape)[:8]}, the buffer's is "
                                   f"{expected.dtype}{list(expected.shape)}")
        data = stream.read(expected.nbytes)
        if len(data) != expected.nbytes:
            raise CorruptFileError(f"{path}: array {name!r} is truncated")
    order = "F" if fortran_order else "C"
    return np.frombuffer(data, dtype=dtype).reshape(expected.shape, order=order)


def load_replay_buffer(path: str | os.PathLike, buffer: Any) -> None:
    """Fill ``buffer`` (built by the model with the same settings) from :func:`save_replay_buffer`'s file.

    Each array's shape and dtype are checked against the buffer's from its header before it is read.
    Raises :class:`~rollback_rl.persistence.safe_io.UnsafeFileError` for pickled content (refused, not run) and
    :class:`~rollback_rl.persistence.safe_io.CorruptFileError` for a truncated or corrupted file, or one whose
    arrays do not fit ``buffer``.
    """
    expected = {**_replay_arrays(buffer), "pos": np.asarray(0, dtype=np.int64), "full": np.asarray(False)}
    loaded = {}
    with open_regular_file(path) as file:
        start = file.read(4)
        if start[:1] == b"\x80":
            raise UnsafeFileError(f"{path}: pickle content detected; refusing to load it")
        if start != b"PK\x03\x04":
            raise CorruptFileError(f"{path}: not an .npz replay buffer file (truncated or corrupted?)")
        file.seek(0)
        try:
            with zipfile.ZipFile(file) as archive:
                check_zip_members(archive, limit=4 * len(expected))
                for name, target in expected.items():
                    loaded[name] = _read_npz_array(archive, name, target, str(path))
        except SafeLoadError:
            raise
        except LimitExceeded as error:
            raise OutOfRangeError(f"{path}: {error}") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError, RuntimeError) as error:
            raise CorruptFileError(f"{path}: truncated or corrupted replay buffer ({type(error).__name__}: "
                                   f"{one_line(str(error), 120)})") from None
    for name, target in _replay_arrays(buffer).items():
        target[...] = loaded[name]
    buffer.pos = int(loaded["pos"])
    buffer.full = bool(loaded["full"])
