"""A learning-rate schedule multiplied by a constant: what the learning-rate remedies install.

A plain callable (no SB3 import), so a model file can store it as data (``persistence/safe_model.py``
writes ``{"__schedule__": "ScaledSchedule", "factor": ..., "inner": ...}``) and a resumed run keeps a
learning rate cooled after a rollback.
"""

from __future__ import annotations

from collections.abc import Callable


class ScaledSchedule:
    """``schedule`` (progress remaining, 1 -> 0, to a learning rate) multiplied by ``factor``.

    :param schedule: the original schedule
    :param factor: multiplier applied to every value
    """

    def __init__(self, schedule: Callable[[float], float], factor: float) -> None:
        self.schedule = schedule
        self.factor = factor

    def __call__(self, progress_remaining: float) -> float:
        return self.factor * self.schedule(progress_remaining)

    def __repr__(self) -> str:
        return f"ScaledSchedule({self.schedule!r}, factor={self.factor!r})"
