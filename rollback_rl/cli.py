"""The ``rollback-rl`` command: train an agent with rollback, score a saved model, re-draw a run's plot.

    rollback-rl train [ENV_ID] [--algo dqn] [--steps N] [--seed 0] [--no-rollback] [--hyperparams FILE]
    rollback-rl train --resume RUN_DIR
    rollback-rl evaluate MODEL_PATH [--episodes 100] [--seed 0]
    rollback-rl plot RUN_DIR

``train`` reads top to bottom: check every input, build the environments and the model, and only then
create the run folder ``<logdir>/<run name>/``, which receives the TensorBoard events file (with a
custom-scalars layout), ``progress.csv``, a durable checkpoint every ``--checkpoint-freq`` timesteps
in ``checkpoints/``, and at the end ``model.safetensors`` (and SB3's ``model.zip``),
``learning_curve.png`` and ``run.json``. ``train --resume RUN_DIR`` continues a run that stopped
(crashed, killed, interrupted) from its newest checkpoint that loads; see :mod:`rollback_rl.resume`
and :mod:`rollback_rl.run_logs`. Nothing rollback-rl loads can run code: models and checkpoints are
read with :mod:`rollback_rl.safe_model`, and SB3 ``.zip`` files without their pickles.

Bad input is reported as one ``rollback-rl: error: ...`` line on stderr with exit status 2, before
anything is written.

Each subcommand is added by one ``_add_<name>_command`` function listed in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
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
from rollback_rl.callbacks.rollback import EVAL_SEED_OFFSET
from rollback_rl.checkpoints import CheckpointStore
from rollback_rl.detectors import SignificantDrop
from rollback_rl.hyperparams import (
    DEFAULT_EVAL_EPISODES,
    ZOO_DQN,
    HyperparameterError,
    check_hyperparameters,
    eval_freq_for,
    hyperparameters_for,
    load_yaml_section,
    model_arguments,
    parse_yaml_value,
    to_jsonable,
)
from rollback_rl.nonfinite import LogNonFiniteCounts, NonFiniteGuard
from rollback_rl.plotting import PLOT_FILENAME, plot_run
from rollback_rl.resume import (
    CHECKPOINTS_DIR,
    NoCheckpointError,
    ResumePoint,
    RunCheckpoints,
    RunInUseError,
    hold_run_lock,
    load_resume_point,
    run_in_use,
    run_metadata,
)
from rollback_rl.run_logs import open_run_logger
from rollback_rl.safe_io import SafeLoadError, atomic_write_bytes
from rollback_rl.safe_model import (
    load_model,
    load_sb3_zip_safely,
    read_model_metadata,
    save_model,
)
from rollback_rl.tensorboard_layout import add_rollback_layout

PROG = "rollback-rl"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MODEL_FILENAME = "model.safetensors"
SB3_MODEL_FILENAME = "model.zip"  # for SB3 users; rollback-rl itself reads it without its pickles
RUN_INFO_FILENAME = "run.json"
DEFAULT_CHECKPOINT_FREQ = 10_000
FINAL_EVAL_SEED_OFFSET = 1_000_000  # far above every seed used in training (seed, seed + EVAL_SEED_OFFSET)

ALGORITHMS: dict[str, type[BaseAlgorithm]] = {"dqn": RollbackDQN, "ppo": PPO, "a2c": A2C, "sac": SAC, "td3": TD3}
VANILLA_ALGORITHMS: dict[str, type[BaseAlgorithm]] = {**ALGORITHMS, "dqn": DQN}
_CLASSES_BY_NAME = {cls.__name__: cls for cls in [*ALGORITHMS.values(), *VANILLA_ALGORITHMS.values()]}


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2, nothing written."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors reported the same single-line way as ours."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # Python 3.11's argparse drops a value of "--" (--steps=--) and passes the option an empty list.
        if action.option_strings and "--" in arg_strings:
            self.error(f"argument {'/'.join(action.option_strings)}: expected a value, got '--'")
        return super()._get_values(action, arg_strings)


def _integer_at_least(minimum: int, text: str) -> int:
    description = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _integer_at_least(1, text)


def _seed(text: str) -> int:
    return _integer_at_least(0, text)


def _non_negative_int(text: str) -> int:
    return _integer_at_least(0, text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text!r}")
    return value


def _assignment(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "train", help="train an agent and write a run folder",
        description="Train an agent with rollback (or without, --no-rollback) and write a run folder: "
                    "TensorBoard events, progress.csv, checkpoints, model.safetensors (and model.zip), "
                    "learning_curve.png, run.json. --resume RUN_DIR continues a run that stopped.")
    parser.add_argument("env_id", nargs="?", default="CartPole-v1", metavar="ENV_ID",
                        help="gymnasium env id (default: CartPole-v1)")
    parser.add_argument("--algo", choices=sorted(ALGORITHMS), default="dqn",
                        help="dqn: RollbackDQN (SB3's DQN with an undo log); the others: the SB3 "
                             "algorithm with RollbackCallback (default: dqn)")
    parser.add_argument("--steps", type=_positive_int, metavar="N",
                        help="training timesteps (default: the hyperparameters' n_timesteps, e.g. "
                             "50,000 on CartPole-v1)")
    parser.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    parser.add_argument("--no-rollback", action="store_true",
                        help="the vanilla arm: the plain SB3 algorithm, evaluated on the same schedule")
    parser.add_argument("--hyperparams", metavar="FILE",
                        help="RL Zoo-format YAML; the section named after ENV_ID overrides the defaults")
    parser.add_argument("--set", dest="overrides", type=_assignment, action="append", default=[],
                        metavar="KEY=VALUE", help="override one hyperparameter, e.g. --set "
                                                  "learning_rate=1e-3 (repeatable; applied last)")
    parser.add_argument("--eval-freq", type=_positive_int, metavar="N",
                        help="training timesteps between evaluations (default: 2,500 on CartPole, "
                             "5,000 otherwise)")
    parser.add_argument("--eval-episodes", type=_positive_int, default=DEFAULT_EVAL_EPISODES, metavar="N",
                        help=f"greedy episodes per evaluation (default: {DEFAULT_EVAL_EPISODES})")
    parser.add_argument("--drop", type=_fraction, default=0.5,
                        help="collapse when the score falls by this fraction of the learned range "
                             "(best minus lowest score) and significantly (default: 0.5)")
    parser.add_argument("--patience", type=_positive_int, default=1, metavar="N",
                        help="evaluations in a row that must show the drop (default: 1)")
    parser.add_argument("--max-restores", type=_non_negative_int, default=2, metavar="N",
                        help="restores of one snapshot after which the next collapse from it keeps the current "
                             "weights; the snapshot comes back at the end if still better; 0: no limit "
                             "(default: 2)")
    parser.add_argument("--checkpoint-freq", type=_non_negative_int, default=DEFAULT_CHECKPOINT_FREQ, metavar="N",
                        help=f"training timesteps between durable checkpoints, for --resume; 0: none "
                             f"(default: {DEFAULT_CHECKPOINT_FREQ:,})")
    parser.add_argument("--checkpoint-replay-buffer", action="store_true",
                        help="also checkpoint the replay buffer (larger checkpoints; without it a resumed "
                             "run refills the buffer before training again)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest checkpoint, with its own settings "
                             "(only --device, -v and --no-progress may be given with it)")
    parser.add_argument("--logdir", default="runs", help="folder holding the run folders (default: runs)")
    parser.add_argument("--run-name", help="run folder name (default: <env>_<algo>_s<seed>_<date-time>)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu; small MLPs are "
                                                        "faster on the CPU)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="-v: also print SB3's training tables; -vv: and every evaluation score")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=train)


def _add_evaluate_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate", help="score a saved model on fresh greedy episodes",
        description="Score a saved model on greedy episodes whose seeds were never used in training "
                    f"({FINAL_EVAL_SEED_OFFSET:,} + seed onwards). Reads model.safetensors, or an SB3 "
                    ".zip without unpickling anything in it.")
    parser.add_argument("model_path", metavar="MODEL_PATH",
                        help=f"{MODEL_FILENAME} or an SB3 .zip, or the run folder holding it")
    parser.add_argument("--episodes", type=_positive_int, default=100, metavar="N",
                        help="greedy episodes (default: 100)")
    parser.add_argument("--seed", type=_seed, default=0,
                        help=f"episode i uses seed {FINAL_EVAL_SEED_OFFSET:,} + SEED + i (default: 0)")
    parser.add_argument("--env", dest="env_id", metavar="ENV_ID",
                        help="env id (default: the one in run.json next to the model, or in the model file)")
    parser.add_argument("--algo", choices=sorted(ALGORITHMS),
                        help="algorithm of an SB3 .zip (default: the one in run.json next to the model)")
    parser.set_defaults(run=evaluate)


def _add_plot_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plot", help="re-draw a run's learning curve from its TensorBoard events",
        description="Re-draw RUN_DIR/learning_curve.png from the run's TensorBoard event files.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by 'rollback-rl train'")
    parser.add_argument("--output", metavar="PNG", help=f"where to write (default: RUN_DIR/{PLOT_FILENAME})")
    parser.set_defaults(run=plot)


def _add_compare_command(commands: argparse._SubParsersAction) -> None:
    from rollback_rl.compare.command import DESCRIPTION, add_compare_arguments, run_compare

    parser = commands.add_parser("compare", help="benchmark the arms of PROTOCOL.md on tasks and seeds",
                                 description=DESCRIPTION)
    add_compare_arguments(parser)
    parser.set_defaults(run=run_compare)


def _add_forgetting_command(commands: argparse._SubParsersAction) -> None:
    from rollback_rl.forgetting.command import add_forgetting_arguments, run_forgetting

    parser = commands.add_parser("forgetting", help="the A -> B -> A forgetting experiment, or --stationary",
                                 description="Task switching (vanilla, rollback, task-keyed snapshot bank) and "
                                             "the failure-share analysis of stationary collapses.")
    add_forgetting_arguments(parser)
    parser.set_defaults(run=run_forgetting)


#: The subcommands, in the order ``--help`` lists them; each adds its parser and sets ``run``.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_train_command, _add_evaluate_command,
                                                                _add_plot_command, _add_compare_command,
                                                                _add_forgetting_command]


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog=PROG, description="Online RL that rolls back to its last good weights "
                                                     "when its performance collapses.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {rollback_rl.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)
        return args.run(args)
    except UsageError as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USAGE


# -- train ----------------------------------------------------------------------------------------

@dataclass
class TrainingPlan:
    """Everything ``train`` does, checked before anything is built or written."""

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
    max_restores: int = 2  # 0: no limit
    checkpoint_freq: int = DEFAULT_CHECKPOINT_FREQ
    checkpoint_replay_buffer: bool = False
    command: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON values (classes by name), as checkpoints store it; ``run_dir`` left out."""
        values = {name: getattr(self, name) for name in _PLAN_JSON_FIELDS}
        return json.loads(json.dumps(to_jsonable(values), default=str))

    @classmethod
    def from_json(cls, values: dict[str, Any], run_dir: Path) -> TrainingPlan:
        """The plan :meth:`to_json` stored (its hyperparameters as JSON, enough to build the envs)."""
        algorithms = ALGORITHMS if values["rollback"] else VANILLA_ALGORITHMS
        defaults = {"max_restores": 0}  # runs started by 0.1, which had no limit, resume as they began
        return cls(algorithm=algorithms[values["algo"]], run_dir=run_dir,
                   **{name: values[name] if name in values else defaults[name] for name in _PLAN_JSON_FIELDS})


