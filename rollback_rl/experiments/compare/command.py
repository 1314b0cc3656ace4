"""``rollback-rl compare``: run the arms of docs/protocol.md on tasks and seeds, then report.

    rollback-rl compare [--tasks CartPole-v1,...] [--arms vanilla,best_model,rollback] [--seeds N]
                        [--steps N] [--results benchmarks/results] [--backend local|ray] [--report-only]

Reads top to bottom: check every input (one ``error:`` line and exit status 2 on the first problem,
before anything runs or is written: tasks that each arm's algorithm can act in, seeds and counts
within their limits, a ``--results`` folder that can be written), list the runs whose records are
missing, run them on the backend writing each record as it arrives, then compute the report from the
records on disk and write ``report.json``, ``report.md`` and ``report.png`` next to them. A record
that cannot be written (disk full) is one line and counts as a failed run; the others are still
written. Running the same command again continues an interrupted benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym

from rollback_rl.experiments.compare.arms import (
    ARM_DESCRIPTIONS,
    DEFAULT_ARMS,
    FINAL_EPISODES,
    RunSettings,
    RunSpec,
    hyperparameters,
    training_run_of,
)
from rollback_rl.experiments.common import MAX_SEEDS, comma_list, seed_list, write_json
from rollback_rl.experiments.compare.backends import BACKENDS, BackendUnavailable, make_backend
from rollback_rl.experiments.compare.records import RecordError, existing_record, load_records, record_path, write_record
from rollback_rl.experiments.compare.report import markdown_table, plot_report, print_report, report_json, summarise
from rollback_rl.hyperparams import DEFAULT_EVAL_EPISODES, MAX_TIMESTEPS, HyperparameterError, check_memory_on_spaces
from rollback_rl.persistence.limits import one_line
from rollback_rl.training import check_action_space, check_env_id
from rollback_rl.validation import (
    MAX_EPISODES,
    UsageError,
    check_output_folder,
    integer_in,
    parse_assignment,
)

PROG = "rollback-rl compare"
EXIT_USAGE = 2
EXIT_FAILED_RUNS = 1
EXIT_INTERRUPTED = 130
DEFAULT_RESULTS = "benchmarks/results"
PROTOCOL_SEEDS = {"CartPole-v1": 20}  # docs/protocol.md: at least 20 seeds on CartPole-v1, 10 on the others
OTHER_TASK_SEEDS = 10
REPORT_FILES = ("report.json", "report.md", "report.png")
MAX_WORKERS = 1_024  #: runs at once
#: The limit of each numeric option: (smallest, largest, the largest's name)
OPTION_RANGES = {"steps": (1, MAX_TIMESTEPS, "MAX_TIMESTEPS"), "eval_freq": (1, MAX_TIMESTEPS, "MAX_TIMESTEPS"),
                 "eval_episodes": (1, MAX_EPISODES, "MAX_EPISODES"),
                 "final_episodes": (1, MAX_EPISODES, "MAX_EPISODES"), "workers": (1, MAX_WORKERS, "MAX_WORKERS"),
                 "seeds": (1, MAX_SEEDS, "MAX_SEEDS")}
DESCRIPTION = ("Run the arms of docs/protocol.md (vanilla SB3 DQN, its EvalCallback best model, rollback-rl "
               "defaults, ...) on tasks and seeds, writing one JSON record per run as it finishes (run again to "
               "continue an interrupted benchmark), then report: final-policy IQM, collapse rate, online return, "
               "eval-curve area, evaluation cost, wall time, with intervals; and a figure.")


def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``compare`` options to ``parser`` (a subcommand's parser); values are checked by :func:`run_compare`."""
    arms = ", ".join(f"{name} ({description})" for name, description in ARM_DESCRIPTIONS.items())
    parser.add_argument("--tasks", default="CartPole-v1", metavar="ID,...",
                        help="gymnasium env ids, comma-separated (default: CartPole-v1)")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), metavar="ARM,...",
                        help=f"arms, comma-separated (default: {','.join(DEFAULT_ARMS)}; vanilla and best_model "
                             f"come from one training run). Known: {arms}")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, metavar="N",
                       help="seeds 0 to N-1 (default: 20 on CartPole-v1, 10 on other tasks; with --report-only: "
                            "every seed found)")
    seeds.add_argument("--seed-list", metavar="S,...", help="these seeds, comma-separated (e.g. 0,3,7)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="training timesteps of every run (default: the Zoo's, e.g. 50,000 on CartPole-v1)")
    parser.add_argument("--eval-freq", type=int, metavar="N",
                        help="training timesteps between evaluations (default: 2,500 on CartPole, 5,000 otherwise)")
    parser.add_argument("--eval-episodes", type=int, default=DEFAULT_EVAL_EPISODES, metavar="N",
                        help=f"greedy episodes per evaluation during training (default: {DEFAULT_EVAL_EPISODES})")
    parser.add_argument("--final-episodes", type=int, default=FINAL_EPISODES, metavar="N",
                        help=f"fresh greedy episodes scoring each final policy (default: {FINAL_EPISODES})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one hyperparameter of every arm, as in 'rollback-rl train --set' (repeatable)")
    parser.add_argument("--results", default=DEFAULT_RESULTS, metavar="DIR",
                        help=f"folder of the per-run records and the report (default: {DEFAULT_RESULTS})")
    parser.add_argument("--backend", default="local", metavar="|".join(BACKENDS),
                        help="local: a process pool on this machine (default); ray: one Ray task per run "
                             "(pip install 'rollback-rl[ray]')")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="the Ray cluster to use (e.g. auto, or HOST:6379); default: start a local Ray instance")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="runs at once (default: the cores this process may use; 1 runs in this process); "
                             "with a Ray cluster, unused")
    parser.add_argument("--report-only", action="store_true", help="run nothing: report the records already there")
    return parser


