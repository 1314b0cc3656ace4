"""Forgetting in online RL (``rollback-rl forgetting``):

- ``experiment``: the A -> B -> A task-switching experiment against replay buffer size and kind, with the
  task-keyed and the label-free snapshot banks (``rollback_rl.callbacks.bank``) as arms;
- ``dose_response``: the recency dose-response on CartPole-v1 (FIFO, reservoir and half-reservoir
  buffers of several sizes);
- ``stationary``: the failure share of the buffer before stationary collapses;
- ``records`` and ``over_seeds``: one JSON record per run (a sweep continues where it stopped) and the
  statistics over seeds that every report uses; ``figures``: the PNGs, drawn from records alone.
"""
