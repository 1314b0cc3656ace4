"""One training run, as ``rollback-rl train`` does it: plan, envs, model, session, training, run.json.

Reads top to bottom, the order a run goes through:

1. :class:`TrainingPlan`: everything the run will do, checked before anything is built or written
   (the command line makes it; :meth:`TrainingPlan.to_json` is what checkpoints store to resume it);
   :func:`resolve_hyperparameters` gives its hyperparameters (defaults, YAML file, ``--set``);
   :func:`plan_setting` is the one check of each setting, for the command line's values and for
   those a checkpoint gives back (:meth:`TrainingPlan.from_json`) alike: a run folder is data;
2. :func:`build_envs` and :func:`build_model`: the training env (seeded with the run's seed), a separate
   evaluation env (seeded ``seed + EVAL_SEED_OFFSET``) and the model, from explicit arguments, so that
   the experiments build theirs exactly the same way; the memory the hyperparameters size on the
   env's spaces is checked first;
3. :func:`open_session`: creates the run folder (atomically, under a name no other run has), or
   continues a resumed one; holds its lock and opens its logger (progress.csv, TensorBoard with the
   rollback layout);
4. :func:`run_training`: trains to the plan's last timestep with the evaluation callback
   (``RollbackCallback``, or SB3's ``EvalCallback`` for the vanilla arm) and durable checkpoints, then
   writes ``model.safetensors`` (and SB3's ``model.zip``) and ``run.json`` (:func:`run_info`) together,
   and ``learning_curve.png``.

How a run ends: at its last timestep; on ``KeyboardInterrupt`` (Ctrl-C, or SIGTERM where the caller
turns it into :class:`Terminated`, as the command line does); or when the env keeps giving non-finite
observations at reset (:class:`~rollback_rl.nonfinite.NonFiniteResetError`). Each way the final files
are written, with SIGINT and SIGTERM held meanwhile, so that a second Ctrl-C cannot leave a new model
beside an old run.json; a write that fails (disk full) leaves both as they were and the run can be
resumed from its newest checkpoint, which :class:`FinishedRun` names.

Bad input raises :class:`rollback_rl.validation.UsageError` naming the problem; what to tell the user
(the summary, an interruption, exit statuses) is left to the command line, :mod:`rollback_rl.cli`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import stable_baselines3
import torch
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import VecEnv

import rollback_rl
import rollback_rl.envs  # registers this package's environments with gymnasium
from rollback_rl.agents import RollbackDQN
from rollback_rl.callbacks import RollbackCallback
from rollback_rl.core.detectors import SignificantDrop
from rollback_rl.evaluation import EVAL_SEED_OFFSET
from rollback_rl.hyperparams import (
    MAX_COUNT,
    MAX_TIMESTEPS,
    ZOO_DQN,
    HyperparameterError,
    check_hyperparameters,
    check_memory_on_spaces,
    hyperparameters_for,
    load_yaml_section,
    model_arguments,
    parse_yaml_value,
    to_jsonable,
)
from rollback_rl.nonfinite import LogNonFiniteCounts, NonFiniteGuard, NonFiniteResetError
from rollback_rl.persistence.checkpoints import CheckpointStore
from rollback_rl.persistence.limits import one_line, quote
from rollback_rl.persistence.resume import (
    CHECKPOINTS_DIR,
    ResumePoint,
    RunCheckpoints,
    RunInUseError,
    hold_run_lock,
    load_resume_point,
    run_metadata,
)
from rollback_rl.persistence.run_logs import CSV_FILENAME, open_run_logger
from rollback_rl.persistence.safe_io import (
    SafeLoadError,
    WriteFailedWarning,
    atomic_write_bytes,
    fsync_directory,
    load_json_file,
    open_regular_file,
)
from rollback_rl.persistence.safe_model import save_model, save_sb3_zip
from rollback_rl.plotting import PLOT_FILENAME, plot_run
from rollback_rl.tensorboard_layout import add_rollback_layout
from rollback_rl.validation import MAX_EPISODES, MAX_SEED, UsageError, integer_in

MODEL_FILENAME = "model.safetensors"
SB3_MODEL_FILENAME = "model.zip"  # for SB3 users; rollback-rl itself reads it without its pickles
RUN_INFO_FILENAME = "run.json"
DEFAULT_CHECKPOINT_FREQ = 10_000  # training timesteps between durable checkpoints

#: ``--algo`` name -> the class trained with rollback (``dqn``: RollbackDQN; the others: the SB3 class,
#: which RollbackCallback rolls back)
ALGORITHMS: dict[str, type[BaseAlgorithm]] = {"dqn": RollbackDQN, "ppo": PPO, "a2c": A2C, "sac": SAC, "td3": TD3}
#: ``--algo`` name -> the class of the vanilla arm (``--no-rollback``): plain SB3
VANILLA_ALGORITHMS: dict[str, type[BaseAlgorithm]] = {**ALGORITHMS, "dqn": DQN}
_CLASSES_BY_NAME = {cls.__name__: cls for cls in [*ALGORITHMS.values(), *VANILLA_ALGORITHMS.values()]}


def algorithm_for(algo: str, rollback: bool) -> type[BaseAlgorithm]:
    """The class that ``--algo algo`` trains, with rollback or (``rollback=False``) plain SB3."""
    return (ALGORITHMS if rollback else VANILLA_ALGORITHMS)[algo]


def algorithm_named(name: str) -> type[BaseAlgorithm] | None:
    """The algorithm class called ``name`` (``"RollbackDQN"``, ``"PPO"``...), as run.json records it."""
    return _CLASSES_BY_NAME.get(name)


#: The action spaces each algorithm acts in (SB3's own lists; PPO and A2C take every kind).
ACTION_SPACES: dict[type[BaseAlgorithm], tuple[type[gym.Space], ...]] = {
    DQN: (gym.spaces.Discrete,), SAC: (gym.spaces.Box,), TD3: (gym.spaces.Box,),
    PPO: (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary),
    A2C: (gym.spaces.Box, gym.spaces.Discrete, gym.spaces.MultiDiscrete, gym.spaces.MultiBinary),
}


def check_env_id(env_id: Any, what: str = "env id") -> str:
    """``env_id`` if it names a registered gymnasium env, else :class:`UsageError`.

    An id of the form ``"module:Name"`` is refused: ``gym.make`` would import ``module`` (running its
    import-time code), and an env id can come from a file (a checkpoint, run.json), which is data.

    :param what: what the id is called in messages (``"task"`` in ``compare``)
    """
    if not isinstance(env_id, str) or not env_id:
        raise UsageError(f"{what} must be a gymnasium env id, got {quote(env_id)}")
    if ":" in env_id:
        raise UsageError(f"{what} {quote(env_id)} names a module to import ('module:Name'); rollback-rl only "
                         "makes registered envs (import the module that registers it, then give the id alone)")
    try:
        gym.spec(env_id)
    except gym.error.Error as error:
        raise UsageError(f"unknown {what} {quote(env_id)}: {one_line(str(error), 200)}") from None
    return env_id


def check_action_space(algorithm: type[BaseAlgorithm], action_space: gym.Space, env_id: str) -> None:
    """Refuse an ``algorithm`` that cannot act in ``action_space`` (DQN on Pendulum-v1's ``Box``), with a
    :class:`UsageError` that says which spaces it needs, before anything is built."""
    supported = next((spaces for cls, spaces in ACTION_SPACES.items() if issubclass(algorithm, cls)), None)
    if supported is not None and not isinstance(action_space, supported):
        needed = " or ".join(space.__name__ for space in supported)
        raise UsageError(f"{algorithm.__name__} cannot run {env_id}: its action space is "
                         f"{type(action_space).__name__}, and {algorithm.__name__} needs {needed} actions")


def library_versions() -> dict[str, str]:
    """The versions of rollback-rl and the libraries a run's numbers depend on."""
    return {"rollback_rl": rollback_rl.__version__, "stable_baselines3": stable_baselines3.__version__,
            "gymnasium": gym.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def machine_description() -> dict[str, Any]:
    """The machine a run's wall times were measured on: platform, cores, torch threads."""
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def now() -> str:
    """The local time, as run.json and checkpoints record it (ISO 8601, to the second)."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# -- the plan ---------------------------------------------------------------------------------------

#: The integer settings of a plan: (smallest, largest, the largest's name in messages). The command
#: line's options and a checkpoint's stored plan go through the same ranges (:func:`plan_setting`).
PLAN_INTEGER_RANGES: dict[str, tuple[int, int, str]] = {
    "seed": (0, MAX_SEED, "MAX_SEED"),
    "steps": (1, MAX_TIMESTEPS, "MAX_TIMESTEPS"),
    "eval_freq": (1, MAX_TIMESTEPS, "MAX_TIMESTEPS"),
    "eval_episodes": (1, MAX_EPISODES, "MAX_EPISODES"),
    "patience": (1, MAX_COUNT, "MAX_COUNT"),
    "max_restores": (0, MAX_COUNT, "MAX_COUNT"),  # 0: no limit (None in a plan)
    "checkpoint_freq": (0, MAX_TIMESTEPS, "MAX_TIMESTEPS"),
}


def plan_setting(name: str, value: Any) -> Any:
    """``value`` checked as the plan's setting ``name`` and normalised (the text of a number becomes the
    number): the integers of :data:`PLAN_INTEGER_RANGES`, ``drop`` (a fraction in (0, 1]), ``env_id``,
    ``algo``, and the yes/no settings.

    :raises ValueError: saying what is wrong, without the setting's name (the caller knows how the
        user named it: ``--steps``, or ``steps`` in a checkpoint)
    """
    if name in PLAN_INTEGER_RANGES:
        minimum, maximum, limit_name = PLAN_INTEGER_RANGES[name]
        return integer_in(minimum, maximum, value, limit_name=limit_name)
    if name in ("drop", "cool_on_solve"):
        try:
            number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
        except (ValueError, OverflowError):
            number = None
        if number is None or not 0 < number <= 1:
            raise ValueError(f"must be a fraction in (0, 1], got {quote(value)}")
        return number
    if name == "env_id":
        try:
            return check_env_id(value)
        except UsageError as error:
            raise ValueError(str(error)) from None
    if name == "algo":
        if value not in ALGORITHMS:
            raise ValueError(f"must be one of {', '.join(ALGORITHMS)}, got {quote(value)}")
        return value
    if name in ("rollback", "checkpoint_replay_buffer"):
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {quote(value)}")
        return value
    if name in ("hyperparameter_sources", "command"):
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"must be a list of strings, got {quote(value)}")
        return value
    raise KeyError(name)


def check_schedule(steps: int, eval_freq: int, steps_name: str = "--steps",
                   eval_freq_name: str = "--eval-freq") -> None:
    """Refuse a run too short for one evaluation (:class:`UsageError` naming both settings)."""
    if steps < eval_freq:
        raise UsageError(f"{steps_name} ({steps}) is less than {eval_freq_name} ({eval_freq}): no evaluation would run")


@dataclass
class TrainingPlan:
    """Everything a run does, checked before anything is built or written.

    :param algo: the ``--algo`` name (``dqn``, ``ppo``...); ``algorithm`` is the class it trains
    :param rollback: ``False`` for the vanilla arm (plain SB3 with ``EvalCallback`` on the same schedule)
    :param steps: training timesteps of the whole run
    :param eval_freq: training timesteps between evaluations
    :param eval_episodes: greedy episodes per evaluation
    :param hyperparameters: RL Zoo-style hyperparameters (``n_timesteps`` = ``steps``)
    :param hyperparameter_sources: where they came from, in the order applied
    :param drop: ``SignificantDrop(drop=...)``: the fraction of the learned range a collapse loses
    :param patience: evaluations in a row that must show the drop
    :param max_restores: restores of one snapshot before the next collapse from it keeps the current
        weights; ``None``: no limit
    :param cool_on_solve: ``RollbackCallback(cool_on_solve=...)``: the learning rate times this from the first
        evaluation at the task's reward threshold; ``None``: never
    :param checkpoint_freq: training timesteps between durable checkpoints; 0: none
    :param command: the command line that made the plan, as run.json records it
    :param number_if_taken: if ``run_dir`` exists when the run starts, use ``<run_dir>-2``, ``-3``...
        (the first free one) instead of refusing; ``run_dir`` then names the folder written
    """

    env_id: str
    algo: str
    algorithm: type[BaseAlgorithm]
    rollback: bool
    seed: int
    steps: int
    eval_freq: int
    eval_episodes: int
    hyperparameters: dict[str, Any]
    hyperparameter_sources: list[str]
    run_dir: Path
    drop: float = 0.5
    patience: int = 1
    max_restores: int | None = 2
    cool_on_solve: float | None = 0.1
    checkpoint_freq: int = DEFAULT_CHECKPOINT_FREQ
    checkpoint_replay_buffer: bool = False
    command: list[str] = field(default_factory=list)
    number_if_taken: bool = False

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON values (classes by name), as checkpoints store it; ``run_dir`` left out."""
        values = {name: getattr(self, name) for name in _PLAN_JSON_FIELDS}
        return json.loads(json.dumps(to_jsonable(values), default=str))

    @classmethod
    def from_json(cls, values: Any, run_dir: Path, source: str = "the checkpoint's run settings") -> TrainingPlan:
        """The plan :meth:`to_json` stored (its hyperparameters as JSON, enough to build the envs),
        every setting checked as the command line checks it (:func:`plan_setting`, and the
        hyperparameter checker for the plan's algorithm): a checkpoint is data, possibly forged.

        :param source: where the values come from, at the start of messages
        :raises UsageError: naming the first setting that is missing or refused
        """
        if not isinstance(values, Mapping):
            raise UsageError(f"{source}: not a mapping of settings")
        missing = [name for name in _PLAN_JSON_FIELDS if name not in values and name not in _PLAN_FIELDS_ADDED_LATER]
        if missing:
            raise UsageError(f"{source}: no {missing[0]}")
        checked: dict[str, Any] = {}
        for name in _PLAN_JSON_FIELDS:
            value = values.get(name)
            if name == "hyperparameters":
                continue
            if name == "max_restores":
                # No limit was 0 before 0.2 spelled it None, and runs started by 0.1 stored no limit at all.
                value = 0 if value is None else value
            if name == "cool_on_solve" and value is None:
                value = 1.0  # never; and runs started before 0.4.0 (no such setting) resume as they started
            try:
                checked[name] = plan_setting(name, value)
            except ValueError as error:
                raise UsageError(f"{source}: {name} {error}") from None
        checked["max_restores"] = checked["max_restores"] or None
        checked["cool_on_solve"] = None if checked["cool_on_solve"] == 1 else checked["cool_on_solve"]
        algorithm = algorithm_for(checked["algo"], checked["rollback"])
        hyperparameters = values["hyperparameters"]
        if not isinstance(hyperparameters, Mapping):
            raise UsageError(f"{source}: hyperparameters must be a mapping, got {quote(hyperparameters)}")
        try:
            check_hyperparameters(hyperparameters, algorithm, f"{source}, hyperparameters")
        except HyperparameterError as error:
            raise UsageError(str(error)) from None
        checked["hyperparameters"] = dict(hyperparameters)
        check_schedule(checked["steps"], checked["eval_freq"], f"{source}: steps", "eval_freq")
        return cls(algorithm=algorithm, run_dir=run_dir, **checked)


