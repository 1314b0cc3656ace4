"""Files that load without executing code: atomic writes, safetensors with JSON metadata, snapshot rings.

Every file rollback-rl writes holds tensors in the safetensors format and everything else as JSON in
the safetensors header, so loading one never unpickles anything. A SHA-256 of the metadata and of
every tensor's bytes is stored beside them: a truncated, bit-flipped or otherwise corrupted file is
refused with :class:`CorruptFileError`, and a pickle (or a ``torch.save`` archive, which holds one) is
refused with :class:`UnsafeFileError` without being unpickled. Both, and :class:`OutOfRangeError`, are
:class:`SafeLoadError` (a ``ValueError``), whose one-line message names the file and says what is wrong
with it, without quoting the file's contents.

Writes are atomic: the data goes to a fresh temporary file in the same directory, is flushed and
fsynced, and only then replaces the target (``os.replace``), so a crash leaves either the old file or
the new one, never half of one. A rename replaces whatever the target was, a symbolic link planted in a
run folder included, so a write never goes through a link to a file outside the folder. Reads go
through :func:`open_regular_file`, which refuses a link that leaves its folder and anything that is not
a regular file (``/dev/zero``, a pipe), and read no more than the limits of
:mod:`rollback_rl.persistence.limits` allow: a file over a limit is refused with
:class:`OutOfRangeError` before it is read whole.

Nested values that are not plain JSON (tuples, dicts with int keys, numpy arrays, tensors inside
optimizer state) go through :func:`to_json_and_tensors` / :func:`from_json_and_tensors`, which
round-trip them exactly.

This module does not import Stable-Baselines3.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import struct
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

from rollback_rl.core.snapshots import Snapshot, SnapshotRing
from rollback_rl.persistence.limits import (
    MAX_HEADER_BYTES,
    MAX_JSON_BYTES,
    MAX_TENSOR_FILE_BYTES,
    LimitExceeded,
    check_size,
    describe_json_error,
    loads_json,
    one_line,
    quote,
    read_capped,
)

FORMAT = "rollback-rl/1"
_METADATA_KEY = "rollback_rl"
_CHECKSUM_KEY = "rollback_rl_sha256"
_METADATA_TENSORS = "__metadata__/"  # where tensors found inside the metadata are stored


class SafeLoadError(ValueError):
    """A file rollback-rl was asked to load cannot be loaded safely and intact.

    The message is one line of at most ``limits.MAX_MESSAGE_CHARS`` characters, whatever it was given.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class UnsafeFileError(SafeLoadError):
    """The file would execute code if loaded the usual way (it holds a pickle): refused unread."""


class CorruptFileError(SafeLoadError):
    """The file is truncated, corrupted, or not a file rollback-rl wrote."""


class OutOfRangeError(SafeLoadError):
    """The file, or a value in it, is outside what rollback-rl accepts: a size over a limit of
    :mod:`rollback_rl.persistence.limits`, or a setting outside the range the hyperparameter checker
    allows. Refused before anything of that size is allocated; the message names the limit."""


class WriteFailedWarning(RuntimeWarning):
    """A file of a run could not be written (disk full, read-only folder); training can go on without it."""


# -- atomic writes, and reads that stay in their folder -------------------------------------------

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # 0 where the platform has none (Windows)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a rename or creation inside directory ``path`` durable (a no-op where unsupported)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open a temporary file beside ``path`` for binary writing; it replaces ``path`` on success.

    On leaving the block without an exception the file is flushed, fsynced and renamed over
    ``path`` (and the directory fsynced). On an exception the temporary file is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        # A fresh file (O_EXCL), never a link followed (O_NOFOLLOW): the rename then replaces ``path``,
        # whatever it is, rather than writing into what it points at.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        with os.fdopen(descriptor, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as file:
        file.write(data)


