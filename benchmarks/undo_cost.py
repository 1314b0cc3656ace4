"""What an exact undo of DQN gradient steps costs: time per gradient step and bytes per undoable step.

Compares, on the RL Zoo's CartPole-v1 DQN (MlpPolicy, net_arch [256, 256], batch 64, Adam lr 2.3e-3),
every variant against a baseline gradient step without any logging, timed in the same run:

- ``undo_log``: the chosen design, ``rollback_rl.core.undo.UndoLog`` (a full copy every
  ``anchor_interval`` operations, the minibatch and learning rate of every step, replay on undo);
- ``full_copy``: a plain copy of the whole training state after every operation;
- ``xor_zlib``: the state XORed against the previous one, compressed with zlib (level 1);
- ``xor_shuffle_zlib``: the same with the XOR's bytes regrouped by significance first (as Blosc does),
  which helps zlib on floats.

Target syncs are interleaved as in the Zoo schedule (train_freq 256 with 128 gradient steps and a sync
every 10 env steps: about one sync per 5 gradient steps) and count as operations in every variant.
Short rounds alternate between variants in random order; each round's time is divided by the baseline
round of the same cycle, and the table gives the median of these paired ratios with a 95% bootstrap
interval. Times are the CPU time of the training thread (with one torch thread it does all the work),
so waiting for a core on a shared machine does not count; wall times are in the JSON. Because the
paired ratio of a 1% effect is noisy on a shared machine, the undo log's own bookkeeping is also timed
alone (``apply`` of an operation that does nothing, anchors included).

Then ``RollbackDQN.train()`` (undo log and non-finite guard) is timed against SB3's ``DQN.train()``
the same way, and ``undo(n)`` is timed for a few n.

Run: ``.venv/bin/python benchmarks/undo_cost.py`` (about six minutes on 2 cores; ``--rounds 4`` for a
quick look); writes ``benchmarks/out/undo_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import zlib
from collections import deque
from pathlib import Path

import gymnasium
import numpy as np
import stable_baselines3
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.logger import Logger

from rollback_rl.agents import RollbackDQN
from rollback_rl.hyperparams import ZOO_DQN
from rollback_rl.core.undo import UndoLog
from rollback_rl.sb3_state import sb3_training_state
from rollback_rl.experiments.common import provenance

ZOO_CARTPOLE = {k: v for k, v in ZOO_DQN["CartPole-v1"].items() if k not in ("n_timesteps", "policy")}
BATCH = ZOO_CARTPOLE["batch_size"]
SYNC_EVERY = 5  # gradient steps per target sync, as in the Zoo schedule (128 steps, ~25 syncs per round)


def make_model(cls: type[DQN], seed: int, **kwargs) -> DQN:
    model = cls("MlpPolicy", "CartPole-v1", seed=seed, **{**ZOO_CARTPOLE, **kwargs})
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def fill_replay_buffer(seed: int, env_steps: int) -> DQN:
    """A model whose replay buffer holds ``env_steps`` transitions of its (untrained) policy."""
    model = make_model(DQN, seed, learning_starts=10**9)
    model.learn(env_steps)
    return model


def live_tensors(model: DQN) -> list[torch.Tensor]:
    """Every tensor of the training state: Q-network, target network, Adam's moments and step counts."""
    optimizer_state = model.policy.optimizer.state.values()
    return [*(t.detach() for t in model.policy.state_dict(keep_vars=True).values()),
            *(v for entries in optimizer_state for v in entries.values() if isinstance(v, torch.Tensor))]


# -- the rejected alternatives ------------------------------------------------------------------------

class FullCopyPerStep:
    """Copy the whole training state after every operation into a ring of preallocated buffers.

    The ring is allocated (and its pages touched) up front, so the timing is the steady state: one
    ``memcpy`` of the state per operation. Its bytes per step do not depend on how many slots it has.
    """

    def __init__(self, model: DQN, slots: int) -> None:
        self.live = live_tensors(model)
        self.slots = [[t.clone() for t in self.live] for _ in range(slots)]
        self.next = 0

    def record(self) -> None:
        torch._foreach_copy_(self.slots[self.next], self.live)
        self.next = (self.next + 1) % len(self.slots)

    @property
    def bytes_per_operation(self) -> float:
        return float(sum(t.numel() * t.element_size() for t in self.live))


