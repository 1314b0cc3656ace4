"""The PNG figures of ``rollback-rl forgetting``, drawn from records or reports alone: per-task curves by arm,
forgetting against buffer size, the recency dose-response, and the stationary buffer analysis."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from rollback_rl.experiments.forgetting.stationary import label_moments

ARM_COLOURS = {"vanilla": "tab:blue", "rollback": "tab:orange", "task_bank": "tab:green", "label_free_bank": "tab:red"}
# vanilla and task_bank are the same run until A returns (rollback too, until its first rollback; and
# label_free_bank is rollback until its first restore): different dashes keep the overlapping lines visible.
ARM_LINESTYLES = {"vanilla": "-", "rollback": "--", "task_bank": ":", "label_free_bank": "-."}
KIND_COLOURS = {"fifo": "tab:blue", "reservoir": "tab:green", "half": "tab:purple"}


def _mean_band(curves: np.ndarray, resamples: int = 1_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over runs (rows) at every column, with a 95% bootstrap interval of that mean."""
    rng = np.random.default_rng(seed)
    draws = curves[rng.integers(0, len(curves), (resamples, len(curves)))].mean(axis=1)
    low, high = np.nanquantile(draws, [0.025, 0.975], axis=0)
    return curves.mean(axis=0), low, high


def plot_forgetting(records: Sequence[Mapping[str, Any]], tasks: tuple[str, str], phase_steps: Sequence[int],
                    path: Path) -> None:
    """Score on A, score on B and the buffer's failure share over training, one line per arm (mean over
    seeds, shaded: 95% bootstrap interval of the mean), with the two task switches marked."""
    figure = Figure(figsize=(11, 8.5), layout="constrained")
    axes = figure.subplots(3, 1, sharex=True)
    arms = list(dict.fromkeys(record["arm"] for record in records))
    for arm in arms:
        runs = [record for record in records if record["arm"] == arm]
        colour, style = ARM_COLOURS.get(arm), ARM_LINESTYLES.get(arm, "-")
        timesteps = np.asarray(runs[0]["timesteps"])
        label = f"{arm} ({len(runs)} seeds)"
        for axis, task in zip(axes[:2], tasks):
            mean, low, high = _mean_band(np.array([run["scores"][task] for run in runs], dtype=float))
            axis.plot(timesteps, mean, color=colour, linestyle=style, linewidth=1.8, label=label)
            axis.fill_between(timesteps, low, high, color=colour, alpha=0.12, linewidth=0)
        buffer_t = np.asarray(runs[0]["buffer"]["timesteps"])
        shares = np.array([np.asarray(run["buffer"]["failures"]) / np.maximum(run["buffer"]["transitions"], 1)
                           for run in runs])
        mean, low, high = _mean_band(shares)
        axes[2].plot(buffer_t, mean, color=colour, linestyle=style, linewidth=1.8, label=label)
        axes[2].fill_between(buffer_t, low, high, color=colour, alpha=0.12, linewidth=0)
    a, b = tasks
    axes[0].set_ylabel(f"score on A ({a})")
    axes[1].set_ylabel(f"score on B ({b})")
    axes[2].set_ylabel("failure share of buffer")
    axes[2].set_xlabel("training timesteps")
    for axis in axes:
        for switch in np.cumsum(phase_steps)[:2]:
            axis.axvline(switch, color="black", linestyle="--", linewidth=0.8)
        axis.grid(alpha=0.3)
    for axis in axes[:2]:
        axis.set_ylim(0, 520)
    starts = np.concatenate([[0], np.cumsum(phase_steps)])
    for index, name in enumerate(("train on A", "train on B", "train on A again")):
        axes[0].text((starts[index] + starts[index + 1]) / 2, 505, name, ha="center", va="top", fontsize=9)
    axes[0].legend(loc="best", fontsize=9)
    figure.suptitle(f"A -> B -> A on SwitchingCartPole (A = {a}, B = {b}); greedy evaluation every "
                    f"{records[0]['settings']['eval_freq']:,} steps")
    figure.savefig(path, dpi=110)


