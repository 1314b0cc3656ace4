"""The rollback-rl command line: tiny runs in-process, bad input rejected before anything is written."""

import base64
import csv
import json
import math
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

from helpers import TINY_YAML
from rollback_rl.persistence.checkpoints import CheckpointStore
from rollback_rl.cli import build_parser, main, plan_training
from rollback_rl.hyperparams import parse_python_literal
from rollback_rl.persistence.safe_io import load_tensors

torch.set_num_threads(1)

TINY_RUN = ["--steps", "600", "--eval-freq", "200", "--eval-episodes", "2", "--no-progress"]


def train_tiny(tmp_path: Path, *extra: str, run_name: str = "tiny") -> Path:
    hyperparams = tmp_path / "tiny.yml"
    hyperparams.write_text(TINY_YAML)
    code = main(["train", "--hyperparams", str(hyperparams), "--logdir", str(tmp_path / "runs"),
                 "--run-name", run_name, *TINY_RUN, *extra])
    assert code == 0
    return tmp_path / "runs" / run_name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("cli"))


def assert_usage_error(capsys, code: int, *words: str) -> str:
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("rollback-rl: error: ")
    assert captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    for word in words:
        assert word in captured.err
    return captured.err


def test_train_writes_events_model_plot_and_run_info(tiny_run, capsys):
    assert len(list(tiny_run.glob("events.out.tfevents.*"))) == 1
    for name in ("model.safetensors", "model.zip", "learning_curve.png", "run.json", "progress.csv"):
        assert (tiny_run / name).is_file(), name
    info = json.loads((tiny_run / "run.json").read_text())
    assert info["env"] == "CartPole-v1" and info["algorithm_class"] == "RollbackDQN" and info["rollback"]
    assert info["steps"] == info["timesteps_done"] == 600
    assert [e["timestep"] for e in info["evaluations"]] == [200, 400, 600]
    assert info["hyperparameters"]["policy_kwargs"] == {"net_arch": [16]}
    assert info["hyperparameters"]["learning_rate"] == 2.3e-3  # the Zoo default, not in tiny.yml
    assert info["undo_log_bytes"] > 0 and info["rollbacks"] == []
    assert set(info["versions"]) >= {"torch", "stable_baselines3", "gymnasium"}


def test_train_prints_a_summary(tmp_path, capsys):
    train_tiny(tmp_path)
    out = capsys.readouterr().out
    assert "Evaluation (2 greedy episodes every 200 steps): best" in out
    assert "Rollbacks: 0" in out
    assert "Undo log:" in out and "MiB" in out


def test_no_rollback_runs_plain_dqn_on_the_same_evaluation_schedule(tmp_path):
    run = train_tiny(tmp_path, "--no-rollback")
    info = json.loads((run / "run.json").read_text())
    assert info["algorithm_class"] == "DQN" and not info["rollback"]
    assert [e["timestep"] for e in info["evaluations"]] == [200, 400, 600]
    assert info["undo_log_bytes"] is None


def test_other_algorithms_train_with_the_rollback_callback(tmp_path):
    code = main(["train", "--algo", "a2c", "--logdir", str(tmp_path), "--run-name", "a2c", *TINY_RUN])
    assert code == 0
    info = json.loads((tmp_path / "a2c" / "run.json").read_text())
    assert info["algorithm_class"] == "A2C" and len(info["evaluations"]) == 3


