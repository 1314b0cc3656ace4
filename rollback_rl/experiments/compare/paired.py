"""Paired per-seed comparison of arms on what learning did, not only on the final weights.

The recovery experiment (docs/protocol.md, "Pre-registered experiments") asks whether rollback makes
*learning* better, so its primary metric is one that picking the best weights at the end cannot improve:

- **post-solve failures** ``F``: training episodes that end in failure (terminated, not truncated by the
  time limit) after the first evaluation whose mean reaches the solve threshold (475 on CartPole-v1),
  to the end of training. A run that never solves has no post-solve period: ``F`` is undefined (NaN),
  it is counted apart as "never solved" and left out of the pairs.
- **re-collapse after a restore**: a rollback during training is followed by a new collapse when an
  evaluation within ``RECOLLAPSE_WINDOW`` timesteps after it lost more than half of what the restored
  weights scored when checked (``normalised_drop(verified, later, floor) > 0.5``, floor min(0, lowest eval)).
- **plain evaluation curve after solving**: the mean of the scheduled evaluations after the solve, of the
  weights training produced (before any restore decision; a restored snapshot's check is not in it).
- **evaluation cost**: environment steps spent evaluating (the restored weights' checks included).

Pairs are formed by seed against a reference arm (``vanilla``, ``best_model``, a control). For each
metric: the median and mean per-seed difference, a 95% bootstrap interval of the mean difference over
seeds (the independent unit), win/tie/loss counts, and for ``F`` a one-sided Wilcoxon signed-rank p.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from rollback_rl.core.detectors import normalised_drop

SOLVE_THRESHOLDS = {"CartPole-v1": 475.0}
RECOLLAPSE_WINDOW = 5_000
BOOTSTRAP_RESAMPLES = 2_000

Metric = Callable[[dict[str, Any]], float]


def solve_timestep(record: dict[str, Any]) -> int | None:
    """The timestep of the first scheduled evaluation whose mean reaches the task's solve threshold."""
    threshold = SOLVE_THRESHOLDS.get(record["task"])
    if threshold is None:
        return None
    for timestep, mean in zip(record["eval_curve"]["timesteps"], record["eval_curve"]["mean"]):
        if mean >= threshold:
            return int(timestep)
    return None


def post_solve_failures(record: dict[str, Any]) -> float:
    """``F``: failed training episodes that ended after the first solve (NaN if the run never solved)."""
    solved = solve_timestep(record)
    if solved is None:
        return math.nan
    episodes = record["training_episodes"]
    return float(sum(1 for end, failed in zip(episodes["end_timestep"], episodes["failed"])
                     if failed and end > solved))


def second_half_failures(record: dict[str, Any]) -> float:
    """Failed training episodes that ended in the second half of training (every task)."""
    half = record["settings"]["steps"] / 2
    episodes = record["training_episodes"]
    return float(sum(1 for end, failed in zip(episodes["end_timestep"], episodes["failed"]) if failed and end > half))


def plain_curve_after_solve(record: dict[str, Any]) -> float:
    """Mean scheduled evaluation after the first solve (the weights training produced); NaN if never solved."""
    solved = solve_timestep(record)
    if solved is None:
        return math.nan
    after = [m for t, m in zip(record["eval_curve"]["timesteps"], record["eval_curve"]["mean"]) if t > solved]
    return float(np.mean(after)) if after else math.nan


def restores_followed_by_collapse(record: dict[str, Any]) -> tuple[int, int]:
    """``(re-collapsed, restores)`` over the in-training rollbacks with a fresh check."""
    timesteps, means = record["eval_curve"]["timesteps"], record["eval_curve"]["mean"]
    floor = min(0.0, float(record["lowest_eval"]))
    last_eval = max(timesteps) if timesteps else 0
    recollapsed = restores = 0
    for event in record["rollbacks"]:
        verified = event.get("verified_score")
        if verified is None or event["timestep"] >= last_eval:
            continue  # no check, or the end-of-training restore: nothing follows it
        restores += 1
        later = [m for t, m in zip(timesteps, means) if event["timestep"] < t <= event["timestep"] + RECOLLAPSE_WINDOW]
        if any(normalised_drop(verified, m, floor) > 0.5 for m in later):
            recollapsed += 1
    return recollapsed, restores


def final_return(record: dict[str, Any]) -> float:
    return float(record["final_policy"]["mean"])


def online_return(record: dict[str, Any]) -> float:
    value = record["online_return"]["mean"]
    return math.nan if value is None else float(value)


def eval_env_steps(record: dict[str, Any]) -> float:
    return float(record["eval_env_steps"])


METRICS: dict[str, tuple[Metric, str]] = {  # name -> (per-record value, which direction is better)
    "post_solve_failures": (post_solve_failures, "lower"),
    "second_half_failures": (second_half_failures, "lower"),
    "final_return": (final_return, "higher"),
    "online_return": (online_return, "higher"),
    "plain_curve_after_solve": (plain_curve_after_solve, "higher"),
    "eval_env_steps": (eval_env_steps, "lower"),
}