_PLAN_JSON_FIELDS = ("env_id", "algo", "rollback", "seed", "steps", "eval_freq", "eval_episodes", "hyperparameters",
                     "hyperparameter_sources", "drop", "patience", "max_restores", "checkpoint_freq", "checkpoint_replay_buffer",
                     "command")


def check_env_id(env_id: str) -> None:
    try:
        gym.spec(env_id)
    except gym.error.Error as error:
        raise UsageError(f"unknown env id {env_id!r}: {error}") from None


def _hyperparameters(args: argparse.Namespace, algorithm: type[BaseAlgorithm]) -> tuple[dict[str, Any], list[str]]:
    """Defaults, then the YAML file's section for the env, then ``--set``; each part checked."""
    params = hyperparameters_for(args.env_id, args.algo)
    sources = ["RL Zoo defaults" if args.algo == "dqn" and args.env_id in ZOO_DQN else "SB3 defaults"]
    try:
        params = check_hyperparameters(params, algorithm, "defaults")
        if args.hyperparams is not None:
            try:
                section = load_yaml_section(args.hyperparams, args.env_id)
            except UnicodeDecodeError as error:
                raise UsageError(f"cannot read hyperparameter file {args.hyperparams}: not UTF-8 text "
                                 f"({error.reason} at byte {error.start})") from None
            params.update(check_hyperparameters(section, algorithm, f"{args.hyperparams}, {args.env_id}"))
            sources.append(str(args.hyperparams))
        if args.overrides:
            values = {key: parse_yaml_value(text) for key, text in args.overrides}
            params.update(check_hyperparameters(values, algorithm, "--set"))
            sources.append("--set")
    except HyperparameterError as error:
        raise UsageError(str(error)) from None
    return params, sources


