"""rollback-rl: online reinforcement learning that notices a collapse and goes back to its last good weights.

The core modules (``snapshots``, ``detectors``, ``undo``) do not import Stable-Baselines3;
``callbacks`` and ``agents`` hold the SB3 glue, ``envs`` the non-stationary environments.
"""

__version__ = "0.4.0"
