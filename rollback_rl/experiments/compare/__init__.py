"""``rollback-rl compare``: benchmark the arms of docs/protocol.md on tasks and seeds, and report.

- ``arms``: the arms (vanilla SB3 DQN, EvalCallback's best model, rollback-rl defaults, ...) and how
  one training run becomes their per-run records;
- ``backends``: where the runs execute (a local process pool, or Ray);
- ``records``: one JSON file per (task, arm, seed) under ``benchmarks/results/``, written atomically,
  so an interrupted benchmark continues where it stopped;
- ``report``: the statistics, tables and figure computed from the records alone;
- ``command``: the command line (``add_compare_arguments``, ``run_compare``).

Nothing is imported here, so that a worker process loads only what a run needs (``arms``).
"""