class XorZlibLog:
    """XOR each tensor's bits against the previous state and compress that; undo XORs back."""

    def __init__(self, model: DQN, depth: int, shuffle: bool) -> None:
        self.live = live_tensors(model)
        self.previous = [t.clone() for t in self.live]
        self.records: deque[list[bytes]] = deque(maxlen=depth)
        self.shuffle = shuffle

    @staticmethod
    def _bits(tensor: torch.Tensor) -> np.ndarray:
        return tensor.reshape(-1).numpy().view(np.uint8).reshape(-1, tensor.element_size())

    def record(self) -> None:
        blobs = []
        for live, previous in zip(self.live, self.previous):
            delta = np.bitwise_xor(self._bits(live), self._bits(previous))
            if self.shuffle:
                delta = delta.T  # byte planes: the sign and exponent bytes of a small change are mostly zero
            blobs.append(zlib.compress(np.ascontiguousarray(delta).tobytes(), 1))
            previous.copy_(live)
        self.records.append(blobs)

    def undo(self, n: int) -> None:
        for _ in range(n):
            for blob, previous in zip(self.records.pop(), self.previous):
                width = previous.element_size()
                delta = np.frombuffer(zlib.decompress(blob), dtype=np.uint8)
                bits = self._bits(previous)
                bits ^= delta.reshape(width, -1).T if self.shuffle else delta.reshape(-1, width)
        torch._foreach_copy_(self.live, self.previous)

    @property
    def bytes_per_operation(self) -> float:
        return float(np.mean([sum(len(b) for b in blobs) for blobs in self.records]))


# -- timing -------------------------------------------------------------------------------------------

class Clock:
    """CPU time of this thread and wall time spent inside a ``with`` block, in seconds."""

    def __enter__(self) -> Clock:
        self._cpu, self._wall = time.thread_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu, self.wall = time.thread_time() - self._cpu, time.perf_counter() - self._wall


def run_operations(model: RollbackDQN, steps: int, log: UndoLog | None, after_each=None) -> Clock:
    """Run ``steps`` gradient steps (with a target sync after every SYNC_EVERY-th), timed."""
    learning_rate = model.lr_schedule(1.0)
    batches = [model.replay_buffer.sample(BATCH) for _ in range(steps)]  # sampled outside the timing
    with Clock() as clock:
        for index, batch in enumerate(batches):
            if log is None:
                model._gradient_step(batch, learning_rate)
            else:
                log.apply(model._gradient_step, batch, learning_rate)
            if after_each is not None:
                after_each()
            if index % SYNC_EVERY == SYNC_EVERY - 1:
                if log is None:
                    model._sync_target(1.0)
                else:
                    log.apply(model._sync_target, 1.0, gradient_step=False)
                if after_each is not None:
                    after_each()
    return clock


def median_interval(values: np.ndarray, rng: np.random.Generator, resamples: int = 2_000) -> list[float]:
    """95% percentile-bootstrap interval of the median."""
    medians = np.median(rng.choice(values, size=(resamples, len(values))), axis=1)
    return [float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))]


def timing_summary(clocks: dict[str, list[Clock]], baseline: str, steps: int, rng: np.random.Generator) -> dict:
    """Per variant: microseconds per gradient step, and its paired ratio to the baseline round."""
    summary = {}
    for name, rounds in clocks.items():
        row = {}
        for kind in ("cpu", "wall"):
            times = np.array([getattr(c, kind) for c in rounds]) / steps
            ratios = times / (np.array([getattr(c, kind) for c in clocks[baseline]]) / steps)
            row[kind] = {"us_per_gradient_step_median": float(np.median(times) * 1e6),
                         "ratio_median": float(np.median(ratios)),
                         "ratio_median_95ci": median_interval(ratios, rng),
                         "us_per_gradient_step_per_round": [float(t * 1e6) for t in times]}
        summary[name] = row
    return summary


