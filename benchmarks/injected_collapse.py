"""One injected collapse, logged: RL Zoo DQN on CartPole-v1, weights scrambled at a known timestep.

The agent trains with RollbackCallback (evaluation every 2,500 steps, 5 greedy episodes). At
``--scramble-at`` every policy weight is negated and shaken (a fault no training step would make), and
the log shows when the collapse was detected, which snapshot came back, and the scores before and after.
The default 7,430 falls just after a train() call (DQN trains every 256 steps here), so the next
evaluation, at 7,500, sees the scrambled weights before any gradient step could repair them.

    .venv/bin/python benchmarks/injected_collapse.py --seed 0 --scramble-at 7430 --steps 10000

Writes benchmarks/out/injected_collapse.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback, CallbackList

from rollback_rl.callbacks import RollbackCallback
from rollback_rl.experiments.common import provenance
from rollback_rl.hyperparams import ZOO_DQN


class ScrambleWeights(BaseCallback):
    """At ``timestep``, negate every policy weight and add noise: an injected collapse."""

    def __init__(self, timestep: int) -> None:
        super().__init__()
        self.timestep = timestep
        self.scrambled_at: int | None = None

    def _on_step(self) -> bool:
        if self.scrambled_at is None and self.num_timesteps >= self.timestep:
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for parameter in self.model.policy.parameters():
                    parameter.mul_(-1).add_(0.01 * torch.randn(parameter.shape, generator=generator))
            self.scrambled_at = self.num_timesteps
            print(f"[fault] weights scrambled at timestep {self.num_timesteps}")
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scramble-at", type=int, default=7_430)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "injected_collapse.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = {k: v for k, v in ZOO_DQN["CartPole-v1"].items() if k != "n_timesteps"}
    model = DQN(env="CartPole-v1", seed=args.seed, **settings)
    fault = ScrambleWeights(args.scramble_at)
    rollback = RollbackCallback("CartPole-v1", eval_freq=2_500, n_eval_episodes=5, verbose=2)
    model.learn(args.steps, callback=CallbackList([fault, rollback]))
    result = {
        "seed": args.seed, "scrambled_at": fault.scrambled_at,
        "scores": [{"timestep": s.timestep, "mean": s.mean} for s in rollback.scores],
        "rollbacks": [vars(e) for e in rollback.rollbacks], "rebases": rollback.rebases,
        "provenance": provenance(vars(args)),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["rollbacks"], indent=1))


if __name__ == "__main__":
    main()
