"""``rollback-rl forgetting``: the A -> B -> A experiment over seeds, or (``--stationary``) the replay-buffer
analysis of collapses on CartPole-v1.

    rollback-rl forgetting [--seeds 5] [--steps-per-task 30000,15000,15000] [--tasks default,reversed]
                           [--arms vanilla,rollback,task_bank] [--workers N] [--logdir runs]
    rollback-rl forgetting --stationary [--seeds 10] [--steps 50000] [--workers N] [--logdir runs]

Reads top to bottom: check every input (one ``error:`` line and exit status 2 on the first problem),
create the run folder ``<logdir>/forgetting-<date-time>/`` (or ``stationary-<date-time>/``), train every
run in a process pool writing each record as it finishes, then compute the metrics and write
``results.json`` (settings, versions, raw records, per-seed metrics, summary with intervals) and a PNG.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from dataclasses import asdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import stable_baselines3
import torch

import rollback_rl
from rollback_rl.envs import TASK_NAMES
from rollback_rl.forgetting.experiment import ARMS, METRICS, ForgettingSettings, record_metrics, run_experiment, \
    summarise, to_json
from rollback_rl.forgetting.figures import plot_forgetting, plot_stationary
from rollback_rl.forgetting.pool import default_workers
from rollback_rl.forgetting.stationary import analyse, run_stationary
from rollback_rl.hyperparams import DEFAULT_EVAL_EPISODES, HyperparameterError, check_hyperparameters, \
    hyperparameters_for, parse_yaml_value
from stable_baselines3 import DQN

PROG = "rollback-rl forgetting"
EXIT_USAGE = 2
DEFAULTS = ForgettingSettings()
DEFAULT_SEEDS = 5
DEFAULT_STATIONARY_SEEDS = 10
STATIONARY_STEPS = hyperparameters_for("CartPole-v1", "dqn")["n_timesteps"]  # 50,000


class ForgettingUsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2, before anything runs."""


def add_forgetting_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``forgetting`` options to ``parser`` (a subcommand's parser); :func:`run_forgetting` checks them."""
    parser.add_argument("--seeds", type=int, metavar="N",
                        help=f"seeds 0 to N-1 (default: {DEFAULT_SEEDS}; with --stationary: "
                             f"{DEFAULT_STATIONARY_SEEDS})")
    parser.add_argument("--steps-per-task", metavar="N | A,B,A",
                        help="training timesteps of each phase: one number for all three, or the lengths of A, B "
                             f"and A again (default: {','.join(map(str, DEFAULTS.phase_steps))})")
    parser.add_argument("--tasks", metavar="A,B", default=",".join(DEFAULTS.tasks),
                        help=f"task A and task B (default: {','.join(DEFAULTS.tasks)}; known: {', '.join(TASK_NAMES)})")
    parser.add_argument("--arms", metavar="ARM,...", default=",".join(ARMS),
                        help="arms, comma-separated (default: all): "
                             + "; ".join(f"{name}: {text}" for name, text in ARMS.items()))
    parser.add_argument("--stationary", action="store_true",
                        help="instead: vanilla DQN on CartPole-v1 over seeds, testing whether collapses follow a "
                             "replay buffer starved of failure transitions")
    parser.add_argument("--steps", type=int, metavar="N",
                        help=f"with --stationary: training timesteps per seed (default: {STATIONARY_STEPS:,})")
    parser.add_argument("--eval-freq", type=int, default=DEFAULTS.eval_freq, metavar="N",
                        help=f"training timesteps between evaluations (default: {DEFAULTS.eval_freq:,})")
    parser.add_argument("--eval-episodes", type=int, default=DEFAULT_EVAL_EPISODES, metavar="N",
                        help=f"greedy episodes per task and evaluation (default: {DEFAULT_EVAL_EPISODES})")
    parser.add_argument("--final-episodes", type=int, default=DEFAULTS.final_episodes, metavar="N",
                        help="fresh greedy episodes of A scoring each run's final weights "
                             f"(default: {DEFAULTS.final_episodes})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one DQN hyperparameter of every run, e.g. --set learning_starts=500 "
                             "(repeatable)")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="runs at once, one process each (default: every core; 1 runs in this process)")
    parser.add_argument("--logdir", default="runs", metavar="DIR",
                        help="folder that receives the run folder (default: runs)")
    parser.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard event files")
    return parser


def run_forgetting(args: argparse.Namespace) -> int:
    """Run the command described by ``args`` (from :func:`add_forgetting_arguments`); return the exit status."""
    try:
        plan = _check(args)
    except ForgettingUsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    plan["run_dir"].mkdir(parents=True)
    print(f"Writing to {plan['run_dir']}", flush=True)
    if args.stationary:
        return _run_stationary(plan, args)
    return _run_forgetting(plan, args)


