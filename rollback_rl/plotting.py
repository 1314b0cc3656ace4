"""Draw a run's learning curve as a PNG from its TensorBoard event files.

The plot shows the evaluation score (``eval/mean_reward``), the best score so far
(``rollback/best_score``), the online training return (``rollout/ep_rew_mean``, SB3's mean over the last
100 training episodes) and a vertical line at each rollback, found where ``rollback/n_rollbacks``
goes up (and ``rollback/end_restore_score`` for a snapshot put back when training ended), with the
collapsed score crossed and the restored weights' check (``rollback/verify_score``)
circled. ``rollback-rl train`` and ``rollback-rl plot`` both draw through :func:`plot_run`, so
re-drawing a finished run gives the same picture.

A run folder is data: an events file that is a symbolic link or not a regular file is refused, never
read, and the PNG is written to a fresh file renamed over the target (a link planted at
``learning_curve.png`` is replaced, not written through).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from tensorboard.backend.event_processing import event_accumulator

from rollback_rl.persistence.safe_io import atomic_write
from rollback_rl.tensorboard_layout import (
    BEST_TAG,
    END_RESTORE_TAG,
    EVAL_TAG,
    REBASES_TAG,
    ROLLBACKS_TAG,
    TRAINING_RETURN_TAG,
    VERIFY_TAG,
)

PLOT_FILENAME = "learning_curve.png"

Series = list[tuple[int, float]]  # (timestep, value)


@dataclass
class RunCurves:
    """The series a plot needs, each as (timestep, value) pairs in timestep order."""

    evaluation: Series
    training_return: Series = field(default_factory=list)
    best_score: Series = field(default_factory=list)
    rollback_timesteps: list[int] = field(default_factory=list)
    restored_scores: Series = field(default_factory=list)
    rebase_timesteps: list[int] = field(default_factory=list)


def has_event_files(run_dir: str | Path) -> bool:
    return any(Path(run_dir).glob("events.out.tfevents.*"))


def read_scalars(run_dir: str | Path) -> dict[str, Series]:
    """Every scalar series in the event files directly inside ``run_dir``, by tag.

    :raises FileNotFoundError: if ``run_dir`` holds no TensorBoard event file
    :raises ValueError: if one is a symbolic link or not a regular file (``/dev/zero`` would never end)
    """
    if not has_event_files(run_dir):
        raise FileNotFoundError(f"no TensorBoard event file (events.out.tfevents.*) in {run_dir}")
    for path in Path(run_dir).glob("events.out.tfevents.*"):
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"{path}: a symbolic link or not a regular file; refusing to read it")
    accumulator = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def increase_timesteps(counter: Series) -> list[int]:
    """The timesteps at which a running count (such as ``rollback/n_rollbacks``) went up."""
    steps, previous = [], 0.0
    for step, value in counter:
        if value > previous:
            steps.append(step)
        previous = value
    return steps


def read_curves(run_dir: str | Path) -> RunCurves:
    """The plotted series of a run.

    :raises FileNotFoundError: if there is no event file
    :raises ValueError: if the event files hold no ``eval/mean_reward``
    """
    scalars = read_scalars(run_dir)
    if EVAL_TAG not in scalars:
        raise ValueError(f"the event files in {run_dir} hold no {EVAL_TAG} series (no evaluation has run)")
    return RunCurves(
        evaluation=scalars[EVAL_TAG],
        training_return=scalars.get(TRAINING_RETURN_TAG, []),
        best_score=scalars.get(BEST_TAG, []),
        rollback_timesteps=increase_timesteps(scalars.get(ROLLBACKS_TAG, []))
        + [step for step, _ in scalars.get(END_RESTORE_TAG, [])],
        restored_scores=sorted(scalars.get(VERIFY_TAG, []) + scalars.get(END_RESTORE_TAG, [])),
        rebase_timesteps=increase_timesteps(scalars.get(REBASES_TAG, [])),
    )


def draw_curves(curves: RunCurves, output: str | Path, title: str = "") -> Path:
    """Write the learning-curve PNG of ``curves`` to exactly ``output`` (no suffix added), atomically.

    :raises OSError: if it cannot be written (``output`` is then left as it was)
    """
    figure = Figure(figsize=(9, 5), layout="constrained")
    axes = figure.add_subplot()
    if curves.training_return:
        steps, values = zip(*curves.training_return)
        axes.plot(steps, values, color="0.6", linewidth=1, label="training return (last 100 episodes)")
    if curves.best_score:
        steps, values = zip(*curves.best_score)
        axes.step(steps, values, where="post", color="tab:green", linestyle="--", linewidth=1, label="best score")
    steps, values = zip(*curves.evaluation)
    axes.plot(steps, values, color="tab:blue", marker="o", markersize=3, label="evaluation score")
    evaluation = dict(curves.evaluation)
    for index, step in enumerate(curves.rollback_timesteps):
        axes.axvline(step, color="tab:red", linestyle=":", linewidth=1.2, label="rollback" if index == 0 else None)
        if step in evaluation:
            axes.plot(step, evaluation[step], color="tab:red", marker="x", markersize=9, markeredgewidth=2)
    if curves.restored_scores:
        steps, values = zip(*curves.restored_scores)
        axes.plot(steps, values, linestyle="none", marker="o", markersize=6, markerfacecolor="none",
                  color="tab:red", label="restored weights, re-evaluated")
    for index, step in enumerate(curves.rebase_timesteps):
        axes.axvline(step, color="tab:orange", linestyle="-.", linewidth=1,
                     label="new reference (no rollback)" if index == 0 else None)
    axes.set_xlabel("training timesteps")
    axes.set_ylabel("episode return")
    axes.set_title(title or "learning curve")
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    output = Path(output)
    with atomic_write(output) as file:
        figure.savefig(file, format="png", dpi=110)
    return output


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw the learning curve of the run in ``run_dir`` to ``output`` (default: ``run_dir/learning_curve.png``;
    a folder: ``learning_curve.png`` in it) and return the path written.

    :raises FileNotFoundError: if there is no event file
    :raises ValueError: if the event files hold no evaluation, or one is refused
    :raises OSError: if the PNG cannot be written
    """
    run_dir = Path(run_dir)
    if output is None:
        output = run_dir / PLOT_FILENAME  # replaced if it is a link: never followed
    elif Path(output).is_dir():
        output = Path(output) / PLOT_FILENAME
    curves = read_curves(run_dir)
    return draw_curves(curves, output, title=run_dir.resolve().name)