def refuse_link_out_of_folder(path: str | os.PathLike) -> None:
    """Raise :class:`UnsafeFileError` if ``path`` is a symbolic link to somewhere outside its folder.

    A run folder is data: a link in it to ``/etc/passwd`` or ``~/.ssh/id_rsa`` must not get that file
    read (nor quoted in an error message). Links within the folder are allowed.
    """
    path = Path(path)
    if not path.is_symlink():
        return
    folder = path.parent.resolve()
    if not path.resolve().is_relative_to(folder):
        raise UnsafeFileError(f"{path}: a symbolic link to a file outside its folder; refusing to read it")


def open_regular_file(path: str | os.PathLike) -> IO[bytes]:
    """``open(path, "rb")``, refusing a link that leaves the folder (:func:`refuse_link_out_of_folder`)
    and anything but a regular file (a device such as ``/dev/zero``, a pipe, a folder).

    :raises UnsafeFileError: for such a link
    :raises CorruptFileError: for something that is not a regular file
    :raises OSError: if it cannot be opened (missing, no permission)
    """
    path = Path(path)
    refuse_link_out_of_folder(path)
    target = path.resolve() if path.is_symlink() else path
    # O_NONBLOCK: opening a pipe must not wait for a writer; it is refused just below anyway.
    descriptor = os.open(target, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise CorruptFileError(f"{path}: not a regular file")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_file_capped(path: str | os.PathLike, limit: int, limit_name: str) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular_file`), or
    :class:`OutOfRangeError` if it is over ``limit`` bytes, checked before reading."""
    with open_regular_file(path) as file:
        try:
            return read_capped(file, limit, "the file", limit_name)
        except LimitExceeded as error:
            raise OutOfRangeError(f"{path}: {error}") from None


def load_json_file(path: str | os.PathLike, limit: int = MAX_JSON_BYTES, limit_name: str = "MAX_JSON_BYTES") -> Any:
    """The JSON value in ``path`` (run.json, a manifest), read within the size and nesting limits.

    :raises OutOfRangeError: if over ``limit`` bytes or nested deeper than ``MAX_NESTING_DEPTH``
    :raises CorruptFileError: if it is not UTF-8 JSON
    :raises UnsafeFileError: if it is a link out of its folder
    :raises OSError: if it cannot be read
    """
    data = read_file_capped(path, limit, limit_name)
    try:
        return loads_json(data, limit, limit_name)
    except LimitExceeded as error:
        raise OutOfRangeError(f"{path}: {error}") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise CorruptFileError(f"{path}: {describe_json_error(error)}") from None


# -- nested values as JSON plus tensors ---------------------------------------------------------

_TAGS = ("__tensor__", "__tuple__", "__items__", "__ndarray__", "__numpy__")


def to_json_and_tensors(value: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested value into a JSON-able skeleton and the tensors it holds.

    Tensors become ``{"__tensor__": name}`` (named ``prefix/<path>``, moved to the CPU); tuples,
    dicts with non-string keys, numpy arrays and numpy scalars are tagged so that
    :func:`from_json_and_tensors` gives back equal values of the same types. Floats, including NaN and
    infinities, round-trip exactly. Anything else (a class, a function) raises ``TypeError``.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(item: Any, where: str) -> Any:
        if isinstance(item, torch.Tensor):
            tensors[where] = item.detach().cpu()
            return {"__tensor__": where}
        if item is None or isinstance(item, (bool, int, float, str)):
            return item
        if isinstance(item, np.ndarray):
            if item.dtype.kind not in "biuf":
                raise TypeError(f"{where}: cannot store a numpy array of dtype {item.dtype}")
            return {"__ndarray__": item.tolist(), "dtype": item.dtype.str, "shape": list(item.shape)}
        if isinstance(item, np.generic):
            return {"__numpy__": item.item(), "dtype": item.dtype.str}
        if isinstance(item, tuple):
            return {"__tuple__": [encode(v, f"{where}/{i}") for i, v in enumerate(item)]}
        if isinstance(item, list):
            return [encode(v, f"{where}/{i}") for i, v in enumerate(item)]
        if isinstance(item, Mapping):
            if all(isinstance(k, str) and k not in _TAGS for k in item):
                return {k: encode(v, f"{where}/{k}") for k, v in item.items()}
            return {"__items__": [[encode(k, f"{where}/key"), encode(v, f"{where}/{k}")] for k, v in item.items()]}
        raise TypeError(f"{where}: cannot store a {type(item).__name__} without pickling it")

    return encode(value, prefix), tensors


def numeric_dtype(text: Any) -> np.dtype:
    """The numpy dtype named ``text`` if it is a plain number type (bool, int, uint, float), else ``ValueError``.

    A dtype string read from a file could otherwise name a structured or sub-array type of gigabytes
    per element (``"(100000,100000)f8"``), or Python objects.
    """
    dtype = np.dtype(str(text))
    if dtype.kind not in "biuf" or dtype.subdtype is not None or dtype.itemsize > 16:
        raise ValueError(f"not a plain numeric dtype: {quote(text)}")
    return dtype


def from_json_and_tensors(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`to_json_and_tensors`; a skeleton that it did not write raises ``KeyError``,
    ``TypeError`` or ``ValueError``."""
    if isinstance(skeleton, list):
        return [from_json_and_tensors(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        name = skeleton["__tensor__"]
        if name not in tensors:
            raise KeyError(f"tensor {quote(name)} is referenced by the metadata but missing from the file")
        return tensors[name]
    if "__tuple__" in skeleton:
        return tuple(from_json_and_tensors(v, tensors) for v in skeleton["__tuple__"])
    if "__items__" in skeleton:
        return {from_json_and_tensors(k, tensors): from_json_and_tensors(v, tensors) for k, v in skeleton["__items__"]}
    if "__ndarray__" in skeleton:
        return np.array(skeleton["__ndarray__"], dtype=numeric_dtype(skeleton["dtype"])).reshape(skeleton["shape"])
    if "__numpy__" in skeleton:
        return numeric_dtype(skeleton["dtype"]).type(skeleton["__numpy__"])
    return {k: from_json_and_tensors(v, tensors) for k, v in skeleton.items()}


# -- safetensors files with JSON metadata -------------------------------------------------------

def _checksum(metadata_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(metadata_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> bytes:
    """The bytes of a safetensors file holding ``tensors``, ``metadata`` and their checksum.

    ``metadata`` may hold anything :func:`to_json_and_tensors` stores (tensors in it are stored
    beside the others, under ``__metadata__/``).
    """
    skeleton, metadata_tensors = to_json_and_tensors(dict(metadata), _METADATA_TENSORS)
    clashes = [name for name in tensors if name.startswith(_METADATA_TENSORS)]
    if clashes:
        raise ValueError(f"tensor names starting with {_METADATA_TENSORS!r} are reserved (got {clashes[0]!r})")
    tensors = {name: t.detach().cpu().contiguous() for name, t in {**tensors, **metadata_tensors}.items()}
    metadata_json = json.dumps(skeleton)
    header = {"format": FORMAT, _METADATA_KEY: metadata_json, _CHECKSUM_KEY: _checksum(metadata_json, tensors)}
    return safetensors.torch.save(tensors, metadata=header)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write ``tensors`` and ``metadata`` (see :func:`tensors_to_bytes`) to ``path``, atomically."""
    atomic_write_bytes(path, tensors_to_bytes(tensors, metadata))


def _refuse_pickles(data: bytes, name: str) -> None:
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        raise UnsafeFileError(f"{name}: pickle content detected; refusing to load it (rollback-rl files are "
                              "safetensors and never run code when loaded)")
    if data[:4] == b"PK\x03\x04":
        raise UnsafeFileError(f"{name}: pickle content detected (a zip archive, as written by torch.save or "
                              "SB3's model.save); refusing to load it as a rollback-rl file (use "
                              "rollback_rl.persistence.safe_model.load_sb3_zip_safely for SB3 .zip files)")


def _check_header_length(prefix: bytes, file_size: int, name: str) -> int:
    """The header length the first 8 bytes of a safetensors file give, checked against the limit and
    the file's size; the number itself is never printed (it is the file's first bytes)."""
    if file_size < 8:
        raise CorruptFileError(f"{name}: truncated ({file_size} bytes; a safetensors file starts with an "
                               "8-byte header length)")
    (header_length,) = struct.unpack("<Q", prefix[:8])
    if header_length > MAX_HEADER_BYTES:
        raise CorruptFileError(f"{name}: not a safetensors file (its header length field is over the "
                               f"limit of {MAX_HEADER_BYTES:,} bytes, MAX_HEADER_BYTES)")
    if 8 + header_length > file_size:
        raise CorruptFileError(f"{name}: truncated or not a safetensors file (its header length field "
                               f"is larger than the file, {file_size:,} bytes)")
    return header_length


def _loads_metadata_json(text: str | bytes, name: str, what: str) -> Any:
    try:
        return loads_json(text, MAX_HEADER_BYTES, "MAX_HEADER_BYTES")
    except LimitExceeded as error:
        raise OutOfRangeError(f"{name}: {what}: {error}") from None
    except ValueError as error:
        raise CorruptFileError(f"{name}: bad {what} ({describe_json_error(error)})") from None


def tensors_from_bytes(data: bytes, name: str = "<bytes>") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`tensors_to_bytes`: ``(tensors, metadata)``, or a :class:`SafeLoadError`."""
    _refuse_pickles(data, name)
    header_length = _check_header_length(data[:8], len(data), name)
    header = _loads_metadata_json(data[8:8 + header_length], name, "safetensors header")
    if not isinstance(header, dict):
        raise CorruptFileError(f"{name}: bad safetensors header (not a JSON object)")
    header_metadata = header.get("__metadata__") or {}
    if not isinstance(header_metadata, dict) or _METADATA_KEY not in header_metadata:
        raise CorruptFileError(f"{name}: not a rollback-rl file (its safetensors header has no rollback-rl metadata)")
    if header_metadata.get("format") != FORMAT:
        raise CorruptFileError(f"{name}: unknown format {quote(header_metadata.get('format'))} (expected {FORMAT!r})")
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as error:
        raise CorruptFileError(f"{name}: truncated or corrupted safetensors data "
                               f"({one_line(str(error), 160)})") from None
    metadata_json = header_metadata[_METADATA_KEY]
    if not isinstance(metadata_json, str) or header_metadata.get(_CHECKSUM_KEY) != _checksum(metadata_json, tensors):
        raise CorruptFileError(f"{name}: checksum mismatch (the file was corrupted or changed after it was written)")
    skeleton = _loads_metadata_json(metadata_json, name, "metadata")
    try:
        metadata = from_json_and_tensors(skeleton, tensors)
    except (KeyError, TypeError, ValueError, OverflowError) as error:  # a forged checksum
        raise CorruptFileError(f"{name}: bad metadata ({type(error).__name__}: {one_line(str(error), 160)})") from None
    return {k: v for k, v in tensors.items() if not k.startswith(_METADATA_TENSORS)}, metadata


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`: ``(tensors on the CPU, metadata)``.

    The file's size (at most ``MAX_TENSOR_FILE_BYTES``) and header length are checked before the rest
    is read. Raises :class:`UnsafeFileError` for a pickle or ``torch.save`` archive (nothing of it is
    run) or a link out of the folder, :class:`OutOfRangeError` for a file over a limit, and
    :class:`CorruptFileError` for a truncated, corrupted or foreign file.
    """
    name = str(path)
    with open_regular_file(path) as file:
        size = os.fstat(file.fileno()).st_size
        try:
            check_size(size, MAX_TENSOR_FILE_BYTES, "the file", "MAX_TENSOR_FILE_BYTES")
        except LimitExceeded as error:
            raise OutOfRangeError(f"{name}: {error}") from None
        prefix = file.read(8)
        _refuse_pickles(prefix, name)
        _check_header_length(prefix, size, name)
        data = prefix + file.read(size - len(prefix))
    return tensors_from_bytes(data, name)


def load_torch_file(file: str | os.PathLike | IO[bytes], name: str | None = None) -> Any:
    """``torch.load(file, weights_only=True)`` on the CPU, with a clear error for what it refuses.

    ``weights_only`` unpickles with an allow-list of tensor types and plain containers, so a crafted
    pickle cannot run code; this turns its refusal into :class:`UnsafeFileError`.
    """
    name = name or str(getattr(file, "name", file))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # any protocol is refused alike
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (torch raises many types; each becomes one of ours)
        text = str(error)
        if "Weights only load failed" in text or "Unsupported global" in text or "Unsupported operand" in text:
            first_reason = next((line.strip() for line in text.splitlines() if "Unsupported" in line), "")
            raise UnsafeFileError(f"{name}: refused: it holds pickled objects that could run code when loaded"
                                  + (f" ({one_line(first_reason, 120)})" if first_reason else "")) from None
        raise CorruptFileError(f"{name}: truncated or corrupted torch file ({type(error).__name__}: "
                               f"{one_line(text.splitlines()[0], 120) if text else ''})") from None


# -- snapshot rings -----------------------------------------------------------------------------

def save_snapshot_ring(path: str | os.PathLike, ring: SnapshotRing) -> None:
    """Write every snapshot of ``ring`` (oldest first) to one safetensors file, atomically.

    Each snapshot keeps its tensors, timestep, score, episode returns and the optimizer bookkeeping
    (per-parameter state keys, param groups) that :meth:`SnapshotRing.restore` needs.
    """
    tensors: dict[str, torch.Tensor] = {}
    snapshots = []
    for index, snapshot in enumerate(ring):
        for key, tensor in snapshot.tensors.items():
            tensors[f"snapshot/{index}/{key}"] = tensor
        snapshots.append({
            "timestep": snapshot.timestep,
            "score": snapshot.score,
            "episode_returns": None if snapshot.episode_returns is None else snapshot.episode_returns.tolist(),
            "tensor_keys": list(snapshot.tensors),
            "optimizer_tensor_keys": snapshot.optimizer_tensor_keys,
            "optimizer_values": snapshot.optimizer_values,
        })
    save_tensors(path, tensors, {"kind": "snapshot_ring", "capacity": ring.capacity, "snapshots": snapshots})


def load_snapshot_ring(path: str | os.PathLike, ring: SnapshotRing | int | None = None,
                       device: str | torch.device | None = None) -> SnapshotRing:
    """Read a file written by :func:`save_snapshot_ring` into a ring, oldest snapshot first.

    :param ring: the ring to fill (its snapshots are cleared first), a capacity for a new ring, or
        ``None`` for a new ring of the saved capacity. Where the ring holds fewer snapshots than the
        file, the newest are kept.
    :param device: where to put the snapshot buffers: default ``ring.device``, else the CPU. For a
        model on a GPU in a ring without a device, pass the model's device.
    """
    tensors, metadata = load_tensors(path)
    if metadata.get("kind") != "snapshot_ring":
        raise CorruptFileError(f"{path}: not a snapshot ring file (it holds a {metadata.get('kind')!r})")
    if ring is None or isinstance(ring, int):
        ring = SnapshotRing(ring or metadata["capacity"])
    ring.clear()
    device = torch.device(device) if device is not None else ring.device or torch.device("cpu")
    try:
        for index, saved in enumerate(metadata["snapshots"]):
            buffers = {key: tensors[f"snapshot/{index}/{key}"].to(device) for key in saved["tensor_keys"]}
            returns = saved["episode_returns"]
            snapshot = Snapshot(
                timestep=int(saved["timestep"]),
                score=float(saved["score"]),
                episode_returns=None if returns is None else np.asarray(returns, dtype=np.float64),
                tensors=buffers,
                optimizer_tensor_keys=saved["optimizer_tensor_keys"],
                optimizer_values=saved["optimizer_values"],
                flat=list(buffers.values()),
            )
            ring.add(snapshot)  # layout=None: take() re-checks shapes before reusing its buffers
    except (KeyError, TypeError, ValueError) as error:
        raise CorruptFileError(f"{path}: snapshot ring metadata does not match its tensors ({error})") from None
    return ring
