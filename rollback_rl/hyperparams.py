"""Training hyperparameters: the RL Zoo's tuned defaults per task, read and checked from Zoo-format YAML.

A hyperparameter set is a plain dict in the RL Zoo's vocabulary (``hyperparams/dqn.yml``): the keyword
arguments of the SB3 algorithm (``learning_rate``, ``batch_size``, ...) plus the Zoo's own keys
``n_timesteps``, ``policy``, ``n_envs``, ``env_kwargs`` and, for SAC/TD3, ``noise_type`` and
``noise_std``. :func:`hyperparameters_for` gives the defaults for a task, :func:`load_yaml_section`
reads one task's section of a Zoo YAML file, :func:`check_hyperparameters` rejects unknown keys and
wrong types with a message that names the key, and :func:`model_arguments` turns a checked set into
the arguments of the algorithm's constructor.

Values written the Zoo's way are understood: ``policy_kwargs: "dict(net_arch=[256, 256])"`` (parsed
as a literal, never evaluated), ``learning_rate: lin_7.3e-4`` (linear decay to 0), ``1e-3`` without a
dot (a float, as in YAML 1.2; PyYAML alone would read a string), ``n_timesteps: !!float 5e4``.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import yaml
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.utils import LinearSchedule

# rl-baselines3-zoo hyperparams/dqn.yml, as listed in PROTOCOL.md.
_DQN_CLASSIC_CONTROL = dict(policy="MlpPolicy", learning_rate=6.3e-4, batch_size=128, buffer_size=50_000,
                            learning_starts=0, gamma=0.99, target_update_interval=250, train_freq=4,
                            gradient_steps=-1, exploration_fraction=0.12, exploration_final_eps=0.1,
                            policy_kwargs=dict(net_arch=[256, 256]))
ZOO_DQN: dict[str, dict[str, Any]] = {
    "CartPole-v1": dict(n_timesteps=50_000, policy="MlpPolicy", learning_rate=2.3e-3, batch_size=64,
                        buffer_size=100_000, learning_starts=1_000, gamma=0.99, target_update_interval=10,
                        train_freq=256, gradient_steps=128, exploration_fraction=0.16,
                        exploration_final_eps=0.04, policy_kwargs=dict(net_arch=[256, 256])),
    "Acrobot-v1": dict(n_timesteps=100_000, **_DQN_CLASSIC_CONTROL),
    "LunarLander-v3": dict(n_timesteps=100_000, **_DQN_CLASSIC_CONTROL),
    "MountainCar-v0": dict(n_timesteps=120_000, policy="MlpPolicy", learning_rate=4e-3, batch_size=128,
                           buffer_size=10_000, learning_starts=1_000, gamma=0.98, target_update_interval=600,
                           train_freq=16, gradient_steps=8, exploration_fraction=0.2,
                           exploration_final_eps=0.07, policy_kwargs=dict(net_arch=[256, 256])),
}
# This package's CartPole variants keep CartPole-v1's spaces and reward, so its tuned settings carry
# over; they run long enough to see every phase of their default schedule.
_CARTPOLE_FAMILY_STEPS = {"CartPole-v1": 50_000, "rollback_rl/SwitchingCartPole-v0": 75_000,
                          "rollback_rl/DriftingCartPole-v0": 100_000}
for _env_id, _steps in _CARTPOLE_FAMILY_STEPS.items():
    ZOO_DQN.setdefault(_env_id, {**ZOO_DQN["CartPole-v1"], "n_timesteps": _steps})

DEFAULT_TIMESTEPS = 100_000  # tasks not in the table
CARTPOLE_EVAL_FREQ = 2_500
DEFAULT_EVAL_FREQ = 5_000
DEFAULT_EVAL_EPISODES = 5


def hyperparameters_for(env_id: str, algo: str) -> dict[str, Any]:
    """The default hyperparameters for ``algo`` (``"dqn"``, ``"ppo"``, ...) on ``env_id``.

    DQN on a task of the table gets the RL Zoo's tuned settings; anything else gets SB3's defaults with
    an ``MlpPolicy``, trained for the table's steps (or ``DEFAULT_TIMESTEPS``).
    """
    if algo == "dqn" and env_id in ZOO_DQN:
        return _copy(ZOO_DQN[env_id])
    steps = ZOO_DQN[env_id]["n_timesteps"] if env_id in ZOO_DQN else DEFAULT_TIMESTEPS
    return {"n_timesteps": steps, "policy": "MlpPolicy"}


def eval_freq_for(env_id: str) -> int:
    """Training timesteps between two evaluations (PROTOCOL.md): 2,500 on CartPole, 5,000 elsewhere."""
    return CARTPOLE_EVAL_FREQ if env_id in _CARTPOLE_FAMILY_STEPS else DEFAULT_EVAL_FREQ


def _copy(params: Mapping[str, Any]) -> dict[str, Any]:
    return {key: (_copy(value) if isinstance(value, Mapping) else value) for key, value in params.items()}


class HyperparameterError(ValueError):
    """A hyperparameter file or value that cannot be used; the message names the file, key and value."""


# -- reading YAML ---------------------------------------------------------------------------------

class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float as YAML 1.2 does (PyYAML reads a string)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.VERBOSE),
    list("-+0123456789."),
)


def parse_yaml_value(text: str) -> Any:
    """A single value written as in a YAML file (``--set batch_size=64``)."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        raise HyperparameterError(f"cannot read {text!r} as a YAML value: {error}") from None


