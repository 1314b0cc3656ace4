"""Recency dose-response: does DQN on CartPole-v1 fail more when its replay buffer forgets sooner?

The claim to test: a FIFO replay buffer only holds the last ``buffer_size`` timesteps, so once the agent
balances, what it did before (and the failures it learned from) leaves the buffer, and it forgets. If
that is the cause, failures must grow as the buffer shrinks (a dose-response), and a buffer of the same
size that keeps old experience (``ReservoirReplayBuffer``, or half FIFO, half reservoir:
``HalfReservoirReplayBuffer``) must undo it. With the RL Zoo's 100,000 the buffer never fills in 50,000
steps: no transition is ever evicted, whatever the buffer's kind.

Each run: vanilla SB3 DQN on CartPole-v1, the RL Zoo's settings except the replay buffer (its size and
kind, ``rollback_rl.buffers.BUFFER_KINDS``), built as ``rollback-rl train`` builds it
(``training.build_model``: model seed = seed, evaluation env seeded ``seed + 10,000``), scored every
``eval_freq`` timesteps on ``eval_episodes`` greedy episodes (``ReplayBufferDiagnostics``, which also
records the buffer and the age of what training samples), every training episode recorded, and the
final weights scored on ``final_episodes`` greedy episodes of seeds never used in training. A buffer at
least as large as the run never evicts anything, so there the three kinds are the same buffer and the
same run, bit for bit (``rollback_rl.buffers``): only the FIFO is run at such sizes, and it is the
*no-recency reference* of every kind.

Per run, from its record alone (:func:`run_metrics`):

- ``post_solve_failures``: training episodes that end in failure (terminated, not truncated) after the
  first evaluation >= 475 (``experiments.compare.paired.post_solve_failures``; undefined if never solved);
- ``collapsed_evaluations``: the fraction of the evaluations after the first solve whose mean is below
  ``COLLAPSE_FRACTION`` (half) of the best mean so far;
- ``mean_sample_age``: the mean age, in timesteps, of the transitions training sampled over the run
  (the dose: the FIFO's shrinks with its size, the reservoir's does not);
- ``failure_share_after_solve``: the share of failures among the transitions held, averaged over the
  buffer records from the first solve on (both from ``ReplayBufferDiagnostics.summary``);
- ``online_return`` (training episodes) and ``final_return`` (the final weights, fresh episodes).

Per cell (kind, size), over seeds: mean and IQM with 95% bootstrap intervals resampling seeds, and
paired over seeds: each kind minus the FIFO of the same size, and each cell minus the no-recency
reference (the largest FIFO). The dose-response itself, over the FIFO sizes (:func:`fifo_trend`): per
seed, the least-squares slope of each metric against log10 of the buffer size, then the mean slope over
seeds with its bootstrap interval, the signs of the slopes and a two-sided Wilcoxon p; a positive slope
of collapses means they grow as recency weakens. Reading: if failures grow as the FIFO shrinks while a
reservoir of the same small size stays near the reference, recency is the cause; if the reservoir fails
like the FIFO of its size, the smaller amount of data is, not its age.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from scipy import stats
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import CallbackList

from rollback_rl.buffers import BUFFER_KINDS
from rollback_rl.callbacks import BufferRecord, ReplayBufferDiagnostics
from rollback_rl.callbacks.diagnostics import summarize_buffer_records
from rollback_rl.evaluation import final_episode_seed, greedy_returns
from rollback_rl.experiments.compare.arms import TrainingEpisodes
from rollback_rl.experiments.compare.paired import final_return, online_return, post_solve_failures, solve_timestep
from rollback_rl.experiments.forgetting.over_seeds import (BOOTSTRAP_RESAMPLES, describe, finite_values, interval,
                                                           mean, paired_difference)
from rollback_rl.experiments.forgetting.records import DOSE_RESPONSE, PlannedRun, as_json, cell_folder
from rollback_rl.hyperparams import DEFAULT_EVAL_EPISODES, check_hyperparameters, hyperparameters_for, to_jsonable
from rollback_rl.training import build_model

ENV_ID = "CartPole-v1"
DEFAULT_BUFFER_SIZES = (2_500, 5_000, 10_000, 25_000, 100_000)
COLLAPSE_FRACTION = 0.5
FINAL_EPISODES = 100


@dataclass(frozen=True)
class DoseResponseSettings:
    """What every run of the dose-response does besides its buffer; records made otherwise never mix.

    :param steps: training timesteps (the Zoo's 50,000)
    :param eval_freq: training timesteps between evaluations (docs/protocol.md: 2,500)
    :param eval_episodes: greedy episodes per evaluation
    :param final_episodes: greedy episodes scoring the final weights
    :param overrides: ``(key, value)`` pairs replacing the Zoo's DQN hyperparameters (for quick tests);
        never ``buffer_size`` or ``replay_buffer_class``, which each cell sets
    """

    steps: int = 50_000
    eval_freq: int = 2_500
    eval_episodes: int = DEFAULT_EVAL_EPISODES
    final_episodes: int = FINAL_EPISODES
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if min(self.steps, self.eval_freq, self.eval_episodes, self.final_episodes) < 1:
            raise ValueError("steps, eval_freq, eval_episodes and final_episodes must be positive")
        taken = sorted({key for key, _ in self.overrides} & {"buffer_size", "replay_buffer_class"})
        if taken:
            raise ValueError(f"{taken[0]} is what the dose-response varies: set it with the buffer sizes and kinds")

    def hyperparameters(self, kind: str, buffer_size: int) -> dict[str, Any]:
        """The Zoo's CartPole-v1 DQN settings with this buffer, then ``overrides`` (checked)."""
        params = hyperparameters_for(ENV_ID, "dqn")
        params.update(buffer_size=buffer_size, replay_buffer_class=BUFFER_KINDS[kind])
        params.update(check_hyperparameters(dict(self.overrides), DQN, "overrides"))
        params.pop("n_timesteps")
        return params


def never_evicts(buffer_size: int, settings: DoseResponseSettings) -> bool:
    """Whether a buffer of ``buffer_size`` holds every transition of a run (then every kind is the FIFO)."""
    return buffer_size >= settings.steps


def cells(sizes: Sequence[int], kinds: Sequence[str], settings: DoseResponseSettings) -> list[tuple[str, int]]:
    """The (kind, size) cells to run: every kind at every size, except that a size which never evicts is
    run once, with the FIFO (the other kinds would repeat it bit for bit)."""
    return list(dict.fromkeys(("fifo" if never_evicts(size, settings) else kind, size)
                              for size in sizes for kind in kinds))


# -- one run --------------------------------------------------------------------------------------------

def run_one(kind: str, buffer_size: int, seed: int, settings: DoseResponseSettings) -> dict[str, Any]:
    """Train vanilla DQN on CartPole-v1 with this buffer and return its record (JSON-ready)."""
    if kind not in BUFFER_KINDS:
        raise ValueError(f"unknown buffer kind {kind!r}; choose from {', '.join(BUFFER_KINDS)}")
    torch.set_num_threads(1)
    started, cpu_started = time.perf_counter(), time.process_time()
    params = settings.hyperparameters(kind, buffer_size)
    model, eval_env = build_model(ENV_ID, DQN, params, seed)  # as rollback-rl train builds it
    diagnostics = ReplayBufferDiagnostics(log_freq=settings.eval_freq, task_eval_envs={ENV_ID: eval_env},
                                          n_eval_episodes=settings.eval_episodes)
    episodes = TrainingEpisodes()
    model.learn(settings.steps, callback=CallbackList([diagnostics, episodes]))
    final_env = gym.make(ENV_ID)
    final_returns = greedy_returns(model, final_env, settings.final_episodes, final_episode_seed(seed))
    final_env.close()
    scores = diagnostics.task_scores[ENV_ID]
    training_returns = episodes.episodes["return"]
    return {
        "experiment": DOSE_RESPONSE,
        "task": ENV_ID,
        "buffer_kind": kind,
        "buffer_size": buffer_size,
        "seed": seed,
        "settings": asdict(settings),
        "algorithm": "DQN",
        "hyperparameters": to_jsonable(params),
        "eval_curve": {"timesteps": [s.timestep for s in scores], "mean": [s.mean for s in scores],
                       "episode_returns": [list(s.episode_returns or ()) for s in scores]},
        "training_episodes": episodes.episodes,
        "online_return": {"mean": float(np.mean(training_returns)) if training_returns else None,
                          "episodes": len(training_returns)},
        "final_policy": {"mean": float(np.mean(final_returns)), "returns": final_returns,
                         "first_episode_seed": final_episode_seed(seed)},
        "buffer": {field: [getattr(r, field) for r in diagnostics.records]
                   for field in ("timestep", "transitions", "failures", "sampled", "sampled_failures",
                                 "mean_sample_age")},
        "eval_env_steps": diagnostics.eval_timesteps,
        "wall_seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "cpu_seconds": time.process_time() - cpu_started,  # what the run costs on a core of its own
    }


def plan_runs(sizes: Sequence[int], kinds: Sequence[str], seeds: Sequence[int], settings: DoseResponseSettings,
              folder: Path) -> dict[tuple[str, int, int], PlannedRun]:
    """Every run of the sweep, seed-major (early results cover every cell), with its record's path."""
    return {(kind, size, seed): PlannedRun(folder / cell_folder(kind, size) / f"seed{seed}.json", asdict(settings),
                                           (kind, size, seed, settings), f"{kind} {size:,} seed {seed}")
            for seed in seeds for kind, size in cells(sizes, kinds, settings)}


# -- metrics of one run -------------------------------------------------------------------------------

def buffer_records(record: Mapping[str, Any]) -> list[BufferRecord]:
    """The run's ``BufferRecord`` list, as ``ReplayBufferDiagnostics`` made it (``null`` ages read as NaN)."""
    buffer = record["buffer"]
    ages = [math.nan if age is None else float(age) for age in buffer["mean_sample_age"]]
    return [BufferRecord(*values) for values in zip(buffer["timestep"], buffer["transitions"], buffer["failures"],
                                                    buffer["sampled"], buffer["sampled_failures"], ages)]


def collapsed_evaluations(record: Mapping[str, Any], fraction: float = COLLAPSE_FRACTION) -> float:
    """Fraction of the evaluations after the first solve whose mean is below ``fraction`` of the best
    mean so far (NaN if the run never solved, or no evaluation came after)."""
    solved = solve_timestep(record)
    if solved is None:
        return math.nan
    curve = record["eval_curve"]
    peaks = np.maximum.accumulate(np.asarray(curve["mean"], dtype=float))
    after = [mean < fraction * peak for t, mean, peak in zip(curve["timesteps"], curve["mean"], peaks) if t > solved]
    return float(np.mean(after)) if after else math.nan


def mean_sample_age(record: Mapping[str, Any]) -> float:
    return summarize_buffer_records(buffer_records(record)).mean_sample_age


def failure_share_after_solve(record: Mapping[str, Any]) -> float:
    solved = solve_timestep(record)
    if solved is None:
        return math.nan
    return summarize_buffer_records(buffer_records(record), start_timestep=solved).failure_share


# name -> (value of a record, which direction is better (None: descriptive), what it is)
METRICS: dict[str, tuple[Callable[[Mapping[str, Any]], float], str | None, str]] = {
    "post_solve_failures": (post_solve_failures, "lower", "failed training episodes after the first evaluation >= 475"),
    "collapsed_evaluations": (collapsed_evaluations, "lower", "fraction of evaluations after solving below "
                              f"{COLLAPSE_FRACTION:.0%} of the best so far"),
    "mean_sample_age": (mean_sample_age, None, "mean age of the transitions sampled for training, in timesteps"),
    "failure_share_after_solve": (failure_share_after_solve, None,
                                  "share of failures among the transitions held, after solving"),
    "online_return": (online_return, "higher", "mean return of the training episodes"),
    "final_return": (final_return, "higher", "final weights, mean of fresh greedy episodes"),
}


def run_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Every metric of one run (NaN where undefined, e.g. the post-solve ones of a run that never solved)."""
    return {name: float(measure(record)) for name, (measure, _, _) in METRICS.items()}


# -- over seeds ---------------------------------------------------------------------------------------

def fifo_trend(by_size: Mapping[int, Mapping[int, float]], resamples: int = BOOTSTRAP_RESAMPLES,
               min_sizes: int = 3) -> dict[str, Any] | None:
    """The dose-response of one metric over FIFO buffer sizes, with seeds as the unit.

    :param by_size: ``{buffer_size: {seed: value}}`` (NaN or ``None``: undefined, e.g. never solved)
    :param min_sizes: sizes a seed needs a defined value at for its slope to count
    :return: ``None`` if no seed has ``min_sizes`` defined values; else ``n`` (seeds), ``sizes``,
        ``slopes`` (per seed: least-squares slope of the value against log10 of the size, i.e. the change
        per tenfold larger buffer), ``mean_slope`` (estimate, 95% bootstrap interval over seeds),
        ``positive``/``zero``/``negative`` counts and ``wilcoxon_p_two_sided`` (``None`` if every slope is 0)
    """
    values = {size: finite_values(by_seed) for size, by_seed in by_size.items()}
    slopes: dict[int, float] = {}
    for seed in sorted({seed for by_seed in values.values() for seed in by_seed}):
        points = [(math.log10(size), by_seed[seed]) for size, by_seed in sorted(values.items()) if seed in by_seed]
        if len(points) >= min_sizes:
            x, y = np.array(points).T
            slopes[seed] = float(np.polyfit(x, y, 1)[0])  # the sizes are distinct: x is never constant
    if not slopes:
        return None
    numbers = np.array([slopes[seed] for seed in sorted(slopes)])
    numbers[np.isclose(numbers, 0.0, atol=1e-12)] = 0.0
    p = float(stats.wilcoxon(numbers, zero_method="wilcox").pvalue) if np.any(numbers != 0) else None
    return {"n": len(slopes), "sizes": sorted(by_size), "slopes": {str(seed): slope for seed, slope in slopes.items()},
            "mean_slope": interval(numbers, mean, resamples), "positive": int(np.sum(numbers > 0)),
            "zero": int(np.sum(numbers == 0)), "negative": int(np.sum(numbers < 0)), "wilcoxon_p_two_sided": p}


def report(records: Sequence[Mapping[str, Any]], resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """The dose-response from its records: per cell, every metric over seeds; paired over seeds, each kind
    minus the FIFO of its size and each cell minus the no-recency reference (the largest FIFO).

    :raises ValueError: if the records mix settings (they would not be comparable)
    """
    settings = {json.dumps(as_json(record["settings"]), sort_keys=True) for record in records}
    if len(settings) > 1:
        raise ValueError("the records were made with different settings; report them from separate folders")
    by_cell: dict[tuple[str, int], dict[int, dict[str, float]]] = {}
    for record in records:
        by_cell.setdefault((record["buffer_kind"], int(record["buffer_size"])), {})[int(record["seed"])] = \
            run_metrics(record)
    order = {kind: index for index, kind in enumerate(BUFFER_KINDS)}
    keys = sorted(by_cell, key=lambda cell: (cell[1], order.get(cell[0], len(order)), cell[0]))
    fifo_sizes = [size for kind, size in keys if kind == "fifo"]
    reference = ("fifo", max(fifo_sizes)) if fifo_sizes else None
    steps = records[0]["settings"]["steps"] if records else None
    result: dict[str, Any] = {
        "experiment": "recency dose-response, vanilla DQN on CartPole-v1",
        "settings": records[0]["settings"] if records else None,
        "metrics": {name: {"better": better, "description": text} for name, (_, better, text) in METRICS.items()},
        "no_recency_reference": None if reference is None else {
            "cell": cell_folder(*reference), "never_evicts": steps is not None and reference[1] >= steps},
        "bootstrap_resamples": resamples,
        "cells": [],
        "paired": [],
        "fifo_trend": {},
    }
    for kind, size in keys:
        by_seed = by_cell[(kind, size)]
        result["cells"].append({
            "cell": cell_folder(kind, size), "kind": kind, "buffer_size": size, "seeds": sorted(by_seed),
            "never_solved": sum(1 for m in by_seed.values() if math.isnan(m["post_solve_failures"])),
            "metrics": {name: describe({s: m[name] for s, m in by_seed.items()}, resamples) for name in METRICS},
        })
    for kind, size in keys:
        references = [("fifo", size)] if kind != "fifo" else []
        if reference is not None and (kind, size) != reference:
            references.append(reference)
        for other in dict.fromkeys(references):
            if other not in by_cell:
                continue
            for name, (_, better, _) in METRICS.items():
                difference = paired_difference({s: m[name] for s, m in by_cell[(kind, size)].items()},
                                               {s: m[name] for s, m in by_cell[other].items()}, better, resamples)
                if difference is not None:
                    result["paired"].append({"metric": name, "cell": cell_folder(kind, size),
                                             "reference": cell_folder(*other), **difference})
    if len(fifo_sizes) >= 3:
        for name in METRICS:
            trend = fifo_trend({size: {s: m[name] for s, m in by_cell[("fifo", size)].items()} for size in fifo_sizes},
                               resamples)
            if trend is not None:
                result["fifo_trend"][name] = trend
    return result


def _interval_text(entry: Mapping[str, Any] | None, digits: int) -> str:
    if not entry:
        return "-"
    return f"{entry['estimate']:,.{digits}f} [{entry['low']:,.{digits}f}, {entry['high']:,.{digits}f}]"


DIGITS = {"post_solve_failures": 1, "collapsed_evaluations": 2, "mean_sample_age": 0, "failure_share_after_solve": 4,
          "online_return": 1, "final_return": 1}


def markdown(result: Mapping[str, Any]) -> str:
    """The report as two Markdown tables: per cell (mean [95% interval over seeds]), and paired differences."""
    reference = result["no_recency_reference"]
    lines = ["# Recency dose-response: vanilla DQN on CartPole-v1", ""]
    if reference is not None:
        evicts = "never evicts a transition" if reference["never_evicts"] else "evicts (smaller than the run)"
        lines += [f"No-recency reference: `{reference['cell']}` ({evicts}; at sizes that never evict, the three "
                  "kinds are the same buffer and only the FIFO is run).", ""]
    lines += ["Mean [95% bootstrap interval over seeds]; post-solve metrics leave out runs that never solved.", ""]
    names = list(result["metrics"])
    lines += ["| buffer | seeds | never solved | " + " | ".join(names) + " |",
              "|---|---|---|" + "---|" * len(names)]
    for cell in result["cells"]:
        values = [_interval_text(cell["metrics"][name].get("mean"), DIGITS[name]) for name in names]
        lines.append(f"| {cell['cell']} | {len(cell['seeds'])} | {cell['never_solved']} | " + " | ".join(values) + " |")
    lines += ["", "Paired over seeds (cell minus reference):", "",
              "| metric | cell - reference | pairs | mean difference [95% CI] | win/tie/loss "
              "| Wilcoxon p (one-sided) |",
              "|---|---|---|---|---|---|"]
    for entry in result["paired"]:
        if result["metrics"][entry["metric"]]["better"] is None:
            counts, p = "-", "-"
        else:
            counts = f"{entry['wins']}/{entry['ties']}/{entry['losses']}"
            p = "-" if entry["wilcoxon_p_one_sided"] is None else f"{entry['wilcoxon_p_one_sided']:.3g}"
        lines.append(f"| {entry['metric']} | {entry['cell']} - {entry['reference']} | {entry['n']} | "
                     f"{_interval_text(entry['mean_difference'], DIGITS[entry['metric']])} | {counts} | {p} |")
    trends = result.get("fifo_trend") or {}
    if trends:
        sizes = ", ".join(f"{size:,}" for size in next(iter(trends.values()))["sizes"])
        lines += ["", f"Dose-response over the FIFO sizes ({sizes}): per seed, the least-squares slope of the metric "
                  "against log10 of the buffer size (change per tenfold larger buffer; positive: grows as recency "
                  "weakens); mean over seeds [95% bootstrap interval]; seeds with a value at 3 sizes or more.", "",
                  "| metric | seeds | mean slope [95% CI] | positive/zero/negative | Wilcoxon p (two-sided) |",
                  "|---|---|---|---|---|"]
        for name, trend in trends.items():
            p = "-" if trend["wilcoxon_p_two_sided"] is None else f"{trend['wilcoxon_p_two_sided']:.3g}"
            lines.append(f"| {name} | {trend['n']} | {_interval_text(trend['mean_slope'], DIGITS[name] + 1)} | "
                         f"{trend['positive']}/{trend['zero']}/{trend['negative']} | {p} |")
    return "\n".join(lines) + "\n"