_PLAN_JSON_FIELDS = ("env_id", "algo", "rollback", "seed", "steps", "eval_freq", "eval_episodes", "hyperparameters",
                     "hyperparameter_sources", "drop", "patience", "max_restores", "cool_on_solve", "checkpoint_freq", "checkpoint_replay_buffer",
                     "command")
_PLAN_FIELDS_ADDED_LATER = ("max_restores", "cool_on_solve")  # a stored plan may lack them


def resolve_hyperparameters(env_id: str, algo: str, algorithm: type[BaseAlgorithm], hyperparams_file: str | None = None,
                            overrides: Sequence[tuple[str, str]] = ()) -> tuple[dict[str, Any], list[str]]:
    """The hyperparameters of a run: the defaults for ``env_id`` and ``algo`` (the RL Zoo's for DQN on its
    tasks), then the section named ``env_id`` of the RL Zoo-format YAML ``hyperparams_file``, then
    ``overrides`` (``(key, value text)`` pairs, values read as YAML); each part checked for ``algorithm``.

    :return: the hyperparameters, and where they came from (``["RL Zoo defaults", FILE, "--set"]``)
    :raises UsageError: naming the first value ``algorithm`` does not accept, or an unreadable file
    """
    params = hyperparameters_for(env_id, algo)
    sources = ["RL Zoo defaults" if algo == "dqn" and env_id in ZOO_DQN else "SB3 defaults"]
    try:
        params = check_hyperparameters(params, algorithm, "defaults")
        if hyperparams_file is not None:
            try:
                section = load_yaml_section(hyperparams_file, env_id)
            except UnicodeDecodeError as error:
                raise UsageError(f"cannot read hyperparameter file {hyperparams_file}: not UTF-8 text "
                                 f"({error.reason} at byte {error.start})") from None
            params.update(check_hyperparameters(section, algorithm, f"{hyperparams_file}, {env_id}"))
            sources.append(str(hyperparams_file))
        if overrides:
            values = {key: parse_yaml_value(text) for key, text in overrides}
            params.update(check_hyperparameters(values, algorithm, "--set"))
            sources.append("--set")
    except HyperparameterError as error:
        raise UsageError(str(error)) from None
    return params, sources