def bookkeeping_seconds(model: RollbackDQN, depth: int, anchor_interval: int, operations: int) -> float:
    """The undo log's own cost per operation: ``apply`` of a no-op with the real minibatch and state."""
    log = UndoLog(sb3_training_state(model), max_depth=depth, max_bytes=2**40, anchor_interval=anchor_interval)
    batches = [model.replay_buffer.sample(BATCH) for _ in range(operations)]

    def nothing(batch, learning_rate):
        return None

    for batch in batches[:depth + 2 * anchor_interval]:  # reach the steady state: anchors recycled
        log.apply(nothing, batch, 1e-3)
    with Clock() as clock:
        for batch in batches:
            log.apply(nothing, batch, 1e-3)
    return clock.cpu / operations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="alternating timing rounds per variant")
    parser.add_argument("--steps", type=int, default=64, help="gradient steps per round")
    parser.add_argument("--depth", type=int, default=1_000, help="undo depth (gradient steps) of every variant")
    parser.add_argument("--anchor-interval", type=int, default=100, help="undo log: operations per full copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "undo_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)

    source = fill_replay_buffer(args.seed, 5_000)
    variants = ["baseline", "undo_log", "full_copy", "xor_zlib", "xor_shuffle_zlib"]
    models: dict[str, RollbackDQN] = {}
    for name in variants:
        models[name] = make_model(RollbackDQN, args.seed, undo_depth=0)
        models[name].replay_buffer = source.replay_buffer
        run_operations(models[name], 20, None)  # Adam's state exists, caches are warm
    param_bytes = sum(p.numel() * p.element_size() for p in models["baseline"].q_net.parameters())
    state_bytes = sum(t.numel() * t.element_size() for t in live_tensors(models["baseline"]))

    # Each variant records its own model; rounds alternate between them in random order.
    undo_log = UndoLog(sb3_training_state(models["undo_log"]), max_depth=args.depth,
                       max_bytes=2**40, anchor_interval=args.anchor_interval)
    full_copy = FullCopyPerStep(models["full_copy"], min(args.depth, 64))  # depth slots would take GBs
    xor = XorZlibLog(models["xor_zlib"], args.depth, shuffle=False)
    xor_shuffle = XorZlibLog(models["xor_shuffle_zlib"], args.depth, shuffle=True)
    record_after_each = {"full_copy": full_copy.record, "xor_zlib": xor.record, "xor_shuffle_zlib": xor_shuffle.record}
    clocks: dict[str, list[Clock]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in rng.permutation(variants):
            log = undo_log if name == "undo_log" else None
            clocks[name].append(run_operations(models[name], args.steps, log, record_after_each.get(name)))

    # The XOR log must be lossless to count: undo a few steps and compare with a copy taken before them.
    reference = [t.clone() for t in live_tensors(models["xor_shuffle_zlib"])]
    run_operations(models["xor_shuffle_zlib"], 3, None, xor_shuffle.record)
    xor_shuffle.undo(3)
    assert all(torch.equal(a, b) for a, b in zip(live_tensors(models["xor_shuffle_zlib"]), reference))

    # The per-operation variants store one record per gradient step and per target sync.
    operations_per_step = 1 + 1 / SYNC_EVERY
    bytes_per_step = {"baseline": 0.0, "undo_log": undo_log.bytes_per_step,
                      **{name: log.bytes_per_operation * operations_per_step
                         for name, log in (("full_copy", full_copy), ("xor_zlib", xor),
                                           ("xor_shuffle_zlib", xor_shuffle))}}
    results = timing_summary(clocks, "baseline", args.steps, rng)
    for name in variants:
        results[name]["bytes_per_gradient_step"] = bytes_per_step[name]
        results[name]["bytes_ratio_vs_q_net_parameters"] = bytes_per_step[name] / param_bytes
    undo_log_layout = {"anchors": undo_log.n_anchors, "anchor_bytes": state_bytes, "nbytes": undo_log.nbytes,
                       "depth": undo_log.depth, "operations": len(undo_log)}
    bookkeeping = bookkeeping_seconds(models["baseline"], args.depth, args.anchor_interval, 5 * args.depth)

    # undo(n): restore the anchor at or before the target, replay the operations after it.
    undo_seconds: dict[int, list[float]] = {}
    for n in (1, 10, 100, args.depth):
        undo_seconds[n] = []
        for _ in range(3):
            refill = max(n - undo_log.depth, 0) + int(rng.integers(0, args.anchor_interval))
            run_operations(models["undo_log"], refill, undo_log)
            with Clock() as clock:
                undo_log.undo(n)
            undo_seconds[n].append(clock.cpu)
    anchor = undo_log._segments[-1].anchor
    with Clock() as clock:
        for _ in range(20):
            anchor.restore_last_good(undo_log.state)
    restore_seconds = clock.cpu / 20

    # End to end: RollbackDQN.train() (undo log + non-finite guard) against SB3's DQN.train().
    agents = {"DQN": make_model(DQN, args.seed), "RollbackDQN": make_model(RollbackDQN, args.seed),
              "RollbackDQN(undo_depth=0)": make_model(RollbackDQN, args.seed, undo_depth=0)}
    for agent in agents.values():
        agent.replay_buffer = source.replay_buffer
        agent.train(20, BATCH)
    train_clocks: dict[str, list[Clock]] = {name: [] for name in agents}
    for _ in range(2 * args.rounds):  # twice as many: this is the figure users pay
        for name in rng.permutation(list(agents)):
            with Clock() as clock:
                agents[name].train(args.steps, BATCH)
            train_clocks[name].append(clock)
    train_results = timing_summary(train_clocks, "DQN", args.steps, rng)
    guard = agents["RollbackDQN"]
    with Clock() as clock:
        for _ in range(1_000):
            guard._weights_finite()
    weight_check_seconds = clock.cpu / 1_000

    baseline_us = results["baseline"]["cpu"]["us_per_gradient_step_median"]
    print(f"torch {torch.__version__}, SB3 {stable_baselines3.__version__}, gymnasium {gymnasium.__version__}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    print(f"Q-network parameters: {param_bytes} bytes; training state (Q, target, Adam): {state_bytes} bytes")
    print(f"{args.rounds} rounds x {args.steps} gradient steps, a target sync every {SYNC_EVERY}; depth {args.depth}; "
          "CPU time of the training thread\n")
    print(f"{'variant':<18}{'us/step':>9}{'time ratio':>12}{'95% CI':>16}{'bytes/step':>12}{'x Q params':>12}")
    for name, row in results.items():
        low, high = row["cpu"]["ratio_median_95ci"]
        print(f"{name:<18}{row['cpu']['us_per_gradient_step_median']:>9.0f}{row['cpu']['ratio_median']:>12.3f}"
              f"{f'{low:.3f}-{high:.3f}':>16}{row['bytes_per_gradient_step']:>12.0f}"
              f"{row['bytes_ratio_vs_q_net_parameters']:>12.3f}")
    print(f"\nundo log bookkeeping alone: {bookkeeping * 1e6:.1f} us per operation, "
          f"{bookkeeping * operations_per_step / (baseline_us * 1e-6):.2%} of a baseline gradient step")
    print(f"undo log after the rounds: {undo_log_layout}, an anchor every {args.anchor_interval} operations")
    for n, seconds in undo_seconds.items():
        print(f"undo({n}): median {np.median(seconds) * 1e3:.1f} ms, max {np.max(seconds) * 1e3:.1f} ms")
    print(f"restore of one anchor alone: {restore_seconds * 1e6:.0f} us\n")
    print(f"{'train() of':<28}{'us/step':>9}{'ratio vs DQN':>14}{'95% CI':>16}")
    for name, row in train_results.items():
        low, high = row["cpu"]["ratio_median_95ci"]
        print(f"{name:<28}{row['cpu']['us_per_gradient_step_median']:>9.0f}{row['cpu']['ratio_median']:>14.3f}"
              f"{f'{low:.3f}-{high:.3f}':>16}")
    dqn_us = train_results["DQN"]["cpu"]["us_per_gradient_step_median"]
    print(f"non-finite guard's weight check alone: {weight_check_seconds * 1e6:.1f} us per gradient step, "
          f"{weight_check_seconds / (dqn_us * 1e-6):.2%} of a DQN.train() step")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "stable_baselines3": stable_baselines3.__version__, "gymnasium": gymnasium.__version__,
                    "python": platform.python_version(), "processor": platform.processor() or platform.machine(),
                    "load_average_at_end": os.getloadavg()},
        "config": {**vars(args), "out": str(args.out), "sync_every_gradient_steps": SYNC_EVERY,
                   "hyperparameters": ZOO_CARTPOLE},
        "q_net_parameter_bytes": param_bytes,
        "training_state_bytes": state_bytes,
        "variants": results,
        "undo_log_bookkeeping_cpu_seconds_per_operation": bookkeeping,
        "undo_log_after_rounds": undo_log_layout,
        "undo_cpu_seconds": {str(n): seconds for n, seconds in undo_seconds.items()},
        "restore_one_anchor_cpu_seconds": restore_seconds,
        "train_call": train_results,
        "weight_check_cpu_seconds_per_gradient_step": weight_check_seconds,
        "provenance": provenance(vars(args)),
    }, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
