"""Where the training runs of a benchmark execute: a local process pool (default) or a Ray cluster.

A backend takes :class:`~rollback_rl.experiments.compare.arms.RunSpec` s, runs :func:`~rollback_rl.experiments.compare.arms.execute`
on each in a worker process, and hands every result back to the caller *as it finishes*
(``on_done(spec, records)``, or ``on_failed(spec, message)``), so that the caller writes its records at
once and an interrupted benchmark loses at most the runs in flight. Every worker runs one run at a
time with one torch thread.

- ``LocalBackend``: ``experiments.common.run_in_pool`` over ``workers`` processes (default: the cores
  this process may use), started with ``spawn`` so each run begins in a fresh interpreter, as on Ray.
  ``workers=1`` runs in this process, one run after another.
- ``RayBackend``: each run is a Ray task (``num_cpus=1``), on the cluster at ``address`` or on a local
  Ray instance started here (and stopped at the end). Ray is optional: ``pip install rollback-rl[ray]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rollback_rl.experiments.common import default_workers, run_in_pool
from rollback_rl.experiments.compare.arms import RunSpec, execute

OnDone = Callable[[RunSpec, list[dict[str, Any]]], None]
OnFailed = Callable[[RunSpec, str], None]
BACKENDS = ("local", "ray")


class BackendUnavailable(RuntimeError):
    """The backend cannot start (Ray not installed, cluster unreachable); the message says what to do."""


def _failure(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}".strip()


class LocalBackend:
    """Run the specs in a pool of ``workers`` local processes (default: :func:`default_workers`).

    :param workers: processes running at once; 1 runs everything in this process
    """

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()

    def run(self, specs: Sequence[RunSpec], on_done: OnDone, on_failed: OnFailed) -> None:
        run_in_pool(execute, {spec: (spec,) for spec in specs}, self.workers, on_done,
                    on_failed=lambda spec, error: on_failed(spec, _failure(error)))


class RayBackend:
    """Run each spec as a Ray task (one CPU each).

    :param address: a running cluster's address (``ray.init(address=...)``, e.g. ``"auto"`` or
        ``"10.0.0.5:6379"``); ``None`` starts a local Ray instance with ``workers`` CPUs, stopped at the end
    :param workers: CPUs of the local instance (default: :func:`default_workers`); ignored with an ``address``

    The cluster's Python environment must have the same rollback-rl, SB3, torch and gymnasium installed.
    """

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise BackendUnavailable("the ray backend needs Ray: pip install 'rollback-rl[ray]'") from None
        self._ray = ray
        self.address = address
        self.workers = workers or default_workers()

    def run(self, specs: Sequence[RunSpec], on_done: OnDone, on_failed: OnFailed) -> None:
        ray = self._ray
        started_here = not ray.is_initialized()
        if started_here:
            try:
                if self.address is not None:
                    ray.init(address=self.address, logging_level="WARNING")
                else:
                    ray.init(num_cpus=self.workers, include_dashboard=False, logging_level="WARNING")
            except Exception as error:  # noqa: BLE001 - connection errors come in many types
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise BackendUnavailable(f"cannot start {where}: {_failure(error)}") from None
        try:
            remote_execute = ray.remote(num_cpus=1, max_retries=0)(execute)
            pending = {remote_execute.remote(spec): spec for spec in specs}
            try:
                while pending:
                    finished, _ = ray.wait(list(pending), num_returns=1)
                    for reference in finished:
                        spec = pending.pop(reference)
                        try:
                            records = ray.get(reference)
                        except Exception as error:  # noqa: BLE001 - RayTaskError wraps the run's own error
                            on_failed(spec, _failure(error))
                        else:
                            on_done(spec, records)
            except BaseException:
                for reference in pending:
                    ray.cancel(reference, force=True)
                raise
        finally:
            if started_here:
                ray.shutdown()


def make_backend(name: str, workers: int | None = None, ray_address: str | None = None) -> LocalBackend | RayBackend:
    """The backend called ``name`` (``"local"`` or ``"ray"``).

    :raises BackendUnavailable: for ``"ray"`` when Ray is not installed
    """
    if name == "local":
        return LocalBackend(workers)
    if name == "ray":
        return RayBackend(ray_address, workers)
    raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