# -- checking the command line -------------------------------------------------------------------------

def _comma_list(text: str, option: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ForgettingUsageError(f"{option} needs at least one name")
    if len(set(items)) != len(items):
        raise ForgettingUsageError(f"{option} names something twice: {text!r}")
    return items


def _positive(option: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ForgettingUsageError(f"{option} must be a positive integer, got {value}")


def _overrides(pairs: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    values = {}
    for text in pairs:
        key, equals, value = text.partition("=")
        if not equals or not key.strip():
            raise ForgettingUsageError(f"--set expects KEY=VALUE, got {text!r}")
        try:
            values[key.strip()] = parse_yaml_value(value)
        except HyperparameterError as error:
            raise ForgettingUsageError(str(error)) from None
    try:
        check_hyperparameters(values, DQN, "--set")
    except HyperparameterError as error:
        raise ForgettingUsageError(str(error)) from None
    return tuple(values.items())


def _check(args: argparse.Namespace) -> dict[str, Any]:
    for option, value in (("--seeds", args.seeds), ("--steps", args.steps),
                          ("--eval-freq", args.eval_freq), ("--eval-episodes", args.eval_episodes),
                          ("--final-episodes", args.final_episodes),
                          ("--workers", args.workers)):
        _positive(option, value)
    overrides = _overrides(args.overrides)
    logdir = Path(args.logdir)
    if logdir.exists() and not logdir.is_dir():
        raise ForgettingUsageError(f"--logdir {logdir} exists and is not a folder")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    plan: dict[str, Any] = {"overrides": overrides, "workers": args.workers or default_workers()}
    if args.stationary:
        if args.steps_per_task is not None:
            raise ForgettingUsageError("--steps-per-task is for the A -> B -> A experiment; with --stationary use --steps")
        if args.tasks != ",".join(DEFAULTS.tasks) or args.arms != ",".join(ARMS):
            raise ForgettingUsageError("--tasks and --arms are for the A -> B -> A experiment, not --stationary")
        plan.update(seeds=list(range(args.seeds or DEFAULT_STATIONARY_SEEDS)), steps=args.steps or STATIONARY_STEPS,
                    run_dir=_free(logdir / f"stationary-{stamp}"))
        return plan
    if args.steps is not None:
        raise ForgettingUsageError("--steps is for --stationary; the A -> B -> A experiment takes --steps-per-task")
    arms = _comma_list(args.arms, "--arms")
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        raise ForgettingUsageError(f"unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    tasks = _comma_list(args.tasks, "--tasks")
    try:
        settings = ForgettingSettings(tasks=tuple(tasks), eval_freq=args.eval_freq, eval_episodes=args.eval_episodes,
                                      phase_steps=_phase_steps(args.steps_per_task), overrides=overrides,
                                      final_episodes=args.final_episodes)
    except ValueError as error:
        raise ForgettingUsageError(str(error).replace("phase_steps", "--steps-per-task")
                                   .replace("eval_freq", "--eval-freq").replace("tasks must", "--tasks must")) from None
    plan.update(settings=settings, arms=arms, seeds=list(range(args.seeds or DEFAULT_SEEDS)),
                run_dir=_free(logdir / f"forgetting-{stamp}"))
    return plan


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
        raise ForgettingUsageError(f"--steps-per-task must be one positive integer or three separated by commas "
                                   f"(A,B,A), got {text!r}")
    return steps[0], steps[1], steps[2]


def _free(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``... if it exists (two runs started in the same second)."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}-{number}")
    return candidate


# -- running -------------------------------------------------------------------------------------------

def _command_line(argv: Sequence[str]) -> str:
    """The command as typed: ``argv`` holds the subcommand when it came through ``rollback-rl``'s own parser."""
    words = list(argv) if argv[:1] == ["forgetting"] else ["forgetting", *argv]
    return " ".join(["rollback-rl", *words])


def _environment(args: argparse.Namespace, workers: int, started: float) -> dict[str, Any]:
    return {
        "command": _command_line(getattr(args, "argv", [])),
        "workers": workers,
        "cores": default_workers(),
        "wall_minutes": (time.perf_counter() - started) / 60,
        "versions": {"rollback_rl": rollback_rl.__version__, "torch": torch.__version__,
                     "stable_baselines3": stable_baselines3.__version__, "gymnasium": gym.__version__,
                     "python": platform.python_version()},
        "machine": platform.platform(),
    }


def _run_forgetting(plan: dict[str, Any], args: argparse.Namespace) -> int:
    started = time.perf_counter()
    settings: ForgettingSettings = plan["settings"]
    run_dir: Path = plan["run_dir"]
    print(f"A -> B -> A: tasks {settings.tasks}, phases of {', '.join(f'{n:,}' for n in settings.phase_steps)} steps, arms "
          f"{', '.join(plan['arms'])}, seeds {plan['seeds'][0]}-{plan['seeds'][-1]}, {plan['workers']} workers",
          flush=True)
    records = run_experiment(settings, plan["arms"], plan["seeds"], run_dir, workers=plan["workers"],
                             tensorboard=not args.no_tensorboard, progress=lambda line: print(line, flush=True))
    per_seed: dict[str, dict[int, dict[str, Any]]] = {}
    for record in records:
        per_seed.setdefault(record["arm"], {})[record["seed"]] = record_metrics(record)
    summary = summarise(per_seed)
    plot_forgetting(records, settings.tasks, settings.phase_steps, run_dir / "forgetting.png")
    results = {"experiment": "A -> B -> A forgetting", "settings": asdict(settings),
               "arms": {arm: ARMS[arm] for arm in plan["arms"]}, "seeds": plan["seeds"],
               **_environment(args, plan["workers"], started),
               "cpu_minutes": sum(record["cpu_seconds"] for record in records) / 60, "summary": summary,
               "per_seed": {arm: {str(seed): m for seed, m in by_seed.items()} for arm, by_seed in per_seed.items()},
               "records": records}
    (run_dir / "results.json").write_text(to_json(results))
    print(format_summary(summary, settings))
    print(f"Wrote {run_dir / 'results.json'} and {run_dir / 'forgetting.png'} "
          f"({results['wall_minutes']:.1f} min)")
    return 0


def _interval_text(entry: dict[str, Any], key: str = "iqm", digits: int = 0) -> str:
    if key not in entry:
        return "n/a"
    value = entry[key]
    return f"{value['estimate']:.{digits}f} [{value['low']:.{digits}f}, {value['high']:.{digits}f}]"


def format_summary(summary: dict[str, Any], settings: ForgettingSettings) -> str:
    """A plain-text table of the summary: IQM [95% interval] over seeds per arm and metric."""
    names = {"forgetting": "forgetting (A before switch - A at end of B)",
             "relearn_steps": f"steps to relearn A to {settings.relearn_fraction:.0%} of its pre-switch score",
             "average_score": "average score on the task trained on",
             "online_return": "online return (training episodes)",
             "final_score_a": f"final weights on A ({settings.final_episodes} fresh episodes)"}
    lines = ["IQM [95% bootstrap interval] over seeds (mean in parentheses):"]
    for arm, arm_summary in summary.items():
        lines.append(f"  {arm} (seeds {len(arm_summary['seeds'])}): rollbacks {sum(arm_summary['rollbacks'])}, "
                     f"rebases {sum(arm_summary['rebases'])}, bank restores {sum(arm_summary['bank_restores'])}")
        for metric in METRICS:
            entry = arm_summary[metric]
            extra = ""
            if metric == "relearn_steps":
                extra = f"; censored {entry['censored']}, undefined {entry['undefined']}"
            difference = entry.get("minus_vanilla")
            if difference:
                extra += (f"; minus vanilla (paired mean) {difference['estimate']:+.0f} "
                          f"[{difference['low']:+.0f}, {difference['high']:+.0f}]")
            lines.append(f"    {names[metric]}: {_interval_text(entry)} ({_interval_text(entry, 'mean')}){extra}")
    return "\n".join(lines)


def _run_stationary(plan: dict[str, Any], args: argparse.Namespace) -> int:
    started = time.perf_counter()
    run_dir: Path = plan["run_dir"]
    print(f"Stationary buffer analysis: vanilla DQN on CartPole-v1, {plan['steps']:,} steps, seeds "
          f"{plan['seeds'][0]}-{plan['seeds'][-1]}, {plan['workers']} workers", flush=True)
    runs = run_stationary(plan["seeds"], plan["steps"], run_dir, workers=plan["workers"], overrides=plan["overrides"],
                          eval_freq=args.eval_freq, eval_episodes=args.eval_episodes,
                          tensorboard=not args.no_tensorboard, progress=lambda line: print(line, flush=True))
    analysis = analyse(runs)
    plot_stationary(runs, analysis, run_dir / "stationary.png")
    results = {"experiment": "failure share of the replay buffer before collapses, CartPole-v1",
               "steps": plan["steps"], "seeds": plan["seeds"], **_environment(args, plan["workers"], started),
               "cpu_minutes": sum(run["cpu_seconds"] for run in runs) / 60,
               "analysis": analysis,
               "analysis_sampled": analyse(runs, variable="sampled_failure_share"),
               "records": runs}
    (run_dir / "stationary.json").write_text(to_json(results))
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
    """``python -m rollback_rl.forgetting.command``: the subcommand on its own, until the CLI hooks it in."""
    parser = add_forgetting_arguments(argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_forgetting(args)


if __name__ == "__main__":
    sys.exit(main())