# -- checking the command line ---------------------------------------------------------------------

@dataclass
class ComparePlan:
    """Everything ``compare`` will do, checked before anything runs."""

    tasks: list[str]
    arms: list[str]
    seeds: dict[str, list[int] | None]  # by task; None: every seed found (--report-only)
    settings: dict[str, RunSettings]  # by task
    results: Path


def _check_task(task: str) -> gym.Env:
    """The task's env (closed), made once to see that it can be; UsageError naming the task if not."""
    # This package's own tasks are registered with gymnasium: arms imports rollback_rl.envs.
    check_env_id(task, what="task")
    try:
        env = gym.make(task)
        env.close()
    except Exception as error:  # noqa: BLE001 - missing extras (Box2D) and bad kwargs raise many types
        raise UsageError(f"cannot make task {task}: {' '.join(str(error).split())}") from None
    return env


def _in_range(name: str, value: int | None) -> None:
    """Refuse the option ``--<name>``'s value outside :data:`OPTION_RANGES`."""
    if value is not None:
        minimum, maximum, limit_name = OPTION_RANGES[name]
        try:
            integer_in(minimum, maximum, value, "--" + name.replace("_", "-"), limit_name)
        except ValueError as error:
            raise UsageError(str(error)) from None


def _seeds(args: argparse.Namespace, tasks: list[str]) -> dict[str, list[int] | None]:
    if args.seed_list is not None:
        seeds = seed_list(args.seed_list)
        return {task: seeds for task in tasks}
    if args.seeds is not None:
        _in_range("seeds", args.seeds)
        return {task: list(range(args.seeds)) for task in tasks}
    if args.report_only:
        return {task: None for task in tasks}
    return {task: list(range(PROTOCOL_SEEDS.get(task, OTHER_TASK_SEEDS))) for task in tasks}


def _overrides(texts: Sequence[str]) -> tuple[tuple[str, str], ...]:
    try:
        return tuple(parse_assignment(text) for text in texts)
    except ValueError as error:
        raise UsageError(f"--set {error}") from None


