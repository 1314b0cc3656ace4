"""Does memory stay flat over a long run with rollback? Resident memory sampled over a million steps.

Trains ``rollback-rl train CartPole-v1`` (RollbackDQN with RollbackCallback, the RL Zoo's CartPole
settings: replay buffer of 100,000 transitions, 128 gradient steps every 256 env steps) through the
CLI's own code path, durable checkpoints and logs included, and samples the process's resident memory
(``VmRSS`` from ``/proc/self/status``; psutil elsewhere) every ``--sample-every`` timesteps. Once the
replay buffer is full, nothing should grow but the per-episode records (a few bytes per episode):
memory is called flat when the median of the last quarter of the samples taken after the buffer
filled exceeds the median of the first quarter by less than ``--tolerance-mib``. The least-squares
slope over that window (MiB per 100,000 steps) is reported too.

Evaluations run every 10,000 steps (5 episodes) instead of the CLI's 2,500, which only makes the run
faster: evaluation allocates nothing that lasts.

Run: ``.venv/bin/python benchmarks/memory_long_run.py`` (1,000,000 steps at the Zoo's 128 gradient
steps per 256 env steps: about 45 minutes on one core); ``--set gradient_steps=32`` (what
``benchmarks/results/memory_long_run.json`` holds: 15 minutes) trains less per step but allocates the
same things; ``--steps 30000`` for a smoke run. Writes ``benchmarks/out/memory_long_run.json``
and prints a table of the samples.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback

from rollback_rl import cli
from rollback_rl.experiments.common import provenance, write_json
from rollback_rl.hyperparams import to_jsonable
from rollback_rl.training import DEFAULT_CHECKPOINT_FREQ, build_model, open_session, run_training

OUT = Path(__file__).resolve().parent / "out" / "memory_long_run.json"


def resident_mib() -> float:
    """Resident set size of this process, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024  # reported in kB
    except OSError:
        pass
    import psutil  # not a dependency: only where /proc is missing

    return psutil.Process().memory_info().rss / 2**20


