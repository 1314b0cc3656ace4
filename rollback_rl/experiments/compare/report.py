"""The report of a benchmark, computed from its per-run records alone (so anyone can recompute it).

Per task and arm: the final-policy return's IQM with a 95% stratified bootstrap interval (and its
median), the collapse-at-end rate with a Wilson interval, the online return, the normalised area under
the evaluation curve, the evaluation env steps spent per run, wall times, the overhead against the
``vanilla`` arm and the rollbacks per run. With several tasks, an "all tasks" row per arm pools the
final returns normalised to each task's score range (stratified by task, as rliable does).

:func:`summarise` computes it, :func:`print_report`, :func:`markdown_table` and :func:`report_json`
present it, :func:`plot_report` draws the evaluation curves (median and interquartile band per arm)
and the performance profile of the final returns.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from rollback_rl.experiments.compare.records import RecordError
from rollback_rl.core.detectors import normalised_drop
from rollback_rl.core.statistics import (
    iqm,
    normalised_area_under_curve,
    performance_profile,
    stratified_bootstrap_interval,
    wilson_interval,
)

COLLAPSE_DROP = 0.5
BOOTSTRAP_RESAMPLES = 2_000
REFERENCE_ARM = "vanilla"
ALL_TASKS = "all tasks (normalised)"
# The exact range of an episode's return, where the task has one: CartPole pays 1 a step for at most
# 500 steps; Acrobot and MountainCar pay -1 a step for at most 500 and 200 steps. Other tasks use the
# lowest and highest score found in their records.
REFERENCE_RANGES: dict[str, tuple[float, float]] = {
    "CartPole-v1": (0.0, 500.0),
    "rollback_rl/SwitchingCartPole-v0": (0.0, 500.0),
    "rollback_rl/DriftingCartPole-v0": (0.0, 500.0),
    "Acrobot-v1": (-500.0, 0.0),
    "MountainCar-v0": (-200.0, 0.0),
}
COLLAPSE_RULE = (f"collapsed at the end: the final-policy return fell by more than {COLLAPSE_DROP:.0%} of the run's "
                 "learned range below its peak eval score, the range measured from the floor min(0, lowest eval "
                 "score) (detectors.normalised_drop). With non-negative returns (CartPole) the floor is 0, i.e. "
                 f"final < {COLLAPSE_DROP:.0%} of peak; on tasks with negative returns it is the run's lowest eval score.")

Interval = tuple[float, float, float]  # estimate, low, high


# -- per-run quantities ----------------------------------------------------------------------------

def final_return(record: dict[str, Any]) -> float:
    """Mean return of the final policy on its fresh greedy episodes."""
    return float(record["final_policy"]["mean"])


def collapse_floor(record: dict[str, Any]) -> float:
    return min(0.0, float(record["lowest_eval"]))


def collapsed_at_end(record: dict[str, Any]) -> bool:
    """Whether the run's final policy lost more than half of what the run had learned (``COLLAPSE_RULE``)."""
    if record["peak_eval"] is None:
        return False
    return normalised_drop(float(record["peak_eval"]), final_return(record), collapse_floor(record)) > COLLAPSE_DROP


