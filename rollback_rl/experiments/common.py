"""What every experiment shares: the process pool, provenance, atomic JSON records, and option parsing.

``rollback-rl compare``, ``rollback-rl forgetting`` and the scripts in ``benchmarks/`` all run many
independent training runs and write JSON records that someone will read months later. They do it
one way:

- :func:`run_in_pool`: independent calls in ``spawn``-ed worker processes (a fresh interpreter each, so
  no torch or gymnasium state leaks between runs), each result handed back as it finishes, so that the
  caller writes it at once and an interrupted experiment loses only the runs in flight;
  :func:`default_workers` (the cores this process may use) is the default pool size everywhere;
- :func:`provenance`: what made a record (package version, git commit and whether the tree was dirty,
  library versions, machine, the full settings), in every record;
- :func:`write_json`: a record is written whole or not at all (``persistence.safe_io``'s atomic write),
  NaN and infinities as ``null`` (JSON has no NaN);
- :func:`comma_list`, :func:`free_folder`: ``--tasks A,B`` style options, and a new run folder that
  never overwrites an old one.

Bad input is reported with :class:`rollback_rl.validation.UsageError`, and ``--set KEY=VALUE`` is read
with :func:`rollback_rl.validation.parse_assignment`, the same as for ``rollback-rl train``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import subprocess
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import rollback_rl
from rollback_rl.hyperparams import to_jsonable
from rollback_rl.persistence.safe_io import atomic_write_bytes
from rollback_rl.training import library_versions, machine_description
from rollback_rl.validation import MAX_SEED, UsageError, integer_in

# -- the process pool -----------------------------------------------------------------------------


def default_workers() -> int:
    """The cores this process may use (its CPU affinity where the OS has one, else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_in_pool(function: Callable[..., Any], jobs: Mapping[Hashable, tuple[Any, ...]], workers: int,
                on_done: Callable[[Hashable, Any], None],
                on_failed: Callable[[Hashable, BaseException], None] | None = None) -> None:
    """Call ``function(*arguments)`` for every job and ``on_done(key, result)`` as each one finishes.

    With ``workers > 1`` the calls run in at most that many ``spawn``-ed processes; with 1 they run
    here, in order. ``function`` must be importable by name (a module-level function).

    :param jobs: key -> the arguments of one call; the key is handed back with its result
    :param on_failed: ``on_failed(key, error)`` for a call that raised, and the others go on; ``None``:
        the first failure cancels the calls not yet started and is raised
    """
    if workers <= 1:
        for key, arguments in jobs.items():
            _deliver(key, lambda: function(*arguments), on_done, on_failed)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)) or 1, mp_context=context) as pool:
        pending: dict[Future[Any], Hashable] = {pool.submit(function, *arguments): key
                                                for key, arguments in jobs.items()}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    _deliver(pending.pop(future), future.result, on_done, on_failed)
        except BaseException:
            for future in pending:
                future.cancel()
            raise


# -- provenance -----------------------------------------------------------------------------------


def _deliver(key: Hashable, result: Callable[[], Any], on_done: Callable[[Hashable, Any], Any],
             on_failed: Callable[[Hashable, BaseException], Any] | None) -> None:
    """Hand ``result()`` to ``on_done``, or its exception to ``on_failed`` (re-raised without one)."""
    try:
        value = result()
    except Exception as error:  # noqa: BLE001 - one failed run must not stop the others
        if on_failed is None:
            raise
        on_failed(key, error)
    else:
        on_done(key, value)


def git_provenance() -> dict[str, Any]:
    """The git commit of the package's checkout and whether its tracked files differ from it
    (``git_dirty``); both ``None`` outside a git checkout (an installed wheel)."""
    root = Path(rollback_rl.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": dirty}


def provenance(settings: Mapping[str, Any]) -> dict[str, Any]:
    """What made a record, to be stored in it under ``"provenance"``.

    :param settings: every setting the record depends on (command-line options, hyperparameters, ...);
        stored as JSON values (anything else by its ``str``)
    :return: ``{"rollback_rl": version, "git_commit", "git_dirty", "versions": {library: version},
        "machine": {platform, cpu_count, torch_threads}, "settings"}``
    """
    return {"rollback_rl": rollback_rl.__version__, **git_provenance(), "versions": library_versions(),
            "machine": machine_description(),
            "settings": json.loads(json.dumps(to_jsonable(dict(settings)), default=str))}


# -- JSON records ---------------------------------------------------------------------------------


def finite_json_values(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON has no NaN), tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: finite_json_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json_values(item) for item in value]
    return value


def json_text(value: Any, one_field_per_line: bool = False, indent: int = 1) -> str:
    """``value`` as JSON text ending in a newline, NaN and infinities as ``null``.

    :param one_field_per_line: one top-level field a line, each value compact: short files that diff
        well (per-run records); otherwise indented by ``indent`` spaces a level (summaries)
    """
    value = finite_json_values(value)
    if not one_field_per_line:
        return json.dumps(value, indent=indent) + "\n"
    fields = [f"  {json.dumps(key)}: {json.dumps(item, separators=(', ', ': '))}" for key, item in value.items()]
    return "{\n" + ",\n".join(fields) + "\n}\n"


def write_json(path: str | Path, value: Any, one_field_per_line: bool = False, indent: int = 1) -> Path:
    """Write ``value`` (see :func:`json_text`) to ``path`` whole or not at all, creating its folder.

    An experiment interrupted at any moment leaves only complete files: the text goes to a temporary
    file that is renamed over ``path`` once it is on disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json_text(value, one_field_per_line, indent).encode())
    return path


# -- options --------------------------------------------------------------------------------------


def comma_list(text: str, option: str) -> list[str]:
    """The names in ``--option A,B,C`` (blanks around names ignored).

    :raises UsageError: if it names nothing, or a name twice
    """
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{option} needs at least one name")
    duplicates = sorted({item for item in items if items.count(item) > 1})
    if duplicates:
        raise UsageError(f"{option} names {', '.join(duplicates)} twice")
    return items


MAX_SEEDS = 1_000  #: seeds of one task in one command (the protocol asks for 10 to 20)


def seed_list(text: str, option: str = "--seed-list") -> list[int]:
    """The seeds in ``--seed-list 100,101,...``: distinct integers from 0 to ``MAX_SEED``, at most ``MAX_SEEDS``.

    :raises UsageError: naming the first problem
    """
    texts = comma_list(text, option)
    if len(texts) > MAX_SEEDS:
        raise UsageError(f"{option} names {len(texts):,} seeds, over the limit of {MAX_SEEDS:,} (MAX_SEEDS)")
    try:
        seeds = [integer_in(0, MAX_SEED, item, limit_name="MAX_SEED") for item in texts]
    except ValueError as error:
        raise UsageError(f"{option} must be integers >= 0 separated by commas: {error}") from None
    if len(set(seeds)) < len(seeds):
        raise UsageError(f"{option} names a seed twice: {text}")
    return seeds


def free_folder(path: str | Path) -> Path:
    """``path``, or ``path-2``, ``path-3``... the first that does not exist (two runs started in the
    same second get different folders)."""
    path = Path(path)
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate
