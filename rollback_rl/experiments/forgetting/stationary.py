"""Do collapses on CartPole-v1 follow a failure-starved replay buffer? Measure it instead of assuming it.

The common explanation of DQN's collapse on CartPole-v1: once the agent balances, the buffer fills with
near-optimal transitions, failures (true terminations) become rare in what it trains on, and the
network "forgets what failure looks like". This module runs vanilla DQN with the RL Zoo's settings and
the evaluation schedule of docs/protocol.md (5 greedy episodes every 2,500 timesteps) over several seeds,
recording at every evaluation the share of failure transitions in the buffer
(``ReplayBufferDiagnostics``), and then compares the buffer before collapses with the buffer at
matched moments when no collapse followed.

Definitions (evaluation index k, score s_k, peak p_k = max(s_0..s_k)):

- collapsed at k: p_k >= ``peak_threshold`` and s_k < ``collapse_fraction`` * p_k;
- at risk at k: p_k >= ``peak_threshold`` and not collapsed at k (the agent has learned and still holds);
- a *case*: an at-risk moment k followed by a collapse at k + 1; a *control*: an at-risk moment k not
  followed by one. The buffer is read at k, before the collapse, since a collapsed policy fails
  often and so refills the buffer with failures;
- matching: each case is compared with the controls *at the same timestep* in the other seeds, so that
  time in training (which the failure share falls with) cannot explain a difference.

Test: the mean over cases of (case share minus the mean share of its matched controls), with a 95%
bootstrap interval over cases and a permutation p-value that shuffles case and control labels within
each timestep; a Mann-Whitney U test on all cases against all controls is given too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from scipy import stats
from stable_baselines3 import DQN
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor

from rollback_rl.callbacks import ReplayBufferDiagnostics
from rollback_rl.core.statistics import stratified_bootstrap_interval, wilson_interval
from rollback_rl.experiments.common import run_in_pool, write_json
from rollback_rl.hyperparams import (DEFAULT_EVAL_EPISODES, check_hyperparameters, eval_freq_for,
                                     hyperparameters_for, model_arguments)

ENV_ID = "CartPole-v1"
PERMUTATIONS = 10_000
BOOTSTRAP_RESAMPLES = 2_000


def run_seed(seed: int, steps: int, eval_freq: int = eval_freq_for(ENV_ID), eval_episodes: int = DEFAULT_EVAL_EPISODES,
             overrides: Sequence[tuple[str, Any]] = (), tensorboard_dir: str | None = None) -> dict[str, Any]:
    """Train vanilla DQN (Zoo settings, ``overrides`` last) on CartPole-v1 and return its curves and buffer records."""
    torch.set_num_threads(1)
    started, cpu_started = time.perf_counter(), time.process_time()
    params = hyperparameters_for(ENV_ID, "dqn")
    params.update(check_hyperparameters(dict(overrides), DQN, "overrides"))
    params.pop("n_timesteps")
    training_env = Monitor(gym.make(ENV_ID))
    model = DQN(params.pop("policy"), training_env, seed=seed, device="cpu", **model_arguments(params))
    if tensorboard_dir is not None:
        model.set_logger(configure(tensorboard_dir, ["tensorboard"]))
    diagnostics = ReplayBufferDiagnostics(log_freq=eval_freq, task_eval_envs={ENV_ID: gym.make(ENV_ID)},
                                          n_eval_episodes=eval_episodes)
    model.learn(steps, callback=diagnostics)
    records = diagnostics.records
    return {
        "seed": seed,
        "steps": steps,
        "eval_freq": eval_freq,
        "eval_episodes": eval_episodes,
        "overrides": [list(pair) for pair in overrides],
        "timesteps": [score.timestep for score in diagnostics.task_scores[ENV_ID]],
        "scores": [score.mean for score in diagnostics.task_scores[ENV_ID]],
        "failure_share": [r.failure_share for r in records],
        "sampled_failure_share": [r.sampled_failure_share for r in records],
        "mean_sample_age": [r.mean_sample_age for r in records],
        "transitions": [r.transitions for r in records],
        "failures": [r.failures for r in records],
        "online_return": float(np.mean(training_env.get_episode_rewards())),
        "eval_timesteps": diagnostics.eval_timesteps,
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,  # what the run costs on a core of its own
    }


# -- the analysis ---------------------------------------------------------------------------------------

def label_moments(scores: Sequence[float], collapse_fraction: float = 0.5,
                  peak_threshold: float = 400.0) -> list[str | None]:
    """For every evaluation k: ``"case"`` (at risk, collapse at k + 1), ``"control"`` (at risk, none at
    k + 1), ``"collapsed"``, or ``None`` (not at risk: peak not reached yet, or the last evaluation)."""
    values = np.asarray(scores, dtype=float)
    peaks = np.maximum.accumulate(values)
    collapsed = (peaks >= peak_threshold) & (values < collapse_fraction * peaks)
    at_risk = (peaks >= peak_threshold) & ~collapsed
    labels: list[str | None] = []
    for k in range(len(values)):
        if collapsed[k]:
            labels.append("collapsed")
        elif not at_risk[k] or k + 1 == len(values):
            labels.append(None)
        else:
            labels.append("case" if collapsed[k + 1] else "control")
    return labels


def _matched_difference(strata: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean over cases of (case value minus the mean of its stratum's controls)."""
    differences = [case - controls.mean() for cases, controls in strata for case in cases]
    return float(np.mean(differences))


