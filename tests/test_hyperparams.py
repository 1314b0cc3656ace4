"""The hyperparameter checker on untrusted input: YAML bombs, huge and non-finite numbers, limits named.

Every refusal is a HyperparameterError whose message is one line of bounded length that names the key
and the limit. The bombs are also run in a subprocess under ``ulimit -v``, where expanding them would
end in a MemoryError.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from gymnasium import spaces
from stable_baselines3 import DQN, SAC
from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit

from rollback_rl.agents import RollbackDQN
from rollback_rl.hyperparams import (
    MAX_SET_VALUE_CHARS,
    ZOO_DQN,
    HyperparameterError,
    check_hyperparameters,
    check_memory_on_spaces,
    check_saved_settings,
    load_yaml_section,
    parse_python_literal,
    parse_yaml_value,
)
from rollback_rl.persistence.limits import MAX_MESSAGE_CHARS, MAX_NESTING_DEPTH, MAX_YAML_BYTES

REPOSITORY = Path(__file__).resolve().parents[1]


def refusal(call, *words: str) -> str:
    """The HyperparameterError ``call()`` raises: one line, bounded, containing ``words``."""
    with pytest.raises(HyperparameterError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and len(message) <= MAX_MESSAGE_CHARS, message
    for word in words:
        assert word in message, (word, message)
    return message


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    """A YAML mapping whose last alias expands to ``width ** levels`` strings."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return "\n".join(lines)


def nested_list(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def yaml_file(folder: Path, body: str, name: str = "hyper.yml") -> Path:
    path = folder / name
    path.write_text("CartPole-v1:\n" + textwrap.indent(body, "  ") + "\n")
    return path


# -- YAML: bombs, depth, size ------------------------------------------------------------------------

def test_an_alias_bomb_in_a_file_is_refused_in_milliseconds(tmp_path):
    path = yaml_file(tmp_path, "policy_kwargs:\n" + textwrap.indent(billion_laughs(), "  "))
    started = time.perf_counter()
    message = refusal(lambda: load_yaml_section(path, "CartPole-v1"), "MAX_YAML_NODES", str(path))
    assert time.perf_counter() - started < 1.0
    assert "not valid YAML" not in message  # a limit, not a syntax error


def test_an_alias_bomb_in_a_set_value_is_refused():
    text = "{" + billion_laughs().replace("\n", ", ") + "}"
    assert len(text) < MAX_SET_VALUE_CHARS
    refusal(lambda: parse_yaml_value(text), "MAX_YAML_NODES")


def test_a_chain_of_merge_keys_past_the_budget_is_refused(tmp_path):
    lines = ["m0: &m0 {k0: 0, k1: 1}"] + [f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], x{i}: {i}}}" for i in range(1, 40)]
    path = yaml_file(tmp_path, "\n".join(lines))
    refusal(lambda: load_yaml_section(path, "CartPole-v1"), "MAX_YAML_NODES")


def test_a_recursive_alias_is_refused_not_walked_forever():
    refusal(lambda: parse_yaml_value("&loop [*loop]"), "MAX_NESTING_DEPTH")


def test_few_aliases_within_the_budget_still_load(tmp_path):
    path = yaml_file(tmp_path, "policy_kwargs: &kwargs {net_arch: [64, 64]}\nenv_kwargs: {}")
    (tmp_path / "two.yml").write_text(path.read_text() + "Acrobot-v1:\n  policy_kwargs: *kwargs\n")
    assert load_yaml_section(tmp_path / "two.yml", "Acrobot-v1") == {"policy_kwargs": {"net_arch": [64, 64]}}


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}")])
def test_nesting_200000_deep_gives_one_line_not_a_recursion_error(tmp_path, opening, closing):
    path = yaml_file(tmp_path, "policy_kwargs: " + opening * 200_000 + "1" + closing * 200_000)
    refusal(lambda: load_yaml_section(path, "CartPole-v1"), "MAX_NESTING_DEPTH")