def plan_compare(args: argparse.Namespace) -> ComparePlan:
    """Check the whole command line; raises UsageError naming the first problem."""
    tasks = comma_list(args.tasks, "--tasks")
    arms = comma_list(args.arms, "--arms")
    unknown = [arm for arm in arms if arm not in ARM_DESCRIPTIONS]
    if unknown:
        raise UsageError(f"unknown arm {unknown[0]!r}: choose from {', '.join(ARM_DESCRIPTIONS)}")
    seeds = _seeds(args, tasks)
    for name in ("steps", "eval_freq", "eval_episodes", "final_episodes", "workers"):
        _in_range(name, getattr(args, name))
    if args.backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if args.ray_address is not None and args.backend != "ray":
        raise UsageError("--ray-address needs --backend ray")
    results = Path(args.results)
    check_output_folder(results, "--results")
    if results.exists() and not results.is_dir():
        raise UsageError(f"--results {results} exists and is not a folder")
    envs = {task: _check_task(task) for task in tasks}
    settings = {task: RunSettings.for_task(task, args.steps, args.eval_freq, args.eval_episodes,
                                           args.final_episodes, _overrides(args.overrides)) for task in tasks}
    for task, task_settings in settings.items():
        if task_settings.steps < task_settings.eval_freq:
            raise UsageError(f"{task}: --steps ({task_settings.steps}) is less than the evaluation interval "
                                    f"({task_settings.eval_freq}): no evaluation would run (lower --eval-freq)")
        for run in dict.fromkeys(training_run_of(arm) for arm in arms):
            env = envs[task]
            try:
                params = hyperparameters(RunSpec(task, run.name, 0, task_settings))
                check_action_space(run.algorithm, env.action_space, task)
                check_memory_on_spaces(params, env.observation_space, env.action_space, "the hyperparameters")
            except (UsageError, HyperparameterError) as error:
                raise UsageError(f"{task}, {run.name}: {error}") from None
    return ComparePlan(tasks=tasks, arms=arms, seeds=seeds, settings=settings, results=results)


def check_results_writable(results: Path) -> None:
    """Create the ``--results`` folder and write and delete a file in it, before any training: a folder
    that cannot take the records is refused up front, not once the runs are done. Folders this
    created are removed again if it fails.

    :raises UsageError: naming the folder and the reason
    """
    created = []
    folder = results
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    probe = results / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        for path in reversed(created):
            path.mkdir()
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise UsageError(f"--results {results} cannot be written: {error.strerror or error}") from None


def runs_to_do(plan: ComparePlan) -> tuple[list[RunSpec], int]:
    """The training runs with at least one requested record missing, seed by seed (so that a stopped
    benchmark has whole seeds), and how many requested records exist already.

    :raises UsageError: if an existing record was made with other settings
    """
    specs, found = [], 0
    seeds_in_order = sorted({seed for seeds in plan.seeds.values() for seed in seeds or []})
    for seed in seeds_in_order:
        for task in plan.tasks:
            if seed not in (plan.seeds[task] or []):
                continue
            settings = plan.settings[task]
            for run_name in dict.fromkeys(training_run_of(arm).name for arm in plan.arms):
                spec = RunSpec(task, run_name, seed, settings)
                missing = False
                for arm in spec.arms:  # every arm of the run: its records are written together
                    try:
                        record = existing_record(plan.results, task, arm, seed)
                    except RecordError as error:
                        raise UsageError(f"{error}: delete it to run it again") from None
                    if record is not None and record["settings"] != settings.to_json():
                        raise UsageError(
                            f"{record_path(plan.results, task, arm, seed)} was made with {record['settings']}, "
                            f"not {settings.to_json()}: choose another --results folder")
                    if arm in plan.arms:
                        missing = missing or record is None
                        found += record is not None
                if missing:
                    specs.append(spec)
    return specs, found


# -- running ---------------------------------------------------------------------------------------

