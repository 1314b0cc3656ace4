"""rollback-rl compare: records per (task, arm, seed), resuming, the report recomputed from records, bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from stable_baselines3 import DQN

from rollback_rl.evaluation import FINAL_SEED_OFFSET
from rollback_rl.experiments.compare import backends, report
from rollback_rl.experiments.compare.arms import CoolOnSolvedEvaluation
from rollback_rl.experiments.compare.backends import BackendUnavailable, make_backend
from rollback_rl.experiments.compare.command import add_compare_arguments, run_compare
from rollback_rl.experiments.compare.records import read_record, record_path
from rollback_rl.core.statistics import iqm, normalised_area_under_curve, stratified_bootstrap_interval, wilson_interval

torch.set_num_threads(1)

ARMS = ("vanilla", "best_model", "rollback")
SEEDS = (0, 1)
# Small enough to train in about a second: 600 steps, a 16-unit network, few gradient steps.
TINY = ["--steps", "600", "--eval-freq", "200", "--final-episodes", "3",
        "--set", "policy_kwargs=dict(net_arch=[16])", "--set", "learning_starts=100", "--set", "gradient_steps=8"]
FEW_RESAMPLES = 200  # the report's bootstrap, cut down for speed (the statistic is the same)


def compare(*argv: str) -> int:
    parser = add_compare_arguments(argparse.ArgumentParser(prog="rollback-rl compare"))
    return run_compare(parser.parse_args(list(argv)))


def tiny_compare(results: Path, *extra: str) -> int:
    return compare("--arms", ",".join(ARMS), "--seeds", str(len(SEEDS)), "--workers", "1",
                   "--results", str(results), *TINY, *extra)


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory: pytest.TempPathFactory) -> Path:
    results = tmp_path_factory.mktemp("compare") / "results"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "BOOTSTRAP_RESAMPLES", FEW_RESAMPLES)
        assert tiny_compare(results) == 0
    return results


@pytest.fixture
def few_resamples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "BOOTSTRAP_RESAMPLES", FEW_RESAMPLES)


def records_of(results: Path) -> dict[tuple[str, int], dict]:
    return {(arm, seed): read_record(record_path(results, "CartPole-v1", arm, seed)) for arm in ARMS for seed in SEEDS}


def test_writes_one_record_per_task_arm_and_seed(benchmark: Path) -> None:
    records = records_of(benchmark)
    # The rollback run also writes its twin arm: the same run's weights before the end-of-training check.
    written = (*ARMS, "rollback_no_end_check")
    assert sorted(p.relative_to(benchmark).as_posix() for p in benchmark.rglob("seed*.json")) == sorted(
        f"CartPole-v1/{arm}/seed{seed}.json" for arm in written for seed in SEEDS)
    for (arm, seed), record in records.items():
        assert (record["task"], record["arm"], record["seed"]) == ("CartPole-v1", arm, seed)
        assert record["settings"]["steps"] == 600 and record["hyperparameters"]["policy_kwargs"] == {"net_arch": [16]}
        assert len(record["final_policy"]["returns"]) == 3
        # As 'rollback-rl evaluate --seed 1000*seed' would replay them.
        assert record["final_policy"]["first_episode_seed"] == FINAL_SEED_OFFSET + 1_000 * seed
        assert record["eval_curve"]["timesteps"][:3] == [200, 400, 600]
        assert record["peak_eval"] == max(record["eval_curve"]["mean"])
        assert record["eval_env_steps"] >= sum(len(r) for r in record["eval_curve"]["episode_returns"])
        assert record["online_return"]["episodes"] > 0
        made_by = record["provenance"]
        assert set(made_by) == {"rollback_rl", "git_commit", "git_dirty", "versions", "machine", "settings"}
        assert made_by["machine"]["torch_threads"] == 1 and "stable_baselines3" in made_by["versions"]
        assert (made_by["settings"]["seed"], made_by["settings"]["steps"]) == (seed, 600)
        assert record["time_s"]["learn"] > record["time_s"]["evaluating"] > 0
    for seed in SEEDS:  # one training run serves both arms
        vanilla, best = records[("vanilla", seed)], records[("best_model", seed)]
        assert vanilla["eval_curve"] == best["eval_curve"] and vanilla["time_s"]["learn"] == best["time_s"]["learn"]
        assert best["final_policy"]["source"].startswith("best_model.zip")
        assert records[("rollback", seed)]["algorithm"] == "RollbackDQN"
        before_check = read_record(record_path(benchmark, "CartPole-v1", "rollback_no_end_check", seed))
        assert before_check["eval_curve"]["timesteps"] == records[("rollback", seed)]["eval_curve"]["timesteps"][
            :len(before_check["eval_curve"]["timesteps"])]
        assert before_check["training_episodes"] == records[("rollback", seed)]["training_episodes"]
        assert vanilla["algorithm"] == "DQN"


def test_second_invocation_runs_nothing(benchmark: Path, monkeypatch: pytest.MonkeyPatch, few_resamples: None,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def must_not_run(spec):
        raise AssertionError(f"ran {spec} again")
    monkeypatch.setattr(backends, "execute", must_not_run)
    before = {path: path.stat().st_mtime_ns for path in benchmark.rglob("seed*.json")}
    assert tiny_compare(benchmark) == 0
    assert "Nothing to run" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in benchmark.rglob("seed*.json")} == before


def copy_records(results: Path, destination: Path) -> Path:
    for path in results.rglob("seed*.json"):
        target = destination / path.relative_to(results)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    return destination


def test_an_interrupted_benchmark_runs_only_the_missing_runs(benchmark: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, few_resamples: None) -> None:
    results = copy_records(benchmark, tmp_path / "results")
    lost = read_record(record_path(results, "CartPole-v1", "rollback", 1))
    record_path(results, "CartPole-v1", "rollback", 1).unlink()
    ran = []

    def replay(spec):
        ran.append((spec.task, spec.training_run, spec.seed))
        return [lost]
    monkeypatch.setattr(backends, "execute", replay)
    assert tiny_compare(results) == 0
    assert ran == [("CartPole-v1", "rollback", 1)]
    assert read_record(record_path(results, "CartPole-v1", "rollback", 1))["final_policy"] == lost["final_policy"]


def test_report_numbers_are_the_statistics_of_the_records(benchmark: Path) -> None:
    written = json.loads((benchmark / "report.json").read_text())
    assert written["bootstrap_resamples"] == FEW_RESAMPLES
    records = records_of(benchmark)
    rows = {row["arm"]: row for row in written["rows"]}
    assert list(rows) == list(ARMS)
    for arm in ARMS:
        finals = [float(np.mean(records[(arm, seed)]["final_policy"]["returns"])) for seed in SEEDS]
        estimate, low, high = stratified_bootstrap_interval({"CartPole-v1": finals}, iqm, resamples=FEW_RESAMPLES)
        assert rows[arm]["final_return_iqm"] == pytest.approx({"estimate": estimate, "low": low, "high": high})
        assert rows[arm]["final_return_iqm"]["estimate"] == pytest.approx(iqm(finals))
        collapsed = sum(f < 0.5 * records[(arm, seed)]["peak_eval"] for f, seed in zip(finals, SEEDS))
        rate, low, high = wilson_interval(collapsed, len(SEEDS))
        assert (rows[arm]["collapses"], rows[arm]["collapse_rate"]) == (
            collapsed, pytest.approx({"estimate": rate, "low": low, "high": high}))
        areas = [normalised_area_under_curve(records[(arm, s)]["eval_curve"]["timesteps"],
                                             records[(arm, s)]["eval_curve"]["mean"], 0.0, 500.0) for s in SEEDS]
        assert rows[arm]["eval_curve_area_iqm"]["estimate"] == pytest.approx(iqm(areas))
        in_place = [report.in_place_curve_area(records[(arm, s)], 0.0, 500.0) for s in SEEDS]
        assert rows[arm]["in_place_eval_curve_area_iqm"]["estimate"] == pytest.approx(iqm(in_place))
        if arm != "rollback":
            assert in_place == pytest.approx(areas)
        online = [records[(arm, s)]["online_return"]["mean"] for s in SEEDS]
        assert rows[arm]["online_return_iqm"]["estimate"] == pytest.approx(iqm(online))
        assert rows[arm]["eval_env_steps_per_run"] == pytest.approx(np.mean([records[(arm, s)]["eval_env_steps"]
                                                                             for s in SEEDS]))
    assert rows["vanilla"]["overhead_vs_vanilla"] == pytest.approx(1.0)
    assert rows["best_model"]["overhead_vs_vanilla"] == pytest.approx(1.0)  # the same training run
    markdown = (benchmark / "report.md").read_text()
    assert markdown.startswith("| Task | Arm |") and "| CartPole-v1 | rollback | 2 |" in markdown


def test_report_figure_is_written(benchmark: Path) -> None:
    png = (benchmark / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_report_only_reports_every_seed_found(benchmark: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             few_resamples: None) -> None:
    results = copy_records(benchmark, tmp_path / "results")
    monkeypatch.setattr(backends, "execute", None)  # nothing may run
    assert compare("--report-only", "--results", str(results), "--arms", "rollback,best_model") == 0
    rows = json.loads((results / "report.json").read_text())["rows"]
    assert [(row["arm"], row["seeds"]) for row in rows] == [("rollback", list(SEEDS)), ("best_model", list(SEEDS))]


@pytest.mark.parametrize(("argv", "message"), [
    (["--tasks", "NoSuchTask-v9"], "unknown task 'NoSuchTask-v9'"),
    (["--arms", "vanilla,nonsense"], "unknown arm 'nonsense': choose from vanilla, best_model, rollback"),
    (["--seeds", "0"], "--seeds must be a positive integer, got 0"),
    (["--seeds", "-2"], "--seeds must be a positive integer, got -2"),
    (["--seed-list", "3,1,3"], "--seed-list names 3 twice"),
    (["--set", "learning_rate"], "--set expected KEY=VALUE, got 'learning_rate'"),
    (["--seed-list", "1,x"], "--seed-list must be integers >= 0"),
    (["--steps", "100"], "no evaluation would run"),
    (["--set", "no_such_key=1"], "unknown hyperparameter 'no_such_key'"),
    (["--ray-address", "auto"], "--ray-address needs --backend ray"),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                argv: list[str], message: str) -> None:
    assert compare("--results", str(tmp_path / "results"), *argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("rollback-rl compare: error: ") and captured.err.count("\n") == 1
    assert message in captured.err
    assert not (tmp_path / "results").exists()


def test_records_made_with_other_settings_are_not_mixed(benchmark: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tiny_compare(benchmark, "--final-episodes", "4") == 2
    assert "choose another --results folder" in capsys.readouterr().err


def test_ray_backend_without_ray_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray now fails
    with pytest.raises(BackendUnavailable, match=r"pip install 'rollback-rl\[ray\]'"):
        make_backend("ray")
    assert compare("--backend", "ray", "--results", str(tmp_path), "--seeds", "1", *TINY) == 2
    assert "rollback-rl[ray]" in capsys.readouterr().err


@pytest.mark.parametrize(("peak", "lowest", "final", "collapsed"), [
    (500.0, 9.0, 240.0, True),  # non-negative returns: below 50% of the peak
    (500.0, 9.0, 260.0, False),
    (-100.0, -500.0, -350.0, True),  # negative returns: lost 62.5% of the learned range (-500 to -100)
    (-100.0, -500.0, -250.0, False),  # lost 37.5%
    (200.0, -300.0, -10.0, False),  # returns of both signs: lost 42% of the learned range (-300 to 200)
])
def test_collapse_at_end_is_measured_on_the_learned_range(peak: float, lowest: float, final: float,
                                                          collapsed: bool) -> None:
    record = {"peak_eval": peak, "lowest_eval": lowest, "final_policy": {"mean": final}}
    assert report.collapsed_at_end(record) is collapsed


def test_in_place_curve_replaces_each_collapsed_score_by_the_restored_weights_check() -> None:
    record = {"eval_curve": {"timesteps": [100, 200, 300, 400, 450], "mean": [50.0, 500.0, 20.0, 480.0, 9.0]},
              "rollbacks": [{"timestep": 300, "verified_score": 490.0},
                            {"timestep": 400, "verified_score": None},  # online mode: no check, curve kept
                            {"timestep": 450, "verified_score": 470.0},
                            {"timestep": 450, "verified_score": 495.0}]}  # the end-of-training restore came last
    assert report.in_place_curve(record) == [50.0, 500.0, 490.0, 480.0, 495.0]
    assert record["eval_curve"]["mean"] == [50.0, 500.0, 20.0, 480.0, 9.0]  # the record is left as it is
    assert report.in_place_curve_area(record, 0.0, 500.0) == pytest.approx(
        normalised_area_under_curve([100, 200, 300, 400, 450], [50.0, 500.0, 490.0, 480.0, 495.0], 0.0, 500.0))
    assert report.in_place_curve_area(record, 0.0, 500.0) > report.eval_curve_area(record, 0.0, 500.0)


def test_the_cool_on_solve_candidate_cools_once_at_the_first_solved_evaluation():
    model = DQN("MlpPolicy", "CartPole-v1", learning_rate=1e-3, policy_kwargs=dict(net_arch=[8]))
    rollback = SimpleNamespace(scores=[SimpleNamespace(mean=470.0)])
    cool = CoolOnSolvedEvaluation(rollback, threshold=475.0)
    cool.init_callback(model)
    cool.on_step()
    assert model.lr_schedule(1.0) == pytest.approx(1e-3) and cool.cooled_at is None
    rollback.scores.append(SimpleNamespace(mean=475.0))
    cool.on_step()
    rollback.scores.append(SimpleNamespace(mean=500.0))
    cool.on_step()  # once only
    assert model.lr_schedule(1.0) == pytest.approx(1e-4) and cool.cooled_at == 0
