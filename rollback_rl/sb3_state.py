"""What Stable-Baselines3 saves of a model's training state: what a snapshot copies and a rollback puts back."""

from __future__ import annotations

from typing import Any

from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.save_util import recursive_getattr


def sb3_training_state(model: BaseAlgorithm) -> dict[str, Any]:
    """What a rollback must put back for an SB3 model: the objects SB3 itself saves.

    Uses ``model._get_torch_save_params()``, so every algorithm is covered the way ``model.save()``
    covers it: the policy (with DQN's target network, SAC/TD3's target critics), every optimizer, and
    extra tensors such as SAC's ``log_ent_coef``.
    """
    state_dicts, tensors = model._get_torch_save_params()
    return {name: recursive_getattr(model, name) for name in [*state_dicts, *tensors]}
