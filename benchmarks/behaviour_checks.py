"""Two behaviours of the rollback decision, checked on full-size training runs rather than the test suite's
tiny ones: RL Zoo DQN on CartPole-v1, ``RollbackCallback`` with its defaults.

1. **A catastrophic collapse is repaired at the next evaluation, however many restores came before.**
   Right before every ``--fault-every``-th scheduled evaluation from ``--faults-from`` on, the policy is
   forced to one action (the Q-network's last layer answers "push left" whatever it sees: about 9 steps
   on CartPole-v1). The fault runs in the same step as the evaluation, before it, so no gradient step
   can repair it first. For each fault: the restores made before it, whether that evaluation restored a
   snapshot, and the restored weights' fresh check.
2. **No rollback before anything is learned**, in each of the three modes (own evaluation env, child of
   SB3's ``EvalCallback``, online from the training episodes): an agent that does not learn
   (``learning_starts`` beyond the run, so its weights stay at their random initialisation) and an agent
   in its first ``--early-steps`` of ordinary Zoo training. The count of rollbacks must be 0.

    .venv/bin/python benchmarks/behaviour_checks.py            # about 10 CPU minutes

Writes ``benchmarks/results/behaviour_checks.json`` (with provenance) and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback, CallbackList, EvalCallback
from stable_baselines3.common.env_util import make_vec_env

from rollback_rl.callbacks import RollbackCallback
from rollback_rl.evaluation import EVAL_SEED_OFFSET
from rollback_rl.experiments.common import provenance, write_json
from rollback_rl.hyperparams import ZOO_DQN

TASK = "CartPole-v1"
OUT = Path(__file__).parent / "results" / "behaviour_checks.json"


class ForceOneAction(BaseCallback):
    """Right before the evaluations at ``timesteps``, make the greedy policy always choose action 0."""

    def __init__(self, timesteps: set[int]) -> None:
        super().__init__()
        self.timesteps = timesteps
        self.done: list[int] = []

    def _on_step(self) -> bool:
        if self.num_timesteps in self.timesteps:
            last = self.model.policy.q_net.q_net[-1]
            with torch.no_grad():
                last.weight.zero_()
                last.bias.copy_(torch.tensor([1.0, 0.0]))
            self.done.append(self.num_timesteps)
        return True


def zoo_dqn(seed: int, **overrides: Any) -> DQN:
    settings = {k: v for k, v in ZOO_DQN[TASK].items() if k != "n_timesteps"}
    settings.update(overrides)
    return DQN(env=TASK, seed=seed, **settings)


def repeated_faults(seed: int, steps: int, eval_freq: int, faults_from: int, fault_every: int) -> dict[str, Any]:
    """Check 1 on one seed."""
    model = zoo_dqn(seed)
    fault_times = set(range(faults_from, steps + 1, fault_every * eval_freq))
    fault = ForceOneAction(fault_times)
    rollback = RollbackCallback(TASK, eval_freq=eval_freq, n_eval_episodes=5)
    model.learn(steps, callback=CallbackList([fault, rollback]))
    by_timestep = {event.timestep: event for event in rollback.rollbacks}
    faults = []
    for timestep in sorted(fault.done):
        event = by_timestep.get(timestep)
        score = next(s.mean for s in rollback.scores if s.timestep == timestep)
        faults.append({"timestep": timestep, "faulted_score": score,
                       "restores_before": sum(1 for e in rollback.rollbacks if e.timestep < timestep),
                       "repaired_at_this_evaluation": event is not None,
                       "restored_timestep": event.restored_timestep if event else None,
                       "restored_check": event.verified_score if event else None})
    return {"seed": seed, "faults": faults, "rollbacks": len(rollback.rollbacks),
            "scores": [[s.timestep, s.mean] for s in rollback.scores]}


def rollbacks_before_learning(seed: int, mode: str, learning: bool, steps: int, eval_freq: int) -> dict[str, Any]:
    """Check 2 on one seed and mode: the rollbacks of an agent that has learned (almost) nothing."""
    model = zoo_dqn(seed, **({} if learning else {"learning_starts": steps + 1}))
    with tempfile.TemporaryDirectory() as logs:
        if mode == "eval_env":
            rollback = RollbackCallback(TASK, eval_freq=eval_freq, n_eval_episodes=5)
            callback: BaseCallback = rollback
        elif mode == "eval_callback_child":
            rollback = RollbackCallback()
            callback = EvalCallback(make_vec_env(TASK, seed=EVAL_SEED_OFFSET + seed), eval_freq=eval_freq,
                                    n_eval_episodes=5, log_path=logs, callback_after_eval=rollback, verbose=0)
        else:
            rollback = RollbackCallback(eval_freq=eval_freq)
            callback = rollback
        model.learn(steps, callback=callback)
    return {"seed": seed, "mode": mode, "learning": learning, "rollbacks": len(rollback.rollbacks),
            "scores": [[s.timestep, s.mean] for s in rollback.scores]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1", help="seeds of check 1 (comma-separated)")
    parser.add_argument("--steps", type=int, default=30_000, help="training steps of check 1")
    parser.add_argument("--eval-freq", type=int, default=2_500)
    parser.add_argument("--faults-from", type=int, default=10_000)
    parser.add_argument("--fault-every", type=int, default=2, help="a fault every N-th evaluation")
    parser.add_argument("--early-seeds", default="0,1,2", help="seeds of check 2 (comma-separated)")
    parser.add_argument("--early-steps", type=int, default=10_000, help="training steps of check 2")
    parser.add_argument("--early-eval-freq", type=int, default=1_000)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(1)

    faults = [repeated_faults(int(seed), args.steps, args.eval_freq, args.faults_from, args.fault_every)
              for seed in args.seeds.split(",")]
    early = [rollbacks_before_learning(int(seed), mode, learning, args.early_steps, args.early_eval_freq)
             for seed in args.early_seeds.split(",")
             for mode in ("eval_env", "eval_callback_child", "online") for learning in (False, True)]
    injected = [f for run in faults for f in run["faults"]]
    summary = {
        "faults_injected": len(injected),
        "faults_repaired_at_the_next_evaluation": sum(f["repaired_at_this_evaluation"] for f in injected),
        "most_restores_before_a_repaired_fault": max((f["restores_before"] for f in injected
                                                      if f["repaired_at_this_evaluation"]), default=None),
        "rollbacks_before_learning": {f"{mode}, {'early training' if learning else 'no learning'}":
                                      sum(r["rollbacks"] for r in early if r["mode"] == mode
                                          and r["learning"] == learning)
                                      for mode in ("eval_env", "eval_callback_child", "online")
                                      for learning in (False, True)},
    }
    write_json(args.out, {"summary": summary, "repeated_faults": faults, "before_learning": early,
                          "provenance": provenance(vars(args))})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
