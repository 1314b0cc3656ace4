"""The paired report of the recovery experiment, from its records alone (docs/protocol.md).

    .venv/bin/python benchmarks/recovery_report.py benchmarks/results/recovery_tuning
    .venv/bin/python benchmarks/recovery_report.py benchmarks/results/recovery --references vanilla,best_model,control_cool_on_solve

    .venv/bin/python benchmarks/recovery_report.py benchmarks/results/recovery_other_tasks --task Acrobot-v1 --references vanilla,best_model

Reads every ``<task>/<arm>/seed<k>.json`` under the folder, writes ``paired_report.json`` and
``paired_report.md`` beside them (``paired_report_<task>.{json,md}`` for a task other than CartPole-v1,
so that the reports of several tasks in one folder sit side by side) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rollback_rl.experiments.common import provenance
from rollback_rl.experiments.compare.paired import markdown, paired_report
from rollback_rl.experiments.compare.records import read_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--references", default="vanilla,best_model,control_cool_on_solve,rollback_v02")
    parser.add_argument("--task", default="CartPole-v1")
    args = parser.parse_args()
    folder = args.results / args.task.replace("/", "_")
    records = [read_record(path) for path in sorted(folder.glob("*/seed*.json"))]
    report = paired_report(records, args.references.split(","))
    report["task"] = args.task
    report["records"] = sorted(str(p.relative_to(args.results)) for p in folder.glob("*/seed*.json"))
    report["provenance"] = provenance(vars(args))
    stem = "paired_report" if args.task == "CartPole-v1" else f"paired_report_{folder.name}"
    (args.results / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (args.results / f"{stem}.md").write_text(f"# Paired report: {args.task}, records under {args.results}\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
