"""What a rollback costs: snapshot/restore time and bytes, and the wall-time overhead of RollbackCallback.

Part 1 times ``SnapshotRing.take`` and ``restore`` on the RL Zoo CartPole-v1 DQN (MlpPolicy,
net_arch [256, 256], Adam state populated), next to one plain ``Tensor.copy_`` of the same number of
bytes. Part 2 runs CartPole-v1 DQN with the RL Zoo settings twice per seed, once with SB3's
EvalCallback and once with RollbackCallback on the same evaluation schedule (every 2,500 steps,
5 episodes), and reports the wall-time ratio of the time spent outside evaluation (evaluation time
and steps are reported separately: a rollback's check of the restored weights adds evaluations).
A third arm, ``rollback_never``, is RollbackCallback with a detector that never fires: it follows the
very same training trajectory as the EvalCallback run (checked: the final weights are compared), so
its ratio is the pure cost of the bookkeeping (snapshots, scores), free of the noise of runs that
diverge after a rollback. A fourth, ``rollback_dqn_never``, does the same with RollbackDQN (the undo
log of every gradient step and the non-finite guard: what ``rollback-rl train`` runs), again on the
same trajectory.

    .venv/bin/python benchmarks/snapshot_cost.py            # both parts (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/snapshot_cost.py --quick    # part 1 only

Writes benchmarks/out/snapshot_cost.json. Wall time, runs one after another: for RollbackDQN's cost
against DQN and the snapshot/copy ratios in CPU time, interleaved, see ``benchmarks/cpu_overhead.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import gymnasium
import stable_baselines3
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.monitor import Monitor

from rollback_rl.agents import RollbackDQN
from rollback_rl.callbacks import RollbackCallback, sb3_training_state
from rollback_rl.core.detectors import CollapseDetector
from rollback_rl.core.snapshots import SnapshotRing
from rollback_rl.experiments.common import provenance

ZOO_CARTPOLE = dict(learning_rate=2.3e-3, batch_size=64, buffer_size=100_000, learning_starts=1_000, gamma=0.99,
                    target_update_interval=10, train_freq=256, gradient_steps=128, exploration_fraction=0.16,
                    exploration_final_eps=0.04, policy_kwargs=dict(net_arch=[256, 256]))


def median_microseconds(function, repeats: int) -> float:
    for _ in range(20):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        function()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1_000


def snapshot_costs(repeats: int) -> dict:
    model = DQN("MlpPolicy", "CartPole-v1", seed=0, **{**ZOO_CARTPOLE, "learning_starts": 100})
    model.learn(400)  # one train() call: Adam's moments exist
    state = sb3_training_state(model)
    results = {}
    for check_finite in (True, False):
        ring = SnapshotRing(capacity=3, check_finite=check_finite)
        ring.take(state, 0, 0.0)
        take_us = median_microseconds(lambda: ring.take(state, 0, 0.0), repeats)
        restore_us = median_microseconds(lambda: ring.restore_last_good(state), repeats)
        results["checked" if check_finite else "unchecked"] = {"take_us": take_us, "restore_us": restore_us}
    snapshot_bytes = ring.last_good.nbytes
    source = torch.empty(snapshot_bytes // 4, dtype=torch.float32).normal_()
    destination = torch.empty_like(source)
    plain_us = median_microseconds(lambda: destination.copy_(source), repeats)
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.policy.q_net.parameters())
    return {
        "snapshot_bytes": snapshot_bytes,
        "q_network_parameter_bytes": parameter_bytes,
        "tensors_per_snapshot": len(ring.last_good.tensors),
        "plain_copy_us": plain_us,
        **{f"{kind}_{key}": value for kind, values in results.items() for key, value in values.items()},
        "take_over_plain_copy": results["checked"]["take_us"] / plain_us,
        "restore_over_plain_copy": results["checked"]["restore_us"] / plain_us,
        "unchecked_take_over_plain_copy": results["unchecked"]["take_us"] / plain_us,
    }


class TimedEvalCallback(EvalCallback):
    """SB3's EvalCallback, also counting the wall time and environment steps it spends evaluating."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_seconds = 0.0

    def _on_step(self) -> bool:
        start = time.perf_counter()
        evaluating = self.eval_freq > 0 and self.n_calls % self.eval_freq == 0
        result = super()._on_step()
        if evaluating:
            self.eval_seconds += time.perf_counter() - start
        return result


class NeverCollapses(CollapseDetector):
    """A detector that never fires: RollbackCallback then takes snapshots and keeps scores, nothing else."""

    def is_bad(self, reference, current, floor) -> bool:
        return False


ARMS = ("eval_callback", "rollback", "rollback_never", "rollback_dqn_never")
NEVER_ARMS = ("rollback_never", "rollback_dqn_never")