def test_nesting_just_within_the_limit_loads():
    text = "[" * (MAX_NESTING_DEPTH - 1) + "]" * (MAX_NESTING_DEPTH - 1)
    assert parse_yaml_value(text) is not None
    refusal(lambda: parse_yaml_value("[" * (MAX_NESTING_DEPTH + 1) + "]" * (MAX_NESTING_DEPTH + 1)), "MAX_NESTING_DEPTH")


def test_dev_zero_as_a_hyperparameter_file_stops_at_the_size_limit():
    started = time.perf_counter()
    refusal(lambda: load_yaml_section("/dev/zero", "CartPole-v1"), "MAX_YAML_BYTES", "/dev/zero")
    assert time.perf_counter() - started < 1.0


def test_a_pipe_as_a_hyperparameter_file_is_refused_without_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "pipe.yml")
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(
        refusal(lambda: load_yaml_section(tmp_path / "pipe.yml", "CartPole-v1"), "a pipe, not a file")), daemon=True)
    reader.start()
    reader.join(timeout=30)  # a blocking open() would never return: no process writes to the pipe
    assert not reader.is_alive() and outcome


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "sparse.yml"
    with open(path, "wb") as file:
        file.truncate(20 * 2**30)  # 20 GB, sparse: reading it would take minutes
    refusal(lambda: load_yaml_section(path, "CartPole-v1"), "MAX_YAML_BYTES", f"{20 * 2**30:,}")
    path.write_text("CartPole-v1:\n  gamma: 0.9\n" + "#" * MAX_YAML_BYTES)
    refusal(lambda: load_yaml_section(path, "CartPole-v1"), "MAX_YAML_BYTES")


def test_a_set_value_over_the_length_limit_is_refused_with_a_short_message():
    message = refusal(lambda: parse_yaml_value("[" + "1, " * 5_000 + "1]"), "MAX_SET_VALUE_CHARS", "15,003")
    assert len(message) < 200


def test_an_integer_of_5000_digits_is_refused_in_a_file(tmp_path):
    path = yaml_file(tmp_path, "n_timesteps: " + "9" * 5_000)
    refusal(lambda: load_yaml_section(path, "CartPole-v1"), str(path))


def test_yaml_errors_do_not_quote_the_file(tmp_path):
    path = yaml_file(tmp_path, "secret_token: [abc123")
    message = refusal(lambda: load_yaml_section(path, "CartPole-v1"), "not valid YAML", "line")
    assert "abc123" not in message


# -- numbers that size memory or time -------------------------------------------------------------------

OUT_OF_RANGE = [  # (key, value, what the message names)
    ("learning_rate", math.inf, "finite"), ("learning_rate", math.nan, "finite"), ("learning_rate", "lin_inf", "finite"),
    ("learning_rate", "lin_nan", "finite"), ("max_grad_norm", math.inf, "finite"), ("noise_std", math.inf, "finite"),
    ("n_timesteps", 1e30, "MAX_TIMESTEPS"), ("n_timesteps", 10**40, "MAX_TIMESTEPS"), ("n_timesteps", 10**5000, "MAX_TIMESTEPS"),
    ("learning_starts", 1e12, "MAX_TIMESTEPS"), ("buffer_size", 1e13, "MAX_BUFFER_SIZE"),
    ("batch_size", 10**9, "MAX_BATCH_SIZE"), ("n_envs", 100_000_000, "MAX_N_ENVS"),
    ("gradient_steps", 10**6, "MAX_GRADIENT_STEPS"), ("train_freq", 10**8, "MAX_TRAIN_FREQ"),
    ("train_freq", [10**8, "episode"], "MAX_TRAIN_FREQ"), ("target_update_interval", 1e18, "MAX_COUNT"),
    ("stats_window_size", 10**12, "MAX_COUNT"), ("undo_depth", 10**9, "MAX_UNDO_DEPTH"),
    ("undo_memory_budget", 2**50, "MAX_UNDO_MEMORY_BUDGET"), ("snapshot_capacity", 10**6, "MAX_SNAPSHOT_CAPACITY"),
    ("max_nonfinite_streak", 10**30, "MAX_COUNT"),
    ("policy_kwargs", "dict(net_arch=[40000, 40000])", "MAX_LAYER_WIDTH"),
    ("policy_kwargs", {"net_arch": [64] * 100}, "MAX_LAYERS"),
    ("policy_kwargs", {"net_arch": [4096] * 6}, "MAX_HIDDEN_WEIGHTS"),
    ("policy_kwargs", {"net_arch": {"pi": [64], "vf": [50_000]}}, "MAX_LAYER_WIDTH"),
    ("policy_kwargs", "dict(net_arch=[64], features_extractor_kwargs=dict(features_dim=10000000))", "MAX_LAYER_WIDTH"),
    ("policy_kwargs", "dict(" + "x" * 2_000 + "=1)", "MAX_LITERAL_CHARS"),
    ("policy_kwargs", "dict(net_arch=" + "[" * 100 + "]" * 100 + ")", "MAX_NESTING_DEPTH"),
    ("env_kwargs", {"a": nested_list(100)}, "MAX_NESTING_DEPTH"),
]