def load_yaml_section(path: str | Path, env_id: str) -> dict[str, Any]:
    """The ``env_id`` section of an RL Zoo hyperparameter file (top-level keys are env ids).

    :raises HyperparameterError: if the file is missing, is not YAML, or has no section for ``env_id``
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise HyperparameterError(f"cannot read hyperparameter file {path}: {error.strerror}") from None
    try:
        document = yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HyperparameterError(f"{path} is not valid YAML: {first_line}") from None
    if not isinstance(document, dict) or not all(isinstance(key, str) for key in document):
        raise HyperparameterError(f"{path}: expected env ids as top-level keys (RL Zoo format), "
                                  f"e.g. 'CartPole-v1:' followed by indented hyperparameters")
    if env_id not in document:
        known = ", ".join(sorted(document)) or "none"
        raise HyperparameterError(f"{path} has no section for {env_id} (sections: {known})")
    section = document[env_id]
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise HyperparameterError(f"{path}, {env_id}: expected a mapping of hyperparameters, "
                                  f"got {type(section).__name__}")
    return section


# -- parsing the Zoo's Python-literal strings (policy_kwargs) ---------------------------------------

# The only names a policy_kwargs string may use: the ones found in the RL Zoo's files.
_ALLOWED_NAMES: dict[str, Any] = {}
for _name in ("ReLU", "Tanh", "ELU", "LeakyReLU", "SiLU", "GELU", "Sigmoid"):
    _ALLOWED_NAMES[f"nn.{_name}"] = _ALLOWED_NAMES[f"th.nn.{_name}"] = getattr(th.nn, _name)
for _name in ("Adam", "AdamW", "RMSprop", "SGD"):
    _ALLOWED_NAMES[f"optim.{_name}"] = _ALLOWED_NAMES[f"th.optim.{_name}"] = getattr(th.optim, _name)


def parse_python_literal(text: str) -> Any:
    """Parse a Zoo-style string such as ``"dict(net_arch=[64, 64], activation_fn=nn.ReLU)"``.

    Accepts literals, lists, tuples, dicts, ``dict(key=...)`` calls and the torch activation and
    optimizer classes in ``_ALLOWED_NAMES``; anything else is refused. Nothing is evaluated.

    :raises ValueError: if the string uses anything else
    """
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"not a Python literal: {error.msg}") from None
    return _literal(tree.body)


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.List):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(item) for item in node.elts)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(key): _literal(value) for key, value in zip(node.keys, node.values)}  # type: ignore[arg-type]
    if isinstance(node, ast.Call) and _dotted_name(node.func) == "dict" and not node.args \
            and all(keyword.arg is not None for keyword in node.keywords):
        return {keyword.arg: _literal(keyword.value) for keyword in node.keywords}
    name = _dotted_name(node)
    if name in _ALLOWED_NAMES:
        return _ALLOWED_NAMES[name]
    shown = ast.unparse(node)
    raise ValueError(f"{shown!r} is not allowed (literals, dict(...), and the classes "
                     f"nn.ReLU/nn.Tanh/..., th.optim.Adam/... only)")


# -- checking ----------------------------------------------------------------------------------------

def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value)


def _integer(value: Any) -> int | None:
    # The Zoo writes large counts as floats (n_timesteps: !!float 5e4): accept whole floats.
    number = _number(value)
    if number is None or not number.is_integer():
        return None
    return int(number)


def _int_at_least(minimum: int) -> Callable[[Any], Any]:
    def check(value: Any) -> int:
        number = _integer(value)
        if number is None or number < minimum:
            raise ValueError("must be a positive integer" if minimum == 1 else f"must be an integer >= {minimum}")
        return number
    return check


def _float_in(low: float, high: float, low_open: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> float:
        number = _number(value)
        if number is None or not (low < number if low_open else low <= number) or not number <= high:
            left = "(" if low_open else "["
            raise ValueError(f"must be a number in {left}{low:g}, {high:g}]")
        return number
    return check


def _positive_or_linear(value: Any) -> float | str:
    """A positive number, or the Zoo's ``lin_<number>`` (linear decay from that number to 0)."""
    if isinstance(value, str) and value.startswith("lin_"):
        start = _number(_maybe_float(value[4:]))
        if start is not None and start > 0:
            return value
    number = _number(value)
    if number is None or not number > 0:
        raise ValueError("must be a positive number or 'lin_<number>'")
    return number