def score_range(task: str, records: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """The range scores of ``task`` are normalised to: ``REFERENCE_RANGES`` or the records' own extremes."""
    if task in REFERENCE_RANGES:
        return REFERENCE_RANGES[task]
    values = [v for r in records if r["task"] == task for v in [*r["eval_curve"]["mean"], final_return(r)]]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    return (low, high) if high > low else (low, low + 1.0)


def eval_curve_area(record: dict[str, Any], low: float, high: float) -> float:
    curve = record["eval_curve"]
    return normalised_area_under_curve(curve["timesteps"], curve["mean"], low, high)


def in_place_curve(record: dict[str, Any]) -> list[float]:
    """The evaluation curve of the weights in place after each evaluation's decision: where a rollback
    followed an evaluation, the restored weights' fresh check (``verified_score``) replaces the collapsed
    score that triggered it. The same as ``eval_curve`` for arms without rollbacks."""
    means = list(record["eval_curve"]["mean"])
    index = {timestep: i for i, timestep in enumerate(record["eval_curve"]["timesteps"])}
    for event in record["rollbacks"]:  # in order: a later event at one timestep wins
        if event.get("verified_score") is not None and event["timestep"] in index:
            means[index[event["timestep"]]] = float(event["verified_score"])
    return means


def in_place_curve_area(record: dict[str, Any], low: float, high: float) -> float:
    return normalised_area_under_curve(record["eval_curve"]["timesteps"], in_place_curve(record), low, high)


def training_seconds(record: dict[str, Any]) -> float:
    """Wall time of ``learn()`` less the time spent evaluating (the same schedule in every arm)."""
    return float(record["time_s"]["learn"]) - float(record["time_s"]["evaluating"])


# -- the summary -----------------------------------------------------------------------------------

@dataclass
class ArmSummary:
    """One row of the report: one arm on one task (or on all tasks, normalised). Times in seconds."""

    task: str
    arm: str
    runs: int
    seeds: list[int]
    final_iqm: Interval
    final_median: float
    collapses: int
    collapse_rate: Interval
    online_iqm: Interval | None = None
    area_iqm: Interval | None = None
    in_place_area_iqm: Interval | None = None
    eval_env_steps: float | None = None  # mean per run
    learn_seconds: float | None = None  # median per run
    eval_seconds: float | None = None  # median per run
    overhead: float | None = None  # median over seeds of learn / vanilla's learn, same seed
    overhead_excluding_eval: float | None = None
    rollbacks_per_run: float | None = None

    def to_json(self) -> dict[str, Any]:
        def interval(value: Interval | None) -> dict[str, float] | None:
            return None if value is None else dict(zip(("estimate", "low", "high"), value))
        return {"task": self.task, "arm": self.arm, "runs": self.runs, "seeds": self.seeds,
                "final_return_iqm": interval(self.final_iqm), "final_return_median": self.final_median,
                "collapses": self.collapses, "collapse_rate": interval(self.collapse_rate),
                "online_return_iqm": interval(self.online_iqm), "eval_curve_area_iqm": interval(self.area_iqm),
                "in_place_eval_curve_area_iqm": interval(self.in_place_area_iqm),
                "eval_env_steps_per_run": self.eval_env_steps, "learn_seconds_median": self.learn_seconds,
                "eval_seconds_median": self.eval_seconds, "overhead_vs_vanilla": self.overhead,
                "overhead_vs_vanilla_excluding_eval": self.overhead_excluding_eval,
                "rollbacks_per_run": self.rollbacks_per_run}


def _bootstrap(task: str, values: Sequence[float]) -> Interval:
    return stratified_bootstrap_interval({task: values}, iqm, resamples=BOOTSTRAP_RESAMPLES)


def _paired_ratio(records: list[dict[str, Any]], reference: dict[int, dict[str, Any]], measure: Any) -> float | None:
    ratios = [measure(r) / measure(reference[r["seed"]]) for r in records
              if r["seed"] in reference and measure(reference[r["seed"]]) > 0]
    return float(np.median(ratios)) if ratios else None


def summarise_arm(task: str, arm: str, records: list[dict[str, Any]], reference: dict[int, dict[str, Any]],
                  score_low_high: tuple[float, float]) -> ArmSummary:
    """The row of ``arm`` on ``task`` from its records; ``reference``: the vanilla arm's records by seed."""
    finals = [final_return(r) for r in records]
    collapses = sum(collapsed_at_end(r) for r in records)
    online = [r["online_return"]["mean"] for r in records if r["online_return"]["mean"] is not None]
    areas = [eval_curve_area(r, *score_low_high) for r in records]
    return ArmSummary(
        task=task, arm=arm, runs=len(records), seeds=sorted(r["seed"] for r in records),
        final_iqm=_bootstrap(task, finals), final_median=float(np.median(finals)),
        collapses=collapses, collapse_rate=wilson_interval(collapses, len(records)),
        online_iqm=_bootstrap(task, online) if online else None,
        area_iqm=_bootstrap(task, areas),
        in_place_area_iqm=_bootstrap(task, [in_place_curve_area(r, *score_low_high) for r in records]),
        eval_env_steps=float(np.mean([r["eval_env_steps"] for r in records])),
        learn_seconds=float(np.median([r["time_s"]["learn"] for r in records])),
        eval_seconds=float(np.median([r["time_s"]["evaluating"] for r in records])),
        overhead=_paired_ratio(records, reference, lambda r: float(r["time_s"]["learn"])),
        overhead_excluding_eval=_paired_ratio(records, reference, training_seconds),
        rollbacks_per_run=float(np.mean([len(r["rollbacks"]) for r in records])),
    )


def summarise_all_tasks(arm: str, records: list[dict[str, Any]], ranges: dict[str, tuple[float, float]]) -> ArmSummary:
    """``arm`` over every task: final returns normalised to each task's range, bootstrapped by task."""
    by_task: dict[str, list[float]] = {}
    for r in records:
        low, high = ranges[r["task"]]
        by_task.setdefault(r["task"], []).append((final_return(r) - low) / (high - low))
    collapses = sum(collapsed_at_end(r) for r in records)
    pooled = [v for values in by_task.values() for v in values]
    return ArmSummary(task=ALL_TASKS, arm=arm, runs=len(records), seeds=sorted({r["seed"] for r in records}),
                      final_iqm=stratified_bootstrap_interval(by_task, iqm, resamples=BOOTSTRAP_RESAMPLES),
                      final_median=float(np.median(pooled)), collapses=collapses,
                      collapse_rate=wilson_interval(collapses, len(records)))


def check_same_settings(records: Sequence[dict[str, Any]]) -> None:
    """Refuse to mix runs of one task made with different settings (steps, schedule, overrides)."""
    first: dict[str, dict[str, Any]] = {}
    for r in records:
        seen = first.setdefault(r["task"], r)
        if r["settings"] != seen["settings"]:
            raise RecordError(f"{r['task']}: {r['arm']} seed {r['seed']} was run with {r['settings']}, but "
                              f"{seen['arm']} seed {seen['seed']} with {seen['settings']}: keep each set of "
                              "settings in its own --results folder")


@dataclass
class Report:
    tasks: list[str]
    arms: list[str]
    rows: list[ArmSummary]
    ranges: dict[str, tuple[float, float]]
    records: list[dict[str, Any]]


def summarise(records: Sequence[dict[str, Any]], tasks: Sequence[str], arms: Sequence[str]) -> Report:
    """The report's rows, task by task in the order given, then one "all tasks" row per arm if several tasks."""
    records = list(records)
    check_same_settings(records)
    tasks = [t for t in tasks if any(r["task"] == t for r in records)]
    ranges = {task: score_range(task, records) for task in tasks}
    rows = []
    for task in tasks:
        reference = {r["seed"]: r for r in records if r["task"] == task and r["arm"] == REFERENCE_ARM}
        for arm in arms:
            mine = [r for r in records if r["task"] == task and r["arm"] == arm]
            if mine:
                rows.append(summarise_arm(task, arm, mine, reference, ranges[task]))
    if len(tasks) > 1:
        for arm in arms:
            mine = [r for r in records if r["arm"] == arm]
            if mine:
                rows.append(summarise_all_tasks(arm, mine, ranges))
    return Report(tasks=tasks, arms=[a for a in arms if any(r["arm"] == a for r in records)], rows=rows,
                  ranges=ranges, records=records)


# -- presenting ------------------------------------------------------------------------------------

def _interval_text(value: Interval | None, digits: int = 1, percent: bool = False) -> str:
    if value is None:
        return "-"
    scale, suffix = (100.0, "%") if percent else (1.0, "")
    estimate, low, high = (v * scale for v in value)
    return f"{estimate:.{digits}f}{suffix} [{low:.{digits}f}, {high:.{digits}f}]"


def _number(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


COLUMNS = ("Task", "Arm", "Runs", "Final return IQM [95% CI]", "Final median", "Collapsed at end [95% CI]",
           "Online return IQM [95% CI]", "Eval AUC IQM [95% CI]", "Eval AUC in place IQM [95% CI]",
           "Eval env steps/run", "Learn s", "Eval s", "Overhead vs vanilla (excl. eval)", "Rollbacks/run")


def table_rows(report: Report) -> list[list[str]]:
    rows = []
    for row in report.rows:
        digits = 2 if row.task == ALL_TASKS else 1  # normalised scores on the all-tasks rows
        collapse = f"{row.collapses}/{row.runs} {_interval_text(row.collapse_rate, 0, percent=True)}"
        overhead = "-" if row.overhead is None else \
            f"{row.overhead:.2f}x ({_number(row.overhead_excluding_eval, 2, 'x')})"
        rows.append([
            row.task, row.arm, str(row.runs),
            _interval_text(row.final_iqm, digits), _number(row.final_median, digits), collapse,
            _interval_text(row.online_iqm, 1), _interval_text(row.area_iqm, 2),
            _interval_text(row.in_place_area_iqm, 2),
            _number(row.eval_env_steps), _number(row.learn_seconds, 1), _number(row.eval_seconds, 1),
            overhead, _number(row.rollbacks_per_run, 2),
        ])
    return rows


def _made_by(record: dict[str, Any]) -> dict[str, Any]:
    """The part of a record that says what made it: its ``provenance`` (older records kept ``versions``
    and ``machine`` at the top level, next to a ``provenance`` holding only the git commit)."""
    made_by = record.get("provenance") or {}
    return made_by if "versions" in made_by else record


def notes(report: Report) -> list[str]:
    """What a reader needs to read the numbers: settings, ranges, rules, versions and machine."""
    lines = []
    for task in report.tasks:
        settings = next(r["settings"] for r in report.records if r["task"] == task)
        overrides = ", ".join(f"{k}={v}" for k, v in settings["overrides"])
        low, high = report.ranges[task]
        lines.append(f"{task}: {settings['steps']:,} steps, {settings['eval_episodes']} greedy eval episodes every "
                     f"{settings['eval_freq']:,} steps, final policy scored on {settings['final_episodes']} fresh "
                     f"greedy episodes; AUC normalised to [{low:g}, {high:g}]"
                     + (f"; overrides: {overrides}" if overrides else ""))
    lines.append("Final return IQM: 95% stratified bootstrap interval, "
                 f"{BOOTSTRAP_RESAMPLES:,} resamples; collapse rate: Wilson interval.")
    lines.append(COLLAPSE_RULE)
    lines.append("Eval AUC: area under the evaluation curve, normalised; 'in place': the same curve with each "
                 "collapsed score that triggered a rollback replaced by the restored weights' fresh check, i.e. "
                 "the score of the weights training went on with.")
    lines.append("Overhead: median over seeds of this arm's learn() wall time / vanilla's (same seed); in brackets "
                 "with the time spent evaluating left out of both. Runs shared the machine's cores, so wall times "
                 "carry that noise.")
    for key, label in (("versions", "Versions"), ("machine", "Machine")):
        seen = {tuple(sorted(_made_by(r)[key].items())) for r in report.records}
        for item in sorted(seen):
            lines.append(f"{label}: " + ", ".join(f"{k} {v}" for k, v in item))
    executions = sorted({(r.get("execution") or {}).get("backend", "?") + f" x{(r.get('execution') or {}).get('workers', '?')}"
                         for r in report.records})
    lines.append("Backend (concurrent runs): " + ", ".join(executions))
    return lines


def print_report(report: Report) -> None:
    """Print the table (with rich) and the notes."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 240)
    table = Table(title="rollback-rl compare", show_lines=False)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("Task", "Arm") else "right")
    for row in table_rows(report):
        table.add_row(*row)
    console.print(table)
    for line in notes(report):
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def markdown_table(report: Report) -> str:
    """The table and its notes as Markdown, for the README."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    lines.append("")
    lines += [f"- {line}" for line in notes(report)]
    return "\n".join(lines) + "\n"


def report_json(report: Report) -> dict[str, Any]:
    return {"tasks": report.tasks, "arms": report.arms,
            "score_ranges": {task: list(value) for task, value in report.ranges.items()},
            "collapse_rule": COLLAPSE_RULE, "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
            "rows": [row.to_json() for row in report.rows], "notes": notes(report)}


# -- the figure ------------------------------------------------------------------------------------

def _median_and_quartiles(curves: list[tuple[list[int], list[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """Every seed's curve on the union of their timesteps (linear interpolation), and its quartiles per timestep."""
    grid = np.array(sorted({t for timesteps, _ in curves for t in timesteps}), dtype=float)
    values = np.array([np.interp(grid, timesteps, means) for timesteps, means in curves])
    return grid, np.percentile(values, [25, 50, 75], axis=0)


def plot_report(report: Report, path: str | Path) -> Path:
    """Write a PNG: per task, the evaluation curves of every training run (median, interquartile band,
    the final policies' IQM as a marker at the end); then the performance profile of final returns."""
    tasks = report.tasks
    figure = Figure(figsize=(5.5 * (len(tasks) + 1), 4.2), layout="constrained")
    axes = figure.subplots(1, len(tasks) + 1, squeeze=False)[0]
    colours = {arm: f"C{i}" for i, arm in enumerate(report.arms)}
    for axis, task in zip(axes, tasks):
        drawn_runs: dict[str, str] = {}  # training run -> arm whose colour draws its curve
        for arm in report.arms:
            mine = [r for r in report.records if r["task"] == task and r["arm"] == arm]
            if not mine:
                continue
            run = mine[0]["training_run"]
            last = max(r["eval_curve"]["timesteps"][-1] for r in mine if r["eval_curve"]["timesteps"])
            if run not in drawn_runs:
                drawn_runs[run] = arm
                curves = [(r["eval_curve"]["timesteps"], r["eval_curve"]["mean"]) for r in mine
                          if r["eval_curve"]["timesteps"]]
                grid, (low, median, high) = _median_and_quartiles(curves)
                label = " / ".join(a for a in report.arms if any(
                    r["task"] == task and r["arm"] == a and r["training_run"] == run for r in report.records))
                axis.plot(grid, median, color=colours[arm], label=f"{label}: eval (median, IQR)")
                axis.fill_between(grid, low, high, color=colours[arm], alpha=0.2, linewidth=0)
            axis.plot([last], [iqm([final_return(r) for r in mine])], marker="o", linestyle="none",
                      color=colours[arm], markeredgecolor="black", label=f"{arm}: final policy IQM")
        axis.set_title(task)
        axis.set_xlabel("training timesteps")
        axis.set_ylabel("mean greedy return")
        axis.legend(fontsize="small")
    profile_axis = axes[-1]
    thresholds = np.linspace(0.0, 1.0, 201)
    for arm in report.arms:
        scores = [(final_return(r) - report.ranges[r["task"]][0]) / np.subtract(*report.ranges[r["task"]][::-1])
                  for r in report.records if r["arm"] == arm and r["task"] in report.ranges]
        if scores:
            profile_axis.step(thresholds, performance_profile(scores, thresholds), where="post",
                              color=colours[arm], label=f"{arm} ({len(scores)} runs)")
    profile_axis.set_title("Performance profile of final policies")
    profile_axis.set_xlabel("normalised final return " + r"$\tau$")
    profile_axis.set_ylabel(r"fraction of runs with score $> \tau$")
    profile_axis.set_ylim(-0.02, 1.02)
    profile_axis.legend(fontsize="small")
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path
