"""Forgetting in online RL: the A -> B -> A task-switching experiment, a task-keyed snapshot bank, and the
stationary replay-buffer analysis on CartPole-v1 (``rollback-rl forgetting``)."""

from rollback_rl.forgetting.bank import BankRestore, TaskSnapshotBank

__all__ = ["BankRestore", "TaskSnapshotBank"]
