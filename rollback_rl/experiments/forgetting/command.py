"""``rollback-rl forgetting``: the A -> B -> A experiment, the recency dose-response, or (``--stationary``) the
replay-buffer analysis of collapses on CartPole-v1.

    rollback-rl forgetting [--tasks default,reversed[,B...]] [--arms vanilla,rollback,task_bank,label_free_bank]
                           [--buffer-sizes 10000,...] [--buffer-kinds fifo,...] [--seeds 5 | --seed-list S,...]
                           [--steps-per-task 30000,15000,15000] [--results DIR] [--report-only] [--workers N]
    rollback-rl forgetting --dose-response [--buffer-sizes 2500,5000,10000,25000,100000]
                           [--buffer-kinds fifo,reservoir,half] [--seeds 10] [--steps 50000] [--results DIR]
                           [--report-only] [--workers N]
    rollback-rl forgetting --stationary [--seeds 10] [--steps 50000] [--workers N] [--logdir runs]

Reads top to bottom: check every input (one ``error:`` line and exit status 2 on the first problem), run
every run whose record is missing under ``--results`` (default ``benchmarks/results/forgetting``), writing
each record as it finishes, so that the same command continues an interrupted sweep; then compute the
report from the records on disk alone and write ``report.json``, ``report.md`` and the figures next to
them. ``--report-only`` runs nothing: it regenerates the report and the figures from the records.
``--stationary`` keeps its own layout: a new ``<logdir>/stationary-<date-time>/`` folder per call.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from stable_baselines3 import DQN

from rollback_rl.buffers import BUFFER_KINDS
from rollback_rl.envs import TASK_NAMES
from rollback_rl.experiments.common import comma_list, default_workers, free_folder, provenance, seed_list, write_json
from rollback_rl.experiments.forgetting import dose_response, experiment
from rollback_rl.experiments.forgetting.experiment import ARMS, ForgettingSettings
from rollback_rl.experiments.forgetting.figures import (plot_dose_response, plot_forgetting,
                                                        plot_forgetting_against_buffer, plot_stationary)
from rollback_rl.experiments.forgetting.records import (A_B_A, DEFAULT_RESULTS, DOSE_RESPONSE, RecordError,
                                                        load_records, run_missing)
from rollback_rl.experiments.forgetting.stationary import analyse, run_stationary
from rollback_rl.hyperparams import DEFAULT_EVAL_EPISODES, HyperparameterError, check_hyperparameters, \
    parse_yaml_value
from rollback_rl.validation import UsageError, integer_at_least, parse_assignment

PROG = "rollback-rl forgetting"
EXIT_USAGE = 2
EXIT_FAILED_RUNS = 1
DESCRIPTION = ("Forgetting in online RL: A -> B -> A task switching (vanilla, rollback, a task-keyed and a "
               "label-free snapshot bank) against replay buffer size and kind; the recency dose-response on "
               "CartPole-v1 (--dose-response); and the failure-share analysis of stationary collapses (--stationary). "
               "Records are written one per run as each finishes; the same command continues an interrupted sweep.")
DEFAULTS = ForgettingSettings()
DOSE_DEFAULTS = dose_response.DoseResponseSettings()
DEFAULT_SEEDS = {"a_b_a": 5, "dose_response": 10, "stationary": 10}
DEFAULT_ARMS = tuple(ARMS)


def add_forgetting_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``forgetting`` options to ``parser`` (a subcommand's parser); :func:`run_forgetting` checks them."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dose-response", action="store_true",
                      help="instead: vanilla DQN on CartPole-v1 over replay buffer sizes and kinds, measuring whether "
                           "failures after solving grow as the buffer forgets sooner")
    mode.add_argument("--stationary", action="store_true",
                      help="instead: vanilla DQN on CartPole-v1 over seeds, testing whether collapses follow a "
                           "replay buffer starved of failure transitions")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, metavar="N",
                       help=f"seeds 0 to N-1 (default: {DEFAULT_SEEDS['a_b_a']}; with --dose-response or "
                            f"--stationary: {DEFAULT_SEEDS['dose_response']})")
    seeds.add_argument("--seed-list", metavar="S,...",
                       help="these seeds, comma-separated (e.g. 100,101,102: evaluation seeds kept apart from the "
                            "seeds 0-N used to choose settings)")
    parser.add_argument("--tasks", metavar="A,B[,B...]", default=",".join(DEFAULTS.tasks),
                        help=f"task A, then one or more tasks B, each run as A -> B -> A (default: "
                             f"{','.join(DEFAULTS.tasks)}; known: {', '.join(TASK_NAMES)})")
    parser.add_argument("--arms", metavar="ARM,...", default=",".join(DEFAULT_ARMS),
                        help="arms, comma-separated (default: all): "
                             + "; ".join(f"{name}: {text}" for name, text in ARMS.items()))
    parser.add_argument("--buffer-sizes", metavar="N,...",
                        help=f"replay buffer sizes, in transitions (default: {DEFAULTS.buffer_size:,}; with "
                             f"--dose-response: {','.join(map(str, dose_response.DEFAULT_BUFFER_SIZES))})")
    parser.add_argument("--buffer-kinds", metavar="KIND,...",
                        help=f"replay buffer kinds: {', '.join(BUFFER_KINDS)} (default: {DEFAULTS.buffer_kind}; with "
                             f"--dose-response: {','.join(BUFFER_KINDS)})")
    parser.add_argument("--steps-per-task", metavar="N | A,B,A",
                        help="training timesteps of each phase: one number for all three, or the lengths of A, B "
                             f"and A again (default: {','.join(map(str, DEFAULTS.phase_steps))})")
    parser.add_argument("--steps", type=int, metavar="N",
                        help=f"with --dose-response or --stationary: training timesteps per run "
                             f"(default: {DOSE_DEFAULTS.steps:,})")
    parser.add_argument("--eval-freq", type=int, default=DEFAULTS.eval_freq, metavar="N",
                        help=f"training timesteps between evaluations (default: {DEFAULTS.eval_freq:,})")
    parser.add_argument("--eval-episodes", type=int, default=DEFAULT_EVAL_EPISODES, metavar="N",
                        help=f"greedy episodes per task and evaluation (default: {DEFAULT_EVAL_EPISODES})")
    parser.add_argument("--final-episodes", type=int, default=DEFAULTS.final_episodes, metavar="N",
                        help="fresh greedy episodes scoring each run's final weights "
                             f"(default: {DEFAULTS.final_episodes})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one DQN hyperparameter of every run, e.g. --set learning_starts=500 "
                             "(repeatable; not buffer_size or replay_buffer_class: use --buffer-sizes, --buffer-kinds)")
    parser.add_argument("--results", metavar="DIR",
                        help=f"folder of the per-run records and the reports (default: {DEFAULT_RESULTS}); the "
                             f"records go to {A_B_A}/ or {DOSE_RESPONSE}/ in it")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the report and the figures from the records already there")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="runs at once, one process each (default: the cores this process may use; 1 runs "
                             "in this process)")
    parser.add_argument("--logdir", metavar="DIR",
                        help="with --stationary: folder that receives its run folder (default: runs)")
    parser.add_argument("--no-tensorboard", action="store_true",
                        help="with --stationary: write no TensorBoard event files")
    return parser


def run_forgetting(args: argparse.Namespace) -> int:
    """Run the command described by ``args`` (from :func:`add_forgetting_arguments`); return the exit status."""
    try:
        plan = _check(args)
        if args.stationary:
            return _run_stationary(plan, args)
        if args.dose_response:
            return _run_dose_response(plan, args)
        return _run_a_b_a(plan, args)
    except (UsageError, RecordError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


# -- checking the command line -------------------------------------------------------------------------

def _positive(option: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        return integer_at_least(1, value, option)
    except ValueError as error:
        raise UsageError(str(error)) from None


def _overrides(texts: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    try:
        pairs = [parse_assignment(text) for text in texts]
    except ValueError as error:
        raise UsageError(f"--set {error}") from None
    try:
        values = {key: parse_yaml_value(value) for key, value in pairs}
        check_hyperparameters(values, DQN, "--set")
    except HyperparameterError as error:
        raise UsageError(str(error)) from None
    for key in ("buffer_size", "replay_buffer_class"):
        if key in values:
            raise UsageError(f"--set {key}: the buffer is what these experiments vary; use --buffer-sizes and "
                             "--buffer-kinds")
    return tuple(values.items())


def _numbers(text: str | None, option: str, default: Sequence[int]) -> list[int]:
    if text is None:
        return list(default)
    return [_positive(option, item) for item in comma_list(text, option)]


def _kinds(text: str | None, default: Sequence[str]) -> list[str]:
    kinds = list(default) if text is None else comma_list(text, "--buffer-kinds")
    unknown = [kind for kind in kinds if kind not in BUFFER_KINDS]
    if unknown:
        raise UsageError(f"unknown buffer kind {unknown[0]!r}; choose from {', '.join(BUFFER_KINDS)}")
    return kinds


def _refuse(args: argparse.Namespace, mode: str, options: dict[str, bool]) -> None:
    """One error for the first option given that ``mode`` does not take."""
    for option, given in options.items():
        if given:
            raise UsageError(f"{option} is not for {mode}")


def _check(args: argparse.Namespace) -> dict[str, Any]:
    for option, value in (("--seeds", args.seeds), ("--steps", args.steps), ("--eval-freq", args.eval_freq),
                          ("--eval-episodes", args.eval_episodes), ("--final-episodes", args.final_episodes),
                          ("--workers", args.workers)):
        _positive(option, value)
    overrides = _overrides(args.overrides)
    a_b_a_only = {"--tasks": args.tasks != ",".join(DEFAULTS.tasks), "--arms": args.arms != ",".join(DEFAULT_ARMS),
                  "--steps-per-task": args.steps_per_task is not None}
    plan: dict[str, Any] = {"overrides": overrides, "workers": args.workers or default_workers()}
    if args.stationary:
        _refuse(args, "--stationary", {**a_b_a_only, "--buffer-sizes": args.buffer_sizes is not None,
                                       "--buffer-kinds": args.buffer_kinds is not None,
                                       "--results": args.results is not None, "--report-only": args.report_only})
        logdir = Path(args.logdir or "runs")
        if logdir.exists() and not logdir.is_dir():
            raise UsageError(f"--logdir {logdir} exists and is not a folder")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        plan.update(seeds=_seeds(args, "stationary"),
                    steps=args.steps or DOSE_DEFAULTS.steps, run_dir=free_folder(logdir / f"stationary-{stamp}"))
        return plan
    _refuse(args, "the A -> B -> A experiment or --dose-response",
            {"--logdir": args.logdir is not None, "--no-tensorboard": args.no_tensorboard})
    results = Path(args.results or DEFAULT_RESULTS)
    if results.exists() and not results.is_dir():
        raise UsageError(f"--results {results} exists and is not a folder")
    if args.dose_response:
        _refuse(args, "--dose-response", a_b_a_only)
        try:
            settings = dose_response.DoseResponseSettings(steps=args.steps or DOSE_DEFAULTS.steps,
                                                          eval_freq=args.eval_freq, eval_episodes=args.eval_episodes,
                                                          final_episodes=args.final_episodes, overrides=overrides)
        except ValueError as error:
            raise UsageError(str(error)) from None
        plan.update(settings=settings, folder=results / DOSE_RESPONSE,
                    sizes=_numbers(args.buffer_sizes, "--buffer-sizes", dose_response.DEFAULT_BUFFER_SIZES),
                    kinds=_kinds(args.buffer_kinds, tuple(BUFFER_KINDS)),
                    seeds=_seeds(args, "dose_response"))
        return plan
    _refuse(args, "the A -> B -> A experiment (it takes --steps-per-task)", {"--steps": args.steps is not None})
    arms = comma_list(args.arms, "--arms")
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise UsageError(f"unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    tasks = comma_list(args.tasks, "--tasks")
    if len(tasks) < 2:
        raise UsageError(f"--tasks needs task A and at least one task B, got {args.tasks!r}")
    sizes = _numbers(args.buffer_sizes, "--buffer-sizes", (DEFAULTS.buffer_size,))
    kinds = _kinds(args.buffer_kinds, (DEFAULTS.buffer_kind,))
    phase_steps = _phase_steps(args.steps_per_task)
    try:
        cells = [ForgettingSettings(tasks=(tasks[0], b), eval_freq=args.eval_freq, eval_episodes=args.eval_episodes,
                                    phase_steps=phase_steps, overrides=overrides, final_episodes=args.final_episodes,
                                    buffer_size=size, buffer_kind=kind)
                 for b in tasks[1:] for kind in kinds for size in sizes]
    except ValueError as error:
        raise UsageError(str(error).replace("phase_steps", "--steps-per-task").replace("eval_freq", "--eval-freq")
                         .replace("tasks must", "--tasks must").replace("buffer_size", "--buffer-sizes")) from None
    plan.update(cells=cells, arms=arms, tasks=tasks, sizes=sizes, kinds=kinds, folder=results / A_B_A,
                seeds=_seeds(args, "a_b_a"))
    return plan


def _seeds(args: argparse.Namespace, mode: str) -> list[int]:
    if args.seed_list is not None:
        return seed_list(args.seed_list)
    return list(range(args.seeds or DEFAULT_SEEDS[mode]))


def _phase_steps(text: str | None) -> tuple[int, int, int]:
    if text is None:
        return DEFAULTS.phase_steps
    try:
        steps = [int(item) for item in text.split(",")]
    except ValueError:
        steps = []
    if len(steps) == 1:
        steps *= 3
    if len(steps) != 3 or min(steps) < 1:
        raise UsageError(f"--steps-per-task must be one positive integer or three separated by commas "
                         f"(A,B,A), got {text!r}")
    return steps[0], steps[1], steps[2]


# -- running -------------------------------------------------------------------------------------------

def _command_line(argv: Sequence[str]) -> str:
    """The command as typed: ``argv`` holds the subcommand when it came through ``rollback-rl``'s own parser."""
    words = list(argv) if argv[:1] == ["forgetting"] else ["forgetting", *argv]
    return " ".join(["rollback-rl", *words])


