"""Save and load Stable-Baselines3 models without unpickling anything.

SB3's ``model.save()`` writes a ``.zip`` whose ``data`` entry stores every setting that is not plain
JSON (the policy class, the spaces, schedules, ``train_freq``...) with cloudpickle, and ``load()``
unpickles it: a crafted file runs code. Here instead:

- :func:`save_model` writes one safetensors file (see :mod:`rollback_rl.persistence.safe_io`): every tensor of
  the training state (networks, target networks, optimizer state, SAC's ``log_ent_coef``) plus, as
  JSON, the algorithm's settings and counters (``num_timesteps``...), with classes, spaces and
  schedules stored by name or value and rebuilt from an allow-list. :func:`load_model` reads it back
  bitwise: same predictions, same optimizer state.
- :func:`load_sb3_zip_safely` reads an SB3 ``.zip`` without running its pickles: the JSON settings
  are used, the cloudpickled ones are rebuilt from the env and from the readable description SB3
  stores beside each pickle, and the weights are read with ``torch.load(weights_only=True)``.

Only the algorithms in :data:`ALGORITHMS` are built, and only classes from ``torch.nn``,
``torch.optim``, SB3's buffers, feature extractors and the algorithm's own policies are named.

A model file is data from outside: before a model is built from the sizes it holds, they go through
the hyperparameter checker (:func:`rollback_rl.hyperparams.check_saved_settings` and
:func:`~rollback_rl.hyperparams.check_memory_on_spaces`), and files and zip entries are read within the
limits of :mod:`rollback_rl.persistence.limits`. A file over a limit, or with a setting out of range,
raises :class:`~rollback_rl.persistence.safe_io.OutOfRangeError`.

Both writers (:func:`save_model`, :func:`save_sb3_zip`) write a fresh file and rename it over the
target, so a symbolic link planted where the model goes is replaced, never written through.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import math
import os
import re
import warnings
import zipfile
import zlib
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common import buffers, torch_layers
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise
from stable_baselines3.common.save_util import recursive_getattr
from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit
from stable_baselines3.common.utils import ConstantSchedule, FloatSchedule, LinearSchedule, check_for_correct_spaces

from rollback_rl.core.schedules import ScaledSchedule
from rollback_rl.hyperparams import HyperparameterError, check_memory_on_spaces, check_saved_settings
from rollback_rl.persistence.limits import (
    MAX_JSON_BYTES,
    MAX_TENSOR_FILE_BYTES,
    LimitExceeded,
    check_size,
    check_zip_members,
    describe_json_error,
    loads_json,
    one_line,
    quote,
    read_zip_member,
)
from rollback_rl.persistence.safe_io import (
    CorruptFileError,
    OutOfRangeError,
    atomic_write,
    from_json_and_tensors,
    load_tensors,
    load_torch_file,
    numeric_dtype,
    open_regular_file,
    save_tensors,
    to_json_and_tensors,
)
from rollback_rl.sb3_state import sb3_training_state

SUFFIX = ".safetensors"

#: Algorithms that may be built from a file: name -> module that defines it (imported on use).
ALGORITHMS = {
    "A2C": "stable_baselines3",
    "DQN": "stable_baselines3",
    "PPO": "stable_baselines3",
    "SAC": "stable_baselines3",
    "TD3": "stable_baselines3",
    "RollbackDQN": "rollback_rl.agents",
}

# Settings that describe the last rollout, not the model: SB3 drops them too when given a new env.
_RUNTIME_ATTRIBUTES = ("_last_obs", "_last_episode_starts", "_last_original_obs")
_ACTION_NOISES = {cls.__name__: cls for cls in (NormalActionNoise, OrnsteinUhlenbeckActionNoise)}


def algorithm_class(algorithm: str | type[BaseAlgorithm]) -> type[BaseAlgorithm]:
    """The allow-listed algorithm class named ``algorithm`` (or ``algorithm`` itself, if allowed)."""
    name = algorithm if isinstance(algorithm, str) else getattr(algorithm, "__name__", repr(algorithm))
    if name not in ALGORITHMS:
        raise ValueError(f"unsupported algorithm {quote(name, 40)}: expected one of {', '.join(ALGORITHMS)}")
    cls = getattr(importlib.import_module(ALGORITHMS[name]), name)
    if not isinstance(algorithm, str) and algorithm is not cls:
        raise ValueError(f"unsupported algorithm class {algorithm!r}: only {cls.__module__}.{name} is allowed")
    return cls


# -- classes by name, from an allow-list --------------------------------------------------------

def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


@functools.cache
def _allowed_classes(algorithm: type[BaseAlgorithm]) -> dict[str, type]:
    """Classes a settings file may name: the algorithm's policies, torch layers and optimizers, SB3
    buffers and feature extractors; by full name and by public name (``torch.nn.ReLU``)."""
    allowed: dict[str, type] = {}
    for namespace, base in ((torch.nn, torch.nn.Module), (torch.optim, torch.optim.Optimizer),
                            (buffers, buffers.BaseBuffer), (torch_layers, torch.nn.Module)):
        for name in dir(namespace):
            obj = getattr(namespace, name)
            if isinstance(obj, type) and issubclass(obj, base):
                allowed[_qualified_name(obj)] = obj
                allowed[f"{namespace.__name__}.{name}"] = obj
    for policy in algorithm.policy_aliases.values():
        allowed[_qualified_name(policy)] = policy
    return allowed


def _class_from_name(name: str, algorithm: type[BaseAlgorithm]) -> type:
    cls = _allowed_classes(algorithm).get(name)
    if cls is None:
        raise ValueError(f"class {quote(name, 60)} is not on the allow-list (torch.nn, torch.optim, SB3 buffers, "
                         f"feature extractors and {algorithm.__name__} policies)")
    return cls


# -- SB3 settings as plain values ---------------------------------------------------------------

def _space_to_plain(space: spaces.Space) -> dict[str, Any]:
    if isinstance(space, spaces.Box):
        return {"type": "Box", "low": space.low, "high": space.high, "dtype": space.dtype.str}
    if isinstance(space, spaces.Discrete):
        return {"type": "Discrete", "n": int(space.n), "start": int(space.start), "dtype": space.dtype.str}
    if isinstance(space, spaces.MultiDiscrete):
        return {"type": "MultiDiscrete", "nvec": space.nvec, "start": space.start, "dtype": space.dtype.str}
    if isinstance(space, spaces.MultiBinary):
        return {"type": "MultiBinary", "n": space.n if isinstance(space.n, int) else list(space.n)}
    if isinstance(space, spaces.Dict):
        return {"type": "Dict", "spaces": {k: _space_to_plain(s) for k, s in space.spaces.items()}}
    if isinstance(space, spaces.Tuple):
        return {"type": "Tuple", "spaces": [_space_to_plain(s) for s in space.spaces]}
    raise TypeError(f"cannot store a {type(space).__name__} space")


def _space_from_plain(plain: dict[str, Any]) -> spaces.Space:
    kind = plain["type"]
    if kind == "Box":
        return spaces.Box(low=plain["low"], high=plain["high"], dtype=numeric_dtype(plain["dtype"]))
    if kind == "Discrete":
        return spaces.Discrete(plain["n"], start=plain["start"], dtype=numeric_dtype(plain["dtype"]))
    if kind == "MultiDiscrete":
        return spaces.MultiDiscrete(plain["nvec"], start=plain["start"], dtype=numeric_dtype(plain["dtype"]))
    if kind == "MultiBinary":
        return spaces.MultiBinary(plain["n"])
    if kind == "Dict":
        return spaces.Dict({k: _space_from_plain(s) for k, s in plain["spaces"].items()})
    if kind == "Tuple":
        return spaces.Tuple([_space_from_plain(s) for s in plain["spaces"]])
    raise ValueError(f"unknown space type {quote(kind, 40)}")


def _to_plain(value: Any, algorithm: type[BaseAlgorithm]) -> Any:
    """Replace the SB3 and torch objects a model's settings hold by tagged plain values."""
    if isinstance(value, type):
        if issubclass(value, np.generic):
            return {"__numpy_type__": np.dtype(value).str}
        if value in algorithm.policy_aliases.values():
            return {"__policy__": next(k for k, v in algorithm.policy_aliases.items() if v is value)}
        _class_from_name(_qualified_name(value), algorithm)  # refuse now what could not be loaded
        return {"__class__": _qualified_name(value)}
    if isinstance(value, spaces.Space):
        return {"__space__": _space_to_plain(value)}
    if isinstance(value, TrainFreq):  # a NamedTuple: test before tuple
        return {"__train_freq__": [value.frequency, value.unit.value]}
    if isinstance(value, FloatSchedule):
        return {"__schedule__": "FloatSchedule", "inner": _to_plain(value.value_schedule, algorithm)}
    if isinstance(value, ScaledSchedule):  # a learning rate cooled after a rollback
        return {"__schedule__": "ScaledSchedule", "factor": value.factor, "inner": _to_plain(value.schedule, algorithm)}
    if isinstance(value, ConstantSchedule):
        return {"__schedule__": "ConstantSchedule", "val": value.val}
    if isinstance(value, LinearSchedule):
        return {"__schedule__": "LinearSchedule", "start": value.start, "end": value.end,
                "end_fraction": value.end_fraction}
    if isinstance(value, deque):
        return {"__deque__": [_to_plain(v, algorithm) for v in value], "maxlen": value.maxlen}
    if type(value).__name__ in _ACTION_NOISES and type(value) is _ACTION_NOISES[type(value).__name__]:
        return {"__action_noise__": type(value).__name__, "attributes": _to_plain(vars(value), algorithm)}
    if isinstance(value, dict):
        return {k: _to_plain(v, algorithm) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_plain(v, algorithm) for v in value]
    if type(value) is tuple:
        return tuple(_to_plain(v, algorithm) for v in value)
    return value