def _buffer_size_axis(axis: Any, sizes: Sequence[int]) -> None:
    """A log-scale x axis labelled with the buffer sizes themselves."""
    axis.set_xscale("log")
    axis.minorticks_off()
    sizes = sorted(set(sizes))
    axis.set_xticks(sizes, [f"{size:,}" for size in sizes])
    axis.set_xlabel("replay buffer size (transitions)")


def _errorbar(axis: Any, points: Sequence[tuple[float, Mapping[str, float]]], colour: str | None, label: str) -> None:
    """One line through (x, mean) points with 95% interval bars; ``points`` sorted by x."""
    x = np.array([point[0] for point in points], dtype=float)
    estimate = np.array([point[1]["estimate"] for point in points])
    low, high = np.array([point[1]["low"] for point in points]), np.array([point[1]["high"] for point in points])
    axis.errorbar(x, estimate, yerr=[estimate - low, high - estimate], color=colour, marker="o", capsize=3,
                  linewidth=1.6, label=label)


def plot_dose_response(result: Mapping[str, Any], path: Path) -> None:
    """Against buffer size (log scale), one line per buffer kind (mean over seeds; bars: 95% bootstrap
    interval over seeds): the mean age of the transitions sampled (the dose), post-solve failures and the
    fraction of collapsed evaluations after solving. Where the no-recency reference never evicts, every
    kind's line ends on it: at that size every kind is the same buffer."""
    panels = {"mean_sample_age": "mean age of sampled transitions (timesteps)",
              "post_solve_failures": "failed training episodes after solving",
              "collapsed_evaluations": "evaluations after solving below half the best"}
    figure = Figure(figsize=(14, 4.6), layout="constrained")
    axes = figure.subplots(1, len(panels))
    cells = result["cells"]
    reference = result["no_recency_reference"]
    never_evicts = reference is not None and reference["never_evicts"]
    shared = next((cell for cell in cells if never_evicts and cell["cell"] == reference["cell"]), None)
    for kind in dict.fromkeys(cell["kind"] for cell in cells):
        own = [cell for cell in cells if cell["kind"] == kind]
        if shared is not None and shared not in own:
            own.append(shared)
        own.sort(key=lambda cell: cell["buffer_size"])
        for axis, metric in zip(axes, panels):
            points = [(cell["buffer_size"], cell["metrics"][metric]["mean"]) for cell in own
                      if "mean" in cell["metrics"][metric]]
            if points:
                seeds = max(len(cell["seeds"]) for cell in own)
                _errorbar(axis, points, KIND_COLOURS.get(kind), f"{kind} (up to {seeds} seeds)")
    for axis, label in zip(axes, panels.values()):
        _buffer_size_axis(axis, [cell["buffer_size"] for cell in cells])
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    steps = (result.get("settings") or {}).get("steps")
    figure.suptitle("Recency dose-response: vanilla DQN on CartPole-v1" + (f", {steps:,} steps" if steps else "")
                    + "; mean over seeds with 95% bootstrap intervals")
    figure.savefig(path, dpi=110)