# -- envs and model ---------------------------------------------------------------------------------

def build_envs(env_id: str, seed: int, hyperparameters: dict[str, Any]) -> tuple[VecEnv, VecEnv]:
    """The training env (``n_envs`` of them, seeded with ``seed``) and the evaluation env (one, seeded
    ``seed + EVAL_SEED_OFFSET``), both with a ``NonFiniteGuard`` inside their ``Monitor``.

    :param hyperparameters: read for ``n_envs`` and ``env_kwargs``
    :raises UsageError: if the envs cannot be made
    """
    if ":" in env_id:  # gym.make would import the module it names (see check_env_id)
        raise UsageError(f"cannot make env {quote(env_id)}: it names a module to import ('module:Name')")
    env_kwargs = hyperparameters.get("env_kwargs", {})

    def guarded_env(**kwargs: Any) -> gym.Env:
        return NonFiniteGuard(gym.make(env_id, **kwargs))

    try:
        env = make_vec_env(guarded_env, n_envs=hyperparameters.get("n_envs", 1), seed=seed, env_kwargs=env_kwargs)
        eval_env = make_vec_env(guarded_env, n_envs=1, env_kwargs=env_kwargs)
    except (gym.error.Error, ImportError, TypeError, ValueError) as error:
        raise UsageError(f"cannot make env {env_id}: {error}") from None
    eval_env.seed(seed + EVAL_SEED_OFFSET)  # evaluation episodes never share seeds with training's
    return env, eval_env


