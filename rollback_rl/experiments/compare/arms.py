"""The arms a benchmark compares (docs/protocol.md), and how one training run becomes their records.

An *arm* is one way of getting a final policy; a *training run* trains once and may serve several
arms: the ``vanilla`` run (SB3's DQN with an ``EvalCallback``) gives both the ``vanilla`` arm (the
weights in place when ``learn()`` returns) and the ``best_model`` arm (EvalCallback's
``best_model.zip``, loaded at the end). Adding an arm is one function decorated with
:func:`training_run`; see ``adam_equal_betas`` at the bottom.

Every run, whatever the arm, is built by ``rollback_rl.training.build_model`` as ``rollback-rl train``
builds it: model seed = seed, evaluation env seeded ``seed + 10,000``, one torch thread, an evaluation
every ``eval_freq`` training timesteps of ``eval_episodes`` greedy episodes. The final policy is then
scored on ``final_episodes`` greedy episodes reset with seeds ``1,000,000 + 1,000 * seed + i``
(``rollback_rl.evaluation.final_episode_seed``), never used in training (``rollback-rl evaluate --seed
1000*seed`` replays them). :func:`execute` is what a worker process runs: one :class:`RunSpec` in, one
record per arm out, each with its provenance (see ``records.py`` for where they go).
"""

from __future__ import annotations

import inspect
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
from stable_baselines3.common.vec_env import VecEnv

import rollback_rl.envs  # registers this package's environments with gymnasium
from rollback_rl.agents import RollbackDQN
from rollback_rl.callbacks import RollbackCallback
from rollback_rl.callbacks.recovery import CoolLearningRate, DropRecentTransitions, ResetOptimizer, SlowTargetUpdates
from rollback_rl.callbacks.schedules import CoolOnSolve, ScaleLearningRate
from rollback_rl.core.schedules import ScaledSchedule
from rollback_rl.evaluation import EVAL_SEED_OFFSET, final_episode_seed, greedy_returns
from rollback_rl.experiments.common import provenance
from rollback_rl.experiments.compare.records import RECORD_SCHEMA
from rollback_rl.hyperparams import DEFAULT_EVAL_EPISODES, eval_freq_for, hyperparameters_for, to_jsonable
from rollback_rl.training import build_model, resolve_hyperparameters

FINAL_EPISODES = 100


# -- what a run is asked to do -------------------------------------------------------------------

@dataclass(frozen=True)
class RunSettings:
    """The settings every arm of one task is run with; records made with other settings never mix.

    :param steps: training timesteps
    :param eval_freq: training timesteps between two evaluations
    :param eval_episodes: greedy episodes per evaluation during training
    :param final_episodes: greedy episodes scoring the final policy
    :param overrides: ``(key, value text)`` pairs applied last to every arm's hyperparameters, as
        ``rollback-rl train --set`` does (e.g. ``("policy_kwargs", "dict(net_arch=[32])")``)
    """

    steps: int
    eval_freq: int
    eval_episodes: int = DEFAULT_EVAL_EPISODES
    final_episodes: int = FINAL_EPISODES
    overrides: tuple[tuple[str, str], ...] = ()

    @classmethod
    def for_task(cls, task: str, steps: int | None = None, eval_freq: int | None = None,
                 eval_episodes: int = DEFAULT_EVAL_EPISODES, final_episodes: int = FINAL_EPISODES,
                 overrides: tuple[tuple[str, str], ...] = ()) -> RunSettings:
        """docs/protocol.md's settings for ``task`` (the Zoo's steps, its evaluation schedule), with changes."""
        if steps is None:
            steps = int(hyperparameters_for(task, "dqn")["n_timesteps"])
        return cls(steps=steps, eval_freq=eval_freq if eval_freq is not None else eval_freq_for(task),
                   eval_episodes=eval_episodes, final_episodes=final_episodes, overrides=tuple(overrides))

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "eval_freq": self.eval_freq, "eval_episodes": self.eval_episodes,
                "final_episodes": self.final_episodes, "overrides": [list(pair) for pair in self.overrides]}