def _settings(args: argparse.Namespace, plan: dict[str, Any]) -> dict[str, Any]:
    """Every setting of the command, for the provenance of its records."""
    settings = {"command": _command_line(getattr(args, "argv", [])), "workers": plan["workers"],
                "seeds": plan["seeds"]}
    if args.stationary:
        return {**settings, "steps": plan["steps"], "eval_freq": args.eval_freq, "eval_episodes": args.eval_episodes,
                "overrides": plan["overrides"], "tensorboard": not args.no_tensorboard}
    if args.dose_response:
        return {**settings, **asdict(plan["settings"]), "buffer_sizes": plan["sizes"], "buffer_kinds": plan["kinds"]}
    every_cell = {key: value for key, value in asdict(plan["cells"][0]).items()
                  if key not in ("tasks", "buffer_size", "buffer_kind")}
    return {**settings, "arms": plan["arms"], "tasks": plan["tasks"], "buffer_sizes": plan["sizes"],
            "buffer_kinds": plan["kinds"], **every_cell}


def _run_sweep(function: Any, runs: dict[Any, Any], experiment_name: str, plan: dict[str, Any],
               args: argparse.Namespace) -> dict[str, str]:
    """Run what is missing (unless ``--report-only``); say which runs failed and why, and return them."""
    if args.report_only:
        return {}
    print(f"{len(runs)} runs planned, {plan['workers']} workers; records under {plan['folder']}", flush=True)
    outcome = run_missing(function, runs, experiment_name, plan["workers"], provenance(_settings(args, plan)),
                          progress=lambda line: print(line, flush=True))
    if outcome.failed:
        print(f"{len(outcome.failed)} runs failed (their records are missing; run the same command again to retry):",
              file=sys.stderr)
        for description, why in outcome.failed.items():
            print(f"  {description}: {why}", file=sys.stderr)
    return outcome.failed


