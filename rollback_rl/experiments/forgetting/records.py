"""The per-run records of the forgetting experiments: one JSON file per run, found again by its path.

A sweep of hundreds of runs is interrupted sooner or later, so every run is written as soon as it
finishes (whole or not at all: ``experiments.common.write_json``), and running the same command again
does only the runs whose record is missing. A record found with other settings than the command's is
refused, not overwritten or mixed in: the command says which file and which setting differs.

Layout, under the ``--results`` folder (default ``benchmarks/results/forgetting``)::

    dose_response/<kind>-<buffer size>/seed<k>.json           (rollback-rl forgetting --dose-response)
    a_b_a/<A>-<B>/<kind>-<buffer size>/<arm>/seed<k>.json     (rollback-rl forgetting)

Each record names its experiment (``"experiment"``), holds its settings and its provenance, and is the
only input of the reports: ``--report-only`` recomputes them from the files alone.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollback_rl.experiments.common import finite_json_values, run_in_pool, write_json

DOSE_RESPONSE = "dose_response"
A_B_A = "a_b_a"
DEFAULT_RESULTS = "benchmarks/results/forgetting"


class RecordError(ValueError):
    """A record file that cannot be used; the message names the file and how to go on."""


def cell_folder(kind: str, buffer_size: int) -> str:
    """The folder name of one buffer: ``fifo-10000``."""
    return f"{kind}-{buffer_size}"


def write_record(path: Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` atomically, one top-level field a line (short files that diff well)."""
    return write_json(path, dict(record), one_field_per_line=True)


def read_record(path: Path, experiment: str) -> dict[str, Any]:
    """The record in ``path``, which must be one of ``experiment``'s."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"cannot read record {path}: {error}") from None
    if not isinstance(record, dict) or record.get("experiment") != experiment:
        raise RecordError(f"{path} is not a record of the {experiment} experiment")
    return record


def as_json(value: Any) -> Any:
    """``value`` as it reads back from a record (tuples as lists, NaN as null), to compare settings."""
    return json.loads(json.dumps(finite_json_values(value), default=str))


def existing_record(path: Path, experiment: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record in ``path`` if there is one (``None``: the run is still to do).

    :raises RecordError: if it was made with other ``settings`` (compared as JSON)
    """
    if not path.is_file():
        return None
    record = read_record(path, experiment)
    wanted = as_json(settings)
    found = record.get("settings", {})
    differing = sorted(key for key in set(wanted) | set(found) if wanted.get(key) != found.get(key))
    if differing:
        key = differing[0]
        raise RecordError(f"{path} was made with other settings ({key}: {found.get(key)!r}, this command: "
                          f"{wanted.get(key)!r}); give another --results folder, or the same settings")
    return record


def load_records(folder: Path, experiment: str) -> list[dict[str, Any]]:
    """Every record of ``experiment`` under ``folder``, in path order (seed files only)."""
    paths = sorted(folder.rglob("seed*.json"), key=lambda p: (p.parent.as_posix(), len(p.name), p.name))
    return [read_record(path, experiment) for path in paths if path.stem.removeprefix("seed").isdigit()]


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: where its record goes, the settings it must have been made with, and the
    arguments of the run function."""

    path: Path
    settings: Mapping[str, Any]
    arguments: tuple[Any, ...]
    description: str


@dataclass
class SweepOutcome:
    """What :func:`run_missing` did: runs found already done, runs done now, runs that failed (why)."""

    found: int = 0
    done: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def run_missing(function: Callable[..., dict[str, Any]], plan: Mapping[Hashable, PlannedRun], experiment: str,
                workers: int, provenance: Mapping[str, Any], progress: Callable[[str], None] = print) -> SweepOutcome:
    """Run ``function(*arguments)`` for every planned run whose record is missing, in ``workers``
    processes, and write each record (with ``provenance``) as soon as it finishes.

    Every existing record is checked first (:func:`existing_record`), so that nothing runs when one of
    them would be refused. A run that raises is reported and the others go on.

    :raises RecordError: if an existing record was made with other settings
    """
    outcome = SweepOutcome()
    missing = {}
    for key, run in plan.items():
        if existing_record(run.path, experiment, run.settings) is None:
            missing[key] = run
        else:
            outcome.found += 1
    if outcome.found:
        progress(f"{outcome.found} of {len(plan)} runs already have a record; running the other {len(missing)}")
    started = time.perf_counter()

    def finish(key: Hashable, record: dict[str, Any]) -> None:
        run = missing[key]
        made_by = dict(provenance)
        threads = record.pop("torch_threads", None)
        if threads is not None:  # the run's own thread count, not that of the process that started it
            made_by["machine"] = {**made_by.get("machine", {}), "torch_threads": threads}
        write_record(run.path, {**record, "provenance": made_by})
        outcome.done += 1
        progress(f"[{outcome.done + len(outcome.failed)}/{len(missing)}] {run.description}: "
                 f"{record['wall_seconds']:.0f} s (elapsed {(time.perf_counter() - started) / 60:.1f} min)")

    def fail(key: Hashable, error: BaseException) -> None:
        outcome.failed[missing[key].description] = f"{type(error).__name__}: {error}"
        progress(f"FAILED {missing[key].description}: {type(error).__name__}: {error}")

    run_in_pool(function, {key: run.arguments for key, run in missing.items()}, workers, finish, fail)
    return outcome