def _from_plain(value: Any, algorithm: type[BaseAlgorithm]) -> Any:
    """Inverse of :func:`_to_plain`."""
    if isinstance(value, list):
        return [_from_plain(v, algorithm) for v in value]
    if isinstance(value, tuple):
        return tuple(_from_plain(v, algorithm) for v in value)
    if not isinstance(value, dict):
        return value
    if "__numpy_type__" in value:
        return numeric_dtype(value["__numpy_type__"]).type
    if "__policy__" in value:
        if value["__policy__"] not in algorithm.policy_aliases:
            raise ValueError(f"unknown {algorithm.__name__} policy {quote(value['__policy__'], 40)}")
        return algorithm.policy_aliases[value["__policy__"]]
    if "__class__" in value:
        return _class_from_name(value["__class__"], algorithm)
    if "__space__" in value:
        return _space_from_plain(value["__space__"])
    if "__train_freq__" in value:
        frequency, unit = value["__train_freq__"]
        return TrainFreq(int(frequency), TrainFrequencyUnit(unit))
    if "__schedule__" in value:
        kind = value["__schedule__"]
        if kind == "FloatSchedule":
            return FloatSchedule(_from_plain(value["inner"], algorithm))
        if kind == "ScaledSchedule":
            return ScaledSchedule(_from_plain(value["inner"], algorithm), _finite(value["factor"], "schedule factor"))
        if kind == "ConstantSchedule":
            return ConstantSchedule(_finite(value["val"], "schedule value"))
        if kind == "LinearSchedule":
            return LinearSchedule(*(_finite(value[key], f"schedule {key}") for key in ("start", "end", "end_fraction")))
        raise ValueError(f"unknown schedule {quote(kind, 40)}")
    if "__deque__" in value:
        return deque([_from_plain(v, algorithm) for v in value["__deque__"]], maxlen=value["maxlen"])
    if "__action_noise__" in value:
        noise = _ACTION_NOISES[value["__action_noise__"]].__new__(_ACTION_NOISES[value["__action_noise__"]])
        noise.__dict__.update(_from_plain(value["attributes"], algorithm))
        return noise
    return {k: _from_plain(v, algorithm) for k, v in value.items()}