@dataclass(frozen=True)
class RunSpec:
    """One training run to do: which run, on which task, with which seed and settings (picklable)."""

    task: str
    training_run: str
    seed: int
    settings: RunSettings

    @property
    def arms(self) -> tuple[str, ...]:
        return TRAINING_RUNS[self.training_run].arms

    def describe(self) -> str:
        return f"{self.task} {'+'.join(self.arms)} seed {self.seed}"


def hyperparameters(spec: RunSpec) -> dict[str, Any]:
    """The Zoo's DQN defaults for the task, then the settings' overrides, checked for the algorithm of
    the spec's training run (as ``rollback-rl train --set`` does).

    :raises UsageError: naming an override that the algorithm does not accept
    """
    algorithm = TRAINING_RUNS[spec.training_run].algorithm
    params, _ = resolve_hyperparameters(spec.task, "dqn", algorithm, overrides=spec.settings.overrides)
    params["n_timesteps"] = spec.settings.steps
    return params


# -- the registry --------------------------------------------------------------------------------

ArmRecords = dict[str, dict[str, Any]]  # arm name -> its record
RunFunction = Callable[["RunSpec"], ArmRecords]  # trains once, returns a record per arm


@dataclass(frozen=True)
class TrainingRun:
    """A registered training run: its function, the arms whose records it returns, and the algorithm
    class that ``--set`` overrides are checked against before any run starts."""

    name: str
    arms: tuple[str, ...]
    description: str
    algorithm: type[BaseAlgorithm]
    function: RunFunction


TRAINING_RUNS: dict[str, TrainingRun] = {}
ARM_DESCRIPTIONS: dict[str, str] = {}  # every arm of every registered run, with what it is
DEFAULT_ARMS = ("vanilla", "best_model", "rollback")


def training_run(name: str, description: str, arms: dict[str, str] | None = None,
                 algorithm: type[BaseAlgorithm] = DQN) -> Callable[[RunFunction], RunFunction]:
    """Register a function that trains once for a :class:`RunSpec` and returns a record per arm
    (build each with :func:`arm_record`). Define it in this module: worker processes (and Ray
    workers) know the arms registered when they import it.

    :param name: the training run's name
    :param description: what the run does (one line, shown by ``--help`` and in the records)
    :param arms: the arms it serves, each with its one-line description; default: one arm, ``name``
    :param algorithm: the algorithm class it trains (its hyperparameters come from :func:`hyperparameters`)
    """
    def register(function: RunFunction) -> RunFunction:
        produced = arms or {name: description}
        taken = [arm for arm in produced if arm in ARM_DESCRIPTIONS]
        if name in TRAINING_RUNS or taken:
            raise ValueError(f"training run {name!r} or arms {taken} registered twice")
        TRAINING_RUNS[name] = TrainingRun(name, tuple(produced), description, algorithm, function)
        ARM_DESCRIPTIONS.update(produced)
        return function
    return register


def training_run_of(arm: str) -> TrainingRun:
    for run in TRAINING_RUNS.values():
        if arm in run.arms:
            return run
    raise KeyError(arm)


def execute(spec: RunSpec) -> list[dict[str, Any]]:
    """Do one training run and return its arms' records. What a worker process runs."""
    torch.set_num_threads(1)
    run = TRAINING_RUNS[spec.training_run]
    started = time.perf_counter()
    records = run.function(spec)
    total_seconds = time.perf_counter() - started  # building, training, scoring every arm's final policy
    if set(records) != set(run.arms):
        raise RuntimeError(f"training run {run.name!r} returned records for {sorted(records)}, expected {list(run.arms)}")
    for record in records.values():
        record["time_s"]["training_run_total"] = round(total_seconds, 4)
    return [records[arm] for arm in run.arms]


# -- training ------------------------------------------------------------------------------------