def _records(folder: Path, experiment_name: str) -> list[dict[str, Any]]:
    records = load_records(folder, experiment_name) if folder.is_dir() else []
    if not records:
        raise UsageError(f"no records under {folder}: run the experiment first (without --report-only)")
    return records


def _finish(failed: dict[str, str], written: Sequence[Path]) -> int:
    print("Wrote " + ", ".join(str(path) for path in written))
    return EXIT_FAILED_RUNS if failed else 0


def _run_dose_response(plan: dict[str, Any], args: argparse.Namespace) -> int:
    folder: Path = plan["folder"]
    runs = dose_response.plan_runs(plan["sizes"], plan["kinds"], plan["seeds"], plan["settings"], folder)
    failed = _run_sweep(dose_response.run_one, runs, DOSE_RESPONSE, plan, args)
    return _finish(failed, write_dose_response_report(folder))


def write_dose_response_report(folder: Path) -> list[Path]:
    """``report.json``, ``report.md`` and ``dose_response.png`` in ``folder``, from its records alone."""
    result = dose_response.report(_records(folder, DOSE_RESPONSE))
    text = dose_response.markdown(result)
    print(text)
    written = [write_json(folder / "report.json", result), folder / "report.md", folder / "dose_response.png"]
    written[1].write_text(text)
    plot_dose_response(result, written[2])
    return written