def _finite(value: Any, what: str) -> float:
    """``value`` as a float if it is a finite number: a schedule of NaN or infinity is refused, as the
    hyperparameter checker refuses ``learning_rate: .inf``."""
    number = float(value) if isinstance(value, float) or (isinstance(value, int) and value.bit_length() < 1000) \
        and not isinstance(value, bool) else math.nan
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {quote(value)}")
    return number


def _settings_of(model: BaseAlgorithm) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """The attributes ``model.save()`` would store, as JSON, with the names of those that cannot be."""
    state_dict_names, tensor_names = model._get_torch_save_params()
    excluded = {*model._excluded_save_params(), *state_dict_names, *tensor_names}
    settings, tensors, skipped = {}, {}, []
    for name, value in model.__dict__.items():
        if name in excluded:
            continue
        try:
            encoded, value_tensors = to_json_and_tensors(_to_plain(value, type(model)), f"settings/{name}")
        except (TypeError, ValueError):
            skipped.append(name)
            continue
        settings[name] = encoded
        tensors.update(value_tensors)
    return settings, tensors, skipped


# -- training state ---------------------------------------------------------------------------

def _training_state_to_tensors(model: BaseAlgorithm) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    layout, tensors = {}, {}
    for name, obj in sb3_training_state(model).items():
        if isinstance(obj, torch.nn.Module):
            state_dict = obj.state_dict()
            tensors.update({f"state/{name}/{key}": t for key, t in state_dict.items()})
            layout[name] = {"kind": "module", "keys": list(state_dict)}
        elif isinstance(obj, torch.optim.Optimizer):
            skeleton, optimizer_tensors = to_json_and_tensors(obj.state_dict(), f"state/{name}")
            tensors.update(optimizer_tensors)
            layout[name] = {"kind": "optimizer", "state_dict": skeleton}
        elif isinstance(obj, torch.Tensor):
            tensors[f"state/{name}"] = obj
            layout[name] = {"kind": "tensor"}
        else:
            raise TypeError(f"training state entry {name!r} is a {type(obj).__name__}")
    return layout, tensors


