"""Durable checkpoints on disk: written atomically, verified by checksum, the previous one kept.

A checkpoint is a directory ``checkpoint-<step>/`` of files plus a ``manifest.json`` that lists each
file's size and SHA-256 and any JSON metadata (counters, callback state). :class:`CheckpointStore`
writes it into a temporary directory, fsyncs every file, renames the directory into place and only
then points ``LATEST`` at it and deletes checkpoints beyond ``keep``: a crash at any moment leaves the
previous checkpoint whole, and a half-written one is never taken for the latest. On loading, a
checkpoint whose files are missing, truncated or corrupted is skipped with a warning and the
previous good one is used.

Also here, the pieces of training state that are not tensors of the model: random-number-generator
states (:func:`capture_rng_state`) and an SB3-style replay buffer (:func:`save_replay_buffer`), both
stored without pickles. This module does not import Stable-Baselines3.
"""

from __future__ import annotations

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

from rollback_rl.safe_io import (
    CorruptFileError,
    SafeLoadError,
    UnsafeFileError,
    atomic_write,
    atomic_write_bytes,
    from_json_and_tensors,
    fsync_directory,
    load_tensors,
    to_json_and_tensors,
)

MANIFEST = "manifest.json"
LATEST = "LATEST"
_NAME = re.compile(r"checkpoint-(\d+)")
_TEMPORARY_PREFIX = ".tmp-checkpoint-"