@dataclass
class TrainingOutcome:
    """A finished training run: the model as ``learn()`` left it and what was measured on the way.

    Times are wall-clock seconds; ``eval_env_steps`` counts environment steps of evaluation episodes.
    """

    model: BaseAlgorithm
    hyperparameters: dict[str, Any]
    eval_timesteps: list[int]
    eval_returns: list[list[float]]
    eval_env_steps: int
    eval_seconds: float
    learn_seconds: float
    online_returns: list[float]
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    rebases: int = 0
    training_episodes: dict[str, list[Any]] = field(default_factory=dict)


class TrainingEpisodes(BaseCallback):
    """Every training episode as it ends: the timestep, its return and length, and whether it ended in
    failure (terminated, not truncated by a time limit). Changes nothing in training."""

    def __init__(self) -> None:
        super().__init__()
        self.episodes: dict[str, list[Any]] = {"end_timestep": [], "return": [], "length": [], "failed": []}

    def _on_step(self) -> bool:
        for done, info in zip(self.locals["dones"], self.locals["infos"]):
            episode = info.get("episode")
            if done and episode is not None:
                self.episodes["end_timestep"].append(int(self.num_timesteps))
                self.episodes["return"].append(float(episode["r"]))
                self.episodes["length"].append(int(episode["l"]))
                self.episodes["failed"].append(not info.get("TimeLimit.truncated", False))
        return True


def _training_episode_returns(model: BaseAlgorithm) -> list[float]:
    # Every training episode, from the Monitor wrappers (model.ep_info_buffer keeps only the last 100).
    return [float(r) for rewards in model.get_env().env_method("get_episode_rewards") for r in rewards]


class TimedEvalCallback(EvalCallback):
    """SB3's ``EvalCallback`` that also adds up the wall time of its evaluations in ``eval_seconds``
    (writing ``best_model.zip`` and ``evaluations.npz`` included)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_seconds = 0.0

    def _on_step(self) -> bool:
        if not (self.eval_freq > 0 and self.n_calls % self.eval_freq == 0):
            return super()._on_step()
        started = time.perf_counter()
        result = super()._on_step()
        self.eval_seconds += time.perf_counter() - started
        return result


def train_with_eval_callback(spec: RunSpec, algorithm: type[BaseAlgorithm], params: dict[str, Any],
                             best_model_dir: str | None = None,
                             after_eval: BaseCallback | None = None) -> TrainingOutcome:
    """Train with SB3's ``EvalCallback`` on the settings' schedule; ``best_model_dir``: where it saves
    ``best_model.zip`` (``None``: not saved); ``after_eval``: its ``callback_after_eval``."""
    model, eval_env = build_model(spec.task, algorithm, params, spec.seed)  # as rollback-rl train builds it
    episodes = TrainingEpisodes()
    with tempfile.TemporaryDirectory(prefix="rollback-rl-compare-") as log_dir:
        # n_envs = 1 unless the hyperparameters say otherwise; EvalCallback counts calls, not timesteps.
        callback = TimedEvalCallback(eval_env, eval_freq=max(spec.settings.eval_freq // model.n_envs, 1),
                                     n_eval_episodes=spec.settings.eval_episodes, deterministic=True,
                                     best_model_save_path=best_model_dir, log_path=log_dir, verbose=0, warn=False,
                                     callback_after_eval=after_eval)
        started = time.perf_counter()
        model.learn(total_timesteps=spec.settings.steps, callback=CallbackList([callback, episodes]))
        learn_seconds = time.perf_counter() - started
    eval_env.close()
    return TrainingOutcome(
        model=model, hyperparameters=params, eval_timesteps=[int(t) for t in callback.evaluations_timesteps],
        eval_returns=[[float(r) for r in returns] for returns in callback.evaluations_results],
        eval_env_steps=int(sum(np.sum(lengths) for lengths in callback.evaluations_length)),
        eval_seconds=callback.eval_seconds, learn_seconds=learn_seconds,
        online_returns=_training_episode_returns(model), training_episodes=episodes.episodes)


def rollback_callback_as_in_train(eval_env: VecEnv, settings: RunSettings,
                                  on_rollback: BaseCallback | None = None, **options: Any) -> RollbackCallback:
    """The callback of ``rollback-rl train`` with its defaults (``--drop 0.5 --patience 1``, i.e.
    ``SignificantDrop()``), on the settings' evaluation schedule; ``options`` override other defaults."""
    return RollbackCallback(eval_env, eval_freq=settings.eval_freq, n_eval_episodes=settings.eval_episodes,
                            callback_on_rollback=on_rollback, **options)