def build_model(env_id: str, algorithm: type[BaseAlgorithm], hyperparameters: dict[str, Any], seed: int,
                device: str = "cpu", verbose: int = 0) -> tuple[BaseAlgorithm, VecEnv]:
    """``algorithm`` on its training env from :func:`build_envs`, and the separate evaluation env.

    :param hyperparameters: RL Zoo-style (``policy``, ``n_envs``, ``env_kwargs`` and the algorithm's
        own arguments); ``n_timesteps`` is ignored
    :param seed: the model's seed and the training env's
    :param verbose: SB3's ``verbose`` (1: its training tables)
    :raises UsageError: if the envs or the model cannot be made, ``algorithm`` cannot act in the env's
        action space, or the networks or buffers would be over their limits on the env's spaces
    """
    env, eval_env = build_envs(env_id, seed, hyperparameters)
    check_action_space(algorithm, env.action_space, env_id)
    try:
        check_memory_on_spaces(hyperparameters, env.observation_space, env.action_space,
                               f"the hyperparameters on {env_id}'s spaces")
    except HyperparameterError as error:
        raise UsageError(str(error)) from None
    try:
        model = algorithm(hyperparameters.get("policy", "MlpPolicy"), env, seed=seed, device=device,
                          verbose=verbose, **model_arguments(hyperparameters, env.action_space))
    except (AssertionError, TypeError, ValueError, KeyError, RuntimeError, MemoryError, OverflowError) as error:
        raise UsageError(f"cannot build {algorithm.__name__} for {env_id}: {error}") from None
    return model, eval_env


# -- the session ------------------------------------------------------------------------------------

