"""A run folder's logs (``progress.csv`` and the TensorBoard events), kept in step with its checkpoints.

SB3 writes both logs as training goes, and TensorBoard's writer holds events in memory for up to two
minutes. After a crash their tail is lost, and a run resumed from a checkpoint at timestep ``s`` would
log the steps after ``s`` a second time. So:

- :func:`flush_logs` runs before every checkpoint and puts every row and event logged so far on disk
  (fsynced): a checkpoint at ``s`` means the logs up to ``s`` are complete.
- :func:`open_run_logger` with ``resume_timestep=s`` cuts ``progress.csv`` back to the rows of
  timesteps up to ``s`` (atomically) and appends to it; it copies the TensorBoard events of steps up
  to ``s`` from the old events files into the new one, then deletes the old files. A run folder
  therefore holds one events file, in which every step appears once, whatever reader opens it (the
  Python reader, TensorBoard's Rust data server, ``rollback-rl plot``). A record cut short by the crash
  is dropped. If the copy itself is interrupted, the next resume finds the old files still there and
  skips the events it already copied (identical bytes).

Every ``progress.csv`` row carries its timestep in SB3's ``time/total_timesteps`` column (SB3 leaves
it empty in rows that a callback dumps), which is what the cut goes by.

``progress.csv`` is written by :class:`ProgressCSV`, not SB3's ``CSVOutputFormat``: SB3 rewrites the
whole file in place when a key first appears (the ``rollback/*`` keys at the first rollback), so a kill
during that rewrite tears the file. Here the file grows by whole rows only, and a new column means a
fresh file renamed over the old one: a kill at any moment leaves a file that parses. A write that
fails (disk full, read-only folder), to progress.csv or to the TensorBoard events, becomes a
:class:`~rollback_rl.persistence.safe_io.WriteFailedWarning` and training goes on.
"""

from __future__ import annotations

import csv
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from stable_baselines3.common.logger import (
    CSVOutputFormat,
    Figure,
    FormatUnsupportedError,
    HParam,
    HumanOutputFormat,
    Image,
    KVWriter,
    Logger,
    TensorBoardOutputFormat,
    Video,
    filter_excluded_keys,
)
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event

from rollback_rl.persistence.safe_io import (
    WriteFailedWarning,
    atomic_write,
    atomic_write_bytes,
    fsync_directory,
    open_regular_file,
)

CSV_FILENAME = "progress.csv"
EVENTS_GLOB = "events.out.tfevents.*"
TIMESTEP_COLUMN = "time/total_timesteps"


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_MAX_CSV_LINE_BYTES = 2**20  # a longer line in progress.csv is not a row this package wrote: dropped