def train_with_rollback(spec: RunSpec, params: dict[str, Any],
                        on_rollback: BaseCallback | None = None, **options: Any) -> TrainingOutcome:
    """Train as ``rollback-rl train`` does by default: ``RollbackDQN`` with ``RollbackCallback``."""
    outcome, _ = _train_with_rollback(spec, params, on_rollback, **options)
    return outcome


def _train_with_rollback(spec: RunSpec, params: dict[str, Any], on_rollback: BaseCallback | None = None,
                         also: Callable[[RollbackCallback], BaseCallback] | None = None,
                         **options: Any) -> tuple[TrainingOutcome, RollbackCallback]:
    """``also``: makes a callback that runs next to the ``RollbackCallback`` (given it) during ``learn()``.
    ``options`` go to ``RollbackCallback``; ``cool_on_solve`` is ``None`` unless given, so that every arm
    but ``rollback`` (today's defaults) trains as it did before 0.4.0 made that cooling a default."""
    options.setdefault("cool_on_solve", None)
    model, eval_env = build_model(spec.task, RollbackDQN, params, spec.seed)  # as rollback-rl train builds it
    callback = rollback_callback_as_in_train(eval_env, spec.settings, on_rollback, **options)
    episodes = TrainingEpisodes()
    callbacks = [callback, episodes] + ([also(callback)] if also is not None else [])
    started = time.perf_counter()
    model.learn(total_timesteps=spec.settings.steps, callback=CallbackList(callbacks))
    learn_seconds = time.perf_counter() - started
    return _rollback_outcome(model, params, callback, learn_seconds, episodes.episodes), callback


def _rollback_outcome(model: BaseAlgorithm, params: dict[str, Any], callback: RollbackCallback,
                      learn_seconds: float, episodes: dict[str, list[Any]]) -> TrainingOutcome:
    return TrainingOutcome(
        model=model, hyperparameters=params, eval_timesteps=[s.timestep for s in callback.scores],
        eval_returns=[list(s.episode_returns or [s.mean]) for s in callback.scores],
        eval_env_steps=callback.eval_timesteps, eval_seconds=callback.eval_seconds, learn_seconds=learn_seconds,
        online_returns=_training_episode_returns(model),
        rollbacks=[asdict(event) for event in callback.rollbacks], rebases=callback.rebases,
        training_episodes=episodes)


# -- scoring and records -------------------------------------------------------------------------

def score_final_policy(model: BaseAlgorithm, spec: RunSpec) -> list[float]:
    """Returns of ``final_episodes`` greedy episodes on a fresh env, seeds never used in training."""
    env = gym.make(spec.task, **hyperparameters_for(spec.task, "dqn").get("env_kwargs", {}))
    try:
        return greedy_returns(model, env, spec.settings.final_episodes, final_episode_seed(spec.seed))
    finally:
        env.close()


