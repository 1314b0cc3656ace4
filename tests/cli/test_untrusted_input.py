"""The command line on hostile input, in a subprocess under ``ulimit -v``: bombs, huge and non-finite
numbers, forged model files, links to private files. Each gets one ``rollback-rl: error:`` line naming
the limit, exit status 2, no traceback, nothing written, nothing of a private file printed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from stable_baselines3 import DQN

from helpers import TINY_YAML
from rollback_rl.cli import main
from rollback_rl.persistence.safe_io import load_tensors, save_tensors
from rollback_rl.persistence.safe_model import save_model

torch.set_num_threads(1)
REPOSITORY = Path(__file__).resolve().parents[2]
MEMORY_CAP_KB = 2_000_000  # importing torch and SB3 and building a small DQN takes about 1 GB
SECRET = "TOPSECRET-0123456789"


def billion_laughs() -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "\n".join(lines)


def zip_bomb(path: Path, inflated: int = 10 * 2**30) -> Path:
    """An 11 MB zip whose ``data`` entry inflates to ``inflated`` zero bytes (ZIP64, written by hand)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    raw = block * (inflated // 2**20) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 8, 0, 0x21, 0, 0xFFFFFFFF, 0xFFFFFFFF, 4, 20)
    local += b"data" + struct.pack("<HHQQ", 1, 16, inflated, len(raw)) + raw
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 8, 0, 0x21, 0, 0xFFFFFFFF, 0xFFFFFFFF,
                          4, 28, 0, 0, 0, 0, 0xFFFFFFFF) + b"data" + struct.pack("<HHQQQ", 1, 24, inflated, len(raw), 0)
    record = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 1, 1, len(central), len(local))
    locator = struct.pack("<IIQI", 0x07064B50, 0, len(local) + len(central), 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(local + central + record + locator + end)
    return path


def forged_model(folder: Path, **settings) -> Path:
    """A model file with ``settings`` written into it and its checksum recomputed (so it verifies)."""
    folder.mkdir()
    path = save_model(DQN("MlpPolicy", "CartPole-v1", buffer_size=100, policy_kwargs=dict(net_arch=[8])), folder / "model")
    tensors, metadata = load_tensors(path)
    metadata["settings"].update(settings)
    save_tensors(path, tensors, metadata)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, list[tuple[list[str], str]]]:
    """A folder of hostile files, and the command lines that use them, each with the word its error
    must contain."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "bomb.yml").write_text("CartPole-v1:\n  policy_kwargs:\n" + textwrap.indent(billion_laughs(), "    "))
    (folder / "deep.yml").write_text("CartPole-v1:\n  policy_kwargs: " + "[" * 200_000 + "]" * 200_000 + "\n")
    (folder / "private.key").write_text(SECRET * 10)
    linked = folder / "linked"
    linked.mkdir()
    (linked / "model.safetensors").symlink_to(folder / "private.key")
    sparse = folder / "sparse"
    sparse.mkdir()
    with open(sparse / "model.safetensors", "wb") as file:
        file.truncate(20 * 2**30)
    logdir = str(folder / "runs")
    train = ["train", "--no-progress", "--logdir", logdir]
    evaluate = ["evaluate", "--env", "CartPole-v1", "--episodes", "1"]
    commands = [
        ([*train, "--hyperparams", "/dev/zero"], "MAX_YAML_BYTES"),
        ([*train, "--hyperparams", str(folder / "bomb.yml")], "MAX_YAML_NODES"),
        ([*train, "--hyperparams", str(folder / "deep.yml")], "MAX_NESTING_DEPTH"),
        ([*train, "--set", "policy_kwargs={" + billion_laughs().replace("\n", ", ") + "}"], "MAX_YAML_NODES"),
        ([*train, "--set", "policy_kwargs=" + "[" * 450], "MAX_NESTING_DEPTH"),
        ([*train, "--set", "gamma=" + "9" * 2_000], "MAX_SET_VALUE_CHARS"),
        ([*train, "--set", "learning_rate=.inf"], "finite"),
        ([*train, "--set", "learning_rate=.nan"], "finite"),
        ([*train, "--set", "n_timesteps=1e30"], "MAX_TIMESTEPS"),
        ([*train, "--set", "buffer_size=1e13"], "MAX_BUFFER_SIZE"),
        ([*train, "--set", "n_envs=100000000"], "MAX_N_ENVS"),
        ([*train, "--set", "policy_kwargs=dict(net_arch=[40000, 40000])"], "MAX_LAYER_WIDTH"),
        ([*evaluate, "--algo", "dqn", str(zip_bomb(folder / "bomb.zip"))], "MAX_TENSOR_FILE_BYTES"),
        ([*evaluate, str(sparse / "model.safetensors")], "MAX_TENSOR_FILE_BYTES"),
        ([*evaluate, str(linked / "model.safetensors")], "outside its folder"),
        ([*evaluate, str(forged_model(folder / "buffer", buffer_size=10**13))], "MAX_BUFFER_SIZE"),
        ([*evaluate, str(forged_model(folder / "net", policy_kwargs={"net_arch": [40_000, 40_000]}))],
         "MAX_LAYER_WIDTH"),
        ([*evaluate, str(forged_model(folder / "rate", learning_rate=float("inf")))], "finite"),
        ([*train, "--steps", "9" * 20], "MAX_TIMESTEPS"),
        ([*train, "--steps", "9" * 5_000], "--steps"),
        ([*train, "--eval-episodes", "9" * 20], "MAX_EPISODES"),
        ([*train, "--seed", "9" * 20], "MAX_SEED"),
        ([*train, "--device", "meta"], "meta"),
        ([*train, "--run-name", "r" * 300], "MAX_NAME_BYTES"),
        ([*train, "--run-name", "bad\udcffname"], "UTF-8"),
        (["train", "--no-progress", "--logdir", "/proc/rollback-rl-runs"], "cannot create the run folder"),
        ([*train, "os:CartPole-v1"], "module"),
        ([*evaluate, "--episodes", "9" * 20, str(sparse / "model.safetensors")], "MAX_EPISODES"),
    ]
    return folder, commands


@pytest.mark.skipif(sys.platform != "linux", reason="ulimit -v")
def test_hostile_input_gets_one_line_and_exit_2_under_a_memory_cap(hostile):
    folder, commands = hostile
    driver = textwrap.dedent("""
        import contextlib, io, json, sys, warnings
        warnings.simplefilter("ignore")
        from rollback_rl.cli import main
        for argv in json.loads(sys.argv[1]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
            print(json.dumps([code, err.getvalue()]), flush=True)
        """)
    argv = json.dumps([command for command, _ in commands])
    shell = f"ulimit -v {MEMORY_CAP_KB} && exec {shlex.quote(sys.executable)} -c {shlex.quote(driver)} {shlex.quote(argv)}"
    result = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=300, cwd=folder,
                            env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(outcomes) == len(commands), result.stderr[-3000:]
    for (command, word), (code, stderr) in zip(commands, outcomes):
        shown = " ".join(command)[:120]
        assert code == 2, (shown, code, stderr[-500:])
        assert stderr.startswith("rollback-rl: error: ") and stderr.count("\n") == 1, (shown, stderr[-500:])
        assert word in stderr and SECRET not in stderr and len(stderr) < 500, (shown, stderr)
    assert not (folder / "runs").exists()


# -- run folders are data: forged checkpoint manifests, planted links -----------------------------

UNTRUSTED_TRIED: list[str] = []  # one entry per forged or planted run folder given to main()


@pytest.fixture(scope="module", autouse=True)
def report_count(request):
    yield
    if UNTRUSTED_TRIED:
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            print(f"\ntest_untrusted_input: {len(UNTRUSTED_TRIED)} forged or planted run folders tried in-process")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run of 400 steps with checkpoints at 0, 200 and 400 (the newest two kept), whose run.json was
    lost: ``--resume`` continues it."""
    folder = tmp_path_factory.mktemp("stopped")
    (folder / "tiny.yml").write_text(TINY_YAML)
    assert main(["train", "--hyperparams", str(folder / "tiny.yml"), "--logdir", str(folder), "--run-name", "run",
                 "--steps", "400", "--eval-freq", "200", "--eval-episodes", "2", "--checkpoint-freq", "200",
                 "--no-progress"]) == 0
    (folder / "run" / "run.json").unlink()
    return folder / "run"


def snapshot_of(folder: Path) -> dict[str, bytes | str]:
    """Every path under ``folder``: a link's target, a file's bytes, or "" for a folder."""
    def content(path: Path) -> bytes | str:
        if path.is_symlink():
            return f"-> {os.readlink(path)}"
        return path.read_bytes() if path.is_file() else ""
    return {str(p.relative_to(folder)): content(p) for p in sorted(folder.rglob("*"))}


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    UNTRUSTED_TRIED.append(" ".join(argv))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def forge_manifests(run_dir: Path, change) -> None:
    """Apply ``change`` to the run settings in every checkpoint's manifest (nothing else checks them)."""
    for manifest in run_dir.glob("checkpoints/checkpoint-*/manifest.json"):
        values = json.loads(manifest.read_text())
        values["metadata"] = change(values["metadata"])
        manifest.write_text(json.dumps(values))


def with_run(**changes):
    return lambda metadata: {**metadata, "run": {**metadata["run"], **changes}}


def with_hyperparameters(**changes):
    return lambda metadata: {**metadata, "run": {**metadata["run"],
                                                  "hyperparameters": {**metadata["run"]["hyperparameters"], **changes}}}


FORGED = {
    "steps_text": (with_run(steps="x"), "steps"),
    "steps_huge": (with_run(steps=10**30), "MAX_TIMESTEPS"),
    "eval_freq_0": (with_run(eval_freq=0), "eval_freq"),
    "checkpoint_freq_negative": (with_run(checkpoint_freq=-5), "checkpoint_freq"),
    "eval_episodes_huge": (with_run(eval_episodes=10**12), "MAX_EPISODES"),
    "drop_nan": (with_run(drop=float("nan")), "drop"),
    "module_env_id": (with_run(env_id="planted_module:Anything-v0"), "module"),
    "algo_unknown": (with_run(algo="evil"), "algo"),
    "learning_rate_inf": (with_hyperparameters(learning_rate=float("inf")), "finite"),
    "buffer_size_huge": (with_hyperparameters(buffer_size=10**13), "MAX_BUFFER_SIZE"),
    "n_envs_changed": (with_hyperparameters(n_envs=2), "n_envs"),
    "n_envs_huge": (with_hyperparameters(n_envs=10**8), "MAX_N_ENVS"),
    "run_not_a_mapping": (lambda metadata: {**metadata, "run": ["steps", 400]}, "not a mapping"),
    "metadata_a_list": (lambda metadata: [1, 2, 3], "not a mapping"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_run_settings_in_a_checkpoint_are_refused_before_anything_is_written(stopped_run, tmp_path,
                                                                                    monkeypatch, case):
    change, word = FORGED[case]
    run_dir = Path(shutil.copytree(stopped_run, tmp_path / "run"))
    forge_manifests(run_dir, change)
    marker = tmp_path / "imported"
    (tmp_path / "planted_module.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    before = snapshot_of(run_dir)
    code, _, err = run_cli(["train", "--resume", str(run_dir), "--no-progress"])
    assert code == 2 and err.startswith("rollback-rl: error: --resume ") and err.count("\n") == 1, err
    assert word in err and "Traceback" not in err, err
    assert snapshot_of(run_dir) == before
    assert not marker.exists()


def test_links_planted_at_the_files_a_resume_writes_are_replaced_not_written_through(stopped_run, tmp_path):
    run_dir = Path(shutil.copytree(stopped_run, tmp_path / "run"))
    outside = {name: tmp_path / f"outside-{name}" for name in ("model.zip", "learning_curve.png",
                                                               "model.safetensors")}
    for name, target in outside.items():
        target.write_text(SECRET)
        (run_dir / name).unlink()
        (run_dir / name).symlink_to(target)
    (run_dir / "evaluations").symlink_to(tmp_path, target_is_directory=True)
    code, _, err = run_cli(["train", "--resume", str(run_dir), "--no-progress"])
    assert code == 0, err
    assert all(target.read_text() == SECRET for target in outside.values())
    assert all((run_dir / name).is_file() and not (run_dir / name).is_symlink() for name in outside)
    assert not (run_dir / "evaluations").is_symlink()
    code, _, err = run_cli(["plot", str(run_dir)])
    assert code == 0 and outside["learning_curve.png"].read_text() == SECRET


@pytest.mark.parametrize("name", ["progress.csv", "run.json"])
def test_a_resume_refuses_a_linked_progress_csv_or_run_json_without_reading_or_writing_it(stopped_run, tmp_path, name):
    run_dir = Path(shutil.copytree(stopped_run, tmp_path / "run"))
    target = tmp_path / "private.key"
    target.write_text(SECRET)
    (run_dir / name).unlink(missing_ok=True)
    (run_dir / name).symlink_to(target)
    before = snapshot_of(run_dir)
    code, _, err = run_cli(["train", "--resume", str(run_dir), "--no-progress"])
    assert code == 2 and err.count("\n") == 1 and "outside its folder" in err and SECRET not in err, err
    assert snapshot_of(run_dir) == before and target.read_text() == SECRET


def test_plot_refuses_an_events_file_that_is_a_link(stopped_run, tmp_path):
    run_dir = Path(shutil.copytree(stopped_run, tmp_path / "run"))
    for path in run_dir.glob("events.out.tfevents.*"):
        path.unlink()
    (run_dir / "events.out.tfevents.1.planted").symlink_to("/dev/zero")
    before = snapshot_of(run_dir)
    code, out, err = run_cli(["plot", str(run_dir)])
    assert code == 2 and err.count("\n") == 1 and "refusing to read it" in err, err
    assert snapshot_of(run_dir) == before