def _maybe_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _gradient_steps(value: Any) -> int:
    number = _integer(value)
    if number is None or not (number >= 1 or number == -1):
        raise ValueError("must be a positive integer, or -1 (as many as environment steps collected)")
    return number


def _train_freq(value: Any) -> int | tuple[int, str]:
    number = _integer(value)
    if number is not None and number >= 1:
        return number
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[1] in ("step", "episode"):
        count = _integer(value[0])
        if count is not None and count >= 1:
            return (count, value[1])
    raise ValueError("must be a positive integer or [n, 'step' | 'episode']")


def _ent_coef(value: Any) -> float | str:
    if isinstance(value, str) and (value == "auto" or (value.startswith("auto_")
                                                        and (_maybe_float(value[5:]) or 0) > 0)):
        return value
    number = _number(value)
    if number is None or number < 0:
        raise ValueError("must be a number >= 0 (SAC also accepts 'auto' or 'auto_<initial value>')")
    return number


def _target_entropy(value: Any) -> float | str:
    number = _number(value)
    if value != "auto" and (number is None or not np.isfinite(number)):
        raise ValueError("must be a number or 'auto'")
    return value if value == "auto" else number


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _policy(value: Any) -> str:
    if value not in ("MlpPolicy", "CnnPolicy", "MultiInputPolicy"):
        raise ValueError("must be 'MlpPolicy', 'CnnPolicy' or 'MultiInputPolicy'")
    return value


