"""Training hyperparameters: the RL Zoo's tuned defaults per task, read and checked from Zoo-format YAML.

A hyperparameter set is a plain dict in the RL Zoo's vocabulary (``hyperparams/dqn.yml``): the keyword
arguments of the SB3 algorithm (``learning_rate``, ``batch_size``, ...) plus the Zoo's own keys
``n_timesteps``, ``policy``, ``n_envs``, ``env_kwargs`` and, for SAC/TD3, ``noise_type`` and
``noise_std``. :func:`hyperparameters_for` gives the defaults for a task, :func:`load_yaml_section`
reads one task's section of a Zoo YAML file, :func:`check_hyperparameters` rejects unknown keys and
wrong types with a message that names the key, and :func:`model_arguments` turns a checked set into
the arguments of the algorithm's constructor.

Everything read here comes from outside the program, so it is read within limits (see
:mod:`rollback_rl.persistence.limits`): a YAML file of at most ``MAX_YAML_BYTES``, nested at most
``MAX_NESTING_DEPTH`` deep, whose aliases expand to at most ``MAX_YAML_NODES`` values ("billion
laughs"), ``--set`` values of at most ``MAX_SET_VALUE_CHARS`` characters, and every number that sizes
memory or time (``buffer_size``, ``batch_size``, ``n_envs``, ``net_arch``, ``n_timesteps``...) finite and
under a named upper limit. :func:`check_saved_settings` applies the same checks to the settings a model
file holds. Each refusal is one line that names the key and the limit.

Values written the Zoo's way are understood: ``policy_kwargs: "dict(net_arch=[256, 256])"`` (parsed
as a literal, never evaluated), ``learning_rate: lin_7.3e-4`` (linear decay to 0), ``1e-3`` without a
dot (a float, as in YAML 1.2; PyYAML alone would read a string), ``n_timesteps: !!float 5e4``.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
import yaml
from gymnasium import spaces
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.noise import NormalActionNoise, OrnsteinUhlenbeckActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.type_aliases import TrainFreq
from stable_baselines3.common.utils import LinearSchedule

from rollback_rl.buffers import REPLAY_BUFFER_CLASSES
from rollback_rl.persistence.limits import (
    MAX_NESTING_DEPTH,
    MAX_YAML_BYTES,
    LimitExceeded,
    check_nesting,
    one_line,
    quote,
    read_capped,
)

# rl-baselines3-zoo hyperparams/dqn.yml, as listed in docs/protocol.md.
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
    """Training timesteps between two evaluations (docs/protocol.md): 2,500 on CartPole, 5,000 elsewhere."""
    return CARTPOLE_EVAL_FREQ if env_id in _CARTPOLE_FAMILY_STEPS else DEFAULT_EVAL_FREQ


def _copy(params: Mapping[str, Any]) -> dict[str, Any]:
    return {key: (_copy(value) if isinstance(value, Mapping) else value) for key, value in params.items()}


class HyperparameterError(ValueError):
    """A hyperparameter file or value that cannot be used; the message names the file, key and value.

    The message is one line of at most ``limits.MAX_MESSAGE_CHARS`` characters, whatever it was given.
    """

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


# -- limits ---------------------------------------------------------------------------------------------
# Upper limits on what sizes memory or time, far above the RL Zoo's tuned settings (in brackets): a
# forged or mistyped value (buffer_size: 1e13, n_envs: 100000000) gets an error naming the limit
# instead of exhausting memory.

MAX_TIMESTEPS = 10**9  #: n_timesteps, learning_starts (Zoo: 1e7 on Atari)
MAX_BUFFER_SIZE = 10**7  #: replay buffer transitions (Zoo: 1e6)
MAX_BATCH_SIZE = 2**16  #: (Zoo: up to 2,048)
MAX_N_ENVS = 1_024  #: parallel training envs (Zoo: up to 64)
MAX_N_STEPS = 2**16  #: rollout length per env of PPO/A2C, n-step returns (Zoo: up to 8,192)
MAX_N_EPOCHS = 1_000  #: PPO epochs per rollout (Zoo: up to 30)
MAX_GRADIENT_STEPS = 10_000  #: gradient steps per rollout (Zoo: up to 256)
MAX_TRAIN_FREQ = 10**6  #: steps or episodes between trainings (Zoo: up to 256)
MAX_LAYER_WIDTH = 4_096  #: units in one net_arch layer (Zoo: up to 400)
MAX_LAYERS = 16  #: layers in one net_arch list (Zoo: up to 3)
MAX_HIDDEN_WEIGHTS = 2**26  #: weights between a network's hidden layers, 256 MiB in float32
MAX_SNAPSHOT_CAPACITY = 100  #: full copies of the networks kept by RollbackDQN (default 3)
MAX_UNDO_DEPTH = 10**6  #: gradient steps RollbackDQN can undo (default 1,000)
MAX_UNDO_MEMORY_BUDGET = 2**34  #: bytes RollbackDQN's undo log may hold (default 64 MiB)
MAX_COUNT = 10**9  #: any other count (target_update_interval, stats_window_size...)
MAX_SET_VALUE_CHARS = 1_000  #: characters of one --set value (policy_kwargs strings: about 100)
MAX_LITERAL_CHARS = 1_000  #: characters of a policy_kwargs string such as "dict(net_arch=[64, 64])"
MAX_CRITICS = 16  #: Q-networks of SAC/TD3 (policy_kwargs n_critics; default 2)
MAX_YAML_NODES = 100_000  #: values in a YAML document once its aliases are expanded (a Zoo file: ~3,000)
MAX_BUFFER_BYTES = 2**34  #: bytes of a replay or rollout buffer, from its size and the observation space


# -- reading YAML ---------------------------------------------------------------------------------

class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-3`` as a float as YAML 1.2 does (PyYAML reads a string), and
    refusing documents that nest deeper than ``MAX_NESTING_DEPTH`` or whose aliases expand to more
    than ``MAX_YAML_NODES`` values, before anything is built from them.

    PyYAML builds an aliased value once and shares it, so a "billion laughs" document loads in
    kilobytes; it is what comes next (a ``repr`` for a message, a copy, run.json) that expands it.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1  # the composer recurses once per level: refuse before Python's stack runs out
        try:
            if self._depth > MAX_NESTING_DEPTH:
                raise LimitExceeded(f"lists and mappings nested more than {MAX_NESTING_DEPTH} deep "
                                    "(MAX_NESTING_DEPTH)")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node, 1, {})
        return node


def _expanded_size(node: yaml.Node, depth: int, measured: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """``(values, levels)`` of ``node`` with every alias expanded, or :class:`LimitExceeded` as soon as
    either is over its limit (a recursive alias is infinitely deep). Each node is measured once."""
    if depth > MAX_NESTING_DEPTH:
        raise LimitExceeded(f"lists and mappings nested more than {MAX_NESTING_DEPTH} deep once its "
                            "aliases are expanded (MAX_NESTING_DEPTH)")
    if id(node) in measured:
        size, levels = measured[id(node)]
        if depth + levels - 1 > MAX_NESTING_DEPTH:
            raise LimitExceeded(f"lists and mappings nested more than {MAX_NESTING_DEPTH} deep once its "
                                "aliases are expanded (MAX_NESTING_DEPTH)")
        return size, levels
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    size, levels = 1, 1
    for child in children:
        child_size, child_levels = _expanded_size(child, depth + 1, measured)
        size, levels = size + child_size, max(levels, child_levels + 1)
        if size > MAX_YAML_NODES:
            raise LimitExceeded(f"its aliases expand to more than {MAX_YAML_NODES:,} values (MAX_YAML_NODES)")
    measured[id(node)] = (size, levels)
    return size, levels


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    """What is wrong and where, without the snippet of the text PyYAML's message quotes."""
    problem = getattr(error, "problem", None) or getattr(error, "context", None)
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{one_line(problem, 120) if problem else type(error).__name__}{where}"


