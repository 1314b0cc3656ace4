"""Per-run result records of a benchmark: one small JSON file per (task, arm, seed).

The layout is ``<results>/<task>/<arm>/seed<k>.json`` (a task id's ``/`` becomes ``-``), so the files
can be committed next to the docs that quote them, and anyone can recompute the tables. A file is
written whole or not at all (``experiments.common.write_json``), so a benchmark interrupted at any
moment leaves only complete records, and running the same command again does only the runs still
missing. Each record carries its provenance (``experiments.common.provenance``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rollback_rl.experiments.common import write_json

RECORD_SCHEMA = 1


def task_folder_name(task: str) -> str:
    """The folder name of a task id (``rollback_rl/SwitchingCartPole-v0`` -> ``rollback_rl-SwitchingCartPole-v0``)."""
    return task.replace("/", "-").replace(":", "-")


def record_path(results_dir: str | Path, task: str, arm: str, seed: int) -> Path:
    return Path(results_dir) / task_folder_name(task) / arm / f"seed{seed}.json"


def write_record(results_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` (which names its task, arm and seed) atomically, one top-level field a line
    (short files that diff well); returns its path."""
    path = record_path(results_dir, record["task"], record["arm"], record["seed"])
    return write_json(path, record, one_field_per_line=True)


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