@pytest.mark.parametrize("key, value, limit", OUT_OF_RANGE, ids=[f"{key}-{limit}" for key, _, limit in OUT_OF_RANGE])
def test_values_out_of_range_are_refused_naming_the_key_and_limit(key, value, limit):
    algorithm = SAC if key == "noise_std" else RollbackDQN
    params = {key: value, "noise_type": "normal"} if key == "noise_std" else {key: value}
    refusal(lambda: check_hyperparameters(params, algorithm, "--set"), "--set", key, limit)


def test_values_written_as_yaml_text_reach_the_same_checks():
    for text, key, limit in ((".inf", "learning_rate", "finite"), (".nan", "learning_rate", "finite"),
                             ("1e30", "n_timesteps", "MAX_TIMESTEPS"), ("!!float 1e13", "buffer_size", "MAX_BUFFER_SIZE")):
        refusal(lambda: check_hyperparameters({key: parse_yaml_value(text)}, RollbackDQN, "--set"), key, limit)


def test_the_largest_allowed_values_pass_and_one_more_is_refused():
    largest = {"n_timesteps": 10**9, "buffer_size": 10**7, "batch_size": 2**16, "gradient_steps": 10_000,
               "train_freq": 10**6, "policy_kwargs": {"net_arch": [4096] * 5}}
    assert check_hyperparameters(largest, RollbackDQN, "limits") == largest
    for key in ("n_timesteps", "buffer_size", "batch_size", "gradient_steps", "train_freq"):
        refusal(lambda: check_hyperparameters({key: largest[key] + 1}, RollbackDQN, "limits"), key, "MAX_")


def test_every_zoo_default_is_within_the_limits():
    for env_id, params in ZOO_DQN.items():
        check_hyperparameters(params, RollbackDQN, env_id)


def test_a_huge_quoted_value_leaves_the_message_short():
    alias_bomb = parse_yaml_value("[" + billion_laughs(levels=4).replace("\n", ", ") + "]")
    message = refusal(lambda: check_hyperparameters({"gamma": alias_bomb}, DQN, "--set"), "gamma")
    assert len(message) < 250
    refusal(lambda: check_hyperparameters({"x" * 10_000: 1}, DQN, "y" * 10_000), "unknown hyperparameter")


def test_policy_kwargs_literals_stay_literals():
    assert parse_python_literal("dict(net_arch=[64, 64])") == {"net_arch": [64, 64]}
    with pytest.raises(ValueError, match="not allowed"):
        parse_python_literal("__import__('os').system('true')")


# -- settings read back from a model file ----------------------------------------------------------------