def arm_record(spec: RunSpec, arm: str, outcome: TrainingOutcome, policy: BaseAlgorithm | None = None,
               policy_source: str = "weights in place when learn() returned", **extra: Any) -> dict[str, Any]:
    """The record of ``arm``: its final policy (``policy``, default the trained model) scored afresh,
    and what ``outcome`` measured during training. ``extra`` adds fields."""
    started = time.perf_counter()
    final_returns = score_final_policy(policy if policy is not None else outcome.model, spec)
    scoring_seconds = time.perf_counter() - started
    means = [float(np.mean(returns)) for returns in outcome.eval_returns]
    return {
        "schema": RECORD_SCHEMA,
        "task": spec.task,
        "arm": arm,
        "seed": spec.seed,
        "training_run": spec.training_run,
        "description": ARM_DESCRIPTIONS[arm],
        "settings": spec.settings.to_json(),
        "algorithm": type(outcome.model).__name__,
        "hyperparameters": to_jsonable(outcome.hyperparameters),
        "eval_seed": spec.seed + EVAL_SEED_OFFSET,
        "final_policy": {"source": policy_source, "mean": float(np.mean(final_returns)),
                         "returns": final_returns, "first_episode_seed": final_episode_seed(spec.seed)},
        "eval_curve": {"timesteps": outcome.eval_timesteps, "mean": means, "episode_returns": outcome.eval_returns},
        "peak_eval": max(means) if means else None,
        "lowest_eval": min(means) if means else None,
        "online_return": {"mean": float(np.mean(outcome.online_returns)) if outcome.online_returns else None,
                          "episodes": len(outcome.online_returns)},
        "timesteps": int(outcome.model.num_timesteps),
        "eval_env_steps": outcome.eval_env_steps,
        "time_s": {"learn": round(outcome.learn_seconds, 4), "evaluating": round(outcome.eval_seconds, 4),
                   "final_scoring": round(scoring_seconds, 4)},
        "rollbacks": outcome.rollbacks,
        "n_rebases": outcome.rebases,
        "training_episodes": outcome.training_episodes,
        "provenance": provenance({"task": spec.task, "training_run": spec.training_run, "seed": spec.seed,
                                  **spec.settings.to_json()}),
        **extra,
    }


# -- the arms --------------------------------------------------------------------------------------

@training_run("vanilla", "SB3 DQN with EvalCallback(best_model_save_path=...)", arms={
    "vanilla": "SB3 DQN, Zoo settings: the weights in place when learn() returns",
    "best_model": "SB3 DQN, Zoo settings: EvalCallback's best_model.zip, loaded at the end"})
def vanilla_and_best_model(spec: RunSpec) -> ArmRecords:
    params = hyperparameters(spec)
    with tempfile.TemporaryDirectory(prefix="rollback-rl-best-model-") as best_model_dir:
        outcome = train_with_eval_callback(spec, DQN, params, best_model_dir=best_model_dir)
        best_model = DQN.load(Path(best_model_dir) / "best_model.zip", device="cpu")  # our own file, just written
    means = [float(np.mean(returns)) for returns in outcome.eval_returns]
    saved_at = outcome.eval_timesteps[int(np.argmax(means))]  # EvalCallback saves on a strictly better mean
    return {
        "vanilla": arm_record(spec, "vanilla", outcome),
        "best_model": arm_record(spec, "best_model", outcome, policy=best_model,
                                 policy_source=f"best_model.zip saved by EvalCallback at timestep {saved_at}",
                                 best_model_timestep=saved_at),
    }


@training_run("rollback", "rollback-rl defaults: RollbackDQN with RollbackCallback(), as rollback-rl train "
              "(no remedy after a rollback, max_restores=2, learning rate x0.1 once at the first evaluation >= "
              "the reward threshold)", algorithm=RollbackDQN,
              arms={"rollback": "rollback-rl defaults, as rollback-rl train; final weights after the end-of-training check",
                    "rollback_no_end_check": "rollback-rl defaults; the same run's weights before the end-of-training check"})
def rollback_defaults(spec: RunSpec) -> ArmRecords:
    defaults = inspect.signature(RollbackCallback).parameters
    return _candidate_records(spec, "rollback", defaults["callback_on_rollback"].default,
                              **{name: defaults[name].default for name in ("max_restores", "cool_on_solve")})