def weights_digest(model: DQN) -> str:
    import hashlib
    digest = hashlib.sha256()
    for value in model.policy.state_dict().values():
        digest.update(value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def time_gradient_steps(model: DQN) -> dict[str, float]:
    """Wrap ``model.train`` (the gradient steps) so that its wall time adds up in the returned dict."""
    timed = {"seconds": 0.0}
    train = model.train

    def timed_train(*args, **kwargs):
        start = time.perf_counter()
        result = train(*args, **kwargs)
        timed["seconds"] += time.perf_counter() - start
        return result

    model.train = timed_train
    return timed


def one_run(arm: str, seed: int, steps: int, eval_freq: int) -> dict:
    """One timed run. ``train_s``: wall time outside evaluation; ``gradient_s``: the part in ``model.train()``."""
    algorithm = RollbackDQN if arm == "rollback_dqn_never" else DQN
    model = algorithm("MlpPolicy", "CartPole-v1", seed=seed, **ZOO_CARTPOLE)
    gradient = time_gradient_steps(model)
    eval_env = Monitor(gymnasium.make("CartPole-v1"))
    if arm == "eval_callback":
        callback = TimedEvalCallback(eval_env, eval_freq=eval_freq, n_eval_episodes=5, verbose=0)
    else:
        detector = NeverCollapses() if arm in NEVER_ARMS else None
        callback = RollbackCallback(eval_env, eval_freq=eval_freq, n_eval_episodes=5, check_at_end=False,
                                    detector=detector)
    start = time.perf_counter()
    model.learn(steps, callback=callback)
    wall = time.perf_counter() - start
    result = {"arm": arm, "seed": seed, "wall_s": wall, "eval_s": callback.eval_seconds,
              "train_s": wall - callback.eval_seconds, "gradient_s": gradient["seconds"],
              "final_weights": weights_digest(model)}
    if arm != "eval_callback":
        result.update(rollbacks=len(callback.rollbacks), eval_timesteps=callback.eval_timesteps)
    return result


def wall_time_overhead(seeds: list[int], steps: int, eval_freq: int) -> dict:
    runs = []
    for seed in seeds:  # interleave the arms so that machine load affects all alike; alternate the order
        for arm in (ARMS if seed % 2 == 0 else ARMS[::-1]):
            runs.append(one_run(arm, seed, steps, eval_freq))
            print(f"  {arm:14s} seed {seed}: wall {runs[-1]['wall_s']:.1f} s, of which evaluating "
                  f"{runs[-1]['eval_s']:.1f} s", flush=True)
    runs.sort(key=lambda r: (r["seed"], ARMS.index(r["arm"])))
    base = [r for r in runs if r["arm"] == "eval_callback"]
    ours = [r for r in runs if r["arm"] == "rollback"]
    train_ratio = sum(r["train_s"] for r in ours) / sum(r["train_s"] for r in base)
    result = {"runs": runs, "steps": steps, "eval_freq": eval_freq,
              "train_time_ratio_rollback_over_eval_callback": train_ratio,
              "wall_time_ratio_rollback_over_eval_callback": sum(r["wall_s"] for r in ours) / sum(r["wall_s"] for r in base),
              "eval_seconds": {arm: sum(r["eval_s"] for r in runs if r["arm"] == arm) for arm in ARMS}}
    for arm in NEVER_ARMS:
        never = [r for r in runs if r["arm"] == arm]
        result[f"train_time_ratio_{arm}_over_eval_callback"] = sum(r["train_s"] for r in never) / sum(
            r["train_s"] for r in base)
        result[f"per_seed_train_time_ratio_{arm}"] = [n["train_s"] / b["train_s"] for n, b in zip(never, base)]
        result[f"{arm}_same_final_weights_as_eval_callback"] = all(
            n["final_weights"] == b["final_weights"] for n, b in zip(never, base))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only time snapshots and restores")
    parser.add_argument("--repeats", type=int, default=2000, help="timed repetitions per operation")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm for the wall-time ratio")
    parser.add_argument("--steps", type=int, default=50_000, help="training timesteps per run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "snapshot_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    report = {"machine": {"cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "stable_baselines3": stable_baselines3.__version__, "gymnasium": gymnasium.__version__},
              "provenance": provenance(vars(args))}
    report["snapshot"] = costs = snapshot_costs(args.repeats)
    print(f"snapshot of the RL Zoo CartPole DQN ({costs['tensors_per_snapshot']} tensors, "
          f"{costs['snapshot_bytes'] / 1e6:.2f} MB; Q-network parameters {costs['q_network_parameter_bytes'] / 1e6:.2f} MB)")
    print(f"  plain copy of the same bytes: {costs['plain_copy_us']:8.1f} us")
    print(f"  take (finite check):          {costs['checked_take_us']:8.1f} us  "
          f"= {costs['take_over_plain_copy']:.2f}x plain copy (target <= 3x)")
    print(f"  take (no finite check):       {costs['unchecked_take_us']:8.1f} us  "
          f"= {costs['unchecked_take_over_plain_copy']:.2f}x")
    print(f"  restore:                      {costs['checked_restore_us']:8.1f} us  "
          f"= {costs['restore_over_plain_copy']:.2f}x")
    if not args.quick:
        print(f"wall time, CartPole-v1 DQN (RL Zoo), {args.steps} steps, {args.seeds} seeds per arm:")
        report["wall_time"] = wall = wall_time_overhead(list(range(args.seeds)), args.steps, eval_freq=2_500)
        print(f"  training time (outside evaluation) ratio rollback / EvalCallback: "
              f"{wall['train_time_ratio_rollback_over_eval_callback']:.3f} (target <= 1.02)")
        print(f"  whole wall time ratio: {wall['wall_time_ratio_rollback_over_eval_callback']:.3f}; evaluation "
              f"seconds: EvalCallback {wall['eval_seconds']['eval_callback']:.1f}, rollback {wall['eval_seconds']['rollback']:.1f}")
        for arm in NEVER_ARMS:
            print(f"  {arm} (same trajectory, detector that never fires): training time ratio "
                  f"{wall[f'train_time_ratio_{arm}_over_eval_callback']:.4f} (per seed "
                  + ", ".join(f"{r:.4f}" for r in wall[f'per_seed_train_time_ratio_{arm}'])
                  + f"); same final weights as EvalCallback: {wall[f'{arm}_same_final_weights_as_eval_callback']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