def test_saved_settings_go_through_the_same_checks():
    good = {"buffer_size": 10_000, "batch_size": 32, "learning_rate": 1e-3, "train_freq": TrainFreq(4, TrainFrequencyUnit.STEP),
            "policy_kwargs": {"net_arch": [64, 64]}, "num_timesteps": 500, "_stats_window_size": 100,
            "target_kl": None, "observation_space": spaces.Discrete(3)}
    check_saved_settings(good, "model.safetensors")
    for name, value, limit in (("buffer_size", 10**13, "MAX_BUFFER_SIZE"), ("learning_rate", math.inf, "finite"),
                               ("train_freq", TrainFreq(10**9, TrainFrequencyUnit.STEP), "MAX_TRAIN_FREQ"),
                               ("policy_kwargs", {"net_arch": [40_000, 40_000]}, "MAX_LAYER_WIDTH"),
                               ("num_timesteps", 10**30, "MAX_TIMESTEPS"), ("_stats_window_size", 10**20, "MAX_COUNT"),
                               ("n_envs", 10**8, "MAX_N_ENVS")):
        refusal(lambda: check_saved_settings({**good, name: value}, "model.safetensors"), "model.safetensors", limit)


def test_memory_on_the_spaces_is_checked_before_building():
    box = spaces.Box(-1, 1, (4,))
    check_memory_on_spaces({"buffer_size": 10**6, "policy_kwargs": {"net_arch": [256, 256]}}, box, spaces.Discrete(2), "x")
    images = spaces.Box(0, 255, (3, 512, 512), dtype=np.uint8)
    refusal(lambda: check_memory_on_spaces({"buffer_size": 10**6}, images, spaces.Discrete(2), "x"), "MAX_BUFFER_BYTES")
    refusal(lambda: check_memory_on_spaces({"n_steps": 2**16, "n_envs": 1024}, spaces.Box(-1, 1, (4096,)),
                                           spaces.Discrete(2), "x"), "rollout buffer", "MAX_BUFFER_BYTES")
    wide = spaces.Box(-1, 1, (10**6,))
    refusal(lambda: check_memory_on_spaces({"policy_kwargs": {"net_arch": [4096]}}, wide, spaces.Discrete(2), "x"),
            "MAX_HIDDEN_WEIGHTS")
    refusal(lambda: check_memory_on_spaces({}, box, spaces.Discrete(10**9), "x"), "MAX_HIDDEN_WEIGHTS")


# -- under a memory cap ------------------------------------------------------------------------------------

MEMORY_CAP_KB = 1_500_000  # importing torch and SB3 takes about 700 MB of address space


def run_under_memory_cap(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python whose address space is capped by ``ulimit -v``."""
    command = f"ulimit -v {MEMORY_CAP_KB} && exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}"
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120,
                          cwd=REPOSITORY, env={**os.environ, "PYTHONPATH": str(REPOSITORY)})


@pytest.mark.skipif(sys.platform != "linux", reason="ulimit -v")
def test_yaml_bombs_are_refused_under_a_memory_cap(tmp_path):
    bomb = yaml_file(tmp_path, "policy_kwargs:\n" + textwrap.indent(billion_laughs(), "  "))
    deep = yaml_file(tmp_path, name="deep.yml", body="policy_kwargs: " + "[" * 200_000 + "]" * 200_000)
    code = textwrap.dedent(f"""
        from rollback_rl.hyperparams import HyperparameterError, load_yaml_section
        for path in ({str(bomb)!r}, {str(deep)!r}, "/dev/zero"):
            try:
                load_yaml_section(path, "CartPole-v1")
            except HyperparameterError as error:
                print("refused:", error)
        """)
    result = run_under_memory_cap(code)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("refused:") for line in lines), result.stdout
    assert "MAX_YAML_NODES" in lines[0] and "MAX_NESTING_DEPTH" in lines[1] and "MAX_YAML_BYTES" in lines[2]


@pytest.mark.skipif(sys.platform != "linux", reason="ulimit -v")
def test_the_memory_cap_is_too_low_for_an_expanded_bomb():
    # Expanded, the bomb is 10**9 strings: 8 GB of list pointers alone. The cap refuses a quarter of that.
    result = run_under_memory_cap("import rollback_rl.hyperparams; bytearray(2 * 2**30)")
    assert result.returncode != 0 and "MemoryError" in result.stderr
