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
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stable_baselines3.common.logger import (
    CSVOutputFormat,
    HumanOutputFormat,
    KVWriter,
    Logger,
    TensorBoardOutputFormat,
)
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event

from rollback_rl.safe_io import atomic_write_bytes, fsync_directory

CSV_FILENAME = "progress.csv"
EVENTS_GLOB = "events.out.tfevents.*"
TIMESTEP_COLUMN = "time/total_timesteps"


class TimestepCSVOutputFormat(CSVOutputFormat):
    """SB3's ``progress.csv`` writer, with the timestep of every row in ``time/total_timesteps``.

    :param filename: the CSV file
    :param keys: the header of an existing file to append to (``None``: start the file afresh)
    """

    def __init__(self, filename: str, keys: list[str] | None = None) -> None:
        if keys is None:
            super().__init__(filename)
            return
        super().__init__(os.devnull)  # sets SB3's attributes; its "w+" would empty the file we continue
        self.file.close()
        # Not "a": SB3 rewrites the header in place when a new key appears. Closed by close(), as SB3's.
        self.file = open(filename, "r+")  # noqa: SIM115
        self.file.seek(0, os.SEEK_END)
        self.keys = list(keys)

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        if TIMESTEP_COLUMN not in key_values:
            key_values = {**key_values, TIMESTEP_COLUMN: step}
            key_excluded = {**key_excluded, TIMESTEP_COLUMN: ()}
        super().write(key_values, key_excluded, step)


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


def flush_logs(logger: Logger) -> None:
    """Write every row and event ``logger`` has taken so far to disk, durably."""
    for output in logger.output_formats:
        if isinstance(output, TensorBoardOutputFormat):
            output.writer.flush()
        elif isinstance(output, CSVOutputFormat):
            output.file.flush()
            os.fsync(output.file.fileno())
    if logger.dir is not None:
        for path in Path(logger.dir).glob(EVENTS_GLOB):
            _fsync(path)


# -- cutting progress.csv back -------------------------------------------------------------------

def _row_timestep(fields: list[str], column: int) -> float | None:
    try:
        return float(fields[column])
    except (IndexError, ValueError):
        return None


def cut_progress_csv(path: Path, timestep: int) -> list[str]:
    """Keep the header and the rows of ``path`` logged at or before ``timestep``; return the header.

    A row that does not parse (cut short by a crash, or torn by SB3 rewriting the header in place) is
    dropped. The file is replaced atomically. A missing file is left missing (header ``[]``).
    """
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").split("\n")
    lines.pop()  # after the last newline: "" or a row cut short
    if not lines:
        atomic_write_bytes(path, b"")
        return []
    header = next(csv.reader([lines[0]]))
    column = header.index(TIMESTEP_COLUMN) if TIMESTEP_COLUMN in header else -1
    kept = [lines[0]]
    for line in lines[1:]:
        fields = next(csv.reader([line]), [])
        step = _row_timestep(fields, column) if column >= 0 else None
        if len(fields) == len(header) and step is not None and step <= timestep:
            kept.append(line)
    atomic_write_bytes(path, ("\n".join(kept) + "\n").encode())
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
    """
    outputs: list[KVWriter] = [HumanOutputFormat(sys.stdout)] if to_stdout else []
    csv_path = run_dir / CSV_FILENAME
    if resume_timestep is None:
        outputs.append(TimestepCSVOutputFormat(str(csv_path)))
        outputs.append(TensorBoardOutputFormat(str(run_dir)))
        return Logger(folder=str(run_dir), output_formats=outputs)
    header = cut_progress_csv(csv_path, resume_timestep)
    if not csv_path.exists():
        csv_path.touch()
    outputs.append(TimestepCSVOutputFormat(str(csv_path), keys=header))
    old_events = sorted(run_dir.glob(EVENTS_GLOB))
    tensorboard = TensorBoardOutputFormat(str(run_dir))
    outputs.append(tensorboard)
    carry_events_over(old_events, tensorboard.writer, resume_timestep)
    return Logger(folder=str(run_dir), output_formats=outputs)