@dataclass
class TrainingSession:
    """One process's share of a run: the model to train from where the run stands, and its logger.

    :param started_at: when the run (its first session) started
    :param resumes: one entry per resume so far: the timestep resumed from, and when
    :param resume_from: the checkpoint this session continues from (``None``: a new run)
    """

    plan: TrainingPlan
    model: BaseAlgorithm
    eval_env: VecEnv
    logger: Logger
    started_at: str
    resumes: list[dict[str, Any]] = field(default_factory=list)
    resume_from: ResumePoint | None = None

    def checkpoint_metadata(self) -> dict[str, Any]:
        return {"run": self.plan.to_json(), "started_at": self.started_at, "resumes": self.resumes}


@dataclass
class ResumableRun:
    """A stopped run, loaded from its newest checkpoint that loads, ready for :func:`open_session`."""

    plan: TrainingPlan
    point: ResumePoint
    eval_env: VecEnv
    started_at: str
    resumes: list[dict[str, Any]]  # this resume included


def load_resumable_run(run_dir: Path, device: str = "cpu",
                       on_skip: Callable[[str], None] | None = None) -> ResumableRun:
    """The run in ``run_dir`` as its newest checkpoint that loads left it (see ``persistence.resume``).

    Nothing is written. The run settings stored in the checkpoint are checked as the command line's
    (:meth:`TrainingPlan.from_json`) before any env is made from them, and the checkpoint must hold
    the state of as many envs as those settings make.

    :param on_skip: told why each newer checkpoint that does not load was skipped
    :raises NoCheckpointError: if no checkpoint loads
    :raises UsageError: if the checkpoint's run settings are refused, or the run folder's progress.csv
        is a link out of the folder or not a regular file
    """
    store = CheckpointStore(run_dir / CHECKPOINTS_DIR)
    metadata = run_metadata(store)
    if not isinstance(metadata, Mapping):
        raise UsageError("the checkpoint's metadata is not a mapping of run settings")
    plan = TrainingPlan.from_json(metadata.get("run"), run_dir)
    started_at, resumes = metadata.get("started_at", ""), metadata.get("resumes", [])
    if not isinstance(started_at, str) or not isinstance(resumes, list):
        raise UsageError("the checkpoint's started_at or resumes are not a time and a list")
    _check_run_folder_links(run_dir)
    env, eval_env = build_envs(plan.env_id, plan.seed, plan.hyperparameters)
    point = load_resume_point(store, env, device=device, on_skip=on_skip)
    saved_envs = point.state.get("envs", {}).get("train", [])
    if len(saved_envs) != env.num_envs:  # a manifest whose n_envs was changed after the checkpoint
        raise UsageError(f"{point.checkpoint.path} holds the state of {len(saved_envs)} training env(s), its run "
                         f"settings make {env.num_envs} (n_envs)")
    resumes = [*resumes, {"timestep": point.timestep, "at": now()}]
    return ResumableRun(plan, point, eval_env, started_at=started_at, resumes=resumes)


def _check_run_folder_links(run_dir: Path) -> None:
    """Refuse a resumed run folder whose ``progress.csv`` (which is appended to) is a link out of the
    folder or not a regular file; checked before anything is written."""
    csv_path = run_dir / CSV_FILENAME
    if csv_path.exists() or csv_path.is_symlink():
        try:
            open_regular_file(csv_path).close()
        except SafeLoadError as error:
            raise UsageError(str(error)) from None
        except OSError as error:
            raise UsageError(f"cannot read {csv_path}: {error.strerror or error}") from None


def create_run_folder(path: Path, number_if_taken: bool = False) -> Path:
    """Create the folder ``path`` (and its missing parents) and return it; with ``number_if_taken``, the
    first of ``path``, ``path-2``, ``path-3``... that no one has created yet.

    The folder itself is made with one ``mkdir``, which fails if it exists: two runs started in the
    same second with the same name get two folders (or the second an error), never one between them.
    Parents this call created are removed again if the folder cannot be made.

    :raises UsageError: if ``path`` exists (without ``number_if_taken``), or cannot be created
        (a read-only folder, ``/proc``, a name too long)
    """
    created_parents = []
    parent = path.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        created_parents.append(parent)
        parent = parent.parent
    try:
        for folder in reversed(created_parents):
            folder.mkdir(exist_ok=True)
        candidate, number = path, 1
        while True:
            try:
                candidate.mkdir()
                return candidate
            except FileExistsError:
                if not number_if_taken:
                    raise UsageError(f"run folder {path} already exists: choose another --run-name "
                                     f"(or continue it with --resume {path})") from None
                number += 1
                candidate = path.with_name(f"{path.name}-{number}")
    except OSError as error:
        for folder in created_parents:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise UsageError(f"cannot create the run folder {path}: {error.strerror or error}") from None