class SampleMemory(BaseCallback):
    """Record (timestep, resident MiB, replay buffer full?) every ``every`` timesteps."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every
        self.samples: list[dict] = []
        self._next = 0
        self._started = time.perf_counter()

    def _on_step(self) -> bool:
        if self.num_timesteps >= self._next:
            self._next += self.every
            buffer = getattr(self.model, "replay_buffer", None)
            self.samples.append({"timestep": int(self.num_timesteps), "rss_mib": round(resident_mib(), 2),
                                 "buffer_full": bool(buffer is not None and buffer.full),
                                 "seconds": round(time.perf_counter() - self._started, 1)})
            if self.verbose:
                sample = self.samples[-1]
                print(f"{sample['timestep']:>9,}  {sample['rss_mib']:8.1f} MiB  buffer full: "
                      f"{sample['buffer_full']!s:5}  {sample['seconds']:7.0f} s", flush=True)
        return True


def flatness(samples: list[dict], tolerance_mib: float) -> dict:
    """Growth of resident memory after the replay buffer filled."""
    after = [s for s in samples if s["buffer_full"]]
    if len(after) < 8:
        return {"verdict": "too short: fewer than 8 samples after the replay buffer filled", "flat": None}
    quarter = len(after) // 4
    first = statistics.median(s["rss_mib"] for s in after[:quarter])
    last = statistics.median(s["rss_mib"] for s in after[-quarter:])
    steps = np.array([s["timestep"] for s in after], dtype=float)
    rss = np.array([s["rss_mib"] for s in after])
    slope = float(np.polyfit(steps, rss, 1)[0] * 100_000)
    growth = last - first
    flat = bool(growth < tolerance_mib)
    return {
        "buffer_full_at": after[0]["timestep"],
        "rss_at_buffer_full_mib": after[0]["rss_mib"],
        "first_quarter_median_mib": first,
        "last_quarter_median_mib": last,
        "growth_mib": round(growth, 2),
        "max_after_full_mib": float(rss.max()),
        "slope_mib_per_100k_steps": round(slope, 3),
        "tolerance_mib": tolerance_mib,
        "flat": flat,
        "verdict": f"{'flat' if flat else 'GROWING'}: {growth:+.1f} MiB from the first to the last quarter after the "
                   f"buffer filled ({slope:+.2f} MiB per 100k steps)",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000, help="training timesteps (default: 1,000,000)")
    parser.add_argument("--sample-every", type=int, default=10_000, help="timesteps between samples (default: 10,000)")
    parser.add_argument("--eval-freq", type=int, default=10_000, help="timesteps between evaluations (default: 10,000)")
    parser.add_argument("--checkpoint-freq", type=int, default=DEFAULT_CHECKPOINT_FREQ,
                        help=f"timesteps between checkpoints (default: {DEFAULT_CHECKPOINT_FREQ:,})")
    parser.add_argument("--buffer-size", type=int, default=None, help="replay buffer size (default: the Zoo's 100,000)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one hyperparameter, as in 'rollback-rl train --set' (repeatable), e.g. "
                             "--set gradient_steps=32 for a shorter run: memory does not grow with gradient steps")
    parser.add_argument("--tolerance-mib", type=float, default=20.0, help="growth still called flat (default: 20 MiB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-run", metavar="DIR", help="write the run folder here and keep it (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"JSON output (default: {OUT})")
    options = parser.parse_args()
    torch.set_num_threads(1)

    logdir = Path(options.keep_run) if options.keep_run else Path(tempfile.mkdtemp(prefix="rollback-rl-memory-"))
    argv = ["train", "CartPole-v1", "--steps", str(options.steps), "--eval-freq", str(options.eval_freq),
            "--eval-episodes", "5", "--checkpoint-freq", str(options.checkpoint_freq), "--seed", str(options.seed),
            "--logdir", str(logdir), "--run-name", f"memory-{options.steps}", "--no-progress"]
    if options.buffer_size is not None:
        argv += ["--set", f"buffer_size={options.buffer_size}"]
    for pair in options.overrides:
        argv += ["--set", pair]
    args = cli.build_parser().parse_args(argv)
    args.argv = argv
    plan = cli.plan_training(args)  # the command line's own checks and defaults
    model, eval_env = build_model(plan.env_id, plan.algorithm, plan.hyperparameters, plan.seed, args.device)
    sampler = SampleMemory(options.sample_every)
    sampler.verbose = 1
    print(f"{'timestep':>9}  {'resident':>12}  replay buffer")
    started = time.perf_counter()
    with open_session(plan, model, eval_env) as session:
        finished = run_training(session, extra_callbacks=[sampler])
    code = cli.EXIT_INTERRUPTED if finished.interrupted else 0
    wall = time.perf_counter() - started
    sampler.samples.append({"timestep": int(model.num_timesteps), "rss_mib": round(resident_mib(), 2),
                            "buffer_full": bool(model.replay_buffer.full), "seconds": round(wall, 1)})

    result = {
        "benchmark": "memory_long_run",
        "steps": options.steps,
        "overrides": options.overrides,
        "exit_status": code,
        "settings": {"env": plan.env_id, "algorithm": plan.algorithm.__name__, "eval_freq": plan.eval_freq,
                     "eval_episodes": plan.eval_episodes, "checkpoint_freq": plan.checkpoint_freq,
                     "sample_every": options.sample_every, "seed": options.seed,
                     "hyperparameters": json.loads(json.dumps(to_jsonable(plan.hyperparameters), default=str))},
        "wall_time_s": round(wall, 1),
        "steps_per_s": round(options.steps / wall, 1),
        "memory": flatness(sampler.samples, options.tolerance_mib),
        "samples": sampler.samples,
        "provenance": provenance({**vars(options), "command": argv}),
    }
    write_json(options.out, result, indent=2)
    print(result["memory"]["verdict"])
    print(f"{options.steps:,} steps in {wall:.0f} s ({result['steps_per_s']:.0f} steps/s); wrote {options.out}")
    if not options.keep_run:
        shutil.rmtree(logdir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