class ProgressCSV(KVWriter):
    """``progress.csv``, written so that a kill at any moment leaves a file every CSV reader parses.

    Each row is appended with a single ``write`` of the whole line, and carries its timestep in
    ``time/total_timesteps``. The header only changes when a row brings keys not seen before (SB3
    sorts them after the existing columns, as here): then the header and the rows so far, padded
    with empty fields, go to a fresh file that is renamed over the old one. So at any moment the file
    is the old one or the new one, each with whole rows, at worst followed by part of the row being
    appended. Strings are quoted as SB3 quotes them, on one line.

    A write that fails (``OSError``: disk full, read-only folder) cuts the file back to its last whole
    row and is warned about once (:class:`~rollback_rl.persistence.safe_io.WriteFailedWarning`); rows
    are dropped until writing works again, and training goes on. ``failed_writes`` counts them.

    :param path: the CSV file
    :param header: the header of the file to continue (as :func:`cut_progress_csv` returns it); empty:
        start a new, empty file
    """

    def __init__(self, path: str | os.PathLike, header: list[str] | tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        self.keys = list(header)
        self.failed_writes = 0
        if not self.keys:
            atomic_write_bytes(self.path, b"")  # fresh: replaces whatever was there, a planted link included
        # O_NOFOLLOW: never append through a link; the file is ours (just written, or cut back and renamed).
        self._descriptor: int | None = os.open(self.path, os.O_RDWR | os.O_APPEND | _NOFOLLOW | _CLOEXEC)

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        row = filter_excluded_keys(key_values, key_excluded, "csv")
        row.setdefault(TIMESTEP_COLUMN, step)
        for value in row.values():
            for unsupported, name in ((Video, "video"), (Figure, "figure"), (Image, "image"), (HParam, "hparam")):
                if isinstance(value, unsupported):
                    raise FormatUnsupportedError(["csv"], name)
        try:
            new_keys = sorted(set(row) - set(self.keys))
            if new_keys:
                self._add_columns(new_keys)
            self._append(",".join(_csv_field(row.get(key)) for key in self.keys) + "\n")
        except OSError as error:
            self._write_failed(error)

    def _append(self, line: str) -> None:
        descriptor = self._open_descriptor()
        size_before = os.fstat(descriptor).st_size
        data = memoryview(line.encode())
        try:
            while data:
                data = data[os.write(descriptor, data):]
        except OSError:
            try:
                os.ftruncate(descriptor, size_before)  # no part of a row left for the next one to join
            except OSError:
                pass
            raise

    def _add_columns(self, new_keys: list[str]) -> None:
        descriptor = self._open_descriptor()
        size = os.fstat(descriptor).st_size
        lines = os.pread(descriptor, size, 0).split(b"\n")[:-1]  # the last piece: "" or a row cut short
        rows = lines[1:] if self.keys else []
        padding = b"," * len(new_keys)
        keys = self.keys + new_keys
        with atomic_write(self.path) as file:
            file.write(",".join(keys).encode() + b"\n")
            for row in rows:
                file.write(row + padding + b"\n")
        os.close(descriptor)
        self._descriptor = None
        self.keys = keys
        self._open_descriptor()

    def _open_descriptor(self) -> int:
        if self._descriptor is None:
            self._descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | _NOFOLLOW | _CLOEXEC)
        return self._descriptor

    def _write_failed(self, error: OSError) -> None:
        self.failed_writes += 1
        if self.failed_writes == 1:
            warnings.warn(f"cannot write {self.path} ({error.strerror or error}); its rows are dropped until "
                          "it can be written again, and training goes on", WriteFailedWarning, stacklevel=3)

    def sync(self) -> None:
        """Make every row written so far durable (``fsync``); a failure is warned about, not raised."""
        try:
            os.fsync(self._open_descriptor())
        except OSError as error:
            self._write_failed(error)

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


def _csv_field(value: Any) -> str:
    """A value as SB3's CSV writer writes it (strings quoted, quotes doubled), kept on one line."""
    if value is None:
        return ""
    if isinstance(value, str):
        return '"' + " ".join(value.splitlines()).replace('"', '""') + '"'
    return " ".join(str(value).split())


class GuardedTensorBoardOutputFormat(TensorBoardOutputFormat):
    """SB3's TensorBoard writer, whose write errors (disk full) are warned about once instead of
    ending training (:class:`~rollback_rl.persistence.safe_io.WriteFailedWarning`); the events of the
    failed writes are lost. ``failed_writes`` counts them."""

    def __init__(self, folder: str) -> None:
        super().__init__(folder)
        self.failed_writes = 0

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        try:
            super().write(key_values, key_excluded, step)
        except OSError as error:
            self._write_failed(error)

    def close(self) -> None:
        try:
            super().close()
        except OSError as error:
            self._write_failed(error)

    def _write_failed(self, error: OSError) -> None:
        self.failed_writes += 1
        if self.failed_writes == 1:
            warnings.warn(f"cannot write the TensorBoard events ({error.strerror or error}); events are lost "
                          "until they can be written again, and training goes on", WriteFailedWarning, stacklevel=3)


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def flush_logs(logger: Logger) -> None:
    """Write every row and event ``logger`` has taken so far to disk, durably.

    A failure (disk full) is warned about (:class:`~rollback_rl.persistence.safe_io.WriteFailedWarning`),
    not raised: the checkpoint that follows can still be written.
    """
    try:
        for output in logger.output_formats:
            if isinstance(output, TensorBoardOutputFormat):
                output.writer.flush()
            elif isinstance(output, ProgressCSV):
                output.sync()
            elif isinstance(output, CSVOutputFormat):
                output.file.flush()
                os.fsync(output.file.fileno())
        if logger.dir is not None:
            for path in Path(logger.dir).glob(EVENTS_GLOB):
                _fsync(path)
    except OSError as error:
        warnings.warn(f"cannot make the logs durable ({error.strerror or error}); training goes on",
                      WriteFailedWarning, stacklevel=2)


# -- cutting progress.csv back -------------------------------------------------------------------

def _row_timestep(fields: list[str], column: int) -> float | None:
    try:
        return float(fields[column])
    except (IndexError, ValueError):
        return None