def _copy_training_state_in(model: BaseAlgorithm, layout: dict[str, Any], tensors: dict[str, torch.Tensor],
                            source: str) -> None:
    state = sb3_training_state(model)
    if set(state) != set(layout):
        raise ValueError(f"{source}: the file holds {sorted(layout)} but a {type(model).__name__} "
                         f"has {sorted(state)}")
    for name, obj in state.items():
        entry = layout[name]
        if isinstance(obj, torch.nn.Module):
            obj.load_state_dict({key: tensors[f"state/{name}/{key}"] for key in entry["keys"]}, strict=True)
        elif isinstance(obj, torch.optim.Optimizer):
            obj.load_state_dict(from_json_and_tensors(entry["state_dict"], tensors))
        else:
            with torch.no_grad():
                obj.copy_(tensors[f"state/{name}"])
    if getattr(model, "undo_log", None) is not None:
        model.undo_log.note_external_change()  # RollbackDQN: its undo history no longer applies


# -- rollback-rl's own model files --------------------------------------------------------------

def _env_id(model: BaseAlgorithm) -> str | None:
    try:
        spec = model.get_env().get_attr("spec", 0)[0]
        return spec.id if spec is not None else None
    except (AttributeError, IndexError, TypeError):  # no env, or one without a spec: the id is informational
        return None


def model_file(path: str | os.PathLike) -> Path:
    """``path`` with the ``.safetensors`` suffix that :func:`save_model` adds."""
    path = Path(path)
    return path if path.name.endswith(SUFFIX) else path.with_name(path.name + SUFFIX)


def save_model(model: BaseAlgorithm, path: str | os.PathLike) -> Path:
    """Save ``model`` to ``<path>.safetensors`` (atomically) and return the path written.

    Stores what ``model.save()`` stores, without pickles: the training state's tensors (networks and
    optimizer state) and the settings and counters as JSON. Settings that cannot be stored without
    pickling (a custom callable schedule, say) are left out with a warning; ``load_model`` then uses
    the algorithm's defaults for them. The replay buffer is not included (see
    :func:`rollback_rl.persistence.checkpoints.save_replay_buffer`).
    """
    algorithm = algorithm_class(type(model).__name__)
    if type(model) is not algorithm:
        raise ValueError(f"cannot save a {type(model).__module__}.{type(model).__name__}: only "
                         f"{', '.join(ALGORITHMS)} are supported")
    settings, settings_tensors, skipped = _settings_of(model)
    if skipped:
        warnings.warn(f"save_model: {', '.join(skipped)} cannot be stored without pickling and were left out; "
                      f"loading will use {algorithm.__name__}'s defaults for them", stacklevel=2)
    layout, tensors = _training_state_to_tensors(model)
    metadata = {
        "kind": "sb3_model",
        "algorithm": algorithm.__name__,
        "env_id": _env_id(model),
        "num_timesteps": int(model.num_timesteps),
        "settings": settings,
        "skipped_settings": skipped,
        "training_state": layout,
    }
    path = model_file(path)
    save_tensors(path, {**tensors, **settings_tensors}, metadata)
    return path


