"""Per-run result records of a benchmark: one small JSON file per (task, arm, seed).

The layout is ``<results>/<task>/<arm>/seed<k>.json`` (a task id's ``/`` becomes ``-``), so the files
can be committed next to the README that quotes them, and anyone can recompute the tables. A file is
written whole or not at all (temporary file, then rename), so a benchmark interrupted at any moment
leaves only complete records, and running the same command again does only the runs still missing.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RECORD_SCHEMA = 1


def task_folder_name(task: str) -> str:
    """The folder name of a task id (``rollback_rl/SwitchingCartPole-v0`` -> ``rollback_rl-SwitchingCartPole-v0``)."""
    return task.replace("/", "-").replace(":", "-")


def record_path(results_dir: str | Path, task: str, arm: str, seed: int) -> Path:
    return Path(results_dir) / task_folder_name(task) / arm / f"seed{seed}.json"


def record_text(record: dict[str, Any]) -> str:
    """JSON with one top-level field a line, each value compact: short files that diff well."""
    fields = [f"  {json.dumps(key)}: {json.dumps(value, separators=(', ', ': '))}" for key, value in record.items()]
    return "{\n" + ",\n".join(fields) + "\n}\n"


def write_record(results_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` (which names its task, arm and seed) atomically; returns its path."""
    path = record_path(results_dir, record["task"], record["arm"], record["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    text = record_text(record)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes it private; records are meant to be shared
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


class RecordError(ValueError):
    """A record file that cannot be used; the message names the file."""


def read_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise RecordError(f"cannot read record {path}: {error}") from None
    if not isinstance(record, dict) or record.get("schema") != RECORD_SCHEMA:
        raise RecordError(f"{path} is not a rollback-rl compare record (schema {RECORD_SCHEMA})")
    return record


def existing_record(results_dir: str | Path, task: str, arm: str, seed: int) -> dict[str, Any] | None:
    path = record_path(results_dir, task, arm, seed)
    return read_record(path) if path.is_file() else None


def load_records(results_dir: str | Path, tasks: Iterable[str], arms: Iterable[str],
                 seeds: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """The records of ``tasks`` x ``arms`` found under ``results_dir``: of ``seeds``, or every seed found."""
    records = []
    for task in tasks:
        for arm in arms:
            folder = record_path(results_dir, task, arm, 0).parent
            if seeds is None:
                found = [p for p in folder.glob("seed*.json") if p.stem.removeprefix("seed").isdigit()]
                paths = sorted(found, key=lambda p: int(p.stem.removeprefix("seed")))
            else:
                paths = [record_path(results_dir, task, arm, seed) for seed in seeds]
            records.extend(read_record(path) for path in paths if path.is_file())
    return records
