"""Does RollbackDQN cost what SB3's DQN costs, and a snapshot what a copy costs? CPU time on identical work.

Training: SB3's ``DQN`` (A) and ``RollbackDQN`` with its default undo log and non-finite guard (B),
same seed, RL Zoo CartPole-v1 settings (``rollback_rl.hyperparams``), learn side by side in one process
and take turns at every ``train()`` call, in the order A B B A A B B A ... (with the control C:
A B C C B A ...). A turn is one rollout (``train_freq`` env steps) and its gradient steps, timed in
process CPU time; each model keeps its own global random state between turns, so each follows the very
trajectory it would follow alone, and the final weights are asserted bitwise equal. The control C is
a second SB3 DQN: its ratio to A is what this machine's noise alone gives (1.00 on a quiet machine).
Turn i of every arm is the same work, so the per-turn ratios B/A give the spread.

Snapshots: ``SnapshotRing.take`` (with its non-finite check, as RollbackCallback's rings do; and
without, as the undo log's anchors) and ``restore`` of the same DQN's training state (Q-network,
target network, Adam's moments), interleaved with one plain ``Tensor.copy_`` of as many bytes, all in
process CPU time; the ratio to the plain copy in each round, median and quartiles over the rounds.

    .venv/bin/python benchmarks/cpu_overhead.py     # 6 minutes of CPU; 6 to 13 minutes on 2 shared cores

Writes benchmarks/results/cpu_overhead.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3 import DQN

from rollback_rl.agents import RollbackDQN
from rollback_rl.core.snapshots import SnapshotRing
from rollback_rl.experiments.common import provenance, write_json
from rollback_rl.hyperparams import ZOO_DQN
from rollback_rl.sb3_state import sb3_training_state

ENV_ID = "CartPole-v1"
ZOO_SETTINGS = {k: v for k, v in ZOO_DQN[ENV_ID].items() if k not in ("n_timesteps", "policy")}
ARMS = {"dqn": DQN, "rollback_dqn": RollbackDQN, "dqn_control": DQN}


def weights_digest(model: DQN) -> str:
    digest = hashlib.sha256()
    for value in model.policy.state_dict().values():
        digest.update(value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def quantiles(values: list[float]) -> dict[str, float]:
    q10, q25, q50, q75, q90 = np.percentile(values, [10, 25, 50, 75, 90])
    return {"median": q50, "q25": q25, "q75": q75, "q10": q10, "q90": q90, "n": len(values)}


# -- training: models taking turns ---------------------------------------------------------------


class Turns:
    """Lets threads run one at a time in a repeating order; a turn ends when its thread calls ``end``."""

    def __init__(self, order: list[str]) -> None:
        self.order = order
        self.position = 0
        self.finished: set[str] = set()
        self.failure: BaseException | None = None
        self.condition = threading.Condition()

    def _current(self) -> str:
        return self.order[self.position % len(self.order)]

    def wait(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.failure is not None or self._current() == name)
            if self.failure is not None:
                raise RuntimeError("another arm failed")

    def end(self, name: str, finished: bool = False, failure: BaseException | None = None) -> None:
        with self.condition:
            self.failure = self.failure or failure
            if finished:
                self.finished.add(name)
            if len(self.finished) < len(set(self.order)):
                self.position += 1
                while self._current() in self.finished:
                    self.position += 1
            self.condition.notify_all()


class RandomState:
    """The global random generators SB3 draws from (numpy for minibatches and exploration)."""

    def __init__(self) -> None:
        self.save()

    def save(self) -> None:
        self.numpy, self.torch, self.python = np.random.get_state(), torch.get_rng_state(), random.getstate()

    def load(self) -> None:
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch)
        random.setstate(self.python)


def run_arm(name: str, model: DQN, randomness: RandomState, steps: int, turns: Turns, cpu_seconds: list[float]) -> None:
    """``model.learn(steps)``, handing the turn on after every ``train()``; CPU seconds of each turn appended."""
    train = model.train
    start = 0.0

    def begin_turn() -> None:
        nonlocal start
        turns.wait(name)
        randomness.load()
        start = time.process_time()

    def finish_turn(finished: bool = False) -> None:
        cpu_seconds.append(time.process_time() - start)
        randomness.save()
        turns.end(name, finished=finished)

    def train_then_hand_on(*args: Any, **kwargs: Any) -> None:
        train(*args, **kwargs)
        finish_turn()
        begin_turn()

    model.train = train_then_hand_on  # type: ignore[method-assign]
    try:
        begin_turn()
        model.learn(steps)
        finish_turn(finished=True)
    except BaseException as error:  # noqa: BLE001 - wake the other threads, then report it in the main thread
        turns.end(name, finished=True, failure=error)
        raise


def lockstep_training(seed: int, steps: int, arms: list[str]) -> dict[str, Any]:
    models, randomness = {}, {}
    for arm in arms:
        models[arm] = ARMS[arm]("MlpPolicy", ENV_ID, seed=seed, **ZOO_SETTINGS)
        randomness[arm] = RandomState()  # right after the seeding in the constructor: as if run alone
    order = arms + arms[::-1]  # A B B A, or A B C C B A
    turns = Turns(order)
    cpu_seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    errors: list[BaseException] = []

    def thread_body(arm: str) -> None:
        try:
            run_arm(arm, models[arm], randomness[arm], steps, turns, cpu_seconds[arm])
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=thread_body, args=(arm,), name=arm) for arm in arms]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    digests = {arm: weights_digest(model) for arm, model in models.items()}
    turn_counts = {len(seconds) for seconds in cpu_seconds.values()}
    assert len(set(digests.values())) == 1, f"seed {seed}: the arms did not do identical work: {digests}"
    assert len(turn_counts) == 1, f"seed {seed}: the arms took different numbers of turns"
    return {"seed": seed, "final_weights": digests[arms[0]], "cpu_seconds": cpu_seconds}


def training_overhead(seeds: list[int], steps: int, arms: list[str]) -> dict[str, Any]:
    runs = []
    for seed in seeds:
        runs.append(lockstep_training(seed, steps, arms))
        totals = {arm: sum(seconds) for arm, seconds in runs[-1]["cpu_seconds"].items()}
        print(f"  seed {seed}: CPU seconds " + ", ".join(f"{arm} {total:.1f}" for arm, total in totals.items())
              + f"; final weights identical ({runs[-1]['final_weights']})", flush=True)
    result: dict[str, Any] = {"runs": runs}
    baseline = arms[0]
    for arm in arms[1:]:
        per_turn = [ours / theirs for run in runs
                    for ours, theirs in zip(run["cpu_seconds"][arm], run["cpu_seconds"][baseline])]
        result[f"{arm}_over_{baseline}"] = {
            "total_cpu_ratio": sum(sum(r["cpu_seconds"][arm]) for r in runs) / sum(sum(r["cpu_seconds"][baseline]) for r in runs),
            "per_seed_cpu_ratio": [sum(r["cpu_seconds"][arm]) / sum(r["cpu_seconds"][baseline]) for r in runs],
            "per_turn_cpu_ratio": quantiles(per_turn),
        }
    return result


# -- snapshots -------------------------------------------------------------------------------------


def interleaved_cpu_microseconds(operations: dict[str, Callable[[], Any]], rounds: int,
                                 calls_per_round: int) -> dict[str, list[float]]:
    """CPU microseconds per call of each operation, one value per round; the order flips every round."""
    names = list(operations)
    for name in names:  # warm up: buffers allocated, layouts built
        for _ in range(20):
            operations[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            operation = operations[name]
            start = time.process_time_ns()
            for _ in range(calls_per_round):
                operation()
            times[name].append((time.process_time_ns() - start) / calls_per_round / 1_000)
    return times


def snapshot_costs(rounds: int, calls_per_round: int) -> dict[str, Any]:
    model = DQN("MlpPolicy", ENV_ID, seed=0, **{**ZOO_SETTINGS, "learning_starts": 100})
    model.learn(400)  # one train() call: Adam's moments exist
    state = sb3_training_state(model)
    checked, unchecked = SnapshotRing(capacity=3), SnapshotRing(capacity=3, check_finite=False)
    snapshot = checked.take(state, 0, 0.0)
    source = torch.empty(snapshot.nbytes // 4, dtype=torch.float32).normal_()
    destination = torch.empty_like(source)
    times = interleaved_cpu_microseconds({
        "plain_copy": lambda: destination.copy_(source),
        "take": lambda: checked.take(state, 0, 0.0),
        "take_unchecked": lambda: unchecked.take(state, 0, 0.0),
        "restore": lambda: checked.restore_last_good(state),
    }, rounds, calls_per_round)
    result: dict[str, Any] = {
        "snapshot_bytes": snapshot.nbytes,
        "tensors_per_snapshot": len(snapshot.tensors),
        "cpu_microseconds": {name: quantiles(values) for name, values in times.items()},
    }
    for name in ("take", "take_unchecked", "restore"):
        result[f"{name}_over_plain_copy"] = quantiles([ours / plain for ours, plain in zip(times[name], times["plain_copy"])])
    return result


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one lockstep run per seed")
    parser.add_argument("--steps", type=int, default=15_000, help="training timesteps per run")
    parser.add_argument("--no-control", action="store_true", help="leave out the DQN-vs-DQN control arm")
    parser.add_argument("--rounds", type=int, default=1_000, help="interleaved rounds of the snapshot timing")
    parser.add_argument("--calls-per-round", type=int, default=10, help="calls of each operation per round")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_overhead.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    arms = ["dqn", "rollback_dqn"] + ([] if args.no_control else ["dqn_control"])
    settings = {"env_id": ENV_ID, "hyperparameters": ZOO_SETTINGS, "seeds": args.seeds, "steps": args.steps,
                "arms": arms, "snapshot_rounds": args.rounds, "calls_per_round": args.calls_per_round,
                "torch_threads": 1, "timer": "time.process_time (process CPU time)"}
    record: dict[str, Any] = {"provenance": provenance(settings)}
    record["conditions"] = {"cpu_model": cpu_model(), "load_average_at_start": os.getloadavg()}

    started = time.perf_counter()
    print(f"snapshots: {args.rounds} interleaved rounds of {args.calls_per_round} calls", flush=True)
    record["snapshot"] = snap = snapshot_costs(args.rounds, args.calls_per_round)
    plain = snap["cpu_microseconds"]["plain_copy"]["median"]
    print(f"  {snap['tensors_per_snapshot']} tensors, {snap['snapshot_bytes'] / 1e6:.2f} MB; plain copy {plain:.1f} us")
    for name in ("take", "take_unchecked", "restore"):
        ratio = snap[f"{name}_over_plain_copy"]
        print(f"  {name:15s} {snap['cpu_microseconds'][name]['median']:7.1f} us = {ratio['median']:.2f}x plain copy "
              f"(quartiles {ratio['q25']:.2f}-{ratio['q75']:.2f}; target <= 3x)", flush=True)

    print(f"training: {', '.join(arms)} taking turns, {args.steps} steps, seeds {args.seeds}", flush=True)
    record["training"] = training = training_overhead(args.seeds, args.steps, arms)
    for arm in arms[1:]:
        ratio = training[f"{arm}_over_dqn"]
        turn = ratio["per_turn_cpu_ratio"]
        print(f"  {arm} / dqn CPU time: {ratio['total_cpu_ratio']:.3f} in all (per seed "
              + ", ".join(f"{r:.3f}" for r in ratio["per_seed_cpu_ratio"])
              + f"); per turn median {turn['median']:.3f}, quartiles {turn['q25']:.3f}-{turn['q75']:.3f}", flush=True)
    record["conditions"]["load_average_at_end"] = os.getloadavg()
    record["conditions"]["wall_seconds"] = time.perf_counter() - started
    write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
