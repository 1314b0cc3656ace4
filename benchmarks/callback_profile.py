"""Count directly what RollbackCallback costs outside its evaluations (wall-time ratios cannot resolve it).

Trains the RL Zoo CartPole-v1 DQN for ``--steps`` with RollbackCallback (a detector that never fires,
so nothing but bookkeeping happens) under cProfile and prints the callback's cumulative time, its
evaluations' time, the difference, and that difference as a share of the whole run:

    .venv/bin/python benchmarks/callback_profile.py             # 5,000 steps, about 20 s
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import gymnasium
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.monitor import Monitor

from rollback_rl.callbacks import RollbackCallback
from snapshot_cost import ZOO_CARTPOLE, NeverCollapses


def cumulative(stats: pstats.Stats, function: str) -> tuple[int, float]:
    """(calls, cumulative seconds) of the rollback_rl function named ``function``."""
    for (filename, _, name), (_, calls, _, cumtime, _) in stats.stats.items():
        if name == function and "rollback_rl" in filename and "callbacks" in filename:
            return calls, cumtime
    raise LookupError(function)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = DQN("MlpPolicy", "CartPole-v1", seed=0, **ZOO_CARTPOLE)
    callback = RollbackCallback(Monitor(gymnasium.make("CartPole-v1")), eval_freq=2_500, n_eval_episodes=5,
                                check_at_end=False, detector=NeverCollapses())
    profile = cProfile.Profile()
    profile.enable()
    model.learn(args.steps, callback=callback)
    profile.disable()
    stats = pstats.Stats(profile)
    calls, on_step = cumulative(stats, "_on_step")
    _, evaluating = cumulative(stats, "_scheduled_evaluation")  # the evaluations _on_step runs
    print(f"{args.steps:,} steps in {stats.total_tt:.2f} s (profiled); RollbackCallback._on_step: {calls:,} calls, "
          f"{on_step:.3f} s, of which evaluating {evaluating:.3f} s; outside evaluation {on_step - evaluating:.4f} s "
          f"= {(on_step - evaluating) / stats.total_tt:.3%} of the run")


if __name__ == "__main__":
    main()
