"""The ``rollback-rl`` command: train an agent with rollback, score a saved model, re-draw a run's plot.

    rollback-rl train [ENV_ID] [--algo dqn] [--steps N] [--seed 0] [--no-rollback] [--hyperparams FILE]
    rollback-rl evaluate MODEL_PATH [--episodes 100] [--seed 0]
    rollback-rl plot RUN_DIR

``train`` reads top to bottom: check every input, build the environments and the model, and only then
create the run folder ``<logdir>/<run name>/``, which receives the TensorBoard events file (with a
custom-scalars layout), ``progress.csv``, ``model.zip``, ``learning_curve.png`` and ``run.json``.
Bad input is reported as one ``rollback-rl: error: ...`` line on stderr with exit status 2, before
anything is written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import stable_baselines3
import torch
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.utils import ConstantSchedule
from stable_baselines3.common.vec_env import VecEnv

import rollback_rl
import rollback_rl.envs  # registers this package's environments with gymnasium
from rollback_rl.agents import RollbackDQN
from rollback_rl.callbacks import RollbackCallback
from rollback_rl.callbacks.rollback import EVAL_SEED_OFFSET
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
from rollback_rl.plotting import PLOT_FILENAME, plot_run
from rollback_rl.tensorboard_layout import add_rollback_layout

PROG = "rollback-rl"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MODEL_FILENAME = "model.zip"
RUN_INFO_FILENAME = "run.json"
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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


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


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog=PROG, description="Online RL that rolls back to its last good weights "
                                                     "when its performance collapses.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {rollback_rl.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train_parser = commands.add_parser(
        "train", help="train an agent and write a run folder",
        description="Train an agent with rollback (or without, --no-rollback) and write a run folder: "
                    "TensorBoard events, progress.csv, model.zip, learning_curve.png, run.json.")
    train_parser.add_argument("env_id", nargs="?", default="CartPole-v1", metavar="ENV_ID",
                              help="gymnasium env id (default: CartPole-v1)")
    train_parser.add_argument("--algo", choices=sorted(ALGORITHMS), default="dqn",
                              help="dqn: RollbackDQN (SB3's DQN with an undo log); the others: the SB3 "
                                   "algorithm with RollbackCallback (default: dqn)")
    train_parser.add_argument("--steps", type=_positive_int, metavar="N",
                              help="training timesteps (default: the hyperparameters' n_timesteps, e.g. "
                                   "50,000 on CartPole-v1)")
    train_parser.add_argument("--seed", type=_seed, default=0, help="random seed (default: 0)")
    train_parser.add_argument("--no-rollback", action="store_true",
                              help="the vanilla arm: the plain SB3 algorithm, evaluated on the same schedule")
    train_parser.add_argument("--hyperparams", metavar="FILE",
                              help="RL Zoo-format YAML; the section named after ENV_ID overrides the defaults")
    train_parser.add_argument("--set", dest="overrides", type=_assignment, action="append", default=[],
                              metavar="KEY=VALUE", help="override one hyperparameter, e.g. --set "
                                                        "learning_rate=1e-3 (repeatable; applied last)")
    train_parser.add_argument("--eval-freq", type=_positive_int, metavar="N",
                              help="training timesteps between evaluations (default: 2,500 on CartPole, "
                                   "5,000 otherwise)")
    train_parser.add_argument("--eval-episodes", type=_positive_int, default=DEFAULT_EVAL_EPISODES, metavar="N",
                              help=f"greedy episodes per evaluation (default: {DEFAULT_EVAL_EPISODES})")
    train_parser.add_argument("--drop", type=_fraction, default=0.5,
                              help="collapse when the score falls by this fraction of the learned range "
                                   "(best minus lowest score) and significantly (default: 0.5)")
    train_parser.add_argument("--patience", type=_positive_int, default=1, metavar="N",
                              help="evaluations in a row that must show the drop (default: 1)")
    train_parser.add_argument("--logdir", default="runs", help="folder holding the run folders (default: runs)")
    train_parser.add_argument("--run-name", help="run folder name (default: <env>_<algo>_s<seed>_<date-time>)")
    train_parser.add_argument("--device", default="cpu", help="torch device (default: cpu; small MLPs are "
                                                              "faster on the CPU)")
    train_parser.add_argument("-v", "--verbose", action="count", default=0,
                              help="-v: also print SB3's training tables; -vv: and every evaluation score")
    train_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    train_parser.set_defaults(run=train)

    evaluate_parser = commands.add_parser(
        "evaluate", help="score a saved model on fresh greedy episodes",
        description="Score a saved model on greedy episodes whose seeds were never used in training "
                    f"({FINAL_EVAL_SEED_OFFSET:,} + seed onwards).")
    evaluate_parser.add_argument("model_path", metavar="MODEL_PATH", help="model.zip, or the run folder holding it")
    evaluate_parser.add_argument("--episodes", type=_positive_int, default=100, metavar="N",
                                 help="greedy episodes (default: 100)")
    evaluate_parser.add_argument("--seed", type=_seed, default=0,
                                 help=f"episode i uses seed {FINAL_EVAL_SEED_OFFSET:,} + SEED + i (default: 0)")
    evaluate_parser.add_argument("--env", dest="env_id", metavar="ENV_ID",
                                 help="env id (default: the one in run.json next to the model)")
    evaluate_parser.add_argument("--algo", choices=sorted(ALGORITHMS),
                                 help="algorithm (default: the one in run.json next to the model)")
    evaluate_parser.set_defaults(run=evaluate)

    plot_parser = commands.add_parser(
        "plot", help="re-draw a run's learning curve from its TensorBoard events",
        description="Re-draw RUN_DIR/learning_curve.png from the run's TensorBoard event files.")
    plot_parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by 'rollback-rl train'")
    plot_parser.add_argument("--output", metavar="PNG", help=f"where to write (default: RUN_DIR/{PLOT_FILENAME})")
    plot_parser.set_defaults(run=plot)
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
            section = load_yaml_section(args.hyperparams, args.env_id)
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
        if not name.strip() or name in (".", "..") or "/" in name or os.sep in name:
            raise UsageError(f"--run-name must be a plain folder name, got {name!r}")
        if (logdir / name).exists():
            raise UsageError(f"run folder {logdir / name} already exists: choose another --run-name")
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
                        hyperparameter_sources=sources, run_dir=_run_dir(args, algo_label))


def build_model(plan: TrainingPlan, device: str, verbose: int) -> tuple[BaseAlgorithm, VecEnv]:
    """The model on its training env, and a separate evaluation env; raises UsageError if either cannot be made."""
    params = plan.hyperparameters
    env_kwargs = params.get("env_kwargs", {})
    try:
        env = make_vec_env(plan.env_id, n_envs=params.get("n_envs", 1), seed=plan.seed, env_kwargs=env_kwargs)
        eval_env = make_vec_env(plan.env_id, n_envs=1, env_kwargs=env_kwargs)
    except (gym.error.Error, ImportError, TypeError, ValueError) as error:
        raise UsageError(f"cannot make env {plan.env_id}: {error}") from None
    eval_env.seed(plan.seed + EVAL_SEED_OFFSET)  # evaluation episodes never share seeds with training's
    try:
        model = plan.algorithm(params.get("policy", "MlpPolicy"), env, seed=plan.seed, device=device,
                               verbose=verbose, **model_arguments(params, env.action_space))
    except (AssertionError, TypeError, ValueError, KeyError, RuntimeError) as error:
        raise UsageError(f"cannot build {plan.algorithm.__name__} for {plan.env_id}: {error}") from None
    return model, eval_env


def train(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    plan = plan_training(args)
    model, eval_env = build_model(plan, args.device, verbose=max(args.verbose - 1, 0))

    # Everything is checked: from here on, the run folder is written.
    plan.run_dir.mkdir(parents=True)
    logger = configure(str(plan.run_dir), ["stdout", "csv", "tensorboard"] if args.verbose else ["csv", "tensorboard"])
    model.set_logger(logger)
    add_rollback_layout(logger)
    if plan.rollback:
        detector = SignificantDrop(drop=args.drop, patience=args.patience)
        callback: BaseCallback = RollbackCallback(eval_env, eval_freq=plan.eval_freq,
                                                  n_eval_episodes=plan.eval_episodes, detector=detector,
                                                  verbose=2 if args.verbose >= 2 else 1)
    else:
        # Same schedule as RollbackCallback's (which counts timesteps summed over envs); EvalCallback counts calls.
        callback = EvalCallback(eval_env, n_eval_episodes=plan.eval_episodes,
                                eval_freq=max(plan.eval_freq // model.n_envs, 1),
                                log_path=str(plan.run_dir / "evaluations"), deterministic=True, warn=False)
    started_at = datetime.datetime.now().astimezone()
    start = time.perf_counter()
    interrupted = False
    try:
        model.learn(total_timesteps=plan.steps, callback=callback, progress_bar=not args.no_progress)
    except KeyboardInterrupt:
        interrupted = True
        print(f"\nInterrupted at timestep {model.num_timesteps}: saving the run so far.", file=sys.stderr)
    wall_time = time.perf_counter() - start

    model.save(plan.run_dir / MODEL_FILENAME)
    logger.close()  # flushes the events file the plot is drawn from
    info = run_info(plan, model, callback, args, started_at, wall_time, interrupted)
    (plan.run_dir / RUN_INFO_FILENAME).write_text(json.dumps(info, indent=2) + "\n")
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


def run_info(plan: TrainingPlan, model: BaseAlgorithm, callback: BaseCallback, args: argparse.Namespace,
             started_at: datetime.datetime, wall_time: float, interrupted: bool) -> dict[str, Any]:
    """What run.json records: the settings, the versions, and the results of the run."""
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
    training_returns = [float(r) for rewards in model.get_env().env_method("get_episode_rewards") for r in rewards]
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
        "detector": ({"name": "SignificantDrop", "drop": args.drop, "patience": args.patience}
                     if plan.rollback else None),
        "hyperparameters": to_jsonable(plan.hyperparameters),
        "hyperparameter_sources": plan.hyperparameter_sources,
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": str(model.device)},
        "command": [PROG, *args.argv],
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_time_s": round(wall_time, 3),
        "evaluations": curve,
        "best_eval": None if best is None else {"timestep": best["timestep"], "score": best["mean"]},
        "final_eval": final,
        "eval_env_steps": eval_env_steps,
        "online_return": {"mean": float(np.mean(training_returns)) if training_returns else None,
                          "episodes": len(training_returns)},
        "rollbacks": [asdict(event) for event in rollback_callback.rollbacks] if rollback_callback else [],
        "n_rebases": rollback_callback.rebases if rollback_callback else 0,
        "undo_log_bytes": undo_log.nbytes if undo_log is not None else None,
        "undo_log_depth": undo_log.depth if undo_log is not None else None,
        "snapshot_bytes": rollback_callback.ring.nbytes if rollback_callback and rollback_callback.ring else None,
        "model": MODEL_FILENAME,
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
    print(f"Wall time: {info['wall_time_s']:.0f} s ({info['eval_env_steps']:,} env steps spent evaluating)")
    print(f"Score the final policy on 100 fresh episodes: {PROG} evaluate {run_dir / MODEL_FILENAME}")


# -- evaluate -------------------------------------------------------------------------------------

def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RUN_INFO_FILENAME
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"cannot read {path}: {error}") from None
    return info if isinstance(info, dict) else None


def load_model(path: str | Path, algorithm: type[BaseAlgorithm] | None = None) -> BaseAlgorithm:
    """Load a saved model for evaluation; the class comes from the run.json next to it if not given.

    The training schedules are replaced by constants, so that a model saved with another SB3 version
    still loads (they are not needed to act). Uses SB3's ``load``, which unpickles: load only models you trust.

    :raises UsageError: if the class is unknown or the file is not a model
    """
    path = Path(path)
    if algorithm is None:
        info = read_run_info(path.parent) or {}
        algorithm = _CLASSES_BY_NAME.get(info.get("algorithm_class", ""))
        if algorithm is None:
            raise UsageError(f"no {RUN_INFO_FILENAME} next to {path} says which algorithm saved it: pass --algo")
    schedule = ConstantSchedule(0.0)
    custom_objects = {"learning_rate": 0.0, "lr_schedule": schedule, "exploration_schedule": schedule,
                      "clip_range": schedule}
    try:
        return algorithm.load(path, custom_objects=custom_objects, device="cpu")
    except Exception as error:  # noqa: BLE001 - a corrupt or foreign file can fail in many ways
        raise UsageError(f"cannot load {path} as a {algorithm.__name__} model: {error}") from None


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
        path = path / MODEL_FILENAME
    elif not path.exists() and path.suffix != ".zip":
        path = path.with_name(path.name + ".zip")  # SB3 saves "model" as "model.zip"
    if not path.is_file():
        raise UsageError(f"model file {path} not found")
    return path


def evaluate(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    model_path = _model_file(args.model_path)
    info = read_run_info(model_path.parent) or {}
    env_id = args.env_id or info.get("env")
    if env_id is None:
        raise UsageError(f"no {RUN_INFO_FILENAME} next to {model_path} names the env: pass --env")
    check_env_id(env_id)
    algorithm = None
    if args.algo is not None:
        algorithm = (ALGORITHMS if info.get("rollback", True) else VANILLA_ALGORITHMS)[args.algo]
    model = load_model(model_path, algorithm)
    env_kwargs = info.get("hyperparameters", {}).get("env_kwargs", {}) if env_id == info.get("env") else {}
    try:
        env = gym.make(env_id, **env_kwargs)
    except (gym.error.Error, ImportError, TypeError, ValueError) as error:
        raise UsageError(f"cannot make env {env_id}: {error}") from None
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