def _load_yaml(text: str) -> Any:
    """``yaml.load`` with :class:`_Yaml12Loader`; ``LimitExceeded`` or ``HyperparameterError``
    (the message without context) on failure."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass
    except yaml.YAMLError as error:
        raise HyperparameterError(_describe_yaml_error(error)) from None
    except RecursionError:  # should not happen under MAX_NESTING_DEPTH; kept as the last line of defence
        raise LimitExceeded(f"nested too deep (MAX_NESTING_DEPTH is {MAX_NESTING_DEPTH})") from None
    except LimitExceeded:
        raise
    except ValueError as error:  # an integer of over 4,300 digits
        raise HyperparameterError(one_line(str(error), 120)) from None


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
    """A single value written as in a YAML file (``--set batch_size=64``), of at most
    ``MAX_SET_VALUE_CHARS`` characters."""
    if len(text) > MAX_SET_VALUE_CHARS:
        raise HyperparameterError(f"--set value {quote(text, 40)} is {len(text):,} characters long, over the "
                                  f"limit of {MAX_SET_VALUE_CHARS:,} (MAX_SET_VALUE_CHARS)")
    try:
        return _load_yaml(text)
    except (HyperparameterError, LimitExceeded) as error:
        raise HyperparameterError(f"cannot read {quote(text, 40)} as a YAML value: {error}") from None


def load_yaml_section(path: str | Path, env_id: str) -> dict[str, Any]:
    """The ``env_id`` section of an RL Zoo hyperparameter file (top-level keys are env ids).

    :raises HyperparameterError: if the file is missing, is not YAML, or has no section for ``env_id``
    """
    path = Path(path)
    try:
        # Without O_NONBLOCK, opening a pipe would wait for a writer; it is refused once open. Read with a
        # cap: the path may be /dev/zero.
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(descriptor, "rb") as file:
            if stat.S_ISFIFO(os.fstat(descriptor).st_mode) or stat.S_ISSOCK(os.fstat(descriptor).st_mode):
                raise HyperparameterError(f"hyperparameter file {path}: a pipe, not a file")
            text = read_capped(file, MAX_YAML_BYTES, "the file", "MAX_YAML_BYTES").decode()
    except OSError as error:
        raise HyperparameterError(f"cannot read hyperparameter file {path}: {error.strerror}") from None
    except LimitExceeded as error:
        raise HyperparameterError(f"hyperparameter file {path}: {error}") from None
    except UnicodeDecodeError as error:
        raise HyperparameterError(f"cannot read hyperparameter file {path}: not UTF-8 text "
                                  f"({error.reason} at byte {error.start:,})") from None
    try:
        document = _load_yaml(text)
    except HyperparameterError as error:
        raise HyperparameterError(f"{path} is not valid YAML: {error}") from None
    except LimitExceeded as error:
        raise HyperparameterError(f"hyperparameter file {path}: {error}") from None
    if not isinstance(document, dict) or not all(isinstance(key, str) for key in document):
        raise HyperparameterError(f"{path}: expected env ids as top-level keys (RL Zoo format), "
                                  f"e.g. 'CartPole-v1:' followed by indented hyperparameters")
    if env_id not in document:
        known = ", ".join(quote(key, 40) for key in sorted(document)[:10]) or "none"
        more = f" and {len(document) - 10:,} more" if len(document) > 10 else ""
        raise HyperparameterError(f"{path} has no section for {quote(env_id, 40)} (sections: {known}{more})")
    section = document[env_id]
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise HyperparameterError(f"{path}, {quote(env_id, 40)}: expected a mapping of hyperparameters, "
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

    :raises ValueError: if the string uses anything else, is over ``MAX_LITERAL_CHARS`` characters or
        nests deeper than ``MAX_NESTING_DEPTH``
    """
    if len(text) > MAX_LITERAL_CHARS:
        raise ValueError(f"is {len(text):,} characters long, over the limit of {MAX_LITERAL_CHARS:,} "
                         "(MAX_LITERAL_CHARS)")
    try:
        tree = ast.parse(text.strip(), mode="eval")
        value = _literal(tree.body)
    except SyntaxError as error:
        raise ValueError(f"not a Python literal: {one_line(str(error.msg), 120)}") from None
    except (RecursionError, MemoryError):  # the parser's own nesting limit is 200 parentheses
        raise ValueError(f"nested more than {MAX_NESTING_DEPTH} deep (MAX_NESTING_DEPTH)") from None
    check_nesting(value)
    return value


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
    shown = quote(ast.unparse(node), 60)
    raise ValueError(f"{shown} is not allowed (literals, dict(...), and the classes "
                     f"nn.ReLU/nn.Tanh/..., th.optim.Adam/... only)")