@contextlib.contextmanager
def open_session(plan: TrainingPlan, model: BaseAlgorithm, eval_env: VecEnv, log_to_stdout: bool = False,
                 resumed: ResumableRun | None = None) -> Iterator[TrainingSession]:
    """Hold the run folder's lock and open its logger for the time of the ``with`` block.

    A new run's folder is created (it must not exist) and its TensorBoard events file receives the
    rollback layout; a ``resumed`` run's logs are cut back to its checkpoint's timestep.

    :param log_to_stdout: also print SB3's training tables
    :raises UsageError: if a new run's folder exists (see ``plan.number_if_taken``) or cannot be created,
        another process holds the run folder, its lock file or logs cannot be written, or a resumed
        run's progress.csv is a link out of the folder; a new run's folder is then removed again
    """
    if resumed is None:
        plan.run_dir = create_run_folder(plan.run_dir, plan.number_if_taken)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(hold_run_lock(plan.run_dir))
            if resumed is None:
                logger = open_run_logger(plan.run_dir, to_stdout=log_to_stdout)
                add_rollback_layout(logger)
            else:
                _replace_planted_links(plan.run_dir)
                logger = open_run_logger(plan.run_dir, to_stdout=log_to_stdout,
                                         resume_timestep=resumed.point.timestep)
        except (RunInUseError, SafeLoadError, OSError) as error:
            held.close()
            if resumed is None:  # the folder was made a moment ago by this call: nothing of it is kept
                shutil.rmtree(plan.run_dir, ignore_errors=True)
            if isinstance(error, OSError) and not isinstance(error, SafeLoadError):
                raise UsageError(f"cannot write the run folder {plan.run_dir}: {error.strerror or error}") from None
            raise UsageError(str(error)) from None
        if resumed is None:
            yield TrainingSession(plan, model, eval_env, logger, started_at=now())
        else:
            yield TrainingSession(plan, model, eval_env, logger, started_at=resumed.started_at,
                                  resumes=resumed.resumes, resume_from=resumed.point)


def _replace_planted_links(run_dir: Path) -> None:
    """Remove symbolic links at the names that SB3 writes through (``evaluations/``, EvalCallback's
    folder): a run folder is data, and a planted link must not get a file outside it written. The
    files rollback-rl writes itself are written to fresh files renamed over the target."""
    for name in (EVALUATIONS_DIR,):
        path = run_dir / name
        if path.is_symlink():
            path.unlink()


# -- training ---------------------------------------------------------------------------------------