def _policy_kwargs(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        value = parse_python_literal(value)
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ValueError("must be a mapping, or a string such as \"dict(net_arch=[256, 256])\"")
    net_arch = value.get("net_arch")
    if net_arch is not None and not _valid_net_arch(net_arch):
        raise ValueError("net_arch must be a list of positive layer sizes, or a dict of such lists "
                         "(e.g. dict(pi=[64, 64], vf=[64, 64]))")
    return value


def _valid_net_arch(net_arch: Any) -> bool:
    def sizes(layers: Any) -> bool:
        return isinstance(layers, (list, tuple)) and all(_integer(n) is not None and n >= 1 for n in layers)
    if isinstance(net_arch, dict):
        return all(isinstance(key, str) and sizes(layers) for key, layers in net_arch.items())
    return sizes(net_arch)


def _env_kwargs(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ValueError("must be a mapping of keyword arguments for gym.make")
    return value


def _noise_type(value: Any) -> str:
    if value not in ("normal", "ornstein-uhlenbeck"):
        raise ValueError("must be 'normal' or 'ornstein-uhlenbeck'")
    return value


_probability = _float_in(0.0, 1.0)
_non_negative = _float_in(0.0, float("inf"))
_positive = _float_in(0.0, float("inf"), low_open=True)

# Each key a hyperparameter file may set, with its check (which also normalises the value).
CHECKS: dict[str, Callable[[Any], Any]] = {
    # RL Zoo keys, not constructor arguments
    "n_timesteps": _int_at_least(1),
    "policy": _policy,
    "n_envs": _int_at_least(1),
    "env_kwargs": _env_kwargs,
    "noise_type": _noise_type,
    "noise_std": _non_negative,
    # constructor arguments (every algorithm)
    "learning_rate": _positive_or_linear,
    "gamma": _probability,
    "policy_kwargs": _policy_kwargs,
    "max_grad_norm": _positive,
    "stats_window_size": _int_at_least(1),
    # off-policy (DQN, SAC, TD3)
    "buffer_size": _int_at_least(1),
    "learning_starts": _int_at_least(0),
    "batch_size": _int_at_least(1),
    "tau": _float_in(0.0, 1.0, low_open=True),
    "train_freq": _train_freq,
    "gradient_steps": _gradient_steps,
    "optimize_memory_usage": _boolean,
    "target_update_interval": _int_at_least(1),
    "exploration_fraction": _probability,
    "exploration_initial_eps": _probability,
    "exploration_final_eps": _probability,
    "n_steps": _int_at_least(1),
    "policy_delay": _int_at_least(1),
    "target_policy_noise": _non_negative,
    "target_noise_clip": _non_negative,
    "ent_coef": _ent_coef,
    "target_entropy": _target_entropy,
    "use_sde": _boolean,
    "sde_sample_freq": _int_at_least(-1),
    # on-policy (PPO, A2C)
    "n_epochs": _int_at_least(1),
    "gae_lambda": _probability,
    "clip_range": _positive_or_linear,
    "normalize_advantage": _boolean,
    "vf_coef": _non_negative,
    "target_kl": _positive,
    "use_rms_prop": _boolean,
    "rms_prop_eps": _positive,
    # RollbackDQN's undo log and snapshots
    "undo_depth": _int_at_least(0),
    "undo_memory_budget": _int_at_least(1),
    "undo_anchor_interval": _int_at_least(1),
    "snapshot_capacity": _int_at_least(1),
    "max_nonfinite_streak": _int_at_least(1),
}
ZOO_KEYS = ("n_timesteps", "policy", "n_envs", "env_kwargs")
NOISE_KEYS = ("noise_type", "noise_std")
# RL Zoo keys that change the environment pipeline; rollback-rl trains on the plain env.
UNSUPPORTED_ZOO_KEYS = ("normalize", "normalize_kwargs", "frame_stack", "env_wrapper", "vec_env_wrapper",
                        "callback", "replay_buffer_class", "replay_buffer_kwargs", "policy_delay_kwargs")


def allowed_keys(algorithm: type) -> list[str]:
    """The keys a hyperparameter file may set for ``algorithm`` (an SB3 algorithm class)."""
    arguments: set[str] = set()
    # The base classes take arguments (use_sde, action_noise) that not every algorithm supports.
    for klass in algorithm.__mro__:
        if "__init__" in vars(klass) and klass not in (BaseAlgorithm, OffPolicyAlgorithm, OnPolicyAlgorithm):
            arguments.update(inspect.signature(klass.__init__).parameters)
    keys = [key for key in CHECKS if key in arguments or key in ZOO_KEYS]
    if "action_noise" in arguments:
        keys.extend(NOISE_KEYS)
    return keys


def check_hyperparameters(params: Mapping[str, Any], algorithm: type, source: str) -> dict[str, Any]:
    """Check every key and value of ``params`` for ``algorithm`` and return them normalised
    (whole floats become ints, ``policy_kwargs`` strings become dicts).

    :param source: where the values came from, for messages (e.g. ``"tiny.yml, CartPole-v1"``)
    :raises HyperparameterError: naming the first unknown key or wrong value
    """
    allowed = allowed_keys(algorithm)
    checked: dict[str, Any] = {}
    for key, value in params.items():
        if key in UNSUPPORTED_ZOO_KEYS:
            raise HyperparameterError(f"{source}: the RL Zoo option {key!r} is not supported by rollback-rl")
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise HyperparameterError(f"{source}: unknown hyperparameter {key!r} for {algorithm.__name__}{hint}")
        try:
            checked[key] = CHECKS[key](value)
        except ValueError as error:
            raise HyperparameterError(f"{source}: {key} {error}, got {value!r}") from None
    if "noise_std" in checked and "noise_type" not in checked:
        raise HyperparameterError(f"{source}: noise_std needs a noise_type ('normal' or 'ornstein-uhlenbeck')")
    return checked


# -- into the algorithm's constructor ----------------------------------------------------------------

def _schedule(value: float | str) -> float | LinearSchedule:
    if isinstance(value, str):  # checked: "lin_<number>"
        return LinearSchedule(start=float(value[4:]), end=0.0, end_fraction=1.0)
    return value


def model_arguments(params: Mapping[str, Any], action_space: Any = None) -> dict[str, Any]:
    """The keyword arguments for the algorithm's constructor from checked hyperparameters: the Zoo keys
    are left out, ``lin_`` schedules and action noise are built (``action_space`` is needed for noise).
    """
    arguments = {key: value for key, value in params.items() if key not in (*ZOO_KEYS, *NOISE_KEYS)}
    for key in ("learning_rate", "clip_range"):
        if key in arguments:
            arguments[key] = _schedule(arguments[key])
    if "policy_kwargs" in arguments:
        arguments["policy_kwargs"] = _copy(arguments["policy_kwargs"])
    if "noise_type" in params:
        size = int(np.prod(action_space.shape))
        sigma = params.get("noise_std", 0.1) * np.ones(size)
        noise_class = NormalActionNoise if params["noise_type"] == "normal" else OrnsteinUhlenbeckActionNoise
        arguments["action_noise"] = noise_class(mean=np.zeros(size), sigma=sigma)
    return arguments


def to_jsonable(value: Any) -> Any:
    """``value`` with classes written as their dotted names, for run.json."""
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value
