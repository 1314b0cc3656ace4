"""The PNG figures of ``rollback-rl forgetting``: per-task curves by arm, and the stationary buffer analysis."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from rollback_rl.forgetting.stationary import label_moments

ARM_COLOURS = {"vanilla": "tab:blue", "rollback": "tab:orange", "task_bank": "tab:green"}
# vanilla and task_bank are the same run until A returns (rollback too, until its first rollback):
# different dashes keep the overlapping lines visible.
ARM_LINESTYLES = {"vanilla": "-", "rollback": "--", "task_bank": ":"}


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