def test_evaluate_reads_the_safetensors_model_and_the_sb3_zip_alike(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run / "model.safetensors"), "--episodes", "3"]) == 0
    from_safetensors = capsys.readouterr().out.splitlines()[-1]
    assert main(["evaluate", str(tiny_run / "model.zip"), "--episodes", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == from_safetensors


def test_evaluate_prints_mean_on_fresh_seeds(tiny_run, capsys):
    assert main(["evaluate", str(tiny_run / "model.zip"), "--episodes", "3"]) == 0
    out = capsys.readouterr().out
    assert "mean return" in out and "seeds 1000000-1000002" in out


def test_evaluate_accepts_the_run_folder_and_needs_env_and_algo_without_run_json(tiny_run, tmp_path, capsys):
    assert main(["evaluate", str(tiny_run), "--episodes", "1"]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    lone_model = tmp_path / "model.zip"
    lone_model.write_bytes((tiny_run / "model.zip").read_bytes())
    assert_usage_error(capsys, main(["evaluate", str(lone_model)]), "--env")
    assert main(["evaluate", str(lone_model), "--env", "CartPole-v1", "--algo", "dqn", "--episodes", "1"]) == 0


def test_a_lone_safetensors_model_names_its_env(tiny_run, tmp_path, capsys):
    lone_model = tmp_path / "model.safetensors"
    lone_model.write_bytes((tiny_run / "model.safetensors").read_bytes())
    assert main(["evaluate", str(tmp_path / "model"), "--episodes", "1"]) == 0
    assert "on CartPole-v1" in capsys.readouterr().out


# -- files that would run code when loaded: refused, nothing runs ----------------------------------

class WritesMarker:
    """A pickle that, when unpickled, runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def sb3_zip_with(original: Path, target: Path, replace: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(original) as source, zipfile.ZipFile(target, "w") as crafted:
        for item in source.infolist():
            crafted.writestr(item, replace.get(item.filename, source.read(item.filename)))
    return target


def test_a_crafted_sb3_zip_is_refused_and_nothing_runs(tiny_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"q_net.q_net.0.weight": WritesMarker(marker)}, tmp_path / "evil.pth")
    crafted = sb3_zip_with(tiny_run / "model.zip", tmp_path / "model.zip", {"policy.pth": (tmp_path / "evil.pth").read_bytes()})
    (tmp_path / "run.json").write_text((tiny_run / "run.json").read_text())
    err = assert_usage_error(capsys, main(["evaluate", str(crafted), "--episodes", "1"]), "policy.pth", "refused")
    assert "could run code" in err
    assert not marker.exists()


def test_the_pickled_settings_of_an_sb3_zip_are_never_unpickled(tiny_run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    data = json.loads(zipfile.ZipFile(tiny_run / "model.zip").read("data"))
    payload = base64.b64encode(pickle.dumps(WritesMarker(marker))).decode()
    for value in data.values():  # every cloudpickled setting now runs code when unpickled
        if isinstance(value, dict) and ":serialized:" in value:
            value[":serialized:"] = payload
    crafted = sb3_zip_with(tiny_run / "model.zip", tmp_path / "model.zip", {"data": json.dumps(data).encode()})
    (tmp_path / "run.json").write_text((tiny_run / "run.json").read_text())
    assert main(["evaluate", str(crafted), "--episodes", "1"]) == 0
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.safetensors", "model.pkl"])
def test_a_pickle_posing_as_a_model_is_refused_and_nothing_runs(tiny_run, tmp_path, capsys, name):
    marker = tmp_path / "pwned"
    (tmp_path / name).write_bytes(pickle.dumps(WritesMarker(marker)))
    (tmp_path / "run.json").write_text((tiny_run / "run.json").read_text())
    assert_usage_error(capsys, main(["evaluate", str(tmp_path / name)]), name, "pickle", "refusing")
    assert not marker.exists()


def test_a_truncated_model_is_refused_with_a_clear_error(tiny_run, tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes((tiny_run / "model.safetensors").read_bytes()[:-50])
    assert_usage_error(capsys, main(["evaluate", str(tmp_path), "--env", "CartPole-v1"]), "model.safetensors",
                       "truncated")


# -- non-finite observations and rewards -----------------------------------------------------------

NAN_OBSERVATION_EVERY, INF_REWARD_EVERY = 97, 131


class FaultyCartPole(CartPoleEnv):
    """CartPole whose n-th step (counted since construction) gives a NaN observation when n is a multiple
    of 97, and an infinite reward when n is a multiple of 131."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps_taken = 0

    def step(self, action):
        observation, reward, terminated, truncated, info = super().step(action)
        self.steps_taken += 1
        if self.steps_taken % NAN_OBSERVATION_EVERY == 0:
            observation = np.full_like(observation, np.nan)
        if self.steps_taken % INF_REWARD_EVERY == 0:
            reward = math.inf
        return observation, reward, terminated, truncated, info


gym.register("tests/FaultyCartPole-v0", entry_point=FaultyCartPole, max_episode_steps=500)


def test_nonfinite_observations_and_rewards_end_the_episode_and_never_reach_training(tmp_path):
    hyperparams = tmp_path / "tiny.yml"
    hyperparams.write_text(TINY_YAML.replace("CartPole-v1", "tests/FaultyCartPole-v0"))
    assert main(["train", "tests/FaultyCartPole-v0", "--hyperparams", str(hyperparams), "--logdir", str(tmp_path),
                 "--run-name", "faulty", "--checkpoint-freq", "200", "--checkpoint-replay-buffer", *TINY_RUN]) == 0
    run = tmp_path / "faulty"
    info = json.loads((run / "run.json").read_text())
    assert info["nonfinite"] == {"observations": 600 // NAN_OBSERVATION_EVERY, "rewards": 600 // INF_REWARD_EVERY}
    assert math.isfinite(info["online_return"]["mean"])
    with open(run / "progress.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert float(rows[-1]["rollback/nonfinite_observations"]) >= 500 // NAN_OBSERVATION_EVERY
    tensors, _ = load_tensors(run / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    store = CheckpointStore(run / "checkpoints")
    for step in store.steps():
        checkpoint = store.load(step)
        snapshots, _ = checkpoint.load_tensors("snapshots.safetensors")
        assert all(torch.isfinite(t).all() for t in snapshots.values() if t.is_floating_point())
        with np.load(checkpoint.file("replay_buffer.npz")) as buffer:
            for name in ("observations", "next_observations", "rewards"):
                assert np.isfinite(buffer[name]).all(), name


class NaNAfterThreeResetsCartPole(CartPoleEnv):
    """CartPole whose resets, after the first three, give a NaN observation every time."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.resets = 0

    def reset(self, *, seed=None, options=None):
        observation, info = super().reset(seed=seed, options=options)
        self.resets += 1
        return (np.full_like(observation, np.nan) if self.resets > 3 else observation), info


gym.register("tests/NaNAfterThreeResets-v0", entry_point=NaNAfterThreeResetsCartPole, max_episode_steps=500)


def test_an_env_whose_resets_keep_giving_nan_stops_training_with_one_line_and_the_model_saved(tmp_path, capsys):
    hyperparams = tmp_path / "tiny.yml"
    hyperparams.write_text(TINY_YAML.replace("CartPole-v1", "tests/NaNAfterThreeResets-v0"))
    code = main(["train", "tests/NaNAfterThreeResets-v0", "--hyperparams", str(hyperparams), "--logdir", str(tmp_path),
                 "--run-name", "nan", *TINY_RUN])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("rollback-rl: error: training stopped at timestep ")
    assert "non-finite observation 10 times in a row" in err and "the model so far is saved" in err
    info = json.loads((tmp_path / "nan" / "run.json").read_text())
    assert info["interrupted"] and "non-finite" in info["stop_reason"] and 0 < info["timesteps_done"] < 600
    assert load_tensors(tmp_path / "nan" / "model.safetensors")[1]["num_timesteps"] == info["timesteps_done"]


def test_plot_redraws_the_same_png(tiny_run, capsys):
    png = tiny_run / "learning_curve.png"
    drawn_by_train = png.read_bytes()
    png.unlink()
    assert main(["plot", str(tiny_run)]) == 0
    assert png.read_bytes() == drawn_by_train


# -- bad input: one line on stderr, exit status 2, no run folder ------------------------------------

@pytest.mark.parametrize("yaml_body, words", [
    ('  learning_rate: "fast"\n', ["learning_rate", "'fast'"]),
    ("  batch_size: 1.5\n", ["batch_size", "1.5"]),
    ("  learnin_rate: 0.001\n", ["learnin_rate", "did you mean 'learning_rate'"]),
    ("  gamma: 1.5\n", ["gamma"]),
    ("  policy_kwargs: \"__import__('os').system('echo hacked')\"\n", ["policy_kwargs", "not allowed"]),
    ("  normalize: true\n", ["normalize", "not supported"]),
])
def test_bad_hyperparameter_file_is_rejected_before_the_run_folder(tmp_path, capsys, yaml_body, words):
    hyperparams = tmp_path / "bad.yml"
    hyperparams.write_text("CartPole-v1:\n" + yaml_body)
    code = main(["train", "--hyperparams", str(hyperparams), "--logdir", str(tmp_path / "runs"), *TINY_RUN])
    assert_usage_error(capsys, code, str(hyperparams), *words)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("arguments, words", [
    (["CartPol-v1"], ["CartPol-v1"]),
    (["--algo", "xyz"], ["--algo", "xyz"]),
    (["--steps", "-5"], ["--steps", "-5"]),
    (["--steps", "100", "--eval-freq", "200"], ["--steps", "--eval-freq"]),
    (["--hyperparams", "no-such-file.yml"], ["no-such-file.yml"]),
    (["--set", "batch_size=big"], ["--set", "batch_size"]),
    (["--algo", "sac"], ["SAC", "CartPole-v1"]),  # SAC needs continuous actions
    (["--no-rollback", "--set", "undo_depth=10"], ["undo_depth", "DQN"]),
    (["--run-name", "../escape"], ["--run-name"]),
    (["--cool-on-solve", "0"], ["--cool-on-solve", "fraction in (0, 1]"]),
])
def test_bad_train_arguments_are_rejected_before_the_run_folder(tmp_path, capsys, arguments, words):
    code = main(["train", "--logdir", str(tmp_path / "runs"), "--no-progress", *arguments])
    assert_usage_error(capsys, code, *words)
    assert not (tmp_path / "runs").exists()


def test_hyperparameter_file_without_a_section_for_the_env_is_rejected(tmp_path, capsys):
    hyperparams = tmp_path / "acrobot.yml"
    hyperparams.write_text("Acrobot-v1:\n  batch_size: 32\n")
    code = main(["train", "--hyperparams", str(hyperparams), "--logdir", str(tmp_path / "runs")])
    assert_usage_error(capsys, code, "no section for", "CartPole-v1", "Acrobot-v1")


def test_existing_run_name_is_rejected(tiny_run, capsys):
    code = main(["train", "--logdir", str(tiny_run.parent), "--run-name", tiny_run.name])
    assert_usage_error(capsys, code, "already exists")


def test_missing_model_file_is_rejected(tmp_path, capsys):
    assert_usage_error(capsys, main(["evaluate", str(tmp_path / "nothing.zip")]), "nothing.zip", "not found")


def test_plot_rejects_a_missing_or_empty_run_folder(tmp_path, capsys):
    assert_usage_error(capsys, main(["plot", str(tmp_path / "missing")]), "missing", "not found")
    assert_usage_error(capsys, main(["plot", str(tmp_path)]), "no TensorBoard event file")


def test_zoo_policy_kwargs_strings_are_parsed_never_evaluated():
    assert parse_python_literal("dict(net_arch=[256, 256], activation_fn=nn.ReLU)") == \
        {"net_arch": [256, 256], "activation_fn": torch.nn.ReLU}
    for unsafe in ("__import__('os')", "dict(a=open('x'))", "nn.Module.__subclasses__()", "[x for x in ()]"):
        with pytest.raises(ValueError, match="not allowed"):
            parse_python_literal(unsafe)


def test_console_script_reports_bad_input_in_one_line(tmp_path):
    script = Path(sys.executable).parent / "rollback-rl"
    result = subprocess.run([str(script), "train", "--steps", "-5", "--logdir", str(tmp_path / "runs")],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("rollback-rl: error: argument --steps")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("option", "max_restores"), [([], 2), (["--max-restores", "5"], 5),
                                                       (["--max-restores", "0"], None)])
def test_max_restores_0_on_the_command_line_is_none_no_limit_in_python(tmp_path, option, max_restores):
    args = build_parser().parse_args(["train", "--logdir", str(tmp_path), *TINY_RUN, *option])
    args.argv = []
    assert plan_training(args).max_restores == max_restores
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # planning writes nothing


@pytest.mark.parametrize(("option", "cool_on_solve"), [([], 0.1), (["--cool-on-solve", "0.5"], 0.5),
                                                        (["--cool-on-solve", "1"], None)])
def test_cool_on_solve_1_on_the_command_line_is_none_never_in_python(tmp_path, option, cool_on_solve):
    args = build_parser().parse_args(["train", "--logdir", str(tmp_path), *TINY_RUN, *option])
    args.argv = []
    assert plan_training(args).cool_on_solve == cool_on_solve


def test_help_says_how_to_ask_for_no_limit(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "0 = no limit" in " ".join(capsys.readouterr().out.split())


class FrozenClock:
    """Stands for the ``datetime`` module: every ``datetime.now()`` is the same second."""

    class datetime:
        @staticmethod
        def now():
            import datetime
            return datetime.datetime(2025, 1, 2, 3, 4, 5)


def test_two_identical_train_commands_in_the_same_second_get_two_run_folders(tmp_path, monkeypatch, capsys):
    from rollback_rl import cli
    monkeypatch.setattr(cli, "datetime", FrozenClock)
    hyperparams = tmp_path / "tiny.yml"
    hyperparams.write_text(TINY_YAML)
    argv = ["train", "--hyperparams", str(hyperparams), "--logdir", str(tmp_path / "runs"), "--steps", "200",
            "--eval-freq", "200", "--eval-episodes", "1", "--no-progress"]
    assert main(argv) == 0 and main(argv) == 0
    name = "CartPole-v1_dqn_s0_20250102-030405"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [name, f"{name}-2"]
    assert f"Run folder: {tmp_path / 'runs' / name}-2" in capsys.readouterr().out
