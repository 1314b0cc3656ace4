"""Stable-Baselines3 agents with rollback built in."""

from rollback_rl.agents.rollback_dqn import RollbackDQN

__all__ = ["RollbackDQN"]