@dataclass
class PairedDifference:
    """``arm - reference`` over the seeds both have (NaN pairs left out)."""

    metric: str
    arm: str
    reference: str
    n_pairs: int
    median_difference: float
    mean_difference: float
    mean_interval: tuple[float, float]
    wins: int
    ties: int
    losses: int
    wilcoxon_p_one_sided: float | None  # H1: the arm is better (in the metric's direction)


def _bootstrap_mean(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    draws = values[rng.integers(0, values.size, (BOOTSTRAP_RESAMPLES, values.size))].mean(axis=1)
    low, high = np.quantile(draws, [0.025, 0.975])
    return float(low), float(high)


def paired_difference(metric: str, arm: str, reference: str, by_arm: dict[str, dict[int, dict[str, Any]]]) -> PairedDifference | None:
    """The paired comparison of ``arm`` against ``reference`` on ``metric``; None without a pair."""
    measure, better = METRICS[metric]
    pairs = [(measure(by_arm[arm][s]), measure(by_arm[reference][s]))
             for s in sorted(set(by_arm.get(arm, {})) & set(by_arm.get(reference, {})))]
    pairs = [(a, r) for a, r in pairs if not (math.isnan(a) or math.isnan(r))]
    if not pairs:
        return None
    differences = np.array([a - r for a, r in pairs])
    sign = 1.0 if better == "higher" else -1.0
    wins, losses = int(np.sum(sign * differences > 0)), int(np.sum(sign * differences < 0))
    p = None
    if np.any(differences != 0):
        p = float(stats.wilcoxon(sign * differences, alternative="greater", zero_method="wilcox").pvalue)
    return PairedDifference(metric, arm, reference, len(pairs), float(np.median(differences)),
                            float(differences.mean()), _bootstrap_mean(differences), wins,
                            len(pairs) - wins - losses, losses, p)


@dataclass
class ArmMetrics:
    """Per-arm summary: medians of each metric, never-solved runs, re-collapse rate, evaluation cost."""

    arm: str
    seeds: list[int]
    medians: dict[str, float]
    never_solved: int
    restores: int
    recollapsed: int


def arm_metrics(arm: str, records: dict[int, dict[str, Any]]) -> ArmMetrics:
    medians = {}
    for name, (measure, _) in METRICS.items():
        values = [measure(r) for r in records.values()]
        finite = [v for v in values if not math.isnan(v)]
        medians[name] = float(np.median(finite)) if finite else math.nan
    counts = [restores_followed_by_collapse(r) for r in records.values()]
    return ArmMetrics(arm, sorted(records), medians,
                      never_solved=sum(1 for r in records.values() if solve_timestep(r) is None),
                      restores=sum(n for _, n in counts), recollapsed=sum(c for c, _ in counts))


def paired_report(records: Sequence[dict[str, Any]], references: Sequence[str]) -> dict[str, Any]:
    """Every arm's metrics and its paired differences against each reference arm, as JSON values."""
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for record in records:
        by_arm.setdefault(record["arm"], {})[int(record["seed"])] = record
    arms = sorted(by_arm)
    report: dict[str, Any] = {"arms": {arm: asdict(arm_metrics(arm, by_arm[arm])) for arm in arms},
                              "paired": [], "recollapse_window": RECOLLAPSE_WINDOW,
                              "solve_thresholds": SOLVE_THRESHOLDS, "bootstrap_resamples": BOOTSTRAP_RESAMPLES}
    for reference in references:
        for arm in arms:
            if arm == reference or reference not in by_arm:
                continue
            for metric in METRICS:
                difference = paired_difference(metric, arm, reference, by_arm)
                if difference is not None:
                    report["paired"].append(asdict(difference))
    return report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def markdown(report: dict[str, Any], primary: str = "post_solve_failures") -> str:
    """Two tables: per-arm medians; paired differences of every arm against each reference."""
    lines = ["| arm | seeds | never solved | F median | final | online | curve after solve | "
             "re-collapsed restores | eval env steps |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, m in report["arms"].items():
        med = m["medians"]
        rate = f"{m['recollapsed']}/{m['restores']}" if m["restores"] else "-"
        lines.append(f"| {arm} | {len(m['seeds'])} | {m['never_solved']} | {_fmt(med[primary], 0)} | "
                     f"{_fmt(med['final_return'])} | {_fmt(med['online_return'])} | "
                     f"{_fmt(med['plain_curve_after_solve'])} | {rate} | {_fmt(med['eval_env_steps'], 0)} |")
    lines += ["", "| metric | arm - reference | pairs | median diff | mean diff [95% CI] | win/tie/loss | "
              "Wilcoxon p (one-sided) |", "|---|---|---|---|---|---|---|"]
    for d in report["paired"]:
        low, high = d["mean_interval"]
        p = "-" if d["wilcoxon_p_one_sided"] is None else f"{d['wilcoxon_p_one_sided']:.3g}"
        lines.append(f"| {d['metric']} | {d['arm']} - {d['reference']} | {d['n_pairs']} | "
                     f"{_fmt(d['median_difference'])} | {_fmt(d['mean_difference'])} [{_fmt(low)}, {_fmt(high)}] | "
                     f"{d['wins']}/{d['ties']}/{d['losses']} | {p} |")
    return "\n".join(lines) + "\n"