# -- checking ----------------------------------------------------------------------------------------

def _number(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def _integer(value: Any) -> int | None:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    # The Zoo writes large counts as floats (n_timesteps: !!float 5e4): accept whole floats.
    number = _number(value)
    if number is None or not number.is_integer():
        return None
    return int(number)


def _int_in(minimum: int, maximum: int, limit_name: str) -> Callable[[Any], int]:
    """A check for an integer in ``[minimum, maximum]``; its message names the limit ``limit_name``."""
    def check(value: Any) -> int:
        number = _integer(value)
        if number is None or number < minimum:
            raise ValueError("must be a positive integer" if minimum == 1 else f"must be an integer >= {minimum}")
        if number > maximum:
            raise ValueError(f"must be at most {maximum:,} ({limit_name})")
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


def _finite_from(low: float, low_open: bool = False) -> Callable[[Any], Any]:
    """A check for a finite number ``> low`` (``low_open``) or ``>= low``: NaN and infinities are refused."""
    def check(value: Any) -> float:
        number = _number(value)
        if number is None or not (low < number if low_open else low <= number):
            raise ValueError(f"must be a finite number {'>' if low_open else '>='} {low:g}")
        return number
    return check


def _positive_or_linear(value: Any) -> float | str:
    """A finite positive number, or the Zoo's ``lin_<number>`` (linear decay from that number to 0)."""
    if isinstance(value, str) and value.startswith("lin_"):
        start = _number(_maybe_float(value[4:]))
        if start is not None and start > 0:
            return value
    number = _number(value)
    if number is None or not number > 0:
        raise ValueError("must be a finite positive number or 'lin_<number>'")
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
    if number > MAX_GRADIENT_STEPS:
        raise ValueError(f"must be at most {MAX_GRADIENT_STEPS:,} (MAX_GRADIENT_STEPS)")
    return number


def _train_freq(value: Any) -> int | tuple[int, str]:
    number = _integer(value)
    if number is None and isinstance(value, (list, tuple)) and len(value) == 2 and value[1] in ("step", "episode"):
        count = _integer(value[0])
        if count is not None and count >= 1:
            _train_freq(count)  # the same upper limit
            return (count, value[1])
    if number is None or number < 1:
        raise ValueError("must be a positive integer or [n, 'step' | 'episode']")
    if number > MAX_TRAIN_FREQ:
        raise ValueError(f"must be at most {MAX_TRAIN_FREQ:,} (MAX_TRAIN_FREQ)")
    return number


def _ent_coef(value: Any) -> float | str:
    if isinstance(value, str) and (value == "auto" or (value.startswith("auto_")
                                                        and (_number(_maybe_float(value[5:])) or 0) > 0)):
        return value
    number = _number(value)
    if number is None or number < 0:
        raise ValueError("must be a finite number >= 0 (SAC also accepts 'auto' or 'auto_<initial value>')")
    return number


def _target_entropy(value: Any) -> float | str:
    number = _number(value)
    if value != "auto" and number is None:
        raise ValueError("must be a finite number or 'auto'")
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
    check_nesting(value)
    net_arch = value.get("net_arch")
    if net_arch is not None:
        _check_net_arch(net_arch)
    features_kwargs = value.get("features_extractor_kwargs")
    if isinstance(features_kwargs, dict) and "features_dim" in features_kwargs:
        _int_in(1, MAX_LAYER_WIDTH, "MAX_LAYER_WIDTH")(features_kwargs["features_dim"])
    if "n_critics" in value:
        _int_in(1, MAX_CRITICS, "MAX_CRITICS")(value["n_critics"])
    return value


def _check_net_arch(net_arch: Any) -> None:
    """Refuse a ``net_arch`` that is not a list of layer sizes (or a dict of such lists), or whose
    layers are too wide, too many, or hold too many weights between them (each limit named)."""
    if isinstance(net_arch, dict):
        if not all(isinstance(key, str) for key in net_arch):
            raise ValueError("net_arch keys must be names such as 'pi', 'vf' or 'qf'")
        networks = list(net_arch.values())
    else:
        networks = [net_arch]
    for layers in networks:
        if not isinstance(layers, (list, tuple)) or not all(_integer(n) is not None and n >= 1 for n in layers):
            raise ValueError("net_arch must be a list of positive layer sizes, or a dict of such lists "
                             "(e.g. dict(pi=[64, 64], vf=[64, 64]))")
        if len(layers) > MAX_LAYERS:
            raise ValueError(f"net_arch has {len(layers):,} layers, over the limit of {MAX_LAYERS} (MAX_LAYERS)")
        widest = max((_integer(n) for n in layers), default=0)
        if widest > MAX_LAYER_WIDTH:
            raise ValueError(f"net_arch has a layer of {widest:,} units, over the limit of {MAX_LAYER_WIDTH:,} "
                             "(MAX_LAYER_WIDTH)")
        weights = hidden_weights(layers)
        if weights > MAX_HIDDEN_WEIGHTS:
            raise ValueError(f"net_arch {quote(layers, 40)} has {weights:,} weights between its layers, over the "
                             f"limit of {MAX_HIDDEN_WEIGHTS:,} (MAX_HIDDEN_WEIGHTS)")


def hidden_weights(layers: Any, inputs: int = 0, outputs: int = 0) -> int:
    """Weights of the linear layers of an MLP with hidden sizes ``layers``, plus those from ``inputs``
    and to ``outputs`` units where given (0: left out)."""
    sizes = [size for size in (inputs, *(_integer(n) or 0 for n in layers), outputs) if size]
    return sum(a * b for a, b in zip(sizes, sizes[1:]))


def _env_kwargs(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise ValueError("must be a mapping of keyword arguments for gym.make")
    check_nesting(value)
    return value


def _noise_type(value: Any) -> str:
    if value not in ("normal", "ornstein-uhlenbeck"):
        raise ValueError("must be 'normal' or 'ornstein-uhlenbeck'")
    return value


def _replay_buffer_class(value: Any) -> type:
    """A class of the allow-list ``REPLAY_BUFFER_CLASSES``, named (``ReservoirReplayBuffer``, or the dotted
    name run.json records) or given; nothing is imported from a string."""
    for cls in REPLAY_BUFFER_CLASSES.values():
        if value is cls or value in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
            return cls
    raise ValueError(f"must be one of {', '.join(REPLAY_BUFFER_CLASSES)}")


_probability = _float_in(0.0, 1.0)
_non_negative = _finite_from(0.0)
_positive = _finite_from(0.0, low_open=True)
_count = _int_in(1, MAX_COUNT, "MAX_COUNT")

# Each key a hyperparameter file may set, with its check (which also normalises the value).
CHECKS: dict[str, Callable[[Any], Any]] = {
    # RL Zoo keys, not constructor arguments
    "n_timesteps": _int_in(1, MAX_TIMESTEPS, "MAX_TIMESTEPS"),
    "policy": _policy,
    "n_envs": _int_in(1, MAX_N_ENVS, "MAX_N_ENVS"),
    "env_kwargs": _env_kwargs,
    "noise_type": _noise_type,
    "noise_std": _non_negative,
    # constructor arguments (every algorithm)
    "learning_rate": _positive_or_linear,
    "gamma": _probability,
    "policy_kwargs": _policy_kwargs,
    "max_grad_norm": _positive,
    "stats_window_size": _count,
    # off-policy (DQN, SAC, TD3)
    "buffer_size": _int_in(1, MAX_BUFFER_SIZE, "MAX_BUFFER_SIZE"),
    "learning_starts": _int_in(0, MAX_TIMESTEPS, "MAX_TIMESTEPS"),
    "batch_size": _int_in(1, MAX_BATCH_SIZE, "MAX_BATCH_SIZE"),
    "tau": _float_in(0.0, 1.0, low_open=True),
    "train_freq": _train_freq,
    "gradient_steps": _gradient_steps,
    "optimize_memory_usage": _boolean,
    "replay_buffer_class": _replay_buffer_class,
    "target_update_interval": _count,
    "exploration_fraction": _probability,
    "exploration_initial_eps": _probability,
    "exploration_final_eps": _probability,
    "n_steps": _int_in(1, MAX_N_STEPS, "MAX_N_STEPS"),
    "policy_delay": _count,
    "target_policy_noise": _non_negative,
    "target_noise_clip": _non_negative,
    "ent_coef": _ent_coef,
    "target_entropy": _target_entropy,
    "use_sde": _boolean,
    "sde_sample_freq": _int_in(-1, MAX_COUNT, "MAX_COUNT"),
    # on-policy (PPO, A2C)
    "n_epochs": _int_in(1, MAX_N_EPOCHS, "MAX_N_EPOCHS"),
    "gae_lambda": _probability,
    "clip_range": _positive_or_linear,
    "normalize_advantage": _boolean,
    "vf_coef": _non_negative,
    "target_kl": _positive,
    "use_rms_prop": _boolean,
    "rms_prop_eps": _positive,
    # RollbackDQN's undo log and snapshots
    "undo_depth": _int_in(0, MAX_UNDO_DEPTH, "MAX_UNDO_DEPTH"),
    "undo_memory_budget": _int_in(1, MAX_UNDO_MEMORY_BUDGET, "MAX_UNDO_MEMORY_BUDGET"),
    "undo_anchor_interval": _count,
    "snapshot_capacity": _int_in(1, MAX_SNAPSHOT_CAPACITY, "MAX_SNAPSHOT_CAPACITY"),
    "max_nonfinite_streak": _count,
}
ZOO_KEYS = ("n_timesteps", "policy", "n_envs", "env_kwargs")
NOISE_KEYS = ("noise_type", "noise_std")
# RL Zoo keys that change the environment pipeline; rollback-rl trains on the plain env.
UNSUPPORTED_ZOO_KEYS = ("normalize", "normalize_kwargs", "frame_stack", "env_wrapper", "vec_env_wrapper",
                        "callback", "replay_buffer_kwargs", "policy_delay_kwargs")


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
            close = difflib.get_close_matches(str(key)[:100], allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise HyperparameterError(f"{source}: unknown hyperparameter {quote(key, 40)} for "
                                      f"{algorithm.__name__}{hint}")
        checked[key] = _checked(key, value, source)
    if "noise_std" in checked and "noise_type" not in checked:
        raise HyperparameterError(f"{source}: noise_std needs a noise_type ('normal' or 'ornstein-uhlenbeck')")
    return checked


def _checked(key: str, value: Any, source: str) -> Any:
    try:
        return CHECKS[key](value)
    except ValueError as error:  # LimitExceeded included
        raise HyperparameterError(f"{source}: {key} {error}, got {quote(value)}") from None


# -- settings read back from a model file ------------------------------------------------------------

# Hyperparameters a model file does not hold as given (the env pipeline, classes it allow-lists itself).
_NOT_IN_MODEL_FILES = ("policy", "env_kwargs", "noise_type", "noise_std", "replay_buffer_class")
# SB3 attributes that differ in name from the hyperparameter they hold.
_ATTRIBUTE_NAMES = {"_stats_window_size": "stats_window_size"}
# Counters a model file holds, in timesteps.
_TIMESTEP_COUNTERS = ("num_timesteps", "_total_timesteps", "_num_timesteps_at_start")


def check_saved_settings(settings: Mapping[str, Any], source: str) -> None:
    """Check the settings a model file holds (SB3's attribute names) with the checks and limits that
    a hyperparameter file gets, before a model is built from them.

    A file is data: a forged ``buffer_size: 1e13`` or ``learning_rate: inf`` must be refused as it
    would be from ``--hyperparams``. Settings the algorithm turned into objects are checked as the
    numbers they hold (``TrainFreq(4, STEP)`` as ``(4, "step")``); schedules are left to the loader,
    which rebuilds them from finite numbers only. Counters (``num_timesteps``) must be within
    ``MAX_TIMESTEPS``. Attributes without a check are left alone.

    :param source: the file, for messages
    :raises HyperparameterError: naming the first setting out of range and its limit
    """
    for name, value in settings.items():
        key = _ATTRIBUTE_NAMES.get(name, name)
        if value is None:  # e.g. target_kl: None (no early stopping)
            continue
        if key in _TIMESTEP_COUNTERS:
            try:
                _int_in(0, MAX_TIMESTEPS, "MAX_TIMESTEPS")(value)
            except ValueError as error:
                raise HyperparameterError(f"{source}: {key} {error}, got {quote(value)}") from None
            continue
        if key not in CHECKS or key in _NOT_IN_MODEL_FILES:
            continue
        if isinstance(value, TrainFreq):
            value = (value.frequency, getattr(value.unit, "value", value.unit))
        if key in ("learning_rate", "clip_range") and callable(value):
            continue
        _checked(key, value, source)


def _space_bytes(space: spaces.Space) -> int:
    """Bytes of one observation or action of ``space`` as SB3's buffers store it."""
    if isinstance(space, spaces.Dict):
        return sum(_space_bytes(child) for child in space.spaces.values())
    if isinstance(space, spaces.Tuple):
        return sum(_space_bytes(child) for child in space.spaces)
    itemsize = space.dtype.itemsize if space.dtype is not None else 8
    return max(math.prod(space.shape or (1,)), 1) * itemsize


def check_memory_on_spaces(params: Mapping[str, Any], observation_space: spaces.Space,
                           action_space: spaces.Space, source: str) -> None:
    """Refuse settings whose networks or buffers would be over their limits on these spaces: the
    weights of an MLP from the observations through ``net_arch`` to the actions (``MAX_HIDDEN_WEIGHTS``),
    and the bytes of the replay buffer (``buffer_size``) or rollout buffer (``n_steps`` x ``n_envs``),
    ``MAX_BUFFER_BYTES``.

    Call it with the env's spaces once they are known (the CLI, before building the model), or with
    the spaces a model file holds (:mod:`rollback_rl.persistence.safe_model`, before building it).
    The checks are estimates that ignore the small layers (biases, value heads).

    :param params: checked hyperparameters, or a model file's settings (SB3 attribute names)
    :raises HyperparameterError: naming the limit
    """
    try:
        observation_size = spaces.flatdim(observation_space)
        action_size = spaces.flatdim(action_space)
        observation_bytes = _space_bytes(observation_space)
        action_bytes = _space_bytes(action_space)
    except (TypeError, ValueError, OverflowError, AttributeError, NotImplementedError) as error:
        raise HyperparameterError(f"{source}: unusable observation or action space "
                                  f"({type(error).__name__}: {one_line(str(error), 120)})") from None
    policy_kwargs = params.get("policy_kwargs")
    net_arch = policy_kwargs.get("net_arch") if isinstance(policy_kwargs, Mapping) else None
    networks = list(net_arch.values()) if isinstance(net_arch, Mapping) else [net_arch or []]
    for layers in networks:
        weights = hidden_weights(layers, observation_size, action_size)
        if weights > MAX_HIDDEN_WEIGHTS:
            raise HyperparameterError(
                f"{source}: a network from {observation_size:,} observation values through net_arch "
                f"{quote(list(layers), 40)} to {action_size:,} action values has {weights:,} weights, over the "
                f"limit of {MAX_HIDDEN_WEIGHTS:,} (MAX_HIDDEN_WEIGHTS)")
    transition_bytes = 2 * observation_bytes + action_bytes + 16  # observation, next one, action, reward, done
    buffers = []
    if _integer(params.get("buffer_size")) is not None:
        buffers.append(("replay buffer", _integer(params["buffer_size"]) * transition_bytes))
    if _integer(params.get("n_steps")) is not None and "buffer_size" not in params:
        n_envs = _integer(params.get("n_envs")) or 1
        buffers.append(("rollout buffer", _integer(params["n_steps"]) * n_envs * (4 * observation_size + 32)))
    for name, size in buffers:
        if size > MAX_BUFFER_BYTES:
            raise HyperparameterError(f"{source}: the {name} would take {size:,} bytes for these observations, "
                                      f"over the limit of {MAX_BUFFER_BYTES:,} (MAX_BUFFER_BYTES)")


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