def _run_dir(args: argparse.Namespace, algo_label: str) -> Path:
    logdir = Path(args.logdir)
    if logdir.exists() and not logdir.is_dir():
        raise UsageError(f"--logdir {logdir} exists and is not a folder")
    if args.run_name is not None:
        name = args.run_name
        if not name.strip() or name in (".", "..") or "/" in name or os.sep in name or "\0" in name:
            raise UsageError(f"--run-name must be a plain folder name, got {name!r}")
        if (logdir / name).exists():
            raise UsageError(f"run folder {logdir / name} already exists: choose another --run-name "
                             f"(or continue it with --resume {logdir / name})")
        return logdir / name
    env_label = args.env_id.replace("/", "-").replace(":", "-")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{env_label}_{algo_label}_s{args.seed}_{stamp}"
    candidate, suffix = logdir / name, 1
    while candidate.exists():  # two runs started in the same second
        suffix += 1
        candidate = logdir / f"{name}-{suffix}"
    return candidate


def plan_training(args: argparse.Namespace) -> TrainingPlan:
    """Check the whole command line; raises UsageError naming the first problem."""
    check_env_id(args.env_id)
    rollback = not args.no_rollback
    algorithm = (ALGORITHMS if rollback else VANILLA_ALGORITHMS)[args.algo]
    params, sources = _hyperparameters(args, algorithm)
    steps = args.steps if args.steps is not None else params["n_timesteps"]
    eval_freq = args.eval_freq if args.eval_freq is not None else eval_freq_for(args.env_id)
    if steps < eval_freq:
        raise UsageError(f"--steps ({steps}) is less than --eval-freq ({eval_freq}): no evaluation would run")
    params["n_timesteps"] = steps  # run.json records what was run
    algo_label = args.algo if rollback else f"{args.algo}-vanilla"
    return TrainingPlan(env_id=args.env_id, algo=args.algo, algorithm=algorithm, rollback=rollback, seed=args.seed,
                        steps=steps, eval_freq=eval_freq, eval_episodes=args.eval_episodes, hyperparameters=params,
                        hyperparameter_sources=sources, run_dir=_run_dir(args, algo_label), drop=args.drop,
                        patience=args.patience, max_restores=args.max_restores, checkpoint_freq=args.checkpoint_freq,
                        checkpoint_replay_buffer=args.checkpoint_replay_buffer, command=[PROG, *args.argv])