def save_sb3_zip(model: BaseAlgorithm, path: str | os.PathLike) -> Path:
    """``model.save(path)``: SB3's own ``.zip`` (for SB3 users; it holds pickles), written to a fresh
    temporary file that is renamed over ``path``, so a symbolic link planted at ``path`` is replaced
    rather than written through. Adds ``.zip`` where ``path`` has no suffix, as SB3 does.

    :return: the path written
    """
    path = Path(path)
    if path.suffix == "":
        path = path.with_name(path.name + ".zip")
    with atomic_write(path) as file:
        model.save(file)
    return path


def read_model_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a model file: ``algorithm``, ``env_id``, ``num_timesteps``, ``settings``..."""
    return _read_model(path)[1]


def _read_model(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.exists() and model_file(path).exists():
        path = model_file(path)
    tensors, metadata = load_tensors(path)
    if not isinstance(metadata, dict) or metadata.get("kind") != "sb3_model":
        kind = metadata.get("kind") if isinstance(metadata, dict) else None
        raise CorruptFileError(f"{path}: not a model file (it holds a {quote(kind, 40)})")
    return tensors, metadata


def _wrap_env(algorithm: type[BaseAlgorithm], env: Any, verbose: int) -> Any:
    if isinstance(env, str):
        env = gym.make(env)
    return algorithm._wrap_env(env, verbose)


def _check_settings(settings: dict[str, Any], observation_space: Any, action_space: Any, source: str) -> None:
    """The hyperparameter checker on a file's settings, and on the memory they size on these spaces
    (the env's, or the file's own); ``OutOfRangeError`` naming the limit."""
    if not isinstance(observation_space, spaces.Space) or not isinstance(action_space, spaces.Space):
        raise CorruptFileError(f"{source}: no observation or action space in the model settings")
    try:
        check_saved_settings(settings, source)
        check_memory_on_spaces(settings, observation_space, action_space, source)
    except HyperparameterError as error:
        raise OutOfRangeError(str(error)) from None


# What SB3 and torch raise when settings do not fit together (asserts included: SB3 checks with them).
_BUILD_ERRORS = (AssertionError, AttributeError, KeyError, OverflowError, RuntimeError, TypeError, ValueError)


def _build(algorithm: type[BaseAlgorithm], settings: dict[str, Any], env: Any, device: torch.device | str,
           source: str) -> BaseAlgorithm:
    """Build a model the way ``BaseAlgorithm.load`` does: bare, settings in, then ``_setup_model``;
    a :class:`~rollback_rl.persistence.safe_io.SafeLoadError` if the settings do not make one."""
    if isinstance(settings.get("policy_kwargs"), dict):
        settings["policy_kwargs"].pop("device", None)
    try:
        model = algorithm(policy=settings["policy_class"], env=env, device=device, _init_setup_model=False)
        model.__dict__.update(settings)
        model._setup_model()
        if callable(settings.get("lr_schedule")):
            # _setup_model rebuilds lr_schedule from learning_rate; keep the stored one (a rate cooled after a rollback)
            model.lr_schedule = settings["lr_schedule"]
    except MemoryError:
        raise OutOfRangeError(f"{source}: building a {algorithm.__name__} from its settings ran out of "
                              "memory") from None
    except _BUILD_ERRORS as error:
        raise CorruptFileError(f"{source}: cannot build a {algorithm.__name__} from its settings "
                               f"({type(error).__name__}: {one_line(str(error), 160)})") from None
    return model


def load_model(path: str | os.PathLike, env: gym.Env | Any | str | None = None,
               device: torch.device | str = "auto") -> BaseAlgorithm:
    """Load a model written by :func:`save_model`; nothing in the file is executed.

    :param path: the file (the ``.safetensors`` suffix may be left out)
    :param env: the env to continue training on (a gym.Env, VecEnv or env id; its spaces must match
        the saved ones); ``None`` is enough to predict
    :param device: where to put the networks
    :return: the model, with bitwise the saved weights, optimizer state, settings and counters
    """
    tensors, metadata = _read_model(path)
    algorithm = algorithm_class(str(metadata.get("algorithm")))
    try:
        settings = _from_plain(from_json_and_tensors(metadata["settings"], tensors), algorithm)
        layout = metadata["training_state"]
        if not isinstance(settings, dict) or not isinstance(layout, dict):
            raise TypeError("the settings or the training state layout is not a mapping")
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise CorruptFileError(f"{path}: unreadable model settings ({type(error).__name__}: "
                               f"{one_line(str(error), 160)})") from None
    _check_settings(settings, settings.get("observation_space"), settings.get("action_space"), str(path))
    if env is not None:
        env = _wrap_env(algorithm, env, settings.get("verbose", 0))
        check_for_correct_spaces(env, settings["observation_space"], settings["action_space"])
        settings.update({name: None for name in _RUNTIME_ATTRIBUTES if name in settings})  # the env is reset
        settings["n_envs"] = env.num_envs
    model = _build(algorithm, settings, env, device, str(path))
    try:
        _copy_training_state_in(model, layout, tensors, str(path))
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        raise CorruptFileError(f"{path}: the weights do not fit the model its settings describe "
                               f"({type(error).__name__}: {one_line(str(error), 160)})") from None
    if model.use_sde:
        model.policy.reset_noise()
    return model


# -- SB3 .zip files, without their pickles ------------------------------------------------------

_FLOAT = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|inf|nan)"
_CLASS_TEXT = re.compile(r"<class '([\w.]+)'>")
_INIT_TEXT = re.compile(r"<function (\w+)\.__init__ at")


def _schedule_from_text(text: str, depth: int = 1) -> Any:
    """Rebuild an SB3 schedule from its repr (``FloatSchedule(ConstantSchedule(val=0.2))``)."""
    if depth > 4:  # SB3 nests two; a forged text could nest until the stack runs out
        raise ValueError("schedule nested more than 4 deep")
    text = text.strip()
    if match := re.fullmatch(r"FloatSchedule\((.*)\)", text):
        return FloatSchedule(_schedule_from_text(match[1], depth + 1))
    if match := re.fullmatch(rf"ConstantSchedule\(val=({_FLOAT})\)", text):
        return ConstantSchedule(_finite(float(match[1]), "val"))
    if match := re.fullmatch(rf"LinearSchedule\(start=({_FLOAT}), end=({_FLOAT}), end_fraction=({_FLOAT})\)", text):
        return LinearSchedule(*(_finite(float(match[i]), "schedule value") for i in (1, 2, 3)))
    raise ValueError(f"unknown schedule {quote(text, 60)}")


def _class_named_in(description: dict[str, Any], candidates: list[type]) -> type | None:
    """The candidate class that SB3's readable description of a pickled class names."""
    module = description.get("__module__")
    match = _INIT_TEXT.search(str(description.get("__init__", "")))
    for cls in candidates:
        if match and cls.__name__ == match[1] and module in (None, cls.__module__):
            return cls
    return None


