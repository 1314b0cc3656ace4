"""Run independent training runs in a pool of processes and hand each result back as it finishes."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any


def default_workers() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_jobs(function: Callable[..., Any], jobs: Mapping[Hashable, tuple[Any, ...]], workers: int,
             on_done: Callable[[Hashable, Any], None]) -> None:
    """Call ``function(*arguments)`` for every job and ``on_done(key, result)`` as each one finishes.

    With ``workers > 1`` the calls run in that many ``spawn``-ed processes (a fresh interpreter each, so
    no torch or gymnasium state leaks between runs); with 1 they run here, in order. ``function`` must be
    importable by name (a module-level function). The first failure cancels the jobs not yet started
    and is raised.
    """
    if workers <= 1:
        for key, arguments in jobs.items():
            on_done(key, function(*arguments))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)) or 1, mp_context=context) as pool:
        pending: dict[Future[Any], Hashable] = {pool.submit(function, *arguments): key
                                                for key, arguments in jobs.items()}
        try:
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    on_done(pending.pop(future), future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise
