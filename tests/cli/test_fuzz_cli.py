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
import sys
import tempfile
from pathlib import Path

import gymnasium as gym
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rollback_rl.agents import RollbackDQN
from rollback_rl.cli import main
from rollback_rl.hyperparams import (
    CHECKS,
    HyperparameterError,
    check_hyperparameters,
    load_yaml_section,
    parse_yaml_value,
)
from rollback_rl.training import run_is_complete

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

def accepts_integer(text: str, minimum: int, maximum: int) -> bool:
    try:
        return minimum <= int(text) <= maximum
    except ValueError:
        return False


def accepts_fraction(text: str) -> bool:
    try:
        return 0 < float(text) <= 1
    except ValueError:
        return False


INTEGER_OPTIONS = {"--steps": (1, 10**9), "--eval-freq": (1, 10**9), "--eval-episodes": (1, 100_000),
                   "--patience": (1, 10**9), "--seed": (0, 2**32 - 1), "--checkpoint-freq": (0, 10**9)}
number_like = st.one_of(st.integers(-10**6, 10**6).map(str), st.floats(allow_nan=True).map(repr),
                        st.sampled_from(["", " ", "1e3", "0x10", "1_000", "nan", "-inf", "½", "٣", "10 000", "--"]))


@FUZZ
@given(option=st.sampled_from([*INTEGER_OPTIONS, "--drop"]), value=st.one_of(number_like, st.text(max_size=12)))
def test_bad_option_values_are_refused(option, value):
    accepted = accepts_fraction(value) if option == "--drop" else accepts_integer(value, *INTEGER_OPTIONS[option])
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
            assume(not run_is_complete(info if isinstance(info, dict) else None))
        assert_refused(["train", "--resume", str(folder / "run"), "--no-progress"], folder, "run")



# -- numbers over their limits, names and paths that cannot be folders ------------------------------

LIMITS = {"--steps": ("MAX_TIMESTEPS", 10**9), "--eval-freq": ("MAX_TIMESTEPS", 10**9),
          "--checkpoint-freq": ("MAX_TIMESTEPS", 10**9), "--eval-episodes": ("MAX_EPISODES", 100_000),
          "--seed": ("MAX_SEED", 2**32 - 1), "--patience": ("MAX_COUNT", 10**9), "--max-restores": ("MAX_COUNT", 10**9)}


@FUZZ
@given(option=st.sampled_from(sorted(LIMITS)), excess=st.one_of(st.integers(1, 10**6), st.integers(1, 10**40),
                                                                  st.just(10**4_000)))
def test_numbers_over_their_limit_are_refused_naming_it(option, excess):
    limit_name, maximum = LIMITS[option]
    text = str(maximum + excess) if excess < 10**4_000 else "9" * 5_000
    with scratch() as folder:
        message = assert_refused(train(folder, f"{option}={text}"), folder, option)
        assert limit_name in message or "positive integer" in message or ">= 0" in message
        assert len(message) < 500


@FUZZ
@given(name=st.one_of(st.text(min_size=256, max_size=400, alphabet=string.ascii_letters),
                      st.text(min_size=86, max_size=120, alphabet="€漢"),  # 3 bytes each in UTF-8: over 255
                      st.binary(min_size=1, max_size=12).map(lambda b: b"x" + b + b"\xff")
                      .map(lambda b: b.decode("utf-8", "surrogateescape")),
                      st.text(min_size=1, max_size=6).map(lambda t: t + "\n" + t),
                      st.sampled_from(["\t", "a\x1bb", "\x7f"])))
def test_run_names_too_long_not_utf8_or_with_control_characters_are_refused(name):
    with scratch() as folder:
        assert_refused(train(folder, "--steps", "200", "--eval-freq", "100", "--run-name", name), folder, "--run-name")


@FUZZ
@given(logdir=st.one_of(st.sampled_from(["/proc/rollback-rl", "/proc/self/nothing/runs", "/sys/rollback-rl"]),
                        st.text(min_size=1, max_size=8, alphabet=string.ascii_letters).map(lambda t: "FILE/" + t),
                        st.integers(4_097, 6_000).map(lambda n: "a" * n),
                        st.integers(256, 300).map(lambda n: "runs/" + "b" * n),
                        st.binary(min_size=1, max_size=6)
                        .map(lambda b: (b"runs\xff" + b).decode("utf-8", "surrogateescape"))))
def test_logdirs_that_cannot_hold_a_run_folder_are_refused_before_anything_is_written(logdir):
    with scratch() as folder:
        (folder / "FILE").write_text("a file, not a folder")
        logdir = logdir.replace("FILE", str(folder / "FILE"))
        message = assert_refused(["train", "--steps", "200", "--eval-freq", "100", "--no-progress", "--logdir", logdir],
                                 folder)
        assert "--logdir" in message or "run folder" in message


