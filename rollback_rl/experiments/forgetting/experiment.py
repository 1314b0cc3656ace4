"""The A -> B -> A forgetting experiment: train on task A, then B, then A again, and measure what is lost.

Every run trains one arm on ``rollback_rl/SwitchingCartPole-v0`` with the schedule A, B, A
(``phase_steps`` training timesteps each; by default 30,000, 15,000, 15,000: the first phase is where
DQN learns CartPole from scratch, which takes the Zoo's settings 25,000 to 35,000 steps) and the RL
Zoo's CartPole DQN settings with a replay buffer of ``buffer_size`` transitions of kind ``buffer_kind``
(``rollback_rl.buffers.BUFFER_KINDS``: a FIFO smaller than a phase holds only the current task once it
has run that long; a reservoir keeps a uniform sample of everything). B is a physics change that A's
policy partly survives (``long_pole``, ``heavy_pole``, ``weak_force``...) or one that makes it exactly
wrong (``reversed``). The greedy policy is scored on *both* tasks every ``eval_freq`` timesteps
(``ReplayBufferDiagnostics``, which also records the replay buffer). The arms:

- ``vanilla``: SB3's DQN;
- ``rollback``: RollbackDQN with ``RollbackCallback`` at its defaults, evaluating the environment as it is
  now. After a switch its rollback check usually finds that the old weights do no better on the new
  task and "rebases" (keeps the current weights) instead of looping; ``rollbacks`` and ``rebases`` in
  each record show when it did not;
- ``task_bank``: SB3's DQN with ``TaskSnapshotBank``, which is *told* the task (``info["task"]``) and puts
  back the last good weights of a task when it returns: the oracle-label upper bound;
- ``label_free_bank``: the ``rollback`` arm plus ``LabelFreeSnapshotBank``, which is told nothing: a
  rebase opens a new regime, and the snapshots banked in earlier regimes are tried and the best one
  kept if it clearly beats the current weights.

The evaluation env of the two rollback arms follows the world: the experiment keeps it on the task the
training env runs now, as an evaluation in a real deployment runs in the world as it is. That is the
experiment's knowledge, not the agent's: neither callback reads a task label.

``vanilla`` and ``task_bank`` are the same run, bit for bit, until A returns: the bank only evaluates and
copies weights before then. Their difference is the restore alone. Likewise ``rollback`` and
``label_free_bank`` until the bank first tries the snapshot of an earlier regime.

The curves are scored after every other callback of the step: they show the weights each arm goes on
training with (after a rollback or a bank restore made at that evaluation). Scored before, an arm that
acts at an evaluation would look one evaluation slower than it is.

Per seed, from the evaluation curves (all timesteps are training timesteps; the switches are at T1, the
end of the first A phase, and T2, the end of B):

- the level of a task at the end of a phase: the mean of its last ``level_window`` evaluations (3, i.e.
  the last 7,500 steps, by default), since one evaluation of 5 episodes is too noisy on CartPole;
- forgetting: the level of A at T1 minus the level of A at T2;
- steps to relearn A: from T2 to the first evaluation scoring at least ``relearn_fraction`` of A's level
  at T1; 0 if nothing was lost; censored at the end of the run if never; undefined when A was not
  learned in the first place (level at T1 below ``learned_score``);
- average score: mean, over all evaluations, of the score on the task being trained on at the time;
- online return: mean return of the training episodes (what the agent earned while learning);
- final score on A: the weights ``learn()`` returned (after ``RollbackCallback``'s end-of-training check,
  for the rollback arms), scored on ``final_episodes`` fresh greedy episodes of A whose seeds were never
  used in training (docs/protocol.md; the seeds of ``rollback-rl compare``, ``evaluation.final_episode_seed``).

A buffer at least as large as the run never evicts anything: there the three kinds are the same buffer
and the same run, bit for bit (``rollback_rl.buffers``), so such a cell is run once, with the FIFO.

Runs go in a pool of processes (``experiments.common.run_in_pool``), one torch thread each; each finished
run is written at once to ``a_b_a/<A>-<B>/<kind>-<size>/<arm>/seed<k>.json`` under the results folder
(``records``), so a sweep continues where it stopped. :func:`report` then gives, per cell (tasks and
buffer), each arm's metrics over seeds (mean and IQM with 95% bootstrap intervals resampling seeds) and
its paired differences from ``vanilla``, from ``task_bank`` and from ``rollback`` (the last separates the
label-free bank from the rollback it runs on; ``over_seeds.paired_difference``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from rollback_rl.agents import RollbackDQN
from rollback_rl.buffers import BUFFER_KINDS
from rollback_rl.callbacks import ReplayBufferDiagnostics, RollbackCallback
from rollback_rl.callbacks.bank import LabelFreeSnapshotBank, TaskSnapshotBank
from rollback_rl.envs import SWITCHING_CARTPOLE_ID, TASK_NAMES
from rollback_rl.evaluation import final_episode_seed, greedy_returns
from rollback_rl.experiments.forgetting.over_seeds import BOOTSTRAP_RESAMPLES, describe, paired_difference
from rollback_rl.experiments.forgetting.records import A_B_A, PlannedRun, as_json, cell_folder
from rollback_rl.hyperparams import check_hyperparameters, hyperparameters_for, model_arguments

ARMS: dict[str, str] = {
    "vanilla": "SB3 DQN",
    "rollback": "RollbackDQN + RollbackCallback (defaults), evaluating the environment as it is now",
    "task_bank": "SB3 DQN + TaskSnapshotBank (told the task; restores a returning task's last good weights)",
    "label_free_bank": "the rollback arm + LabelFreeSnapshotBank (not told the task: after a rebase, tries the "
                       "weights of earlier regimes and keeps the best if clearly better)",
}
# metric -> which direction is better
METRICS: dict[str, str] = {"forgetting": "lower", "relearn_steps": "lower", "adapt_b_steps": "lower",
                           "average_score": "higher", "online_return": "higher", "final_score_a": "higher"}
#: ``adapt_b_steps`` counts up to this fraction of the same seed's vanilla level on B at the end of B
ADAPT_FRACTION = 0.9
# every other arm is compared with each, paired over seeds; label_free_bank - rollback is what the bank
# adds to the rollback it runs on
REFERENCE_ARMS = ("vanilla", "task_bank", "rollback")
COUNTS = ("rollbacks", "rebases", "bank_restores", "rollbacks_after_switches")


@dataclass(frozen=True)
class ForgettingSettings:
    """What every run of one experiment does; the defaults are the ``rollback-rl forgetting`` defaults.

    :param tasks: task A and task B (names of ``rollback_rl.envs.TASK_PRESETS``)
    :param phase_steps: training timesteps of the three phases A, B, A
    :param eval_freq: training timesteps between evaluations (on both tasks)
    :param eval_episodes: greedy episodes per task and evaluation
    :param buffer_size: replay buffer capacity, in transitions. Less than a phase, so that the buffer holds
        only the current task once it has run ``buffer_size`` steps, as in any online learner whose stream
        outlasts its memory (the Zoo's 100,000 would keep every transition of a 60,000-step run)
    :param buffer_kind: what the buffer keeps once full (``rollback_rl.buffers.BUFFER_KINDS``): ``fifo``
        (the newest: SB3's buffer), ``reservoir`` (a uniform sample of all) or ``half`` (half each)
    :param exploration_steps: training timesteps over which epsilon falls to its final value, as in the
        Zoo's 50,000-step CartPole run (0.16 of it); a fraction of the whole run would stretch it with
        ``phase_steps``
    :param final_episodes: greedy episodes of A scoring the weights ``learn()`` returned
    :param level_window: evaluations averaged for a task's level at the end of a phase
    :param relearn_fraction: A counts as relearned at this fraction of its level at the first switch
    :param learned_score: relearning is measured only where A's level at the first switch is at least this
    :param overrides: ``(key, value)`` pairs replacing the Zoo's DQN hyperparameters (for quick tests)
    """

    tasks: tuple[str, str] = ("default", "reversed")
    phase_steps: tuple[int, int, int] = (30_000, 15_000, 15_000)
    eval_freq: int = 2_500
    eval_episodes: int = 5
    buffer_size: int = 10_000
    buffer_kind: str = "fifo"
    exploration_steps: int = 8_000
    final_episodes: int = 100
    level_window: int = 3
    relearn_fraction: float = 0.9
    learned_score: float = 195.0  # CartPole-v0's "solved" level
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if len(self.tasks) != 2 or self.tasks[0] == self.tasks[1]:
            raise ValueError(f"tasks must be two different task names (A, B), got {self.tasks!r}")
        for name in self.tasks:
            if name not in TASK_NAMES:
                raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
        if len(self.phase_steps) != 3 or self.eval_freq < 1 \
                or any(steps < 1 or steps % self.eval_freq for steps in self.phase_steps):
            raise ValueError(f"phase_steps must be three positive multiples of eval_freq ({self.eval_freq}), so "
                             f"that the switches fall on evaluations; got {self.phase_steps!r}")
        if self.eval_episodes < 1 or self.final_episodes < 1 or not 0 < self.relearn_fraction <= 1:
            raise ValueError("eval_episodes and final_episodes must be positive, relearn_fraction in (0, 1]")
        if not 1 <= self.level_window <= min(self.phase_steps[:2]) // self.eval_freq:
            raise ValueError(f"level_window must be between 1 and the evaluations in a phase, got {self.level_window}")
        if self.buffer_kind not in BUFFER_KINDS or self.buffer_size < 2:
            raise ValueError(f"buffer_kind must be one of {', '.join(BUFFER_KINDS)} and buffer_size at least 2, got "
                             f"{self.buffer_kind!r} and {self.buffer_size!r}")
        taken = sorted({key for key, _ in self.overrides} & {"buffer_size", "replay_buffer_class"})
        if taken:
            raise ValueError(f"{taken[0]} is set by buffer_size and buffer_kind, not by an override")

    @property
    def task_a(self) -> str:
        return self.tasks[0]

    @property
    def task_b(self) -> str:
        return self.tasks[1]

    @property
    def switches(self) -> tuple[int, int]:
        """The timesteps at which B starts and at which A returns."""
        return self.phase_steps[0], self.phase_steps[0] + self.phase_steps[1]

    @property
    def total_steps(self) -> int:
        return sum(self.phase_steps)

    @property
    def never_evicts(self) -> bool:
        """Whether the buffer holds every transition of the run: then every kind is the same buffer (the FIFO)."""
        return self.buffer_size >= self.total_steps

    def task_at(self, timestep: int) -> str:
        """The task trained on up to ``timestep`` (an evaluation at a switch belongs to the phase it ends)."""
        return self.task_a if timestep <= self.switches[0] or timestep > self.switches[1] else self.task_b

    def hyperparameters(self) -> dict[str, Any]:
        """The Zoo's DQN settings for the CartPole family with the buffer and ``exploration_steps``, then
        ``overrides`` (checked)."""
        params = hyperparameters_for(SWITCHING_CARTPOLE_ID, "dqn")
        params.update(buffer_size=self.buffer_size, replay_buffer_class=BUFFER_KINDS[self.buffer_kind],
                      exploration_fraction=min(1.0, self.exploration_steps / self.total_steps))
        params.update(check_hyperparameters(dict(self.overrides), DQN, "overrides"))
        params.pop("n_timesteps")
        return params


# -- one run --------------------------------------------------------------------------------------------

def _switching_env(tasks: Sequence[str], switch_at: Sequence[int] = ()) -> gym.Env:
    return gym.make(SWITCHING_CARTPOLE_ID, tasks=tuple(tasks), switch_at=list(switch_at))


class _EvaluateTheTaskTrainedOn(BaseCallback):
    """Keeps a one-task evaluation env on the task the training env runs now, so that an evaluation made
    by a later callback scores the world as it currently is. The experiment reads the task from
    ``info["task"]``; the callbacks that evaluate on this env are never told it."""

    def __init__(self, eval_env: gym.Env) -> None:
        super().__init__()
        self.switching = eval_env.unwrapped

    def _on_step(self) -> bool:
        self.switching.set_task(self.locals["infos"][0]["task"])
        return True


def run_arm(arm: str, seed: int, settings: ForgettingSettings) -> dict[str, Any]:
    """Train ``arm`` with ``seed`` through A, B, A and return its raw record (JSON-ready)."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    torch.set_num_threads(1)
    started, cpu_started = time.perf_counter(), time.process_time()
    a, b = settings.tasks
    training_env = Monitor(_switching_env((a, b, a), settings.switches))
    params = settings.hyperparameters()
    policy = params.pop("policy")
    with_rollback = arm in ("rollback", "label_free_bank")
    algorithm = RollbackDQN if with_rollback else DQN
    model = algorithm(policy, training_env, seed=seed, device="cpu", **model_arguments(params))

    callbacks: list[BaseCallback] = []
    rollback = task_bank = label_free_bank = None
    if with_rollback:
        world = _switching_env((a,))
        rollback = RollbackCallback(DummyVecEnv([lambda: Monitor(world)]), eval_freq=settings.eval_freq,
                                    n_eval_episodes=settings.eval_episodes)
        callbacks += [_EvaluateTheTaskTrainedOn(world), rollback]
        if arm == "label_free_bank":
            label_free_bank = LabelFreeSnapshotBank(rollback, n_trial_episodes=settings.eval_episodes)
            callbacks.append(label_free_bank)
    elif arm == "task_bank":
        task_bank = TaskSnapshotBank({a: _switching_env((a,)), b: _switching_env((b,))}, eval_freq=settings.eval_freq,
                                     n_eval_episodes=settings.eval_episodes)
        callbacks.append(task_bank)
    diagnostics = ReplayBufferDiagnostics(log_freq=settings.eval_freq, n_eval_episodes=settings.eval_episodes,
                                          task_eval_envs={a: _switching_env((a,)), b: _switching_env((b,))})
    callbacks.append(diagnostics)  # last: the curves show the weights each arm trains on from here
    model.learn(settings.total_steps, callback=CallbackList(callbacks))
    final_returns = greedy_returns(model, _switching_env((a,)), settings.final_episodes, final_episode_seed(seed))

    episode_returns = training_env.get_episode_rewards()
    records = diagnostics.records
    bank = task_bank or label_free_bank
    return {
        "experiment": A_B_A,
        "arm": arm,
        "seed": seed,
        "settings": asdict(settings),
        "timesteps": [score.timestep for score in diagnostics.task_scores[a]],
        "scores": {name: [score.mean for score in scores] for name, scores in diagnostics.task_scores.items()},
        "buffer": {
            "timesteps": [r.timestep for r in records],
            "transitions": [r.transitions for r in records],
            "failures": [r.failures for r in records],
            "sampled_failure_share": [r.sampled_failure_share for r in records],
            "mean_sample_age": [r.mean_sample_age for r in records],
        },
        "final_returns_a": final_returns,
        "online_return": float(np.mean(episode_returns)) if episode_returns else float("nan"),
        "training_episodes": len(episode_returns),
        "rollbacks": [asdict(event) for event in rollback.rollbacks] if rollback else [],
        "rebases": rollback.rebases if rollback else 0,
        "bank_restores": [asdict(event) for event in bank.restores] if bank else [],
        "bank_switches": [asdict(switch) for switch in label_free_bank.switches] if label_free_bank else [],
        "bank_regimes": len(label_free_bank.regimes) if label_free_bank else None,
        "eval_timesteps": diagnostics.eval_timesteps + sum(callback.eval_timesteps for callback in
                                                           (rollback, task_bank, label_free_bank) if callback),
        "wall_seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
        "cpu_seconds": time.process_time() - cpu_started,  # what the run costs on a core of its own
    }


def plan_runs(cells: Sequence[ForgettingSettings], arms: Sequence[str], seeds: Sequence[int],
              folder: Path) -> dict[Path, PlannedRun]:
    """Every run of the sweep, seed-major (early results cover every cell and arm), by its record's path.

    A cell whose buffer never evicts is run with the FIFO whatever its kind (there every kind is the same
    buffer, bit for bit), and once.
    """
    plan = {}
    for seed in seeds:
        for settings in cells:
            if settings.never_evicts:
                settings = replace(settings, buffer_kind="fifo")
            for arm in arms:
                a, b = settings.tasks
                path = record_path(folder, settings, arm, seed)
                description = f"{a}->{b}->{a} {settings.buffer_kind} {settings.buffer_size:,} {arm} seed {seed}"
                plan.setdefault(path, PlannedRun(path, asdict(settings), (arm, seed, settings), description))
    return plan


def record_path(folder: Path, settings: ForgettingSettings, arm: str, seed: int) -> Path:
    """``<A>-<B>/<kind>-<size>/<arm>/seed<k>.json`` under ``folder``."""
    a, b = settings.tasks
    return folder / f"{a}-{b}" / cell_folder(settings.buffer_kind, settings.buffer_size) / arm / f"seed{seed}.json"


# -- metrics of one run ---------------------------------------------------------------------------------

def level_at(timesteps: Sequence[int], scores: Sequence[float], timestep: int, window: int = 1) -> float:
    """The mean of the ``window`` evaluation scores ending with the one at exactly ``timestep``.

    :raises ValueError: if no evaluation was made then, or fewer than ``window`` up to it
    """
    try:
        end = list(timesteps).index(timestep) + 1
    except ValueError:
        raise ValueError(f"no evaluation at timestep {timestep}") from None
    if end < window:
        raise ValueError(f"only {end} evaluations up to timestep {timestep}, fewer than {window}")
    return float(np.mean(scores[end - window:end]))


def seed_metrics(timesteps: Sequence[int], scores: Mapping[str, Sequence[float]],
                 settings: ForgettingSettings) -> dict[str, Any]:
    """Forgetting, steps to relearn A and average score of one run's evaluation curves."""
    a, b = settings.task_a, settings.task_b
    b_starts, a_returns = settings.switches
    window = settings.level_window
    before_switch = level_at(timesteps, scores[a], b_starts, window)
    end_of_b = level_at(timesteps, scores[a], a_returns, window)
    relearn_steps: float | None = None
    censored = False
    if before_switch >= settings.learned_score:
        target = settings.relearn_fraction * before_switch
        relearned = [t for t, s in zip(timesteps, scores[a]) if t >= a_returns and s >= target]
        censored = not relearned
        relearn_steps = float((relearned[0] if relearned else settings.total_steps) - a_returns)
    current = [scores[settings.task_at(t)][i] for i, t in enumerate(timesteps)]
    return {
        "score_a_before_switch": before_switch,
        "score_a_end_of_b": end_of_b,
        "score_b_end_of_b": level_at(timesteps, scores[b], a_returns, window),
        "forgetting": before_switch - end_of_b,
        "relearn_steps": relearn_steps,
        "relearn_censored": censored,
        "average_score": float(np.mean(current)),
    }


def record_metrics(record: Mapping[str, Any]) -> dict[str, Any]:
    """``seed_metrics`` of a run record, plus its final score on A, online return and rollback/rebase/restore counts."""
    settings = settings_from_dict(record["settings"])
    metrics = seed_metrics(record["timesteps"], record["scores"], settings)
    switches = settings.switches
    window = 4 * settings.eval_freq
    metrics.update(
        final_score_a=float(np.mean(record["final_returns_a"])),
        online_return=record["online_return"],
        rollbacks=len(record["rollbacks"]),
        rebases=record["rebases"],
        bank_restores=len(record["bank_restores"]),
        # A loop would show as several rollbacks right after a switch.
        rollbacks_after_switches=sum(1 for event in record["rollbacks"]
                                     if any(s < event["timestep"] <= s + window for s in switches)),
    )
    return metrics


def adaptation_steps(timesteps: Sequence[int], scores_b: Sequence[float], settings: ForgettingSettings,
                     target: float) -> tuple[float, bool]:
    """Steps from the switch to B until the first evaluation on B at ``target`` or above, and whether the
    count is censored (never reached during B: then the length of B).

    With ``target`` 90% of vanilla's level on B at the end of B (same seed), this is the non-stationary
    check of docs/protocol.md: recovery must not slow adaptation to a changed task.
    """
    b_starts, a_returns = settings.switches
    reached = [t for t, s in zip(timesteps, scores_b) if b_starts < t <= a_returns and s >= target]
    return float((reached[0] if reached else a_returns) - b_starts), not reached


def add_adaptation(per_seed: Mapping[str, dict[int, dict[str, Any]]], records: Sequence[Mapping[str, Any]],
                   reference: str = "vanilla") -> None:
    """Put ``adapt_b_steps`` (and ``adapt_b_censored``) into every run's metrics: steps to reach
    ``ADAPT_FRACTION`` of ``reference``'s level on B at the end of B in the same seed; ``None`` where that
    seed has no ``reference`` run."""
    for record in records:
        metrics = per_seed[record["arm"]][int(record["seed"])]
        vanilla = per_seed.get(reference, {}).get(int(record["seed"]))
        metrics["adapt_b_steps"], metrics["adapt_b_censored"] = None, False
        if vanilla is not None:
            settings = settings_from_dict(record["settings"])
            b = settings.task_b
            target = ADAPT_FRACTION * vanilla["score_b_end_of_b"]
            metrics["adapt_b_steps"], metrics["adapt_b_censored"] = adaptation_steps(
                record["timesteps"], record["scores"][b], settings, target)


def settings_from_dict(values: Mapping[str, Any]) -> ForgettingSettings:
    values = dict(values)
    values["tasks"] = tuple(values["tasks"])
    values["phase_steps"] = tuple(values["phase_steps"])
    values["overrides"] = tuple(tuple(pair) for pair in values.get("overrides", ()))
    return ForgettingSettings(**values)


# -- over seeds ----------------------------------------------------------------------------------------

def summarise(per_seed: Mapping[str, Mapping[int, Mapping[str, Any]]], references: Sequence[str] = REFERENCE_ARMS,
              resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """Per arm and metric: the values over seeds, their mean and IQM with 95% bootstrap intervals, and the
    paired difference from each reference arm over the seeds both have (``minus_<reference>``).

    :param per_seed: arm to seed to ``record_metrics`` (with ``adapt_b_steps`` from :func:`add_adaptation`;
        a metric a run lacks counts as undefined)
    """
    summary: dict[str, Any] = {}
    for arm, by_seed in per_seed.items():
        arm_summary: dict[str, Any] = {"seeds": sorted(by_seed)}
        for metric, better in METRICS.items():
            entry = describe({seed: m.get(metric) for seed, m in by_seed.items()}, resamples)
            if metric in ("relearn_steps", "adapt_b_steps"):
                flag = metric.replace("_steps", "_censored")
                entry["censored"] = sum(1 for m in by_seed.values() if m.get(flag))
            for index, reference in enumerate(references):
                # task_bank - vanilla is given; vanilla - task_bank would only repeat it negated.
                if reference in per_seed and arm != reference and arm not in references[:index]:
                    entry[f"minus_{reference}"] = paired_difference(
                        {seed: m.get(metric) for seed, m in by_seed.items()},
                        {seed: m.get(metric) for seed, m in per_seed[reference].items()}, better, resamples)
            arm_summary[metric] = entry
        for count in COUNTS:
            arm_summary[count] = [by_seed[s][count] for s in sorted(by_seed)]
        summary[arm] = arm_summary
    return summary


def cell_of(record: Mapping[str, Any]) -> str:
    """The cell a record belongs to: ``<A>-<B>/<kind>-<size>``."""
    settings = record["settings"]
    a, b = settings["tasks"]
    return f"{a}-{b}/{cell_folder(settings.get('buffer_kind', 'fifo'), settings['buffer_size'])}"


def report(records: Sequence[Mapping[str, Any]], resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, Any]:
    """The experiment from its records: per cell (tasks and buffer), every arm's metrics over seeds and
    its paired differences from ``vanilla`` and ``task_bank``.

    :raises ValueError: if the records of one cell were made with different settings
    """
    by_cell: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        by_cell.setdefault(cell_of(record), []).append(record)
    cells = []
    for cell, cell_records in sorted(by_cell.items(), key=lambda item: _cell_order(item[1][0])):
        settings = {json.dumps(as_json(record["settings"]), sort_keys=True) for record in cell_records}
        if len(settings) > 1:
            raise ValueError(f"the records of {cell} were made with different settings; report them from separate "
                             "folders")
        per_seed: dict[str, dict[int, dict[str, Any]]] = {}
        for record in cell_records:
            per_seed.setdefault(record["arm"], {})[int(record["seed"])] = record_metrics(record)
        add_adaptation(per_seed, cell_records)
        arms = {arm: per_seed[arm] for arm in ARMS if arm in per_seed}
        cells.append({"cell": cell, "settings": cell_records[0]["settings"],
                      "arms": {arm: ARMS[arm] for arm in arms},
                      "cpu_minutes": sum(record["cpu_seconds"] for record in cell_records) / 60,
                      "summary": summarise(arms, resamples=resamples),
                      "per_seed": {arm: {str(seed): m for seed, m in by_seed.items()}
                                   for arm, by_seed in arms.items()}})
    return {"experiment": "A -> B -> A forgetting", "metrics": METRICS, "references": list(REFERENCE_ARMS),
            "bootstrap_resamples": resamples, "cells": cells, "buffer_kinds": kind_differences(cells, resamples)}


def kind_differences(cells: Sequence[Mapping[str, Any]], resamples: int = BOOTSTRAP_RESAMPLES) -> list[dict[str, Any]]:
    """Each non-FIFO buffer against the FIFO buffer of the same size, tasks and settings, arm by arm, paired
    by seed: does keeping old transitions change the forgetting of A? (Steps to adapt to B are left out:
    they are measured against vanilla's level in the same cell, so they do not compare across cells.)"""
    def same_except_kind(settings: Mapping[str, Any]) -> str:
        return json.dumps({k: v for k, v in as_json(settings).items() if k != "buffer_kind"}, sort_keys=True)

    fifo = {same_except_kind(cell["settings"]): cell for cell in cells
            if cell["settings"].get("buffer_kind", "fifo") == "fifo"}
    found = []
    for cell in cells:
        kind = cell["settings"].get("buffer_kind", "fifo")
        reference = fifo.get(same_except_kind(cell["settings"]))
        if kind == "fifo" or reference is None:
            continue
        for arm, by_seed in cell["per_seed"].items():
            if arm not in reference["per_seed"]:
                continue
            differences = {metric: paired_difference(
                {seed: m.get(metric) for seed, m in by_seed.items()},
                {seed: m.get(metric) for seed, m in reference["per_seed"][arm].items()}, better, resamples)
                for metric, better in METRICS.items() if metric != "adapt_b_steps"}
            found.append({"cell": cell["cell"], "reference": reference["cell"], "kind": kind, "arm": arm,
                          "differences": differences})
    return found


def _cell_order(record: Mapping[str, Any]) -> tuple[Any, ...]:
    settings = record["settings"]
    kinds = list(BUFFER_KINDS)
    kind = settings.get("buffer_kind", "fifo")
    return (tuple(settings["tasks"]), settings["buffer_size"], kinds.index(kind) if kind in kinds else len(kinds))


def _interval_text(entry: Mapping[str, Any] | None, digits: int = 0, signed: bool = False) -> str:
    if not entry:
        return "-"
    sign = "+" if signed else ""
    estimate, low, high = (f"{entry[key]:{sign},.{digits}f}" for key in ("estimate", "low", "high"))
    return f"{estimate} [{low}, {high}]"


def markdown(result: Mapping[str, Any]) -> str:
    """The report as Markdown: per cell, a table of every arm (mean [95% interval over seeds]) and a
    table of the paired differences from the reference arms."""
    lines = ["# A -> B -> A forgetting", "",
             "Mean [95% bootstrap interval over seeds]. Relearn: steps from the return of A to the first evaluation "
             "at 90% of A's level before the switch (censored at the end of the run; undefined where A was never "
             "learned). Adapt to B: steps from the switch to B to the first evaluation on B at 90% of vanilla's level on B "
             "at the end of B in the same seed (censored at the end of B).", ""]
    for cell in result["cells"]:
        settings = cell["settings"]
        a, b = settings["tasks"]
        lines += [f"## {a} -> {b} -> {a}, {settings.get('buffer_kind', 'fifo')} buffer of {settings['buffer_size']:,} "
                  f"(phases {', '.join(f'{n:,}' for n in settings['phase_steps'])} steps)", "",
                  "| arm | seeds | forgetting | relearn steps | censored / undefined | adapt to B (steps) | censored | "
                  "average score | online return | final score on A | bank restores | rebases |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm, s in cell["summary"].items():
            relearn = s["relearn_steps"]
            lines.append(f"| {arm} | {len(s['seeds'])} | {_interval_text(s['forgetting'].get('mean'))} | "
                         f"{_interval_text(relearn.get('mean'))} | {relearn['censored']} / {relearn['undefined']} | "
                         f"{_interval_text(s['adapt_b_steps'].get('mean'))} | {s['adapt_b_steps']['censored']} | "
                         f"{_interval_text(s['average_score'].get('mean'))} | "
                         f"{_interval_text(s['online_return'].get('mean'), 1)} | "
                         f"{_interval_text(s['final_score_a'].get('mean'))} | {sum(s['bank_restores'])} | "
                         f"{sum(s['rebases'])} |")
        paired = [(arm, metric, reference, s[metric][f"minus_{reference}"])
                  for arm, s in cell["summary"].items() for reference in result["references"] for metric in METRICS
                  if s[metric].get(f"minus_{reference}")]
        if paired:
            lines += ["", "| metric | arm - reference | pairs | mean difference [95% CI] | ratio of means [95% CI] | "
                          "win/tie/loss | Wilcoxon p (one-sided) |", "|---|---|---|---|---|---|---|"]
            for arm, metric, reference, d in paired:
                p = "-" if d["wilcoxon_p_one_sided"] is None else f"{d['wilcoxon_p_one_sided']:.3g}"
                lines.append(f"| {metric} | {arm} - {reference} | {d['n']} | "
                             f"{_interval_text(d['mean_difference'], signed=True)} | "
                             f"{_interval_text(d['ratio_of_means'], 2)} | {d['wins']}/{d['ties']}/{d['losses']} | "
                             f"{p} |")
        lines.append("")
    if result.get("buffer_kinds"):
        lines += ["## Buffer kinds against the FIFO buffer of the same size", "",
                  "The same arm, tasks and settings, paired by seed: kind minus FIFO (for forgetting and relearn steps, "
                  "a win is lower; for scores and return, higher).", "",
                  "| cell | arm | metric | pairs | kind - FIFO [95% CI] | win/tie/loss | Wilcoxon p (one-sided) |",
                  "|---|---|---|---|---|---|---|"]
        for found in result["buffer_kinds"]:
            for metric, d in found["differences"].items():
                if not d:
                    continue
                p = "-" if d["wilcoxon_p_one_sided"] is None else f"{d['wilcoxon_p_one_sided']:.3g}"
                lines.append(f"| {found['cell']} | {found['arm']} | {metric} | {d['n']} | "
                             f"{_interval_text(d['mean_difference'], signed=True)} | "
                             f"{d['wins']}/{d['ties']}/{d['losses']} | {p} |")
        lines.append("")
    return "\n".join(lines)