EVALUATIONS_DIR = "evaluations"  # EvalCallback's log_path (vanilla runs): evaluations/evaluations.npz


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by a SIGTERM handler (the command line installs one) so that SIGTERM
    stops training the way Ctrl-C does: the run so far is written, and can be resumed."""

    signal_number = signal.SIGTERM


def stop_signal(stop: KeyboardInterrupt) -> int:
    """The signal a ``KeyboardInterrupt`` stands for: SIGTERM for :class:`Terminated`, else SIGINT."""
    return int(getattr(stop, "signal_number", signal.SIGINT))


@contextlib.contextmanager
def signals_held(signal_numbers: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[list[int]]:
    """Hold ``signal_numbers`` for the time of the block and list those that arrived meanwhile (in the
    yielded list), so that the block's writes finish together: a second Ctrl-C while the final files
    are written must not leave a new model beside an old run.json. Outside the main thread (where
    Python cannot set signal handlers) nothing is held."""
    arrived: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield arrived
        return
    previous = {number: signal.getsignal(number) for number in signal_numbers}
    for number in signal_numbers:
        signal.signal(number, lambda received, frame: arrived.append(received))
    try:
        yield arrived
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

def evaluation_callback(plan: TrainingPlan, model: BaseAlgorithm, eval_env: VecEnv,
                        verbose: int = 0) -> RollbackCallback | EvalCallback:
    """``RollbackCallback`` with the plan's detector, or for the vanilla arm SB3's ``EvalCallback`` on
    the same schedule (``verbose`` >= 2: print every evaluation score)."""
    if plan.rollback:
        detector = SignificantDrop(drop=plan.drop, patience=plan.patience)
        return RollbackCallback(eval_env, eval_freq=plan.eval_freq, n_eval_episodes=plan.eval_episodes,
                                detector=detector, max_restores=plan.max_restores, cool_on_solve=plan.cool_on_solve,
                                verbose=2 if verbose >= 2 else 1)
    # Same schedule as RollbackCallback's (which counts timesteps summed over envs); EvalCallback counts calls.
    return EvalCallback(eval_env, n_eval_episodes=plan.eval_episodes, eval_freq=max(plan.eval_freq // model.n_envs, 1),
                        log_path=str(plan.run_dir / EVALUATIONS_DIR), deterministic=True, warn=False)


@dataclass
class FinishedRun:
    """What :func:`run_training` leaves.

    :param info: run.json's contents (written unless ``write_error``)
    :param plot_error: why no plot was drawn (``None``: drawn)
    :param stopped_by: the signal (SIGINT, SIGTERM) that stopped training or arrived while the final
        files were written; ``None`` if none did
    :param stop_error: why training stopped early other than by a signal (an env whose resets keep
        giving non-finite observations, a write that failed); ``None`` if it did not
    :param write_error: why the final model and run.json could not be written (both are then left as
        they were); ``None`` if they were
    :param newest_checkpoint: the newest checkpoint of the run, to resume from (``None``: none)
    """

    info: dict[str, Any]
    plot_error: str | None = None
    stopped_by: int | None = None
    stop_error: str | None = None
    write_error: str | None = None
    newest_checkpoint: Path | None = None

    @property
    def interrupted(self) -> bool:
        return bool(self.info["interrupted"])


def run_training(session: TrainingSession, verbose: int = 0, progress_bar: bool = False,
                 extra_callbacks: Sequence[BaseCallback] = ()) -> FinishedRun:
    """Train the session's model to the plan's last timestep, then write the model, run.json and the plot.

    A ``KeyboardInterrupt`` (:class:`Terminated` for SIGTERM), an env whose resets keep giving
    non-finite observations, or an ``OSError`` that reaches training (a file SB3 writes itself, on a
    full disk) stops training; the run so far is written all the same (run.json says
    ``"interrupted": true`` and why, in ``stop_reason``) and can be resumed from its newest checkpoint.
    The model files and run.json are written to temporary files first and renamed into place together,
    with SIGINT and SIGTERM held (:func:`signals_held`); if a write fails (disk full), none of them is
    changed and :attr:`FinishedRun.write_error` says why. Warnings about files that could not be written
    along the way are :class:`~rollback_rl.persistence.safe_io.WriteFailedWarning`.

    :param verbose: 1: one line per rollback; 2: and every evaluation score, and each checkpoint
    :param progress_bar: SB3's progress bar
    :param extra_callbacks: run after the others (benchmarks use this to measure the run)
    """
    plan, model = session.plan, session.model
    model.set_logger(session.logger)
    evaluation = evaluation_callback(plan, model, session.eval_env, verbose)
    checkpoints = RunCheckpoints(plan.run_dir / CHECKPOINTS_DIR, plan.checkpoint_freq, session.checkpoint_metadata(),
                                 evaluation, save_replay_buffer=plan.checkpoint_replay_buffer,
                                 resume_from=session.resume_from, verbose=1 if verbose >= 2 else 0)
    callback = CallbackList([evaluation, LogNonFiniteCounts(), checkpoints, *extra_callbacks])
    finished = FinishedRun(info={})
    try:
        model.learn(total_timesteps=plan.steps - model.num_timesteps, callback=callback,
                    reset_num_timesteps=session.resume_from is None, progress_bar=progress_bar)
    except KeyboardInterrupt as stop:
        finished.stopped_by = stop_signal(stop)
    except NonFiniteResetError as error:
        finished.stop_error = one_line(str(error))
    except OSError as error:  # a write that nothing along the way turned into a warning (SB3's own files)
        finished.stop_error = one_line(f"a file could not be written ({error.strerror or error}"
                                       + (f": {error.filename})" if error.filename else ")"))

    with signals_held() as arrived:
        try:
            session.logger.close()  # flushes the events file the plot is drawn from
        except OSError as error:
            warnings.warn(f"cannot close the logs ({error.strerror or error})", WriteFailedWarning, stacklevel=2)
        stopped = finished.stopped_by is not None or finished.stop_error is not None
        finished.info = run_info(session, evaluation, checkpoints.wall_time, stopped,
                                 stop_reason=_stop_reason(finished))
        finished.write_error = write_final_files(model, finished.info, plan.run_dir)
    if finished.write_error is not None:
        newest = checkpoints.last_checkpoint or (session.resume_from.checkpoint if session.resume_from else None)
        finished.newest_checkpoint = newest.path if newest is not None else None
    if arrived and finished.stopped_by is None:
        finished.stopped_by = arrived[0]
    if finished.stopped_by is not None and arrived:
        finished.plot_error = "stopped by a signal while the final files were written"
        return finished
    try:
        plot_run(plan.run_dir)
    except (FileNotFoundError, ValueError, OSError) as error:  # e.g. interrupted before the first evaluation
        finished.plot_error = one_line(str(error))
    except KeyboardInterrupt as stop:  # a second Ctrl-C while drawing: the plot is the one thing left out
        finished.plot_error = "interrupted while drawing"
        finished.stopped_by = finished.stopped_by or stop_signal(stop)
    return finished


def _stop_reason(finished: FinishedRun) -> str | None:
    if finished.stop_error is not None:
        return finished.stop_error
    if finished.stopped_by is not None:
        return signal.Signals(finished.stopped_by).name
    return None


#: Where the final files are written before they are renamed into place together.
_STAGED_PREFIX = ".staged-"


def write_final_files(model: BaseAlgorithm, info: dict[str, Any], run_dir: Path) -> str | None:
    """Write ``model.safetensors``, SB3's ``model.zip`` and ``run.json`` together: each to a temporary
    file first (``.staged-*``, fsynced), then all renamed into place. A write that fails (``OSError``:
    disk full, read-only folder) leaves all three as they were.

    :return: ``None``, or why they could not be written
    """
    targets = [run_dir / MODEL_FILENAME, run_dir / SB3_MODEL_FILENAME, run_dir / RUN_INFO_FILENAME]
    staged = [target.with_name(_STAGED_PREFIX + target.name) for target in targets]
    try:
        save_model(model, staged[0])
        save_sb3_zip(model, staged[1])
        atomic_write_bytes(staged[2], (json.dumps(info, indent=2) + "\n").encode())
        for source, target in zip(staged, targets):
            os.replace(source, target)
        fsync_directory(run_dir)
    except OSError as error:
        for path in staged:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        return f"cannot write the final model and run.json in {run_dir} ({error.strerror or one_line(str(error))})"
    return None


# -- run.json ---------------------------------------------------------------------------------------

def _evaluations(callback: BaseCallback) -> tuple[list[dict[str, Any]], int]:
    """The evaluation curve (timestep, mean, episode returns) and the env steps spent evaluating."""
    if isinstance(callback, RollbackCallback):
        curve = [{"timestep": s.timestep, "mean": s.mean, "episode_returns": list(s.episode_returns or [])}
                 for s in callback.scores]
        return curve, callback.eval_timesteps
    assert isinstance(callback, EvalCallback)
    curve = [{"timestep": int(t), "mean": float(np.mean(r)), "episode_returns": [float(x) for x in r]}
             for t, r in zip(callback.evaluations_timesteps, callback.evaluations_results)]
    return curve, int(sum(np.sum(lengths) for lengths in callback.evaluations_length))


def _env_total(env: VecEnv, name: str) -> int:
    return int(sum(env.get_attr(name))) if env.has_attr(name) else 0


def run_info(session: TrainingSession, callback: BaseCallback, wall_time: float, interrupted: bool,
             stop_reason: str | None = None) -> dict[str, Any]:
    """What run.json records: the settings, the versions, and the results of the run.

    :param callback: the evaluation callback (from :func:`evaluation_callback`)
    :param wall_time: seconds the run has trained, over all its sessions
    :param interrupted: whether training stopped before the plan's last timestep
    :param stop_reason: why (``"SIGINT"``, ``"SIGTERM"``, or what the env did); ``None`` if it did not stop
    """
    plan, model = session.plan, session.model
    curve, eval_env_steps = _evaluations(callback)
    rollback_callback = callback if isinstance(callback, RollbackCallback) else None
    best = max(curve, key=lambda e: e["mean"], default=None)
    final = {"timestep": curve[-1]["timestep"], "score": curve[-1]["mean"]} if curve else None
    last_rollback = rollback_callback.rollbacks[-1] if rollback_callback and rollback_callback.rollbacks else None
    if final is not None and last_rollback is not None and last_rollback.timestep == final["timestep"] \
            and getattr(last_rollback, "verified_score", None) is not None:
        # The last evaluation triggered a rollback: the weights training ended with are the restored ones.
        final = {"timestep": final["timestep"], "score": last_rollback.verified_score,
                 "collapsed_score": final["score"]}
    env = model.get_env()
    training_returns = [float(r) for rewards in env.env_method("get_episode_rewards") for r in rewards]
    undo_log = getattr(model, "undo_log", None)
    return {
        "env": plan.env_id,
        "algo": plan.algo,
        "algorithm_class": plan.algorithm.__name__,
        "rollback": plan.rollback,
        "seed": plan.seed,
        "steps": plan.steps,
        "timesteps_done": int(model.num_timesteps),
        "interrupted": interrupted,
        "stop_reason": stop_reason,
        "eval_freq": plan.eval_freq,
        "eval_episodes": plan.eval_episodes,
        "eval_seed": plan.seed + EVAL_SEED_OFFSET,
        "detector": ({"name": "SignificantDrop", "drop": plan.drop, "patience": plan.patience,
                      "max_restores": plan.max_restores, "cool_on_solve": plan.cool_on_solve}
                     if plan.rollback else None),
        "hyperparameters": to_jsonable(plan.hyperparameters),
        "hyperparameter_sources": plan.hyperparameter_sources,
        "versions": library_versions(),
        "machine": {**machine_description(), "device": str(model.device)},
        "command": plan.command,
        "started_at": session.started_at,
        "resumes": session.resumes,
        "wall_time_s": round(wall_time, 3),
        "checkpoint_freq": plan.checkpoint_freq,
        "evaluations": curve,
        "best_eval": None if best is None else {"timestep": best["timestep"], "score": best["mean"]},
        "final_eval": final,
        "eval_env_steps": eval_env_steps,
        "online_return": {"mean": float(np.mean(training_returns)) if training_returns else None,
                          "episodes": len(training_returns)},
        "nonfinite": {"observations": _env_total(env, "nonfinite_observations"),
                      "rewards": _env_total(env, "nonfinite_rewards")},
        "rollbacks": [asdict(event) for event in rollback_callback.rollbacks] if rollback_callback else [],
        "n_rebases": rollback_callback.rebases if rollback_callback else 0,
        "undo_log_bytes": undo_log.nbytes if undo_log is not None else None,
        "undo_log_depth": undo_log.depth if undo_log is not None else None,
        "snapshot_bytes": rollback_callback.ring.nbytes if rollback_callback and rollback_callback.ring else None,
        "model": MODEL_FILENAME,
        "sb3_model": SB3_MODEL_FILENAME,
        "plot": PLOT_FILENAME,
    }


def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    """The run.json in ``run_dir`` (``None`` if there is none, or it holds no JSON object), read within
    the size and nesting limits, never through a link out of the folder.

    :raises UsageError: if it cannot be read, or is refused
    """
    path = run_dir / RUN_INFO_FILENAME
    if not path.exists() and not path.is_symlink():
        return None
    try:
        info = load_json_file(path)
    except SafeLoadError as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    return info if isinstance(info, dict) else None


def run_is_complete(info: dict[str, Any] | None) -> bool:
    """Whether run.json says the run trained all its steps (and was not interrupted)."""
    if not info or info.get("interrupted") is not False:
        return False
    done, steps = info.get("timesteps_done"), info.get("steps")
    return isinstance(done, int) and isinstance(steps, int) and done >= steps