@training_run("rollback_v02", "rollback-rl 0.2's defaults: no remedy after a rollback, max_restores=2",
              algorithm=RollbackDQN)
def rollback_v02(spec: RunSpec) -> ArmRecords:
    outcome = train_with_rollback(spec, hyperparameters(spec), on_rollback=None, max_restores=2)
    return {"rollback_v02": arm_record(spec, "rollback_v02", outcome)}


@training_run("rollback_unlimited", "rollback-rl 0.1: no remedy after a rollback and no limit on restores of "
                                     "one snapshot", algorithm=RollbackDQN)
def rollback_unlimited_restores(spec: RunSpec) -> ArmRecords:
    outcome = train_with_rollback(spec, hyperparameters(spec), on_rollback=None, max_restores=None)
    return {"rollback_unlimited": arm_record(spec, "rollback_unlimited", outcome)}


@training_run("rollback_lr_half", "rollback-rl 0.2 (max_restores=2) plus ScaleLearningRate(0.5) after each rollback",
              algorithm=RollbackDQN)
def rollback_halving_learning_rate(spec: RunSpec) -> ArmRecords:
    outcome = train_with_rollback(spec, hyperparameters(spec), on_rollback=ScaleLearningRate(0.5), max_restores=2)
    return {"rollback_lr_half": arm_record(spec, "rollback_lr_half", outcome)}


@training_run("adam_equal_betas", "SB3 DQN with Adam betas=(0.9, 0.9) (beta1 = beta2): the weights "
                                     "when learn() returns")
def adam_equal_betas(spec: RunSpec) -> ArmRecords:
    params = hyperparameters(spec)
    policy_kwargs = params.setdefault("policy_kwargs", {})
    policy_kwargs["optimizer_kwargs"] = {**policy_kwargs.get("optimizer_kwargs", {}), "betas": (0.9, 0.9)}
    return {"adam_equal_betas": arm_record(spec, "adam_equal_betas", train_with_eval_callback(spec, DQN, params))}


# -- recovery candidates (issue: recovery that sticks) and the hard control --------------------------

def _candidate_records(spec: RunSpec, name: str, on_rollback: BaseCallback | None,
                       also: Callable[[RollbackCallback], BaseCallback] | None = None, **options: Any) -> ArmRecords:
    """One rollback run giving two arms: ``name`` (final weights after the end-of-training check) and
    ``name_no_end_check`` (the weights in place when training stopped, before that check)."""
    params = hyperparameters(spec)
    outcome, callback = _train_with_rollback(spec, params, on_rollback, also, check_at_end=False, **options)
    before = arm_record(spec, f"{name}_no_end_check", outcome,
                        policy_source="weights in place when learn() returned, before the end-of-training check")
    callback.check_end_of_training()
    callback.eval_env.close()
    after = _rollback_outcome(outcome.model, params, callback, outcome.learn_seconds, outcome.training_episodes)
    return {name: arm_record(spec, name, after, policy_source="weights after the end-of-training check"),
            f"{name}_no_end_check": before}


def _candidate(name: str, description: str) -> Callable[[RunFunction], RunFunction]:
    return training_run(name, description, algorithm=RollbackDQN, arms={
        name: description + "; final weights after the end-of-training check",
        f"{name}_no_end_check": description + "; final weights before the end-of-training check"})


@_candidate("recover_cool", "rollback, then Adam's state reset and the learning rate x0.1 for the rest of "
                            "training (again at each rollback); no limit on restores")
def recover_cool(spec: RunSpec) -> ArmRecords:
    remedy = CallbackList([ResetOptimizer(), CoolLearningRate(0.1)])
    return _candidate_records(spec, "recover_cool", remedy, max_restores=None)


@_candidate("recover_drop", "rollback, then the replay buffer rewound to the snapshot (transitions since "
                            "dropped); max_restores=2 as rollback 0.2")
