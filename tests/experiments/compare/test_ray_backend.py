"""The Ray backend: a real local Ray instance gives the same records as the local process pool."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from rollback_rl.experiments.compare import command
from rollback_rl.experiments.compare.command import add_compare_arguments, run_compare
from rollback_rl.experiments.compare.records import read_record

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'rollback-rl[ray]')")

TINY = ["--tasks", "CartPole-v1", "--arms", "vanilla,best_model,rollback", "--seed-list", "3",
        "--steps", "600", "--eval-freq", "200", "--final-episodes", "3",
        "--set", "policy_kwargs=dict(net_arch=[16])", "--set", "learning_starts=100", "--set", "gradient_steps=8"]
# What a run computes, as opposed to when and where it ran.
DETERMINISTIC_FIELDS = ("task", "arm", "seed", "settings", "hyperparameters", "final_policy", "eval_curve",
                        "peak_eval", "lowest_eval", "online_return", "timesteps", "eval_env_steps", "rollbacks",
                        "n_rebases")


def compare(*argv: str) -> int:
    parser = add_compare_arguments(argparse.ArgumentParser(prog="rollback-rl compare"))
    return run_compare(parser.parse_args(list(argv)))


def test_ray_gives_the_records_of_the_local_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(command, "write_report", lambda plan: 0)  # test_compare.py covers the report
    assert not ray.is_initialized()
    # One Ray CPU: the runs take a second, starting a worker process (torch, SB3) several on a busy machine.
    assert compare("--backend", "ray", "--workers", "1", "--results", str(tmp_path / "ray"), *TINY) == 0
    assert not ray.is_initialized()  # the instance it started is stopped
    assert compare("--backend", "local", "--workers", "2", "--results", str(tmp_path / "local"), *TINY) == 0

    ray_files = sorted(p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("seed*.json"))
    local_files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("seed*.json"))
    assert ray_files == local_files and len(ray_files) == 4  # rollback also writes rollback_no_end_check
    for relative in ray_files:
        on_ray, on_pool = read_record(tmp_path / "ray" / relative), read_record(tmp_path / "local" / relative)
        assert on_ray["execution"] == {"backend": "ray", "workers": 1}
        assert on_pool["execution"] == {"backend": "local", "workers": 2}
        for field in DETERMINISTIC_FIELDS:
            assert on_ray[field] == on_pool[field], f"{relative}: {field} differs"