def _whole_lines(file: IO[bytes]) -> Iterator[bytes]:
    """The lines of ``file`` that end in a newline and are at most ``_MAX_CSV_LINE_BYTES`` long (read
    with that cap: a file without newlines is not read into memory whole), newline included."""
    while True:
        line = file.readline(_MAX_CSV_LINE_BYTES + 1)
        if not line:
            return
        if line.endswith(b"\n"):
            yield line
            continue
        if len(line) <= _MAX_CSV_LINE_BYTES:
            return  # the end of the file, a row cut short
        while line and not line.endswith(b"\n"):  # an over-long line: skipped to its end
            line = file.readline(_MAX_CSV_LINE_BYTES + 1)


def cut_progress_csv(path: Path, timestep: int) -> list[str]:
    """Keep the header and the rows of ``path`` logged at or before ``timestep``; return the header.

    A row that does not parse (cut short by a crash, torn by an older version's in-place rewrite, or
    longer than any row this package writes) is dropped. The file is read line by line and replaced
    atomically. A missing file is left missing (header ``[]``); a symbolic link out of the run folder
    is refused (:class:`~rollback_rl.persistence.safe_io.UnsafeFileError`), never read.
    """
    if not path.exists() and not path.is_symlink():
        return []
    with open_regular_file(path) as source, atomic_write(path) as target:
        lines = _whole_lines(source)
        header_line = next(lines, None)
        if header_line is None:
            return []
        header = next(csv.reader([header_line.decode(errors="replace").rstrip("\n")]), [])
        column = header.index(TIMESTEP_COLUMN) if TIMESTEP_COLUMN in header else -1
        target.write(header_line)
        for line in lines:
            fields = next(csv.reader([line.decode(errors="replace").rstrip("\n")]), [])
            step = _row_timestep(fields, column) if column >= 0 else None
            if len(fields) == len(header) and step is not None and step <= timestep:
                target.write(line)
    return header


# -- carrying TensorBoard events over ------------------------------------------------------------

def _records(path: Path) -> Iterator[bytes]:
    """The serialized events of one events file, up to the first truncated or corrupted record."""
    yield from RawEventFileLoader(str(path)).Load()


def carry_events_over(old_files: list[Path], writer: Any, timestep: int) -> int:
    """Copy the events of steps up to ``timestep`` from ``old_files`` into ``writer`` (a torch
    ``SummaryWriter``), each distinct event once, make them durable, then delete ``old_files``.

    :return: the number of events copied
    """
    seen: set[bytes] = set()
    file_writer = writer._get_file_writer()
    for path in old_files:
        for record in _records(path):
            if record in seen:
                continue
            seen.add(record)
            event = Event.FromString(record)
            if event.HasField("file_version") or event.step > timestep:
                continue  # the new file has its own version header
            file_writer.add_event(event, walltime=event.wall_time)
    writer.flush()
    for path in Path(writer.get_logdir()).glob(EVENTS_GLOB):
        if path not in old_files:
            _fsync(path)
    for path in old_files:
        path.unlink()
    fsync_directory(writer.get_logdir())
    return len(seen)


# -- the logger -----------------------------------------------------------------------------------

def open_run_logger(run_dir: Path, to_stdout: bool, resume_timestep: int | None = None) -> Logger:
    """The logger of ``rollback-rl train``: progress.csv, TensorBoard, and the console if ``to_stdout``.

    :param resume_timestep: continue the logs of a run resumed from a checkpoint at this timestep,
        dropping what was logged after it (see the module docstring); ``None`` for a new run
    :raises UnsafeFileError: on resuming, if ``progress.csv`` is a link out of the run folder
    """
    outputs: list[KVWriter] = [HumanOutputFormat(sys.stdout)] if to_stdout else []
    csv_path = run_dir / CSV_FILENAME
    if resume_timestep is None:
        outputs.append(ProgressCSV(csv_path))
        outputs.append(GuardedTensorBoardOutputFormat(str(run_dir)))
        return Logger(folder=str(run_dir), output_formats=outputs)
    header = cut_progress_csv(csv_path, resume_timestep)
    outputs.append(ProgressCSV(csv_path, header=header))
    old_events = []
    for path in sorted(run_dir.glob(EVENTS_GLOB)):
        if path.is_symlink():  # planted, not written by this package: removed, never read
            path.unlink()
        elif path.is_file():
            old_events.append(path)
    tensorboard = GuardedTensorBoardOutputFormat(str(run_dir))
    outputs.append(tensorboard)
    carry_events_over(old_events, tensorboard.writer, resume_timestep)
    return Logger(folder=str(run_dir), output_formats=outputs)