def recover_drop(spec: RunSpec) -> ArmRecords:
    return _candidate_records(spec, "recover_drop", DropRecentTransitions(), max_restores=2)


@_candidate("recover_target", "rollback, then the target network synced 10x less often (again at each "
                              "rollback); max_restores=2 as rollback 0.2")
def recover_target(spec: RunSpec) -> ArmRecords:
    return _candidate_records(spec, "recover_target", SlowTargetUpdates(10), max_restores=2)


@_candidate("recover_cool_drop", "rollback, then Adam reset, learning rate x0.1 (again at each rollback) and "
                                 "the replay buffer rewound to the snapshot; no limit on restores")
def recover_cool_drop(spec: RunSpec) -> ArmRecords:
    remedy = CallbackList([ResetOptimizer(), CoolLearningRate(0.1), DropRecentTransitions()])
    return _candidate_records(spec, "recover_cool_drop", remedy, max_restores=None)


@_candidate("recover_cool_solved", "rollback, then Adam's state reset; the learning rate x0.1 for the rest of "
                                   "training only after restoring weights that score at least the env's reward "
                                   "threshold (again at each such rollback); no limit on restores")
def recover_cool_solved(spec: RunSpec) -> ArmRecords:
    remedy = CallbackList([ResetOptimizer(), CoolLearningRate(0.1, from_score="reward_threshold")])
    return _candidate_records(spec, "recover_cool_solved", remedy, max_restores=None)


class CoolOnSolvedEvaluation(BaseCallback):
    """Multiply the learning rate by ``factor`` once, when a scheduled evaluation of ``rollback``
    (the weights training produced) first reaches ``threshold``."""

    def __init__(self, rollback: RollbackCallback, threshold: float, factor: float = 0.1) -> None:
        super().__init__()
        self.rollback, self.threshold, self.factor = rollback, threshold, factor
        self.cooled_at: int | None = None

    def _on_step(self) -> bool:
        if self.cooled_at is None and self.rollback.scores and self.rollback.scores[-1].mean >= self.threshold:
            self.model.lr_schedule = ScaledSchedule(self.model.lr_schedule, self.factor)  # as it ran: no logging
            self.cooled_at = self.num_timesteps
        return True


@_candidate("recover_reset_cool_on_solve", "rollback, then Adam's state reset after each restore; the learning "
                                           "rate x0.1 once, from the first evaluation >= the env's reward "
                                           "threshold (the hard control's schedule); no limit on restores")
def recover_reset_cool_on_solve(spec: RunSpec) -> ArmRecords:
    threshold = gym.spec(spec.task).reward_threshold
    level = float(threshold) if threshold is not None else float("inf")
    return _candidate_records(spec, "recover_reset_cool_on_solve", ResetOptimizer(),
                              also=lambda rollback: CoolOnSolvedEvaluation(rollback, level), max_restores=None)


@_candidate("rollback_v03", "rollback-rl 0.3.0's defaults: Adam reset and learning rate x0.1 after every rollback "
                            "(compounding), no limit on restores (the arm recover_cool; its 0.3.0 records were made "
                            "as the arm rollback)")
def rollback_v03(spec: RunSpec) -> ArmRecords:
    return _candidate_records(spec, "rollback_v03", CallbackList([ResetOptimizer(), CoolLearningRate(0.1)]),
                              max_restores=None)


@training_run("control_cool_on_solve", "SB3 DQN, learning rate x0.1 from the first evaluation >= the env's "
                                       "reward threshold on (475 on CartPole-v1), no rollback")
def control_cool_on_solve(spec: RunSpec) -> ArmRecords:
    threshold = gym.spec(spec.task).reward_threshold
    cool = CoolOnSolve(float(threshold) if threshold is not None else float("inf"))
    outcome = train_with_eval_callback(spec, DQN, hyperparameters(spec), after_eval=cool)
    return {"control_cool_on_solve": arm_record(spec, "control_cool_on_solve", outcome,
                                                cooled_at_timestep=cool.cooled_at)}