_NOT_REBUILT = object()
_DERIVED = object()  # rebuilt by _setup_model from other settings, or by SB3 from the env


def _rebuild_pickled_setting(name: str, description: dict[str, Any], algorithm: type[BaseAlgorithm],
                             env: Any, source: str) -> Any:
    """A setting SB3 stored with cloudpickle, rebuilt from the readable text beside the pickle."""
    type_text = str(description.get(":type:", ""))
    if name in ("observation_space", "action_space"):
        expected_shape = description.get("_shape")
        actual = getattr(env, name)
        if expected_shape is not None and list(actual.shape) != list(expected_shape):
            raise ValueError(f"{source}: the model's {name} has shape {quote(expected_shape, 40)} but the env's "
                             f"has {actual.shape}")
        if "n" in description and isinstance(actual, spaces.Discrete) and str(actual.n) != str(description["n"]):
            raise ValueError(f"{source}: the model's {name} has {quote(description['n'], 40)} actions but the "
                             f"env's has {actual.n}")
        return _DERIVED
    if name in ("lr_schedule", "exploration_schedule", *_RUNTIME_ATTRIBUTES, "ep_info_buffer", "ep_success_buffer"):
        return _DERIVED
    if name == "policy_class":
        return _class_named_in(description, list(algorithm.policy_aliases.values())) or _NOT_REBUILT
    if name in ("replay_buffer_class", "rollout_buffer_class"):
        candidates = [buffers.ReplayBuffer, buffers.DictReplayBuffer, buffers.RolloutBuffer, buffers.DictRolloutBuffer]
        return _class_named_in(description, candidates) or _NOT_REBUILT
    try:
        if type_text.endswith(".FloatSchedule'>"):
            return FloatSchedule(_schedule_from_text(description["value_schedule"]))
        if type_text.endswith(".ConstantSchedule'>"):
            return ConstantSchedule(_finite(float(description["val"]), "val"))
        if type_text.endswith(".LinearSchedule'>"):
            return LinearSchedule(*(_finite(float(description[key]), key) for key in ("start", "end", "end_fraction")))
        if type_text == "<class 'dict'>":
            rebuilt = {}
            for key, value in description.items():
                if key.startswith(":"):
                    continue
                if isinstance(value, str) and (match := _CLASS_TEXT.fullmatch(value)):
                    value = _class_from_name(match[1], algorithm)
                elif isinstance(value, str) and value.startswith("<"):
                    return _NOT_REBUILT  # a function or object: only the pickle holds it
                rebuilt[key] = value
            return rebuilt
    except (KeyError, ValueError):
        return _NOT_REBUILT
    return _NOT_REBUILT


