"""The SB3-free core: snapshot ring, undo log, collapse detectors, statistics and the rollback decision.

Imports torch and numpy, never Stable-Baselines3, so it can be read and tested alone.
"""