class _Progress:
    """Writes each finished run's records and prints one line per run."""

    def __init__(self, results: Path, total: int, execution: dict[str, Any]) -> None:
        self.results, self.total, self.execution = results, total, execution
        self.done, self.failed, self.written = 0, 0, 0

    def on_done(self, spec: RunSpec, records: list[dict[str, Any]]) -> None:
        for record in records:
            # A run done for one missing arm leaves its other arms' existing records alone.
            if not record_path(self.results, record["task"], record["arm"], record["seed"]).exists():
                try:
                    write_record(self.results, {**record, "execution": self.execution})
                except OSError as error:  # disk full: this run's records are lost, the next ones may fit
                    self.on_failed(spec, f"cannot write the record of {record['arm']} in {self.results}: "
                                         f"{error.strerror or error}")
                    return
                self.written += 1
        self.done += 1
        finals = ", ".join(f"{r['arm']} {r['final_policy']['mean']:.1f}" for r in records)
        rollbacks = sum(len(r["rollbacks"]) for r in records)
        print(f"[{self.done + self.failed}/{self.total}] {spec.describe()}: final {finals}"
              + (f", {rollbacks} rollback(s)" if rollbacks else "")
              + f" ({records[0]['time_s']['learn']:.0f} s)", flush=True)

    def on_failed(self, spec: RunSpec, message: str) -> None:
        self.failed += 1
        print(f"[{self.done + self.failed}/{self.total}] {spec.describe()}: FAILED: {message}", file=sys.stderr, flush=True)


def run_compare(args: argparse.Namespace) -> int:
    """Run the benchmark the command line asks for and report; returns the exit status
    (0, 1 if a run failed, 2 for bad input, 130 if interrupted)."""
    try:
        plan = plan_compare(args)
        specs, found = ([], 0) if args.report_only else runs_to_do(plan)
        backend = make_backend(args.backend, args.workers, args.ray_address) if specs else None
        if specs:
            check_results_writable(plan.results)
    except (UsageError, BackendUnavailable) as error:
        print(f"{PROG}: error: {one_line(str(error))}", file=sys.stderr)
        return EXIT_USAGE

    progress = None
    if backend is not None:
        print(f"{len(specs)} training run(s) to do on the {backend.name} backend ({backend.workers} at once); "
              f"{found} record(s) already in {plan.results}", flush=True)
        progress = _Progress(plan.results, len(specs), {"backend": backend.name, "workers": backend.workers})
        try:
            backend.run(specs, progress.on_done, progress.on_failed)
        except KeyboardInterrupt:
            print(f"\nInterrupted: {progress.written} record(s) written to {plan.results}; run the same command "
                  "again to continue.", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BackendUnavailable as error:
            print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
            return EXIT_USAGE
    elif not args.report_only:
        print(f"Nothing to run: all {found} record(s) are already in {plan.results}.")

    status = write_report(plan)
    if progress is not None and progress.failed:
        print(f"{progress.failed} run(s) failed (see above); their records are missing.", file=sys.stderr)
        return EXIT_FAILED_RUNS
    return status


def write_report(plan: ComparePlan) -> int:
    """Report the records of the plan's tasks, arms and seeds: print the table, write the report files."""
    records = []
    try:
        for task in plan.tasks:
            records += load_records(plan.results, [task], plan.arms, plan.seeds[task])
        if not records:
            raise RecordError(f"no records of {', '.join(plan.arms)} on {', '.join(plan.tasks)} in {plan.results}")
        report = summarise(records, plan.tasks, plan.arms)
    except RecordError as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE
    expected = sum(len(seeds) * len(plan.arms) for seeds in plan.seeds.values() if seeds is not None)
    if expected > len(records):
        print(f"Note: {expected - len(records)} of the {expected} requested records are missing; the report "
              "covers the others.")
    print_report(report)
    json_path, markdown_path, png_path = (plan.results / name for name in REPORT_FILES)
    try:
        plan.results.mkdir(parents=True, exist_ok=True)
        write_json(json_path, report_json(report), indent=2)
        markdown_path.write_text(markdown_table(report))
        plot_report(report, png_path)
    except OSError as error:
        print(f"{PROG}: error: cannot write the report in {plan.results}: {one_line(error.strerror or str(error))} "
              "(the records are there: run the same command with --report-only to try again)", file=sys.stderr)
        return EXIT_FAILED_RUNS
    print(f"Wrote {json_path}, {markdown_path} and {png_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rollback_rl.experiments.compare ...``: the command without the rest of ``rollback-rl``."""
    parser = add_compare_arguments(argparse.ArgumentParser(prog=PROG, description=DESCRIPTION))
    return run_compare(parser.parse_args(argv))
