"""The A -> B -> A forgetting experiment: train on task A, then B, then A again, and measure what is lost.

Every run trains one arm on ``rollback_rl/SwitchingCartPole-v0`` with the schedule A, B, A
(``phase_steps`` training timesteps each; by default 30,000, 15,000, 15,000: the first phase is where
DQN learns CartPole from scratch, which takes the Zoo's settings 25,000 to 35,000 steps) and the RL
Zoo's CartPole DQN settings with a replay buffer smaller than a phase, and scores the greedy policy on
*both* tasks every ``eval_freq`` timesteps (``ReplayBufferDiagnostics``, which also records the replay
buffer). The arms:

- ``vanilla``: SB3's DQN;
- ``rollback``: RollbackDQN with ``RollbackCallback`` at its defaults, evaluating the task being trained
  on now. After a switch its rollback check usually finds that the old weights do no better on the new
  task and "rebases" (keeps the current weights) instead of looping; ``rollbacks`` and ``rebases`` in
  each record show when it did not;
- ``task_bank``: SB3's DQN with ``TaskSnapshotBank``, which is *told* the task (``info["task"]``) and puts
  back the last good weights of a task when it returns.

``vanilla`` and ``task_bank`` are the same run, bit for bit, until A returns: the bank only evaluates and
copies weights before then. Their difference is the restore alone.

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
  for the rollback arm), scored on ``final_episodes`` fresh greedy episodes of A whose seeds were never
  used in training (PROTOCOL.md; the seeds of ``rollback-rl compare``).

Seeds run in a pool of processes, one torch thread each; each finished run is written to
``records/<arm>_seed<k>.json`` at once, and :func:`summarise` then gives IQMs and means with 95%
bootstrap intervals over seeds and, for each arm, the paired difference from ``vanilla``.
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
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import configure
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from rollback_rl.agents import RollbackDQN
from rollback_rl.callbacks import ReplayBufferDiagnostics, RollbackCallback
from rollback_rl.compare.arms import final_episode_seed
from rollback_rl.envs import SWITCHING_CARTPOLE_ID, TASK_NAMES
from rollback_rl.forgetting.bank import TaskSnapshotBank
from rollback_rl.forgetting.pool import run_jobs
from rollback_rl.hyperparams import check_hyperparameters, hyperparameters_for, model_arguments
from rollback_rl.statistics import iqm, stratified_bootstrap_interval

ARMS: dict[str, str] = {
    "vanilla": "SB3 DQN",
    "rollback": "RollbackDQN + RollbackCallback (defaults), evaluating the task trained on now",
    "task_bank": "SB3 DQN + TaskSnapshotBank (told the task; restores a returning task's last good weights)",
}
METRICS = ("forgetting", "relearn_steps", "average_score", "online_return", "final_score_a")
BOOTSTRAP_RESAMPLES = 2_000


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

    def task_at(self, timestep: int) -> str:
        """The task trained on up to ``timestep`` (an evaluation at a switch belongs to the phase it ends)."""
        return self.task_a if timestep <= self.switches[0] or timestep > self.switches[1] else self.task_b

    def hyperparameters(self) -> dict[str, Any]:
        """The Zoo's DQN settings for the CartPole family with ``buffer_size`` and ``exploration_steps``,
        then ``overrides`` (checked)."""
        params = hyperparameters_for(SWITCHING_CARTPOLE_ID, "dqn")
        params.update(buffer_size=self.buffer_size, exploration_fraction=min(1.0, self.exploration_steps / self.total_steps))
        params.update(check_hyperparameters(dict(self.overrides), DQN, "overrides"))
        params.pop("n_timesteps")
        return params


# -- one run --------------------------------------------------------------------------------------------

def _switching_env(tasks: Sequence[str], switch_at: Sequence[int] = ()) -> gym.Env:
    return gym.make(SWITCHING_CARTPOLE_ID, tasks=tuple(tasks), switch_at=list(switch_at))


class _EvaluateTheTaskTrainedOn(BaseCallback):
    """Keeps a one-task evaluation env on the task the training env runs now (read from ``info["task"]``),
    so that an evaluation made by a later callback scores the environment as it currently is."""

    def __init__(self, eval_env: gym.Env) -> None:
        super().__init__()
        self.switching = eval_env.unwrapped

    def _on_step(self) -> bool:
        self.switching.set_task(self.locals["infos"][0]["task"])
        return True


def run_arm(arm: str, seed: int, settings: ForgettingSettings, tensorboard_dir: str | None = None) -> dict[str, Any]:
    """Train ``arm`` with ``seed`` through A, B, A and return its raw record (JSON-ready)."""
    from rollback_rl.cli import greedy_returns  # cli imports this package: import when used

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    torch.set_num_threads(1)
    started, cpu_started = time.perf_counter(), time.process_time()
    a, b = settings.tasks
    training_env = Monitor(_switching_env((a, b, a), settings.switches))
    params = settings.hyperparameters()
    policy = params.pop("policy")
    algorithm = RollbackDQN if arm == "rollback" else DQN
    model = algorithm(policy, training_env, seed=seed, device="cpu", **model_arguments(params))
    if tensorboard_dir is not None:
        model.set_logger(configure(tensorboard_dir, ["tensorboard"]))

    diagnostics = ReplayBufferDiagnostics(log_freq=settings.eval_freq, n_eval_episodes=settings.eval_episodes,
                                          task_eval_envs={a: _switching_env((a,)), b: _switching_env((b,))})
    callbacks: list[BaseCallback] = [diagnostics]  # first: the curves show the weights before any intervention
    rollback = bank = None
    if arm == "rollback":
        current_task_env = _switching_env((a,))
        rollback = RollbackCallback(DummyVecEnv([lambda: Monitor(current_task_env)]), eval_freq=settings.eval_freq,
                                    n_eval_episodes=settings.eval_episodes)
        callbacks += [_EvaluateTheTaskTrainedOn(current_task_env), rollback]
    elif arm == "task_bank":
        bank = TaskSnapshotBank({a: _switching_env((a,)), b: _switching_env((b,))}, eval_freq=settings.eval_freq,
                                n_eval_episodes=settings.eval_episodes)
        callbacks.append(bank)
    model.learn(settings.total_steps, callback=CallbackList(callbacks))
    final_returns = greedy_returns(model, _switching_env((a,)), settings.final_episodes, final_episode_seed(seed))

    episode_returns = training_env.get_episode_rewards()
    records = diagnostics.records
    return {
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
        "eval_timesteps": diagnostics.eval_timesteps + (rollback.eval_timesteps if rollback else 0)
                          + (bank.eval_timesteps if bank else 0),
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,  # what the run costs on a core of its own
    }


def to_json(value: Any) -> str:
    """``value`` as JSON text, NaN and infinities written as ``null`` (JSON has no NaN)."""
    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, Mapping):
            return {key: finite(entry) for key, entry in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(entry) for entry in item]
        return item
    return json.dumps(finite(value), indent=1)


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


def settings_from_dict(values: Mapping[str, Any]) -> ForgettingSettings:
    values = dict(values)
    values["tasks"] = tuple(values["tasks"])
    values["phase_steps"] = tuple(values["phase_steps"])
    values["overrides"] = tuple(tuple(pair) for pair in values.get("overrides", ()))
    return ForgettingSettings(**values)


# -- over seeds ----------------------------------------------------------------------------------------

def interval(values: Sequence[float], statistic: Callable[[np.ndarray], float] = iqm,
             resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, float]:
    """``statistic`` of ``values`` with a 95% bootstrap interval over them (resampling seeds)."""
    estimate, low, high = stratified_bootstrap_interval({"runs": list(values)}, statistic=statistic,
                                                        resamples=resamples)
    return {"estimate": estimate, "low": low, "high": high}


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def summarise(per_seed: Mapping[str, Mapping[int, Mapping[str, Any]]], baseline: str = "vanilla",
              resamples: int | None = None) -> dict[str, Any]:
    """Per arm and metric: the values over seeds, their IQM and mean with 95% bootstrap intervals, and the
    mean paired difference from ``baseline`` over the seeds both have (with its interval).

    :param per_seed: arm to seed to ``record_metrics``
    :param resamples: bootstrap resamples per interval (default: ``BOOTSTRAP_RESAMPLES``)
    """
    resamples = resamples or BOOTSTRAP_RESAMPLES
    summary: dict[str, Any] = {}
    for arm, by_seed in per_seed.items():
        arm_summary: dict[str, Any] = {"seeds": sorted(by_seed)}
        for metric in METRICS:
            values = {seed: m[metric] for seed, m in by_seed.items() if m[metric] is not None}
            entry: dict[str, Any] = {"n": len(values), "values": [values[s] for s in sorted(values)]}
            if values:
                entry["iqm"] = interval(list(values.values()), iqm, resamples)
                entry["mean"] = interval(list(values.values()), _mean, resamples)
                entry["median"] = float(np.median(list(values.values())))
            if metric == "relearn_steps":
                entry["censored"] = sum(1 for m in by_seed.values() if m["relearn_censored"])
                entry["undefined"] = sum(1 for m in by_seed.values() if m[metric] is None)
            if arm != baseline and baseline in per_seed:
                base = {seed: m[metric] for seed, m in per_seed[baseline].items() if m[metric] is not None}
                differences = [values[s] - base[s] for s in sorted(values) if s in base]
                if differences:
                    entry[f"minus_{baseline}"] = {"n": len(differences), **interval(differences, _mean, resamples)}
            arm_summary[metric] = entry
        for count in ("rollbacks", "rebases", "bank_restores", "rollbacks_after_switches"):
            arm_summary[count] = [by_seed[s][count] for s in sorted(by_seed)]
        summary[arm] = arm_summary
    return summary


def run_experiment(settings: ForgettingSettings, arms: Sequence[str], seeds: Sequence[int], run_dir: Path,
                   workers: int = 1, tensorboard: bool = True,
                   progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every (arm, seed) in ``workers`` processes (here, if 1), writing each record as it finishes.

    :return: the records, in (seed, arm) order
    """
    records_dir = run_dir / "records"
    records_dir.mkdir(parents=True, exist_ok=True)
    jobs = {(arm, seed): (arm, seed, settings,
                          str(run_dir / "tensorboard" / f"{arm}_seed{seed}") if tensorboard else None)
            for seed in seeds for arm in arms}  # seed-major: early results cover every arm
    started = time.perf_counter()
    done: dict[Any, dict[str, Any]] = {}

    def finish(key: Any, record: dict[str, Any]) -> None:
        done[key] = record
        arm, seed = key
        (records_dir / f"{arm}_seed{seed}.json").write_text(to_json(record))
        progress(f"[{len(done)}/{len(jobs)}] {arm} seed {seed}: {record['wall_seconds']:.0f} s "
                 f"(elapsed {(time.perf_counter() - started) / 60:.1f} min)")

    run_jobs(run_arm, jobs, workers, finish)
    return [done[key] for key in jobs]
