"""Is RollbackCallback's wall-time overhead measurable here? Identical-work A/B runs with a negative control.

Alternates (A B B A blocks) short CartPole-v1 DQN runs (RL Zoo settings, one seed) with SB3's
EvalCallback (A) and with RollbackCallback whose detector never fires (B). Both follow the very same
training trajectory (checked: the final weights' hash), so ``model.train()`` (the gradient steps) does
bitwise the same work in A and B: its time ratio B/A is a negative control that shows the machine's
noise. The time outside ``train()`` and evaluation ("other": env steps, action selection, callbacks) is
where RollbackCallback's bookkeeping would show.

    .venv/bin/python benchmarks/overhead_ab.py      # 4 blocks of 10,000-step runs, about 6 minutes

Writes benchmarks/out/overhead_ab.json. RollbackDQN against SB3's DQN, in CPU time with turns at every
``train()`` call: ``benchmarks/cpu_overhead.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rollback_rl.experiments.common import provenance
from snapshot_cost import one_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4, help="A B B A blocks")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "overhead_ab.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for _ in range(args.blocks):
        for arm in ("eval_callback", "rollback_never", "rollback_never", "eval_callback"):
            run = one_run(arm, args.seed, args.steps, eval_freq=2_500)
            runs.append({**run, "other_s": run["train_s"] - run["gradient_s"]})
            print(f"  {arm:14s} wall {runs[-1]['wall_s']:6.2f} s  train() {runs[-1]['gradient_s']:6.2f} s  "
                  f"other {runs[-1]['other_s']:5.2f} s  eval {runs[-1]['eval_s']:4.2f} s", flush=True)

    def ratio(key: str) -> float:
        return sum(r[key] for r in runs if r["arm"] == "rollback_never") / sum(
            r[key] for r in runs if r["arm"] == "eval_callback")

    train_times = [r["gradient_s"] for r in runs]
    result = {"steps": args.steps, "seed": args.seed, "blocks": args.blocks, "runs": runs,
              "same_final_weights": len({r["final_weights"] for r in runs}) == 1,
              "ratio_train_identical_work": ratio("gradient_s"), "ratio_other": ratio("other_s"),
              "ratio_outside_evaluation": ratio("train_s"),
              "train_s_range_identical_work": [min(train_times), max(train_times)],
              "provenance": provenance(vars(args))}
    print(f"rollback_never / EvalCallback: train() (identical work, the control) {result['ratio_train_identical_work']:.3f}, "
          f"other {result['ratio_other']:.3f}, all outside evaluation {result['ratio_outside_evaluation']:.3f}; "
          f"train() per run ranged {min(train_times):.1f}-{max(train_times):.1f} s; same final weights: "
          f"{result['same_final_weights']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
