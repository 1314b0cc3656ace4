"""Bad input, tried the way a new user would: every one gets one clear line, exit status 2, no traceback,
and leaves every file as it was.

Property-based (hypothesis): option values, ``--set`` assignments, hyperparameter YAML files, env ids,
run names, model files and run folders, each generated to be wrong. The number of bad inputs tried is
printed at the end of the module.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import string
import tempfile
from pathlib import Path

import gymnasium as gym
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rollback_rl import cli
from rollback_rl.agents import RollbackDQN
from rollback_rl.cli import main
from rollback_rl.hyperparams import (
    CHECKS,
    HyperparameterError,
    check_hyperparameters,
    load_yaml_section,
    parse_yaml_value,
)

torch.set_num_threads(1)

TRIED: list[str] = []  # one entry per bad input given to main()
# 40 examples per test by default; ROLLBACK_RL_FUZZ_EXAMPLES=500 for a longer search.
FUZZ = settings(max_examples=int(os.environ.get("ROLLBACK_RL_FUZZ_EXAMPLES", "40")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module", autouse=True)
def report_count(request):
    yield
    line = f"test_fuzz_cli: {len(TRIED)} bad inputs tried, each refused with one line and exit status 2"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\n{line}")
    count_file = os.environ.get("ROLLBACK_RL_FUZZ_COUNT_FILE")
    if count_file:
        Path(count_file).write_text(json.dumps({"bad_inputs_tried": len(TRIED)}) + "\n")


def files_under(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in folder.rglob("*")}


def assert_refused(argv: list[str], folder: Path, *words: str) -> str:
    """Run ``main(argv)``: one ``rollback-rl: error:`` line, status 2, no traceback, ``folder`` and the
    working directory unchanged."""
    TRIED.append(" ".join(argv))
    before, cwd_before = files_under(folder), sorted(os.listdir("."))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    message = err.getvalue()
    assert code == 2, (argv, code, message, out.getvalue()[-500:])
    assert message.startswith("rollback-rl: error: ") and message.count("\n") == 1, (argv, message)
    assert "Traceback" not in message
    for word in words:
        assert word in message, (word, message)
    assert files_under(folder) == before, f"{argv} changed files"
    assert sorted(os.listdir(".")) == cwd_before, f"{argv} wrote into the working directory"
    return message


@contextlib.contextmanager
def scratch():
    with tempfile.TemporaryDirectory(prefix="rollback-rl-fuzz-") as folder:
        yield Path(folder)


def train(folder: Path, *arguments: str) -> list[str]:
    return ["train", "--logdir", str(folder / "runs"), "--no-progress", *arguments]


# -- option values ---------------------------------------------------------------------------------

def accepts_integer(text: str, minimum: int) -> bool:
    try:
        return int(text) >= minimum
    except ValueError:
        return False


def accepts_fraction(text: str) -> bool:
    try:
        return 0 < float(text) <= 1
    except ValueError:
        return False


INTEGER_OPTIONS = {"--steps": 1, "--eval-freq": 1, "--eval-episodes": 1, "--patience": 1, "--seed": 0,
                   "--checkpoint-freq": 0}
number_like = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(repr),
                        st.sampled_from(["", " ", "1e3", "0x10", "1_000", "nan", "-inf", "½", "٣", "10 000", "--"]))


@FUZZ
@given(option=st.sampled_from([*INTEGER_OPTIONS, "--drop"]), value=st.one_of(number_like, st.text(max_size=12)))
def test_bad_option_values_are_refused(option, value):
    accepted = accepts_fraction(value) if option == "--drop" else accepts_integer(value, INTEGER_OPTIONS[option])
    assume(not accepted)
    with scratch() as folder:
        assert_refused(train(folder, f"{option}={value}"), folder, option)


@FUZZ
@given(option=st.text(alphabet=string.ascii_letters + "-_", min_size=1, max_size=12),
       extra=st.lists(st.text(alphabet=string.printable, min_size=1, max_size=8), max_size=2))
def test_unknown_options_and_extra_arguments_are_refused(option, extra):
    known = {"algo", "steps", "seed", "no-rollback", "hyperparams", "set", "eval-freq", "eval-episodes", "drop",
             "patience", "checkpoint-freq", "checkpoint-replay-buffer", "resume", "logdir", "run-name", "device",
             "verbose", "no-progress", "help", "version"}
    assume(not any(name.startswith(option.lstrip("-")) for name in known))  # argparse accepts prefixes
    with scratch() as folder:
        assert_refused(train(folder, f"--{option.lstrip('-')}", *extra), folder)


# -- hyperparameters: --set and YAML files ---------------------------------------------------------

yaml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**9, 10**9), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=12)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=6)
keys = st.one_of(st.sampled_from(sorted(CHECKS)), st.text(min_size=1, max_size=15))


def rejected(section: object) -> bool:
    """Whether the checks reject this hyperparameter section (the CLI must then refuse it)."""
    if not isinstance(section, dict):
        return True
    try:
        check_hyperparameters(section, RollbackDQN, "fuzz")
    except HyperparameterError:
        return True
    return False


@FUZZ
@given(key=keys, value=yaml_values)
def test_bad_set_assignments_are_refused(key, value):
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    assume("=" not in key and key.strip() == key and key)
    try:
        parsed = parse_yaml_value(text)
    except HyperparameterError:
        parsed = None
    else:
        assume(rejected({key: parsed}))
    with scratch() as folder:
        assert_refused(train(folder, "--set", f"{key}={text}"), folder, "--set")


@FUZZ
@given(section=st.dictionaries(keys, yaml_values, min_size=1, max_size=3))
def test_bad_hyperparameter_sections_are_refused(section):
    assume(rejected(section))
    with scratch() as folder:
        path = folder / "hyper.yml"
        path.write_text(yaml.safe_dump({"CartPole-v1": section}))
        assert_refused(train(folder, "--hyperparams", str(path)), folder, str(path))


@FUZZ
@given(text=st.one_of(st.text(max_size=60), st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
                      yaml_values.map(yaml.safe_dump)))
def test_bad_hyperparameter_files_are_refused(text):
    with scratch() as folder:
        path = folder / "hyper.yml"
        path.write_text(text, errors="surrogatepass")
        try:
            assume(rejected(load_yaml_section(path, "CartPole-v1")))
        except (HyperparameterError, UnicodeDecodeError):
            pass
        assert_refused(train(folder, "--hyperparams", str(path)), folder, str(path))


# -- env ids and run names -------------------------------------------------------------------------

def registered(env_id: str) -> bool:
    try:
        gym.spec(env_id)
    except gym.error.Error:
        return False
    return True


@FUZZ
@given(env_id=st.one_of(st.text(min_size=1, max_size=20), st.sampled_from(["CartPole", "cartpole-v1", "CartPole-v9",
                                                                          "ALE/Pong-v5", "rollback_rl/Nothing-v0"])))
def test_unknown_env_ids_are_refused(env_id):
    assume(not env_id.startswith("-") and not registered(env_id))
    with scratch() as folder:
        assert_refused(train(folder, env_id), folder, "env")


@FUZZ
@given(name=st.one_of(st.sampled_from(["", " ", ".", "..", "/", "a/b", "../escape", "a\0b"]),
                      st.text(min_size=1, max_size=8).map(lambda t: t + "/" + t)))
def test_bad_run_names_are_refused(name):
    with scratch() as folder:
        assert_refused(train(folder, "--run-name", name), folder, "--run-name")


@FUZZ
@given(device=st.one_of(st.text(min_size=1, max_size=10), st.sampled_from(["gpu", "cuda:x", "cpu:1:2", "tpu", "CPU"])))
def test_bad_devices_are_refused(device):
    try:
        torch.device(device)
        assume(False)  # a device torch knows (SB3 falls back to the CPU where CUDA is missing)
    except RuntimeError:
        pass
    with scratch() as folder:
        assert_refused(train(folder, "--steps", "200", "--eval-freq", "100", f"--device={device}"), folder, "--device")


# -- files rollback-rl reads: models and run folders -----------------------------------------------

@FUZZ
@given(data=st.one_of(st.binary(max_size=200), st.binary(max_size=50).map(lambda b: b"PK\x03\x04" + b),
                      st.binary(max_size=50).map(lambda b: b"\x80\x04" + b),
                      st.binary(max_size=50).map(lambda b: len(b).to_bytes(8, "little") + b)),
       name=st.sampled_from(["model.safetensors", "model.zip", "model.pkl"]))
def test_corrupt_model_files_are_refused(data, name):
    with scratch() as folder:
        (folder / name).write_bytes(data)
        (folder / "run.json").write_text(json.dumps({"env": "CartPole-v1", "algorithm_class": "RollbackDQN"}))
        assert_refused(["evaluate", str(folder / name), "--episodes", "1"], folder, name)


run_infos = st.one_of(st.none(), st.binary(max_size=40),
                     st.dictionaries(st.sampled_from(["interrupted", "timesteps_done", "steps", "env"]), yaml_values)
                     .map(lambda info: json.dumps(info).encode()))


@FUZZ
@given(data=st.binary(max_size=200), name=st.sampled_from(["manifest.json", "model.safetensors", "LATEST"]),
       run_json=run_infos)
def test_damaged_run_folders_are_refused_by_resume(data, name, run_json):
    with scratch() as folder:
        checkpoint = folder / "run" / "checkpoints" / "checkpoint-200"
        checkpoint.mkdir(parents=True)
        target = checkpoint.parent / name if name == "LATEST" else checkpoint / name
        target.write_bytes(data)
        if run_json is not None:
            (folder / "run" / "run.json").write_bytes(run_json)
            try:
                info = json.loads(run_json)
            except (ValueError, UnicodeDecodeError):
                info = None
            assume(not cli._is_complete(info if isinstance(info, dict) else None))
        assert_refused(["train", "--resume", str(folder / "run"), "--no-progress"], folder, "run")

