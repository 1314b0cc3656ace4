"""Print the results table of docs/results.md from a compare report (benchmarks/results/report.json).

The report itself comes from the per-run records (``rollback-rl compare --report-only``); this script
only picks the columns docs/results.md shows, so that table can be checked against the records:

    rollback-rl compare --report-only --tasks CartPole-v1,Acrobot-v1,MountainCar-v0,LunarLander-v3 \\
        --arms vanilla,best_model,rollback_v02,rollback_unlimited,rollback_lr_half
    .venv/bin/python benchmarks/readme_table.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HEADER = ("task", "arm", "seeds", "final return IQM [95% CI]", "collapsed at end", "online return IQM [95% CI]",
          "eval AUC (in place)", "time excl. eval vs vanilla", "rollbacks/run")


def interval(value: dict | None, digits: int = 1, percent: bool = False) -> str:
    if value is None:
        return "-"
    scale, suffix = (100.0, "%") if percent else (1.0, "")
    estimate, low, high = (value[k] * scale for k in ("estimate", "low", "high"))
    return f"{estimate:.{digits}f}{suffix} [{low:.{digits}f}{suffix}, {high:.{digits}f}{suffix}]"


def table(report: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in report["rows"]:
        if row["online_return_iqm"] is None:  # the "all tasks" rows: normalised finals only
            continue
        rate = row["collapse_rate"]
        area = row["eval_curve_area_iqm"]["estimate"]
        in_place = (row.get("in_place_eval_curve_area_iqm") or row["eval_curve_area_iqm"])["estimate"]
        overhead = row["overhead_vs_vanilla_excluding_eval"]
        lines.append("| " + " | ".join([
            row["task"], row["arm"], str(row["runs"]), interval(row["final_return_iqm"]),
            f"{row['collapses']}/{row['runs']} [{rate['low'] * 100:.0f}%, {rate['high'] * 100:.0f}%]",
            interval(row["online_return_iqm"]), f"{area:.2f} ({in_place:.2f})",
            "-" if overhead is None else f"{overhead:.2f}x", f"{row['rollbacks_per_run']:.1f}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", nargs="?", default=str(Path(__file__).parent / "results" / "report.json"))
    print(table(json.loads(Path(parser.parse_args().report).read_text())))


if __name__ == "__main__":
    main()