#: What a checkpoint file is made from: its bytes, or a function that writes it to the path given.
FileContent = bytes | Callable[[Path], None]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
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
        found = [int(m[1]) for p in self.run_dir.iterdir() if p.is_dir() and (m := _NAME.fullmatch(p.name))]
        return sorted(found)

    # -- writing ------------------------------------------------------------------------------------

    def save(self, step: int, files: Mapping[str, FileContent], metadata: Mapping[str, Any] | None = None) -> Checkpoint:
        """Write a checkpoint for ``step`` and make it the latest.

        :param step: the step to name it by (a non-negative int)
        :param files: file name -> bytes, or a function writing the file to the path it is given
            (e.g. ``lambda path: save_tensors(path, tensors, metadata)``)
        :param metadata: values stored in the manifest (counters, callback state): anything
            :func:`~rollback_rl.safe_io.to_json_and_tensors` stores except tensors (tuples come back
            as tuples); dataclasses must be turned into dicts first
        :return: the new checkpoint
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        for name in files:
            if not isinstance(name, str) or name in (MANIFEST, "") or "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"bad checkpoint file name {name!r}: a plain name, not {MANIFEST!r}")
        metadata = dict(metadata or {})
        encoded_metadata, metadata_tensors = to_json_and_tensors(metadata, "metadata")  # refuse before writing
        if metadata_tensors:
            raise TypeError(f"checkpoint metadata cannot hold tensors ({next(iter(metadata_tensors))}); "
                            "save them in a checkpoint file")
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
                os.replace(temporary, final)
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
        """Delete checkpoints beyond the ``keep`` newest (never ``current``) and leftover temporaries."""
        steps = [s for s in self.steps() if s != current]
        for step in steps[:max(0, len(steps) - (self.keep - 1))]:
            # Renamed first: a crash in the middle of rmtree must not leave a half-deleted checkpoint-<step>.
            doomed = self.run_dir / f"{_TEMPORARY_PREFIX}{int(step)}-pruned-{uuid.uuid4().hex[:8]}"
            os.replace(self.path_of(step), doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        for leftover in self.run_dir.glob(f"{_TEMPORARY_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)

    # -- reading ------------------------------------------------------------------------------------

    def load(self, step: int) -> Checkpoint:
        """The checkpoint of ``step``, verified: every file present with its size and SHA-256.

        Raises :class:`~rollback_rl.safe_io.CorruptFileError` if it is incomplete or corrupted.
        """
        path = self.path_of(step)
        manifest_path = path / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except FileNotFoundError:
            raise CorruptFileError(f"{path}: incomplete checkpoint (no {MANIFEST})") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CorruptFileError(f"{manifest_path}: corrupted manifest ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("step") != int(step) or not isinstance(manifest.get("files"), dict):
            raise CorruptFileError(f"{manifest_path}: corrupted manifest (not a manifest of step {step})")
        for name, expected in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise CorruptFileError(f"{file}: missing from its checkpoint")
            size = file.stat().st_size
            if size != expected["bytes"]:
                raise CorruptFileError(f"{file}: truncated or corrupted ({size} bytes, {expected['bytes']} written)")
            if _sha256(file) != expected["sha256"]:
                raise CorruptFileError(f"{file}: corrupted (SHA-256 differs from the one written)")
        return Checkpoint(int(step), path, from_json_and_tensors(manifest.get("metadata", {}), {}),
                          {n: e["sha256"] for n, e in manifest["files"].items()})

    def candidate_steps(self) -> Iterator[int]:
        """Steps to try loading, best first: the one ``LATEST`` names (the last save that completed),
        then the others, newest first."""
        pointed = None
        try:
            match = _NAME.fullmatch((self.run_dir / LATEST).read_text().strip())
            pointed = int(match[1]) if match else None
        except (OSError, UnicodeDecodeError):
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
            except (SafeLoadError, OSError, KeyError, TypeError) as error:
                warnings.warn(f"skipping checkpoint {self.path_of(step)}: {error}", stacklevel=2)
        return None


# -- random-number-generator states -------------------------------------------------------------

def capture_rng_state(generators: Mapping[str, np.random.Generator] | None = None
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The states of torch's, numpy's and Python's global generators, and of ``generators``.

    :param generators: further numpy generators by name, e.g. ``{"action_space":
        model.action_space.np_random}`` (DQN explores with it)
    :return: ``(tensors, metadata)`` for :func:`~rollback_rl.safe_io.save_tensors`; give both to
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


def load_replay_buffer(path: str | os.PathLike, buffer: Any) -> None:
    """Fill ``buffer`` (built by the model with the same settings) from :func:`save_replay_buffer`'s file.

    Raises :class:`~rollback_rl.safe_io.UnsafeFileError` for pickled content (refused, not run) and
    :class:`~rollback_rl.safe_io.CorruptFileError` for a truncated or corrupted file, or one whose
    arrays do not fit ``buffer``.
    """
    targets = _replay_arrays(buffer)
    with open(path, "rb") as file:
        start = file.read(4)
    if start[:1] == b"\x80":
        raise UnsafeFileError(f"{path}: pickle content detected; refusing to load it")
    if start != b"PK\x03\x04":
        raise CorruptFileError(f"{path}: not an .npz replay buffer file (truncated or corrupted?)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = sorted(set(targets) - set(archive.files))
            if missing:
                raise CorruptFileError(f"{path}: no {missing[0]!r} array; it does not fit this replay buffer")
            loaded = {name: archive[name] for name in [*targets, "pos", "full"]}
    except SafeLoadError:
        raise
    except ValueError as error:  # numpy refuses pickled objects when allow_pickle=False
        if "pickle" in str(error):
            raise UnsafeFileError(f"{path}: pickle content detected; refusing to load it ({error})") from None
        raise CorruptFileError(f"{path}: corrupted replay buffer ({error})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as error:
        raise CorruptFileError(f"{path}: truncated or corrupted replay buffer ({type(error).__name__}: {error})") from None
    for name, target in targets.items():
        if loaded[name].shape != target.shape or loaded[name].dtype != target.dtype:
            raise CorruptFileError(f"{path}: array {name!r} is {loaded[name].dtype}{list(loaded[name].shape)}, "
                                   f"the buffer's is {target.dtype}{list(target.shape)}")
    for name, target in targets.items():
        target[...] = loaded[name]
    buffer.pos = int(loaded["pos"])
    buffer.full = bool(loaded["full"])