def plot_forgetting_against_buffer(result: Mapping[str, Any], path: Path, arm: str = "vanilla") -> bool:
    """Forgetting of A and steps to relearn it against buffer size (log scale), one line per buffer kind
    and one column per pair of tasks, for ``arm`` (mean over seeds; bars: 95% bootstrap interval over
    seeds). Returns ``False`` (and draws nothing) when no cell has that arm."""
    cells = [cell for cell in result["cells"] if arm in cell["summary"]]
    if not cells:
        return False
    pairs = list(dict.fromkeys(tuple(cell["settings"]["tasks"]) for cell in cells))
    metrics = {"forgetting": "forgetting of A (level before B - level after B)",
               "relearn_steps": "steps to relearn A"}
    figure = Figure(figsize=(max(7.0, 5.5 * len(pairs)), 7.5), layout="constrained")
    axes = np.asarray(figure.subplots(len(metrics), len(pairs), squeeze=False))
    for column, tasks in enumerate(pairs):
        own = [cell for cell in cells if tuple(cell["settings"]["tasks"]) == tasks]
        # A buffer that never evicts is every kind's: each line ends on it.
        shared = [cell for cell in own if cell["settings"]["buffer_size"] >= sum(cell["settings"]["phase_steps"])]
        for kind in dict.fromkeys(cell["settings"].get("buffer_kind", "fifo") for cell in own):
            line = [cell for cell in own if cell["settings"].get("buffer_kind", "fifo") == kind]
            line = sorted(line + [cell for cell in shared if cell not in line],
                          key=lambda cell: cell["settings"]["buffer_size"])
            for row, metric in enumerate(metrics):
                points = [(cell["settings"]["buffer_size"], cell["summary"][arm][metric]["mean"]) for cell in line
                          if "mean" in cell["summary"][arm][metric]]
                if points:
                    _errorbar(axes[row, column], points, KIND_COLOURS.get(kind), kind)
        a, b = tasks
        axes[0, column].set_title(f"{a} -> {b} -> {a}")
        for row, label in enumerate(metrics.values()):
            _buffer_size_axis(axes[row, column], [cell["settings"]["buffer_size"] for cell in own])
            axes[row, column].set_ylabel(label)
            axes[row, column].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=9)
    figure.suptitle(f"A -> B -> A, {arm}: forgetting against the replay buffer\n(mean over seeds, 95% bootstrap "
                    "intervals over seeds)")
    figure.savefig(path, dpi=110)
    return True


def plot_stationary(runs: Sequence[Mapping[str, Any]], analysis: Mapping[str, Any], path: Path) -> None:
    """Left: every seed's evaluation curve, collapses marked. Right: the buffer's failure share at at-risk
    moments by timestep, controls grey and moments just before a collapse red."""
    definition = analysis["definition"]
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    curves, shares = figure.subplots(1, 2)
    for run in runs:
        timesteps = np.asarray(run["timesteps"])
        curves.plot(timesteps, run["scores"], color="tab:blue", alpha=0.35, linewidth=1)
        labels = label_moments(run["scores"], definition["collapse_fraction"], definition["peak_threshold"])
        for k, label in enumerate(labels):
            value = run[analysis["variable"]][k]
            if label == "case":
                curves.plot(timesteps[k + 1], run["scores"][k + 1], "x", color="tab:red", markersize=8)
                shares.plot(timesteps[k], value, "o", color="tab:red", markersize=6, zorder=3)
            elif label == "control":
                shares.plot(timesteps[k], value, ".", color="grey", alpha=0.5)
    curves.set_xlabel("training timesteps")
    curves.set_ylabel("evaluation score (5 greedy episodes)")
    curves.set_title(f"{len(runs)} seeds of vanilla DQN on CartPole-v1; x: collapse", fontsize=10)
    shares.set_xlabel("training timesteps")
    shares.set_ylabel(f"{analysis['variable'].replace('_', ' ')} of the buffer")
    difference = analysis.get("matched_difference")
    text = (f"case minus matched controls: {difference['estimate']:+.4f} [{difference['low']:+.4f}, "
            f"{difference['high']:+.4f}], permutation p = {analysis['permutation_p']:.3f}"
            if difference else "no collapse with a matched control")
    shares.set_title(f"red: just before a collapse ({analysis['n_cases']}); grey: no collapse followed "
                     f"({analysis['n_controls']})\n{text}", fontsize=9)
    for axis in (curves, shares):
        axis.grid(alpha=0.3)
    figure.savefig(path, dpi=110)
