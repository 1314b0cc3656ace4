"""The TensorBoard tags rollback-rl writes, each named once here, and a custom-scalars layout that shows
the evaluation score, the best score and the rollbacks on one chart.

TensorBoard draws each tag on its own chart by default, so a rollback (``rollback/n_rollbacks`` going
up) and the collapse that caused it (``eval/mean_reward`` falling) sit on different charts. The layout
written here adds a "rollback" section to TensorBoard's *Custom Scalars* tab whose first chart holds
all four series; runs of both arms (with and without rollback) appear on the same charts.

Tags are grouped by what they describe, as SB3 does (``eval/``, ``rollout/``, ``train/``): ``rollback/``
what the rollback machinery saw and did, ``buffer/`` the replay buffer's contents
(``ReplayBufferDiagnostics``), ``eval_task/`` and ``bank/`` the per-task scores and restores of the
forgetting experiment. Every ``logger.record`` of the package names its tag with a constant from here.
"""

from __future__ import annotations

from stable_baselines3.common.logger import Logger, TensorBoardOutputFormat

# SB3's own tags, read by the plot and the layout.
EVAL_TAG = "eval/mean_reward"  # the mean return of one evaluation (RollbackCallback writes it like EvalCallback)
TRAINING_RETURN_TAG = "rollout/ep_rew_mean"  # SB3's mean over the last 100 training episodes

# RollbackCallback: its scores, its decisions, their cost.
SCORE_TAG = "rollback/score"  # the score the rollback decision was fed
BEST_TAG = "rollback/best_score"
REFERENCE_TAG = "rollback/reference_score"  # the score a collapse is measured from
REFERENCE_TIMESTEP_TAG = "rollback/reference_timestep"
BASELINE_TAG = "rollback/baseline_score"
ROLLBACKS_TAG = "rollback/n_rollbacks"  # rollbacks during training
REBASES_TAG = "rollback/n_rebases"  # collapses after which the reference was lowered instead
VERIFY_TAG = "rollback/verify_score"  # the restored weights, evaluated right after a rollback
RETIRED_TAG = "rollback/retired_score"
END_RESTORE_TAG = "rollback/end_restore_score"  # a set-aside snapshot put back at the end, its fresh score
EVENT_TAG = "rollback/event"  # one line of text per rollback or rebase
EVAL_TIMESTEPS_TAG = "rollback/eval_timesteps"  # env steps spent evaluating
SNAPSHOT_BYTES_TAG = "rollback/snapshot_bytes"
NONFINITE_SNAPSHOT_REFUSED_TAG = "rollback/nonfinite_snapshot_refused"

# Non-finite values: from the env (NonFiniteGuard) and in training (RollbackDQN).
NONFINITE_OBSERVATIONS_TAG = "rollback/nonfinite_observations"
NONFINITE_REWARDS_TAG = "rollback/nonfinite_rewards"
NONFINITE_STEPS_TAG = "rollback/nonfinite_steps"
NONFINITE_ROLLBACKS_TAG = "rollback/nonfinite_rollbacks"

# What the callbacks run after a rollback changed (callbacks.schedules, callbacks.recovery).
LEARNING_RATE_TAG = "rollback/learning_rate"
OPTIMIZER_RESET_TAG = "rollback/optimizer_reset_tensors"
TRANSITIONS_DROPPED_TAG = "rollback/transitions_dropped"
TARGET_UPDATE_INTERVAL_TAG = "rollback/target_update_interval"

# The replay buffer (ReplayBufferDiagnostics).
BUFFER_FAILURE_SHARE_TAG = "buffer/failure_share"
BUFFER_TRANSITIONS_TAG = "buffer/transitions"
BUFFER_SAMPLED_FAILURE_SHARE_TAG = "buffer/sampled_failure_share"
BUFFER_MEAN_SAMPLE_AGE_TAG = "buffer/mean_sample_age"

# Per-task scores and the task snapshot bank (the forgetting experiment).
BANK_RESTORES_TAG = "bank/n_restores"


def task_score_tag(task: str) -> str:
    """The tag of ``ReplayBufferDiagnostics``' score on ``task`` (``eval_task/<task>``)."""
    return f"eval_task/{task}"


def bank_score_tag(task: str) -> str:
    """The tag of ``TaskSnapshotBank``'s score on ``task`` (``bank/score_<task>``)."""
    return f"bank/score_{task}"


CATEGORY = "rollback"
MAIN_CHART = "evaluation score, best score and rollbacks"


def _exactly(tag: str) -> str:
    return f"^{tag}$"  # chart tags are regular expressions


def rollback_layout() -> dict[str, dict[str, list]]:
    """The layout, in ``SummaryWriter.add_custom_scalars`` form: {category: {chart title: [kind, tags]}}."""
    return {
        CATEGORY: {
            MAIN_CHART: ["Multiline", [_exactly(t) for t in (EVAL_TAG, BEST_TAG, REFERENCE_TAG, ROLLBACKS_TAG)]],
            "rollbacks and rebases": ["Multiline", [_exactly(ROLLBACKS_TAG), _exactly(REBASES_TAG)]],
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