@pytest.mark.parametrize("device", ["meta", "xla", "hpu", "ipu", "lazy", "mtia", "privateuseone", "fpga"])
def test_devices_that_hold_no_data_or_that_rollback_rl_does_not_train_on_are_refused(device, tmp_path):
    assert_refused(train(tmp_path, "--steps", "200", "--eval-freq", "100", "--device", device), tmp_path, "--device")


@FUZZ
@given(module=st.sampled_from(["os", "subprocess", "planted_module", "rollback_rl.cli"]),
       name=st.sampled_from(["CartPole-v1", "Anything-v0", "X"]))
def test_env_ids_naming_a_module_are_refused_and_the_module_is_not_imported(module, name):
    with scratch() as folder:
        marker = folder / "imported"
        (folder / "planted_module.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
        sys.path.insert(0, str(folder))
        try:
            message = assert_refused(train(folder, f"{module}:{name}"), folder, "module")
        finally:
            sys.path.remove(str(folder))
        assert not marker.exists() and "planted_module" not in sys.modules, message


@pytest.mark.parametrize("arguments", [["--episodes", "99999999999999999999"], ["--episodes", "0"],
                                       ["--seed", str(2**32)], ["--env", "os:CartPole-v1"]])
def test_evaluate_refuses_numbers_over_their_limit_and_module_env_ids(arguments, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not looked at")
    assert_refused(["evaluate", str(tmp_path / "model.safetensors"), *arguments], tmp_path)


# -- compare: tasks, seeds and paths checked before any training -----------------------------------

def assert_compare_refused(argv: list[str], folder: Path, *words: str) -> str:
    """As :func:`assert_refused`, for ``compare``'s own ``rollback-rl compare: error:`` line; nothing runs."""
    TRIED.append(" ".join(argv))
    before, cwd_before = files_under(folder), sorted(os.listdir("."))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["compare", "--steps", "400", "--eval-freq", "200", "--workers", "1", *argv])
    message = err.getvalue()
    assert code == 2, (argv, code, message, out.getvalue()[-500:])
    assert message.startswith("rollback-rl compare: error: ") and message.count("\n") == 1, (argv, message)
    for word in words:
        assert word in message, (word, message)
    assert files_under(folder) == before and sorted(os.listdir(".")) == cwd_before, f"{argv} wrote files"
    return message


@pytest.fixture
def nothing_may_train(monkeypatch):
    from rollback_rl.experiments.compare import backends
    monkeypatch.setattr(backends, "execute", None)


@FUZZ
@given(case=st.one_of(
    st.sampled_from([(["--tasks", "Pendulum-v1"], "DQN cannot run Pendulum-v1"),
                     (["--tasks", "CartPole-v1,MountainCarContinuous-v0"], "needs Discrete"),
                     (["--tasks", "os:CartPole-v1"], "module"),
                     (["--seeds", "1000000000"], "MAX_SEEDS"),
                     (["--seeds", "99999999999999999999"], "MAX_SEEDS"),
                     (["--seed-list", ",".join(map(str, range(1_001)))], "MAX_SEEDS"),
                     (["--steps", "99999999999999999999"], "MAX_TIMESTEPS"),
                     (["--final-episodes", "10000000"], "MAX_EPISODES"),
                     (["--workers", "100000"], "MAX_WORKERS"),
                     (["--results", "/proc/rollback-rl-results"], "--results"),
                     (["--results", "FILE/results"], "--results")]),
    st.integers(2**32, 10**30).map(lambda seed: (["--seed-list", f"0,{seed}"], "MAX_SEED"))))
def test_compare_refuses_tasks_seeds_and_paths_before_any_training(case):
    arguments, word = case
    with scratch() as folder, pytest.MonkeyPatch.context() as patch:
        from rollback_rl.experiments.compare import backends
        patch.setattr(backends, "execute", None)  # nothing may train
        (folder / "FILE").write_text("a file")
        arguments = [a.replace("FILE", str(folder / "FILE")) for a in arguments]
        if "--results" not in arguments:
            arguments += ["--results", str(folder / "results")]
        assert_compare_refused(arguments, folder, word)


# -- plot --output -----------------------------------------------------------------------------------

def test_plot_output_folder_gets_learning_curve_png_written_where_it_says(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter
    run = tmp_path / "run"
    writer = SummaryWriter(str(run))
    for step in (100, 200):
        writer.add_scalar("eval/mean_reward", float(step), step)
    writer.close()
    (tmp_path / "out").mkdir()
    assert main(["plot", str(run), "--output", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == f"Wrote {tmp_path / 'out' / 'learning_curve.png'}"
    assert (tmp_path / "out" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out.png").exists()
    assert main(["plot", str(run), "--output", str(tmp_path / "curve")]) == 0  # no suffix: none added
    assert capsys.readouterr().out.strip() == f"Wrote {tmp_path / 'curve'}"
    assert (tmp_path / "curve").read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "curve.png").exists()
    assert_refused(["plot", str(run), "--output", "/proc/rollback-rl.png"], tmp_path, "plot")