def build_envs(plan: TrainingPlan) -> tuple[VecEnv, VecEnv]:
    """The training env (seeded with the run's seed) and the evaluation env (seeded apart), both with
    a NonFiniteGuard inside their Monitor; raises UsageError if they cannot be made."""
    params = plan.hyperparameters
    env_kwargs = params.get("env_kwargs", {})

    def guarded_env(**kwargs: Any) -> gym.Env:
        return NonFiniteGuard(gym.make(plan.env_id, **kwargs))

    try:
        env = make_vec_env(guarded_env, n_envs=params.get("n_envs", 1), seed=plan.seed, env_kwargs=env_kwargs)
        eval_env = make_vec_env(guarded_env, n_envs=1, env_kwargs=env_kwargs)
    except (gym.error.Error, ImportError, TypeError, ValueError) as error:
        raise UsageError(f"cannot make env {plan.env_id}: {error}") from None
    eval_env.seed(plan.seed + EVAL_SEED_OFFSET)  # evaluation episodes never share seeds with training's
    return env, eval_env


def build_model(plan: TrainingPlan, device: str, verbose: int) -> tuple[BaseAlgorithm, VecEnv]:
    """The model on its training env, and a separate evaluation env; raises UsageError if either cannot be made."""
    env, eval_env = build_envs(plan)
    params = plan.hyperparameters
    try:
        model = plan.algorithm(params.get("policy", "MlpPolicy"), env, seed=plan.seed, device=device,
                               verbose=verbose, **model_arguments(params, env.action_space))
    except (AssertionError, TypeError, ValueError, KeyError, RuntimeError, MemoryError, OverflowError) as error:
        raise UsageError(f"cannot build {plan.algorithm.__name__} for {plan.env_id}: {error}") from None
    return model, eval_env


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


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def check_device(device: str) -> None:
    try:
        torch.device(device)
    except RuntimeError as error:
        raise UsageError(f"--device {device!r}: {error}") from None


