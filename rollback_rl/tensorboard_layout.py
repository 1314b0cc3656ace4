"""A TensorBoard custom-scalars layout that shows the evaluation score, the best score and the rollbacks on one chart.

TensorBoard draws each tag on its own chart by default, so a rollback (``rollback/n_rollbacks`` going
up) and the collapse that caused it (``eval/mean_reward`` falling) sit on different charts. The layout
written here adds a "rollback" section to TensorBoard's *Custom Scalars* tab whose first chart holds
all four series; runs of both arms (with and without rollback) appear on the same charts.
"""

from __future__ import annotations

from stable_baselines3.common.logger import Logger, TensorBoardOutputFormat

EVAL_TAG = "eval/mean_reward"
BEST_TAG = "rollback/best_score"
REFERENCE_TAG = "rollback/reference_score"
ROLLBACKS_TAG = "rollback/n_rollbacks"  # rollbacks during training
END_RESTORE_TAG = "rollback/end_restore_score"  # a set-aside snapshot put back at the end, its fresh score
TRAINING_RETURN_TAG = "rollout/ep_rew_mean"
CATEGORY = "rollback"
MAIN_CHART = "evaluation score, best score and rollbacks"


def _exactly(tag: str) -> str:
    return f"^{tag}$"  # chart tags are regular expressions


def rollback_layout() -> dict[str, dict[str, list]]:
    """The layout, in ``SummaryWriter.add_custom_scalars`` form: {category: {chart title: [kind, tags]}}."""
    return {
        CATEGORY: {
            MAIN_CHART: ["Multiline", [_exactly(t) for t in (EVAL_TAG, BEST_TAG, REFERENCE_TAG, ROLLBACKS_TAG)]],
            "rollbacks and rebases": ["Multiline", [_exactly(ROLLBACKS_TAG), _exactly("rollback/n_rebases")]],
            "training return and evaluation score": ["Multiline", [_exactly(TRAINING_RETURN_TAG), _exactly(EVAL_TAG)]],
        }
    }


def add_rollback_layout(logger: Logger) -> None:
    """Write :func:`rollback_layout` into the events file of ``logger``'s TensorBoard output.

    :raises ValueError: if the logger has no TensorBoard output (configure it with ``"tensorboard"``)
    """
    for output in logger.output_formats:
        if isinstance(output, TensorBoardOutputFormat):
            output.writer.add_custom_scalars(rollback_layout())
            return
    raise ValueError("the logger has no TensorBoard output: configure it with format 'tensorboard'")
