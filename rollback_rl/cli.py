"""The ``rollback-rl`` command: train an agent with rollback, score a saved model, re-draw a run's plot,
run the experiments.

    rollback-rl train [ENV_ID] [--algo dqn] [--steps N] [--seed 0] [--no-rollback] [--hyperparams FILE]
    rollback-rl train --resume RUN_DIR
    rollback-rl evaluate MODEL_PATH [--episodes 100] [--seed 0]
    rollback-rl plot RUN_DIR
    rollback-rl compare ... / rollback-rl forgetting ...  (see rollback_rl.experiments)

This module is the command line only: options, messages and exit statuses. What a run does is in
:mod:`rollback_rl.training` (plan, envs, model, session, run.json) and :mod:`rollback_rl.evaluation`
(greedy episodes, seeds, loading a saved model). ``train`` reads top to bottom: check every input,
build the environments and the model, and only then create the run folder ``<logdir>/<run name>/``,
which receives the TensorBoard events file (with a custom-scalars layout), ``progress.csv``, a durable
checkpoint every ``--checkpoint-freq`` timesteps in ``checkpoints/``, and at the end
``model.safetensors`` (and SB3's ``model.zip``), ``learning_curve.png`` and ``run.json``.
``train --resume RUN_DIR`` continues a run that stopped (crashed, killed, interrupted) from its newest
checkpoint that loads; see :mod:`rollback_rl.persistence.resume` and :mod:`rollback_rl.persistence.run_logs`.
Nothing rollback-rl loads can run code: models and checkpoints are read with
:mod:`rollback_rl.persistence.safe_model`, and SB3 ``.zip`` files without their pickles.

Bad input is reported as one ``rollback-rl: error: ...`` line on stderr (of bounded length) with exit
status 2, before anything is written. Exit statuses: 0 done; 1 the run stopped on an error of its own
(an env whose resets keep giving non-finite observations, a file SB3 writes that could not be written;
the run so far is saved) or its final files could not be written (the newest checkpoint is named, to
resume from); 2 bad input; 130 Ctrl-C and 143 SIGTERM, which stop training alike: the run so far is
written, and ``--resume`` continues it. A file that could not be written during training (disk full)
is one ``rollback-rl: warning: ...`` line, and training goes on.

Each subcommand is added by one ``_add_<name>_command`` function listed in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

import rollback_rl
from rollback_rl.evaluation import FINAL_SEED_OFFSET, greedy_returns, is_zip, load_model_for_evaluation
from rollback_rl.experiments.compare.command import DESCRIPTION as COMPARE_DESCRIPTION
from rollback_rl.experiments.compare.command import add_compare_arguments, run_compare
from rollback_rl.experiments.forgetting.command import DESCRIPTION as FORGETTING_DESCRIPTION
from rollback_rl.experiments.forgetting.command import add_forgetting_arguments, run_forgetting
from rollback_rl.hyperparams import CHECKS, DEFAULT_EVAL_EPISODES, eval_freq_for
from rollback_rl.persistence.limits import one_line
from rollback_rl.persistence.resume import NoCheckpointError, run_in_use
from rollback_rl.persistence.safe_io import SafeLoadError, WriteFailedWarning
from rollback_rl.persistence.safe_model import read_model_metadata
from rollback_rl.plotting import PLOT_FILENAME, plot_run
from rollback_rl.training import (
    ALGORITHMS,
    DEFAULT_CHECKPOINT_FREQ,
    MODEL_FILENAME,
    RUN_INFO_FILENAME,
    SB3_MODEL_FILENAME,
    FinishedRun,
    Terminated,
    TrainingPlan,
    algorithm_for,
    algorithm_named,
    build_model,
    check_env_id,
    check_schedule,
    load_resumable_run,
    open_session,
    plan_setting,
    read_run_info,
    resolve_hyperparameters,
    run_is_complete,
    run_training,
    stop_signal,
)
from rollback_rl.validation import (
    MAX_EPISODES,
    MAX_SEED,
    UsageError,
    check_folder_name,
    check_output_folder,
    check_path_text,
    integer_in,
    parse_assignment,
)

PROG = "rollback-rl"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT; SIGTERM gives 143
#: The devices rollback-rl trains on (torch knows others, such as "meta", that hold no data).
DEVICE_TYPES = ("cpu", "cuda", "mps")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors reported the same single-line way as ours."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # Python 3.11's argparse drops a value of "--" (--steps=--) and passes the option an empty list.
        if action.option_strings and "--" in arg_strings:
            self.error(f"argument {'/'.join(action.option_strings)}: expected a value, got '--'")
        return super()._get_values(action, arg_strings)


def _plan_option(name: str) -> Callable[[str], Any]:
    """An argparse ``type``: the option's text checked as the plan's setting ``name`` by
    :func:`rollback_rl.training.plan_setting`, the check a resumed run's settings go through too
    (argparse names the option in the message)."""
    def parse(text: str) -> Any:
        try:
            return plan_setting(name, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse


def _integer_option(minimum: int, maximum: int, limit_name: str) -> Callable[[str], int]:
    """An argparse ``type``: the option's text as an integer in ``[minimum, maximum]``."""
    def parse(text: str) -> int:
        try:
            return integer_in(minimum, maximum, text, limit_name=limit_name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse


def _assignment(text: str) -> tuple[str, str]:
    try:
        return parse_assignment(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    parser.add_argument("--steps", type=_plan_option("steps"), metavar="N",
                        help="training timesteps (default: the hyperparameters' n_timesteps, e.g. "
                             "50,000 on CartPole-v1)")
    parser.add_argument("--seed", type=_plan_option("seed"), default=0, help="random seed (default: 0)")
    parser.add_argument("--no-rollback", action="store_true",
                        help="the vanilla arm: the plain SB3 algorithm, evaluated on the same schedule")
    parser.add_argument("--hyperparams", metavar="FILE",
                        help="RL Zoo-format YAML; the section named after ENV_ID overrides the defaults")
    parser.add_argument("--set", dest="overrides", type=_assignment, action="append", default=[],
                        metavar="KEY=VALUE", help="override one hyperparameter, e.g. --set "
                                                  "learning_rate=1e-3 (repeatable; applied last)")
    parser.add_argument("--eval-freq", type=_plan_option("eval_freq"), metavar="N",
                        help="training timesteps between evaluations (default: 2,500 on CartPole, "
                             "5,000 otherwise)")
    parser.add_argument("--eval-episodes", type=_plan_option("eval_episodes"), default=DEFAULT_EVAL_EPISODES,
                        metavar="N",
                        help=f"greedy episodes per evaluation (default: {DEFAULT_EVAL_EPISODES})")
    parser.add_argument("--drop", type=_plan_option("drop"), default=0.5,
                        help="collapse when the score falls by this fraction of the learned range "
                             "(best minus lowest score) and significantly (default: 0.5)")
    parser.add_argument("--patience", type=_plan_option("patience"), default=1, metavar="N",
                        help="evaluations in a row that must show the drop (default: 1)")
    parser.add_argument("--max-restores", type=_plan_option("max_restores"), default=2, metavar="N",
                        help="restores of one snapshot after which the next collapse from it keeps the current "
                             "weights (the snapshot comes back if the weights fall to the floor, and at the end if "
                             "still better); 0 = no limit (default: 2)")
    parser.add_argument("--cool-on-solve", type=_plan_option("cool_on_solve"), default=0.1, metavar="FACTOR",
                        help="multiply the learning rate by FACTOR once, at the first evaluation that reaches the "
                             "task's reward threshold (475 on CartPole-v1), so that solved weights are consolidated; "
                             "1 = never, as rollback-rl 0.2 (default: 0.1)")
    parser.add_argument("--checkpoint-freq", type=_plan_option("checkpoint_freq"), default=DEFAULT_CHECKPOINT_FREQ,
                        metavar="N",
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
                    f"({FINAL_SEED_OFFSET:,} + seed onwards). Reads model.safetensors, or an SB3 "
                    ".zip without unpickling anything in it.")
    parser.add_argument("model_path", metavar="MODEL_PATH",
                        help=f"{MODEL_FILENAME} or an SB3 .zip, or the run folder holding it")
    parser.add_argument("--episodes", type=_integer_option(1, MAX_EPISODES, "MAX_EPISODES"), default=100,
                        metavar="N", help="greedy episodes (default: 100)")
    parser.add_argument("--seed", type=_integer_option(0, MAX_SEED, "MAX_SEED"), default=0,
                        help=f"episode i uses seed {FINAL_SEED_OFFSET:,} + SEED + i (default: 0)")
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
    parser = commands.add_parser("compare", help="benchmark the arms of docs/protocol.md on tasks and seeds",
                                 description=COMPARE_DESCRIPTION)
    add_compare_arguments(parser)
    parser.set_defaults(run=run_compare)


def _add_forgetting_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("forgetting", help="the A -> B -> A forgetting experiment, or --stationary",
                                 description=FORGETTING_DESCRIPTION)
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
        print(f"{PROG}: error: {one_line(str(error))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as stop:  # outside training (which writes the run so far): before or after it
        number = stop_signal(stop)
        print(f"\n{PROG}: stopped by {signal.Signals(number).name}", file=sys.stderr)
        return 128 + number
    except OSError as error:  # what no check foresaw (a folder that vanished...): still one line
        print(f"{PROG}: error: {one_line(str(error))}", file=sys.stderr)
        return EXIT_FAILED


# -- train ----------------------------------------------------------------------------------------

def check_device(device: str) -> None:
    """Refuse a device torch does not know, or one that holds no data (``meta``) or that rollback-rl
    does not train on: only ``cpu``, ``cuda[:N]`` and ``mps`` are accepted."""
    try:
        device_type = torch.device(device).type
    except RuntimeError as error:
        raise UsageError(f"--device {device!r}: {error}") from None
    if device_type not in DEVICE_TYPES:
        raise UsageError(f"--device {device!r}: rollback-rl trains on {', '.join(DEVICE_TYPES)}, not {device_type}")


def _run_dir(args: argparse.Namespace, algo_label: str) -> tuple[Path, bool]:
    """The run folder to create, and whether a number may be added to its name if it is taken by then
    (the default name; not a ``--run-name``). Checked without writing anything."""
    logdir = Path(args.logdir)
    check_output_folder(logdir, "--logdir")
    if args.run_name is not None:
        check_folder_name(args.run_name, "--run-name")
        if (logdir / args.run_name).exists() or (logdir / args.run_name).is_symlink():
            raise UsageError(f"run folder {logdir / args.run_name} already exists: choose another --run-name "
                             f"(or continue it with --resume {logdir / args.run_name})")
        return logdir / args.run_name, False
    env_label = args.env_id.replace("/", "-").replace(":", "-")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{env_label}_{algo_label}_s{args.seed}_{stamp}"
    check_folder_name(name, "the run folder name (give a shorter one with --run-name)")
    return logdir / name, True


def plan_training(args: argparse.Namespace) -> TrainingPlan:
    """The plan of ``train``'s command line, every option checked; raises UsageError naming the first problem.

    Nothing is written: the run folder is created when the run starts (:func:`rollback_rl.training.open_session`).
    """
    check_env_id(args.env_id)
    if args.hyperparams is not None:
        check_path_text(args.hyperparams, "--hyperparams")
    rollback = not args.no_rollback
    algorithm = algorithm_for(args.algo, rollback)
    params, sources = resolve_hyperparameters(args.env_id, args.algo, algorithm, args.hyperparams, args.overrides)
    steps = args.steps if args.steps is not None else params["n_timesteps"]
    eval_freq = args.eval_freq if args.eval_freq is not None else eval_freq_for(args.env_id)
    check_schedule(steps, eval_freq)
    params["n_timesteps"] = steps  # run.json records what was run
    algo_label = args.algo if rollback else f"{args.algo}-vanilla"
    run_dir, number_if_taken = _run_dir(args, algo_label)
    return TrainingPlan(env_id=args.env_id, algo=args.algo, algorithm=algorithm, rollback=rollback, seed=args.seed,
                        steps=steps, eval_freq=eval_freq, eval_episodes=args.eval_episodes, hyperparameters=params,
                        hyperparameter_sources=sources, run_dir=run_dir, drop=args.drop,
                        patience=args.patience, max_restores=args.max_restores or None,  # --max-restores 0: no limit
                        cool_on_solve=None if args.cool_on_solve == 1 else args.cool_on_solve,
                        checkpoint_freq=args.checkpoint_freq, checkpoint_replay_buffer=args.checkpoint_replay_buffer,
                        command=[PROG, *args.argv], number_if_taken=number_if_taken)


def _raise_terminated(signal_number: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def _stops_and_warnings_of_training() -> Iterator[None]:
    """For the time of ``train``: SIGTERM stops training as Ctrl-C does (:class:`Terminated`), and each
    distinct warning (a file that could not be written: :class:`WriteFailedWarning`) is one
    ``rollback-rl: warning:`` line, shown once."""
    shown: set[tuple[type[Warning], str]] = set()

    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        line = one_line(str(message))
        if (category, line) not in shown:
            shown.add((category, line))
            _print_warning(line if issubclass(category, WriteFailedWarning) else f"{category.__name__}: {line}")

    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show
            yield
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler if previous_handler is not None else signal.SIG_DFL)


def train(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    with _stops_and_warnings_of_training():
        if args.resume is not None:
            return resume_training(args)
        check_device(args.device)
        plan = plan_training(args)
        model, eval_env = build_model(plan.env_id, plan.algorithm, plan.hyperparameters, plan.seed, args.device,
                                      verbose=max(args.verbose - 1, 0))

        # Everything is checked: from here on, the run folder is written.
        with open_session(plan, model, eval_env, log_to_stdout=args.verbose > 0) as session:
            finished = run_training(session, args.verbose, progress_bar=not args.no_progress)
        return _finish(finished, plan.run_dir)


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


def _print_warning(line: str) -> None:
    print(f"{PROG}: warning: {' '.join(line.split())}", file=sys.stderr)


def resume_training(args: argparse.Namespace) -> int:
    """``train --resume RUN_DIR``: continue the run from its newest checkpoint that loads."""
    _refuse_settings_with_resume(args)
    run_dir = check_path_text(args.resume, "--resume")
    if not run_dir.is_dir():
        raise UsageError(f"--resume {run_dir}: run folder not found")
    if run_is_complete(read_run_info(run_dir)):
        print(f"{run_dir} is complete: nothing to resume.")
        return 0
    if run_in_use(run_dir):
        raise UsageError(f"{run_dir} is being written by another rollback-rl process (wait for it to end, or stop it)")
    check_device(args.device)
    try:
        run = load_resumable_run(run_dir, args.device, on_skip=_print_warning)
    except NoCheckpointError as error:
        raise UsageError(f"--resume {run_dir}: {error} (was the run started with --checkpoint-freq 0, "
                         f"or stopped before its first checkpoint? Then start it again)") from None
    except UsageError as error:
        raise UsageError(f"--resume {run_dir}: {error}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"--resume {run_dir}: the checkpoint's run settings are unreadable "
                         f"({type(error).__name__}: {one_line(str(error), 160)})") from None

    # The checkpoint loaded: from here on, the run folder is written.
    with open_session(run.plan, run.point.model, run.eval_env, log_to_stdout=args.verbose > 0,
                      resumed=run) as session:
        print(f"Resuming {run_dir} from timestep {run.point.timestep:,} of {run.plan.steps:,}")
        finished = run_training(session, args.verbose, progress_bar=not args.no_progress)
    return _finish(finished, run_dir)


def _finish(finished: FinishedRun, run_dir: Path) -> int:
    """Print what the run did; the exit status (see the module docstring)."""
    resume = f"{PROG} train --resume {run_dir}"
    if finished.write_error is not None:
        newest = finished.newest_checkpoint
        where = (f"the newest checkpoint is {newest}: continue the run with {resume}" if newest is not None
                 else "no checkpoint was written, so the run cannot be resumed")
        print(f"{PROG}: error: {one_line(finished.write_error)}; {where}", file=sys.stderr)
        return EXIT_FAILED
    timestep = finished.info["timesteps_done"]
    if finished.stop_error is not None:
        print(f"{PROG}: error: training stopped at timestep {timestep:,}: {finished.stop_error}; the model so "
              f"far is saved in {run_dir}", file=sys.stderr)
    elif finished.stopped_by is not None:
        what = "Interrupted" if finished.stopped_by == signal.SIGINT else \
            f"Stopped by {signal.Signals(finished.stopped_by).name}"
        saved = (f"the run so far is saved (continue it with: {resume})" if finished.interrupted
                 else "the run had finished and is saved")
        print(f"\n{what} at timestep {timestep:,}: {saved}.", file=sys.stderr)
    if finished.plot_error is not None and finished.stop_error is None:
        print(f"No plot: {finished.plot_error}", file=sys.stderr)
    print_summary(finished.info, run_dir)
    if finished.stop_error is not None:
        return EXIT_FAILED
    return 128 + finished.stopped_by if finished.stopped_by is not None else 0


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

def _model_file(text: str) -> Path:
    path = check_path_text(text, "MODEL_PATH")
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
    if env_id is None and not is_zip(model_path):
        try:
            env_id = read_model_metadata(model_path).get("env_id")
        except (SafeLoadError, OSError) as error:
            raise UsageError(f"cannot load {model_path}: {error}") from None
    if not isinstance(env_id, str):
        raise UsageError(f"no {RUN_INFO_FILENAME} next to {model_path} names the env: pass --env")
    check_env_id(env_id)
    if args.algo is not None:
        algorithm = algorithm_for(args.algo, rollback=info.get("rollback", True))
    else:
        algorithm = algorithm_named(str(info.get("algorithm_class")))
    if algorithm is None and is_zip(model_path):
        raise UsageError(f"no {RUN_INFO_FILENAME} next to {model_path} says which algorithm saved it: pass --algo")
    hyperparameters = info.get("hyperparameters") if env_id == info.get("env") else None
    env_kwargs = hyperparameters.get("env_kwargs", {}) if isinstance(hyperparameters, dict) else {}
    try:
        env_kwargs = CHECKS["env_kwargs"](env_kwargs)  # run.json is data: a mapping of bounded depth
    except ValueError as error:
        raise UsageError(f"{model_path.parent / RUN_INFO_FILENAME}: env_kwargs {error}") from None
    try:
        env = gym.make(env_id, **env_kwargs)
    except (gym.error.Error, ImportError, TypeError, ValueError) as error:
        raise UsageError(f"cannot make env {env_id}: {error}") from None
    model = load_model_for_evaluation(model_path, env_id, algorithm, env_kwargs)
    if model.observation_space != env.observation_space or model.action_space != env.action_space:
        raise UsageError(f"{model_path} was trained on other observation or action spaces than {env_id}'s")
    first_seed = FINAL_SEED_OFFSET + args.seed
    returns = greedy_returns(model, env, args.episodes, first_seed)
    env.close()
    last_seed = first_seed + args.episodes - 1
    print(f"{model_path} on {env_id}: {args.episodes} greedy episodes, seeds {first_seed}-{last_seed}")
    print(f"mean return {np.mean(returns):.2f}, std {np.std(returns):.2f} "
          f"(min {np.min(returns):.2f}, max {np.max(returns):.2f})")
    return 0


# -- plot -----------------------------------------------------------------------------------------

def plot(args: argparse.Namespace) -> int:
    """Re-draw a run's plot, to ``--output`` (a file, or a folder to write ``learning_curve.png`` into)."""
    run_dir = check_path_text(args.run_dir, "RUN_DIR")
    if not run_dir.is_dir():
        raise UsageError(f"run folder {run_dir} not found")
    if args.output is not None:
        output = check_path_text(args.output, "--output")
        if not output.is_dir():
            if not output.resolve().parent.is_dir():
                raise UsageError(f"--output {args.output}: its folder does not exist")
            check_output_folder(output.parent, "--output")
    try:
        output = plot_run(run_dir, args.output)
    except ValueError as error:
        raise UsageError(str(error)) from None
    except OSError as error:
        if error.errno is None:  # plotting's own "no event file" (a FileNotFoundError of one message)
            raise UsageError(str(error)) from None
        target = args.output if args.output is not None else run_dir / PLOT_FILENAME
        raise UsageError(f"cannot write the plot to {target}: {error.strerror}") from None
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