@contextlib.contextmanager
def _sb3_zip(zip_path: str | os.PathLike, source: str) -> Iterator[zipfile.ZipFile]:
    """The archive, refused if the file is over ``MAX_TENSOR_FILE_BYTES``, holds more than
    ``MAX_ZIP_MEMBERS`` entries or says its entries inflate to more than ``MAX_TENSOR_FILE_BYTES``
    together; limits and zip errors raised as :class:`~rollback_rl.persistence.safe_io.SafeLoadError`."""
    try:
        with open_regular_file(zip_path) as file:
            check_size(os.fstat(file.fileno()).st_size, MAX_TENSOR_FILE_BYTES, "the file", "MAX_TENSOR_FILE_BYTES")
            with zipfile.ZipFile(file) as archive:
                check_zip_members(archive)
                inflated = sum(info.file_size for info in archive.infolist())
                check_size(inflated, MAX_TENSOR_FILE_BYTES, "the inflated total of its entries",
                           "MAX_TENSOR_FILE_BYTES")
                yield archive
    except LimitExceeded as error:
        raise OutOfRangeError(f"{source}: {error}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
        # RuntimeError: an encrypted entry; NotImplementedError: an unknown compression method
        raise CorruptFileError(f"{source}: truncated or corrupted zip file ({one_line(str(error), 120)})") from None


def _read_sb3_data(zip_path: str | os.PathLike, source: str) -> dict[str, Any]:
    """The JSON of an SB3 zip's ``data`` entry, which may inflate to at most ``MAX_JSON_BYTES``."""
    with _sb3_zip(zip_path, source) as archive:
        if "data" not in archive.NameToInfo:
            raise CorruptFileError(f"{source}: not an SB3 model file (no 'data' entry)")
        data = read_zip_member(archive, "data", MAX_JSON_BYTES, "MAX_JSON_BYTES")
    try:
        stored = loads_json(data)
    except LimitExceeded as error:
        raise OutOfRangeError(f"{source}: 'data' entry: {error}") from None
    except ValueError as error:
        raise CorruptFileError(f"{source}: bad 'data' entry ({describe_json_error(error)})") from None
    if not isinstance(stored, dict):
        raise CorruptFileError(f"{source}: bad 'data' entry (not a JSON object)")
    return stored


def _read_sb3_weights(zip_path: str | os.PathLike, source: str, model: BaseAlgorithm) -> dict[str, Any]:
    """The ``.pth`` entries of an SB3 zip, read with ``torch.load(weights_only=True)``. Each may inflate
    to at most 4 times the bytes of ``model``'s policy (the weights, or an optimizer's two Adam
    moments of them), checked before inflating: a model built from checked settings bounds them."""
    policy_bytes = sum(t.numel() * t.element_size() for t in model.policy.state_dict().values())
    limit = 4 * policy_bytes + 2**20
    weights = {}
    with _sb3_zip(zip_path, source) as archive:
        for name in archive.namelist():
            if name.endswith(".pth"):
                content = read_zip_member(archive, name, limit, "4 x the weights of the model its settings describe")
                weights[name[:-len(".pth")]] = load_torch_file(io.BytesIO(content), f"{source}:{one_line(name, 60)}")
    return weights


def load_sb3_zip_safely(zip_path: str | os.PathLike, algo_class: str | type[BaseAlgorithm], env: Any,
                        device: torch.device | str = "auto", policy: str | type | None = None,
                        **overrides: Any) -> BaseAlgorithm:
    """Load a model saved by SB3's ``model.save()`` without unpickling anything in it.

    The JSON settings are used as they are. The settings SB3 stored with cloudpickle are never
    unpickled: the spaces come from ``env`` (checked against the stored shapes), the learning-rate
    and exploration schedules are rebuilt from their float settings, and the policy class, buffer
    class, constant and linear schedules and ``policy_kwargs`` from the readable description SB3
    writes beside each pickle. What cannot be rebuilt that way (``train_freq``, action noise, custom
    callables) keeps the algorithm's default, with a warning naming it; pass it in ``overrides``.
    The weights are read with ``torch.load(weights_only=True)``: a crafted pickle in a ``.pth``
    entry raises :class:`~rollback_rl.persistence.safe_io.UnsafeFileError` without running.

    :param zip_path: the ``.zip`` written by ``model.save()``
    :param algo_class: the algorithm (class or name, from :data:`ALGORITHMS`)
    :param env: the env the model was trained on (a gym.Env, VecEnv or env id)
    :param device: where to put the networks
    :param policy: the policy (alias or class), if it cannot be read from the file
    :param overrides: settings to set after loading, as for ``BaseAlgorithm.load(**kwargs)``
    """
    algorithm = algorithm_class(algo_class)
    source = str(zip_path)
    if env is None:
        raise TypeError("load_sb3_zip_safely needs the env the model was trained on: SB3 stores the "
                        "observation and action spaces with cloudpickle, which is not loaded")
    stored = _read_sb3_data(zip_path, source)

    verbose = stored.get("verbose") if isinstance(stored.get("verbose"), int) else 0
    env = _wrap_env(algorithm, env, verbose)
    protected = set(algorithm._excluded_save_params(algorithm.__new__(algorithm)))
    settings, not_rebuilt = {}, []
    for name, value in stored.items():
        if name in protected or name.startswith("__"):
            continue
        if isinstance(value, dict) and ":serialized:" in value:
            value = _rebuild_pickled_setting(name, value, algorithm, env, source)
            if value is _DERIVED:
                continue
            if value is _NOT_REBUILT:
                if name not in overrides and not (name == "policy_class" and policy is not None):
                    not_rebuilt.append(name)
                continue
        settings[name] = value
    if policy is not None:
        settings["policy_class"] = algorithm.policy_aliases[policy] if isinstance(policy, str) else policy
    if "policy_class" not in settings:
        raise ValueError(f"{source}: cannot tell the policy class without unpickling it; pass policy=, "
                         f"e.g. policy='MlpPolicy'")
    if not_rebuilt:
        warnings.warn(f"{source}: {', '.join(not_rebuilt)} stored only as pickles, which are not loaded; "
                      f"{algorithm.__name__}'s defaults are used (pass them as keyword arguments to set them)",
                      stacklevel=2)
    _check_settings(settings, env.observation_space, env.action_space, source)
    settings["n_envs"] = env.num_envs
    settings.update(overrides)
    model = _build(algorithm, settings, env, device, source)
    weights = _read_sb3_weights(zip_path, source, model)

    variables = weights.pop("pytorch_variables", None) or {}
    try:
        model.set_parameters(weights, exact_match=True, device=model.device)
        with torch.no_grad():
            for name, tensor in variables.items():
                if tensor is not None:
                    recursive_getattr(model, name).copy_(tensor)
    except (RuntimeError, ValueError, KeyError, AttributeError, TypeError) as error:
        raise CorruptFileError(f"{source}: the weights do not fit a {algorithm.__name__} built from the stored "
                               f"settings ({one_line(str(error), 160)}); check policy and policy_kwargs") from None
    if model.use_sde:
        model.policy.reset_noise()
    return model