def analyse(runs: Sequence[Mapping[str, Any]], variable: str = "failure_share", collapse_fraction: float = 0.5,
            peak_threshold: float = 400.0, permutations: int = PERMUTATIONS, seed: int = 0) -> dict[str, Any]:
    """Compare ``variable`` (a per-evaluation series of each run) before collapses with matched controls.

    :param runs: records with ``seed``, ``timesteps``, ``scores`` and ``variable``, on the same evaluation grid
    :return: the cases and controls, the matched mean difference with its bootstrap interval and
        permutation p-value, the Mann-Whitney test, and the share of seeds that collapsed (Wilson interval)
    """
    moments: dict[int, dict[str, list[tuple[int, float]]]] = {}  # timestep -> case/control -> (seed, value)
    collapsed_seeds = 0
    for run in runs:
        labels = label_moments(run["scores"], collapse_fraction, peak_threshold)
        collapsed_seeds += "case" in labels
        for timestep, label, value in zip(run["timesteps"], labels, run[variable]):
            if label in ("case", "control") and np.isfinite(value):
                moments.setdefault(timestep, {"case": [], "control": []})[label].append((run["seed"], value))
    cases = [(t, seed, v) for t, m in sorted(moments.items()) for seed, v in m["case"]]
    controls = [(t, seed, v) for t, m in sorted(moments.items()) for seed, v in m["control"]]
    strata = [(np.array([v for _, v in m["case"]]), np.array([v for _, v in m["control"]]))
              for _, m in sorted(moments.items()) if m["case"] and m["control"]]
    result: dict[str, Any] = {
        "variable": variable,
        "definition": {"collapse_fraction": collapse_fraction, "peak_threshold": peak_threshold},
        "seeds": len(runs),
        "seeds_with_collapse": dict(zip(("rate", "low", "high"), wilson_interval(collapsed_seeds, len(runs))))
        if runs else None,
        "cases": [{"timestep": t, "seed": s, "value": v} for t, s, v in cases],
        "n_cases": len(cases),
        "n_controls": len(controls),
        "n_matched_cases": sum(len(c) for c, _ in strata),
        "case_median": float(np.median([v for *_, v in cases])) if cases else None,
        "control_median": float(np.median([v for *_, v in controls])) if controls else None,
    }
    if strata:
        observed = _matched_difference(strata)
        differences = [case - controls_.mean() for cases_, controls_ in strata for case in cases_]
        estimate, low, high = stratified_bootstrap_interval({"cases": differences}, statistic=np.mean,
                                                            resamples=BOOTSTRAP_RESAMPLES, seed=seed)
        result["matched_difference"] = {"estimate": estimate, "low": low, "high": high}
        result["matched_relative_difference"] = observed / float(np.mean([c.mean() for _, c in strata]))
        result["permutation_p"] = _permutation_p(strata, observed, permutations, seed)
    if cases and controls:
        test = stats.mannwhitneyu([v for *_, v in cases], [v for *_, v in controls], alternative="two-sided")
        result["mann_whitney"] = {"u": float(test.statistic), "p": float(test.pvalue)}
    return result


def _permutation_p(strata: Sequence[tuple[np.ndarray, np.ndarray]], observed: float, permutations: int,
                   seed: int) -> float:
    """Two-sided p-value of ``observed`` when case and control labels are shuffled within each stratum."""
    rng = np.random.default_rng(seed)
    pooled = [(np.concatenate([cases, controls]), len(cases)) for cases, controls in strata]
    extreme = 0
    for _ in range(permutations):
        shuffled = []
        for values, n_cases in pooled:
            order = rng.permutation(len(values))
            shuffled.append((values[order[:n_cases]], values[order[n_cases:]]))
        extreme += abs(_matched_difference(shuffled)) >= abs(observed) - 1e-12
    return (extreme + 1) / (permutations + 1)


# -- running it --------------------------------------------------------------------------------------

def run_stationary(seeds: Sequence[int], steps: int, run_dir: Path, workers: int = 1,
                   overrides: Sequence[tuple[str, Any]] = (), eval_freq: int = eval_freq_for(ENV_ID),
                   eval_episodes: int = DEFAULT_EVAL_EPISODES, tensorboard: bool = True,
                   progress: Callable[[str], None] = print,
                   provenance: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train every seed (in ``workers`` processes), writing ``records/seed<k>.json`` as each finishes.

    :param provenance: stored in every record file (``experiments.common.provenance``)
    """
    records_dir = run_dir / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    jobs = {seed: (seed, steps, eval_freq, eval_episodes, tuple(overrides),
                   str(run_dir / "tensorboard" / f"seed{seed}") if tensorboard else None) for seed in seeds}
    started = time.perf_counter()
    done: dict[Any, dict[str, Any]] = {}

    def finish(seed: Any, record: dict[str, Any]) -> None:
        done[seed] = record
        write_json(records_dir / f"seed{seed}.json", {**record, "provenance": provenance})
        progress(f"[{len(done)}/{len(jobs)}] seed {seed}: {record['wall_seconds']:.0f} s "
                 f"(elapsed {(time.perf_counter() - started) / 60:.1f} min)")

    run_in_pool(run_seed, jobs, workers, finish)
    return [done[seed] for seed in seeds]