def _run_a_b_a(plan: dict[str, Any], args: argparse.Namespace) -> int:
    folder: Path = plan["folder"]
    runs = experiment.plan_runs(plan["cells"], plan["arms"], plan["seeds"], folder)
    failed = _run_sweep(experiment.run_arm, runs, A_B_A, plan, args)
    return _finish(failed, write_a_b_a_report(folder))


def write_a_b_a_report(folder: Path) -> list[Path]:
    """``report.json``, ``report.md`` and the figures in ``folder``, from its records alone: the curves of
    every cell with more than one arm, and forgetting against the buffer where there is more than one buffer."""
    records = _records(folder, A_B_A)
    try:
        result = experiment.report(records)
    except ValueError as error:
        raise UsageError(str(error)) from None
    text = experiment.markdown(result)
    print(text)
    written = [write_json(folder / "report.json", result), folder / "report.md"]
    written[1].write_text(text)
    for cell in result["cells"]:
        if len(cell["arms"]) > 1:
            own = sorted((record for record in records if experiment.cell_of(record) == cell["cell"]),
                         key=lambda record: list(ARMS).index(record["arm"]))
            path = folder / f"curves-{cell['cell'].replace('/', '-')}.png"
            settings = cell["settings"]
            plot_forgetting(own, tuple(settings["tasks"]), settings["phase_steps"], path)
            written.append(path)
    if len({cell["cell"].split("/")[1] for cell in result["cells"]}) > 1 \
            and plot_forgetting_against_buffer(result, folder / "forgetting_vs_buffer.png"):
        written.append(folder / "forgetting_vs_buffer.png")
    return written