def train(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    if args.resume is not None:
        return resume_training(args)
    check_device(args.device)
    plan = plan_training(args)
    model, eval_env = build_model(plan, args.device, verbose=max(args.verbose - 1, 0))

    # Everything is checked: from here on, the run folder is written.
    plan.run_dir.mkdir(parents=True)
    with hold_run_lock(plan.run_dir):
        logger = open_run_logger(plan.run_dir, to_stdout=args.verbose > 0)
        add_rollback_layout(logger)
        session = TrainingSession(plan, model, eval_env, logger, started_at=_now())
        return run_training(session, args)


# Options that --resume accepts; every other one comes from the run's checkpoint.
_RESUME_OPTIONS = {"resume", "device", "verbose", "no_progress", "run", "command", "argv"}
_OPTION_NAMES = {"env_id": "ENV_ID", "overrides": "--set"}


def _refuse_settings_with_resume(args: argparse.Namespace) -> None:
    defaults = vars(build_parser().parse_args(["train"]))
    for name, value in vars(args).items():
        if name not in _RESUME_OPTIONS and value != defaults.get(name):
            option = _OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
            raise UsageError(f"--resume continues a run with the settings it was started with: "
                             f"do not give {option} with it")


def _is_complete(info: dict[str, Any] | None) -> bool:
    """Whether run.json says the run trained all its steps (and was not interrupted)."""
    if not info or info.get("interrupted") is not False:
        return False
    done, steps = info.get("timesteps_done"), info.get("steps")
    return isinstance(done, int) and isinstance(steps, int) and done >= steps


def _print_warning(line: str) -> None:
    print(f"{PROG}: warning: {' '.join(line.split())}", file=sys.stderr)


def resume_training(args: argparse.Namespace) -> int:
    """``train --resume RUN_DIR``: continue the run from its newest checkpoint that loads."""
    _refuse_settings_with_resume(args)
    run_dir = Path(args.resume)
    if not run_dir.is_dir():
        raise UsageError(f"--resume {run_dir}: run folder not found")
    if _is_complete(read_run_info(run_dir)):
        print(f"{run_dir} is complete: nothing to resume.")
        return 0
    if run_in_use(run_dir):
        raise UsageError(f"{run_dir} is being written by another rollback-rl process (wait for it to end, or stop it)")
    check_device(args.device)
    store = CheckpointStore(run_dir / CHECKPOINTS_DIR)
    try:
        metadata = run_metadata(store)
        plan = TrainingPlan.from_json(metadata["run"], run_dir)
        env, eval_env = build_envs(plan)
        point = load_resume_point(store, env, device=args.device, on_skip=_print_warning)
    except NoCheckpointError as error:
        raise UsageError(f"--resume {run_dir}: {error} (was the run started with --checkpoint-freq 0, "
                         f"or stopped before its first checkpoint? Then start it again)") from None
    except (KeyError, TypeError) as error:
        raise UsageError(f"--resume {run_dir}: the checkpoint's run settings are unreadable ({error!r})") from None

    # The checkpoint loaded: from here on, the run folder is written.
    try:
        with hold_run_lock(run_dir):
            logger = open_run_logger(run_dir, to_stdout=args.verbose > 0, resume_timestep=point.timestep)
            print(f"Resuming {run_dir} from timestep {point.timestep:,} of {plan.steps:,}")
            resumes = [*metadata.get("resumes", []), {"timestep": point.timestep, "at": _now()}]
            session = TrainingSession(plan, point.model, eval_env, logger, started_at=metadata.get("started_at", ""),
                                      resumes=resumes, resume_from=point)
            return run_training(session, args)
    except RunInUseError as error:
        raise UsageError(str(error)) from None


def _evaluation_callback(plan: TrainingPlan, model: BaseAlgorithm, eval_env: VecEnv,
                         verbose: int) -> RollbackCallback | EvalCallback:
    if plan.rollback:
        detector = SignificantDrop(drop=plan.drop, patience=plan.patience)
        return RollbackCallback(eval_env, eval_freq=plan.eval_freq, n_eval_episodes=plan.eval_episodes,
                                detector=detector, max_restores=plan.max_restores or None,
                                verbose=2 if verbose >= 2 else 1)
    # Same schedule as RollbackCallback's (which counts timesteps summed over envs); EvalCallback counts calls.
    return EvalCallback(eval_env, n_eval_episodes=plan.eval_episodes, eval_freq=max(plan.eval_freq // model.n_envs, 1),
                        log_path=str(plan.run_dir / "evaluations"), deterministic=True, warn=False)


def run_training(session: TrainingSession, args: argparse.Namespace,
                 extra_callbacks: Sequence[BaseCallback] = ()) -> int:
    """Train the session's model to the plan's last timestep, then write the model, run.json and the plot.

    :param extra_callbacks: run after the others (benchmarks use this to measure the run)
    """
    plan, model = session.plan, session.model
    model.set_logger(session.logger)
    evaluation = _evaluation_callback(plan, model, session.eval_env, args.verbose)
    checkpoints = RunCheckpoints(plan.run_dir / CHECKPOINTS_DIR, plan.checkpoint_freq, session.checkpoint_metadata(),
                                 evaluation, save_replay_buffer=plan.checkpoint_replay_buffer,
                                 resume_from=session.resume_from, verbose=1 if args.verbose >= 2 else 0)
    callback = CallbackList([evaluation, LogNonFiniteCounts(), checkpoints, *extra_callbacks])
    interrupted = False
    try:
        model.learn(total_timesteps=plan.steps - model.num_timesteps, callback=callback,
                    reset_num_timesteps=session.resume_from is None, progress_bar=not args.no_progress)
    except KeyboardInterrupt:
        interrupted = True
        print(f"\nInterrupted at timestep {model.num_timesteps}: saving the run so far "
              f"(continue it with: {PROG} train --resume {plan.run_dir}).", file=sys.stderr)

    save_model(model, plan.run_dir / MODEL_FILENAME)
    model.save(plan.run_dir / SB3_MODEL_FILENAME)
    session.logger.close()  # flushes the events file the plot is drawn from
    info = run_info(session, evaluation, checkpoints.wall_time, interrupted)
    atomic_write_bytes(plan.run_dir / RUN_INFO_FILENAME, (json.dumps(info, indent=2) + "\n").encode())
    try:
        plot_run(plan.run_dir)
    except ValueError as error:  # interrupted before the first evaluation
        print(f"No plot: {error}", file=sys.stderr)
    print_summary(info, plan.run_dir)
    return EXIT_INTERRUPTED if interrupted else 0


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


def _versions() -> dict[str, str]:
    return {"rollback_rl": rollback_rl.__version__, "stable_baselines3": stable_baselines3.__version__,
            "gymnasium": gym.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _env_total(env: VecEnv, name: str) -> int:
    return int(sum(env.get_attr(name))) if env.has_attr(name) else 0


def run_info(session: TrainingSession, callback: BaseCallback, wall_time: float, interrupted: bool) -> dict[str, Any]:
    """What run.json records: the settings, the versions, and the results of the run."""
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
        "eval_freq": plan.eval_freq,
        "eval_episodes": plan.eval_episodes,
        "eval_seed": plan.seed + EVAL_SEED_OFFSET,
        "detector": ({"name": "SignificantDrop", "drop": plan.drop, "patience": plan.patience,
                      "max_restores": plan.max_restores or None}
                     if plan.rollback else None),
        "hyperparameters": to_jsonable(plan.hyperparameters),
        "hyperparameter_sources": plan.hyperparameter_sources,
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": str(model.device)},
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


def _mebibytes(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def print_summary(info: dict[str, Any], run_dir: Path) -> None:
    print(f"Run folder: {run_dir}")
    best, final = info["best_eval"], info["final_eval"]
    if best is not None:
        restored = (f" (restored weights; the collapsed ones scored {final['collapsed_score']:.2f})"
                    if "collapsed_score" in final else "")
        print(f"Evaluation ({info['eval_episodes']} greedy episodes every {info['eval_freq']:,} steps): "
              f"best {best['score']:.2f} at step {best['timestep']:,}, final {final['score']:.2f} "
              f"at step {final['timestep']:,}{restored}")
    if info["rollback"]:
        steps = [f"{event['timestep']:,}" for event in info["rollbacks"]]
        shown = ", ".join(steps[:6]) + (f" and {len(steps) - 6} more" if len(steps) > 6 else "")
        rebases = (f"; {info['n_rebases']} time(s) the restored weights scored as badly, so the reference "
                   f"score was lowered instead" if info["n_rebases"] else "")
        print(f"Rollbacks: {len(steps)}" + (f" (at steps {shown})" if steps else "") + rebases)
    else:
        print("Rollbacks: none (--no-rollback)")
    if info["undo_log_bytes"] is not None:
        snapshots = f", snapshots {_mebibytes(info['snapshot_bytes'])}" if info["snapshot_bytes"] is not None else ""
        print(f"Undo log: {_mebibytes(info['undo_log_bytes'])} holding the last {info['undo_log_depth']:,} "
              f"gradient steps{snapshots}")
    else:
        print(f"Undo log: none ({info['algorithm_class']})")
    nonfinite = info["nonfinite"]
    if nonfinite["observations"] or nonfinite["rewards"]:
        print(f"Non-finite values from the env: {nonfinite['observations']} observation(s), "
              f"{nonfinite['rewards']} reward(s); each ended its episode")
    if info["resumes"]:
        print(f"Resumed {len(info['resumes'])} time(s), from timestep(s) "
              + ", ".join(f"{r['timestep']:,}" for r in info["resumes"]))
    print(f"Wall time: {info['wall_time_s']:.0f} s ({info['eval_env_steps']:,} env steps spent evaluating)")
    print(f"Score the final policy on 100 fresh episodes: {PROG} evaluate {run_dir / MODEL_FILENAME}")


# -- evaluate -------------------------------------------------------------------------------------

def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RUN_INFO_FILENAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    return info if isinstance(info, dict) else None


def _is_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"PK\x03\x04"
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None


def load_model_for_evaluation(path: Path, env_id: str, algorithm: type[BaseAlgorithm] | None,
                              env_kwargs: dict[str, Any]) -> BaseAlgorithm:
    """Load a model to act with, without running any code the file holds.

    A ``.safetensors`` model (``safe_model.save_model``) is loaded as is; an SB3 ``.zip`` is read with
    ``load_sb3_zip_safely``, which needs ``algorithm`` and the env (its training settings that only
    the pickles hold are not needed to act, and are left at their defaults silently).

    :raises UsageError: if the file is refused (pickled code), corrupted, or not a model
    """
    try:
        if not _is_zip(path):
            return load_model(path, device="cpu")
        if algorithm is None:
            raise UsageError(f"no {RUN_INFO_FILENAME} next to {path} says which algorithm saved it: pass --algo")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return load_sb3_zip_safely(path, algorithm, gym.make(env_id, **env_kwargs), device="cpu")
    except (SafeLoadError, OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise UsageError(f"cannot load {path}: {error}") from None


def greedy_returns(model: BaseAlgorithm, env: gym.Env, n_episodes: int, first_seed: int) -> list[float]:
    """Returns of ``n_episodes`` greedy episodes, episode i reset with seed ``first_seed + i``."""
    returns = []
    for episode in range(n_episodes):
        observation, _ = env.reset(seed=first_seed + episode)
        total, done = 0.0, False
        while not done:
            action, _ = model.predict(observation, deterministic=True)
            observation, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    return returns


def _model_file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        for name in (MODEL_FILENAME, SB3_MODEL_FILENAME):
            if (path / name).is_file():
                return path / name
        raise UsageError(f"no {MODEL_FILENAME} or {SB3_MODEL_FILENAME} in {path}")
    if not path.exists():
        for suffix in (".safetensors", ".zip"):  # as save_model and SB3's save add them
            if path.with_name(path.name + suffix).is_file():
                return path.with_name(path.name + suffix)
        raise UsageError(f"model file {path} not found")
    if not path.is_file():
        raise UsageError(f"model path {path} is neither a file nor a folder")
    return path


def evaluate(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    model_path = _model_file(args.model_path)
    info = read_run_info(model_path.parent) or {}
    env_id = args.env_id or info.get("env")
    if env_id is None and not _is_zip(model_path):
        try:
            env_id = read_model_metadata(model_path).get("env_id")
        except (SafeLoadError, OSError) as error:
            raise UsageError(f"cannot load {model_path}: {error}") from None
    if not isinstance(env_id, str):
        raise UsageError(f"no {RUN_INFO_FILENAME} next to {model_path} names the env: pass --env")
    check_env_id(env_id)
    if args.algo is not None:
        algorithm = (ALGORITHMS if info.get("rollback", True) else VANILLA_ALGORITHMS)[args.algo]
    else:
        algorithm = _CLASSES_BY_NAME.get(str(info.get("algorithm_class")))
    hyperparameters = info.get("hyperparameters") if env_id == info.get("env") else None
    env_kwargs = hyperparameters.get("env_kwargs", {}) if isinstance(hyperparameters, dict) else {}
    try:
        env = gym.make(env_id, **env_kwargs)
    except (gym.error.Error, ImportError, TypeError, ValueError) as error:
        raise UsageError(f"cannot make env {env_id}: {error}") from None
    model = load_model_for_evaluation(model_path, env_id, algorithm, env_kwargs)
    if model.observation_space != env.observation_space or model.action_space != env.action_space:
        raise UsageError(f"{model_path} was trained on other observation or action spaces than {env_id}'s")
    first_seed = FINAL_EVAL_SEED_OFFSET + args.seed
    returns = greedy_returns(model, env, args.episodes, first_seed)
    env.close()
    last_seed = first_seed + args.episodes - 1
    print(f"{model_path} on {env_id}: {args.episodes} greedy episodes, seeds {first_seed}-{last_seed}")
    print(f"mean return {np.mean(returns):.2f}, std {np.std(returns):.2f} "
          f"(min {np.min(returns):.2f}, max {np.max(returns):.2f})")
    return 0


# -- plot -----------------------------------------------------------------------------------------

def plot(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run folder {run_dir} not found")
    if args.output is not None and not Path(args.output).resolve().parent.is_dir():
        raise UsageError(f"--output {args.output}: its folder does not exist")
    try:
        output = plot_run(run_dir, args.output)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