def _run_stationary(plan: dict[str, Any], args: argparse.Namespace) -> int:
    started = time.perf_counter()
    run_dir: Path = plan["run_dir"]
    run_dir.mkdir(parents=True)
    print(f"Stationary buffer analysis: vanilla DQN on CartPole-v1, {plan['steps']:,} steps, seeds "
          f"{plan['seeds'][0]}-{plan['seeds'][-1]}, {plan['workers']} workers; writing to {run_dir}", flush=True)
    made_by = provenance(_settings(args, plan))
    runs = run_stationary(plan["seeds"], plan["steps"], run_dir, workers=plan["workers"], overrides=plan["overrides"],
                          eval_freq=args.eval_freq, eval_episodes=args.eval_episodes,
                          tensorboard=not args.no_tensorboard, progress=lambda line: print(line, flush=True),
                          provenance=made_by)
    analysis = analyse(runs)
    plot_stationary(runs, analysis, run_dir / "stationary.png")
    results = {"experiment": "failure share of the replay buffer before collapses, CartPole-v1",
               "steps": plan["steps"], "seeds": plan["seeds"],
               "command": _command_line(getattr(args, "argv", [])), "workers": plan["workers"],
               "cores": default_workers(), "wall_minutes": (time.perf_counter() - started) / 60,
               "provenance": made_by,
               "cpu_minutes": sum(run["cpu_seconds"] for run in runs) / 60,
               "analysis": analysis,
               "analysis_sampled": analyse(runs, variable="sampled_failure_share"),
               "records": runs}
    write_json(run_dir / "stationary.json", results)
    print(format_analysis(analysis))
    print(f"Wrote {run_dir / 'stationary.json'} and {run_dir / 'stationary.png'} ({results['wall_minutes']:.1f} min)")
    return 0


def format_analysis(analysis: dict[str, Any]) -> str:
    """The buffer analysis in a few lines of plain text."""
    seeds = analysis["seeds_with_collapse"]
    lines = [f"Seeds with at least one collapse: {seeds['rate']:.0%} [{seeds['low']:.0%}, {seeds['high']:.0%}] "
             f"of {analysis['seeds']} (Wilson)",
             f"Moments before a collapse: {analysis['n_cases']} ({analysis['n_matched_cases']} with a control at the "
             f"same timestep); at-risk moments with no collapse after: {analysis['n_controls']}"]
    if analysis.get("case_median") is not None and analysis.get("control_median") is not None:
        lines.append(f"Median {analysis['variable']}: {analysis['case_median']:.4f} before collapses, "
                     f"{analysis['control_median']:.4f} otherwise")
    if "matched_difference" in analysis:
        difference = analysis["matched_difference"]
        lines.append(f"Before collapse minus matched controls: {difference['estimate']:+.4f} "
                     f"[{difference['low']:+.4f}, {difference['high']:+.4f}] (95% bootstrap over cases; "
                     f"{analysis['matched_relative_difference']:+.0%} of the controls' level), "
                     f"permutation p = {analysis['permutation_p']:.3f}")
    if "mann_whitney" in analysis:
        lines.append(f"Mann-Whitney U (unmatched): U = {analysis['mann_whitney']['u']:.0f}, "
                     f"p = {analysis['mann_whitney']['p']:.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m rollback_rl.experiments.forgetting.command``: the command without the rest of ``rollback-rl``
    (same as ``rollback-rl forgetting``)."""
    parser = add_forgetting_arguments(argparse.ArgumentParser(prog=PROG, description=DESCRIPTION))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_forgetting(args)


if __name__ == "__main__":
    sys.exit(main())
