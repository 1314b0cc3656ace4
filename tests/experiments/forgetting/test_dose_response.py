"""The recency dose-response: metrics of hand-made records, statistics over seeds, and the command end to end."""

import argparse
import json
import math

import pytest
import torch

from rollback_rl.experiments.forgetting.command import add_forgetting_arguments, run_forgetting
from rollback_rl.experiments.forgetting.dose_response import (DoseResponseSettings, cells, collapsed_evaluations,
                                                              markdown, report, run_metrics)
from rollback_rl.experiments.forgetting.over_seeds import paired_difference

torch.set_num_threads(1)

TINY_OVERRIDES = ["policy_kwargs=dict(net_arch=[8])", "learning_starts=50", "train_freq=8", "gradient_steps=2",
                  "batch_size=16", "target_update_interval=50"]
GRID = [2_500, 5_000, 7_500, 10_000, 12_500, 15_000]


def hand_made_record(means=(200, 480, 500, 240, 260, 100), ends=(3_000, 6_000, 9_000, 12_000),
                     failed=(True, True, False, True), kind="fifo", size=2_500, seed=0, steps=50_000):
    """A dose-response record as ``run_one`` writes it, with made-up numbers."""
    return {
        "experiment": "dose_response", "task": "CartPole-v1", "buffer_kind": kind, "buffer_size": size, "seed": seed,
        "settings": {"steps": steps, "eval_freq": 2_500, "eval_episodes": 5, "final_episodes": 100, "overrides": []},
        "eval_curve": {"timesteps": GRID[:len(means)], "mean": list(means), "episode_returns": []},
        "training_episodes": {"end_timestep": list(ends), "return": [0.0] * len(ends), "length": [0] * len(ends),
                              "failed": list(failed)},
        "online_return": {"mean": 120.0, "episodes": len(ends)},
        "final_policy": {"mean": 450.0, "returns": [450.0]},
        "buffer": {"timestep": [2_500, 5_000, 7_500], "transitions": [2_500, 2_500, 2_500], "failures": [50, 25, 0],
                   "sampled": [0, 1_000, 3_000], "sampled_failures": [0, 10, 0],
                   "mean_sample_age": [None, 400.0, 800.0]},  # None: nothing sampled yet (NaN in JSON)
    }


# -- one run -----------------------------------------------------------------------------------------

def test_metrics_of_a_hand_made_record():
    metrics = run_metrics(hand_made_record())
    assert metrics["post_solve_failures"] == 2  # solved at 5,000; episodes failed at 6,000 and 12,000
    assert metrics["collapsed_evaluations"] == 0.5  # after 5,000: 500, 240, 260, 100 against a best of 500
    assert metrics["mean_sample_age"] == (400 * 1_000 + 800 * 3_000) / 4_000  # each draw counted once
    assert metrics["failure_share_after_solve"] == pytest.approx((25 / 2_500 + 0) / 2)  # records from 5,000 on
    assert metrics["online_return"] == 120 and metrics["final_return"] == 450


def test_a_run_that_never_solves_has_no_post_solve_metrics_but_has_its_sample_age():
    metrics = run_metrics(hand_made_record(means=(100, 200, 300)))
    assert math.isnan(metrics["post_solve_failures"]) and math.isnan(metrics["collapsed_evaluations"])
    assert math.isnan(metrics["failure_share_after_solve"]) and metrics["mean_sample_age"] == 700


def test_collapse_is_measured_from_the_best_score_so_far():
    # Solved at 2,500 with 480: 245 is not below half of 480, but 240 after a 500 is below half of 500
    # (measured from the best of the whole run, 245 would count too).
    assert collapsed_evaluations(hand_made_record(means=(480, 245, 500, 240))) == pytest.approx(1 / 3)


def test_buffers_that_never_evict_are_run_once_with_the_fifo():
    settings = DoseResponseSettings(steps=50_000)
    assert cells([2_500, 50_000, 100_000], ["fifo", "reservoir", "half"], settings) == [
        ("fifo", 2_500), ("reservoir", 2_500), ("half", 2_500), ("fifo", 50_000), ("fifo", 100_000)]
    assert cells([2_500, 100_000], ["reservoir"], settings) == [("reservoir", 2_500), ("fifo", 100_000)]


def test_the_buffer_is_not_an_override():
    with pytest.raises(ValueError, match="replay_buffer_class is what the dose-response varies"):
        DoseResponseSettings(overrides=(("replay_buffer_class", "ReservoirReplayBuffer"),))


# -- over seeds --------------------------------------------------------------------------------------

def test_paired_difference_of_the_documented_example():
    label_free = {0: 2_500, 1: 2_500, 2: 5_000, 3: 2_500, 4: 15_000}
    vanilla = {0: 7_500, 1: 10_000, 2: 5_000, 3: 15_000, 4: 15_000}
    difference = paired_difference(label_free, vanilla, "lower", resamples=500)
    assert difference["mean_difference"]["estimate"] == -5_000 and difference["median_difference"] == -5_000
    assert (difference["wins"], difference["ties"], difference["losses"]) == (3, 2, 0)
    assert difference["ratio_of_means"]["estimate"] == pytest.approx(5_500 / 10_500)
    assert difference["wilcoxon_p_one_sided"] == pytest.approx(1 / 8)  # three wins out of three non-zero pairs
    assert difference["mean_difference"]["high"] <= 0


def test_pairs_leave_out_seeds_undefined_on_either_side():
    difference = paired_difference({0: 1.0, 1: None, 2: math.nan, 3: 4.0}, {0: 0.0, 1: 5.0, 2: 5.0}, "higher")
    assert difference["n"] == 1 and difference["seeds"] == [0] and difference["wins"] == 1
    assert paired_difference({0: None}, {0: 1.0}, "higher") is None


def records_with_failures(kind, size, failures_by_seed):
    """Records whose post-solve failures are the given counts (solved at 5,000; every episode after fails)."""
    return [hand_made_record(kind=kind, size=size, seed=seed, ends=[6_000] * n, failed=[True] * n)
            for seed, n in failures_by_seed.items()]


def test_report_pairs_each_kind_with_the_fifo_of_its_size_and_every_cell_with_the_largest_fifo():
    records = (records_with_failures("fifo", 2_500, {0: 10, 1: 12, 2: 14})
               + records_with_failures("reservoir", 2_500, {0: 2, 1: 3, 2: 4})
               + records_with_failures("fifo", 100_000, {0: 1, 1: 2, 2: 3}))
    result = report(records, resamples=200)
    assert [cell["cell"] for cell in result["cells"]] == ["fifo-2500", "reservoir-2500", "fifo-100000"]
    assert result["no_recency_reference"] == {"cell": "fifo-100000", "never_evicts": True}
    fifo = result["cells"][0]["metrics"]["post_solve_failures"]
    assert fifo["mean"]["estimate"] == 12 and fifo["values"] == {"0": 10.0, "1": 12.0, "2": 14.0}
    paired = {(entry["cell"], entry["reference"]): entry for entry in result["paired"]
              if entry["metric"] == "post_solve_failures"}
    assert set(paired) == {("reservoir-2500", "fifo-2500"), ("reservoir-2500", "fifo-100000"),
                           ("fifo-2500", "fifo-100000")}
    undone = paired[("reservoir-2500", "fifo-2500")]
    assert undone["mean_difference"]["estimate"] == -9 and undone["wins"] == 3
    assert paired[("reservoir-2500", "fifo-100000")]["mean_difference"] == {"estimate": 1, "low": 1, "high": 1}
    assert paired[("fifo-2500", "fifo-100000")]["losses"] == 3
    text = markdown(result)
    assert "| fifo-2500 | 3 | 0 | 12.0 [" in text and "| post_solve_failures | reservoir-2500 - fifo-2500 | 3 |" in text


def test_the_dose_response_is_a_slope_per_seed_against_log_size_summarised_over_seeds():
    # log10 sizes 3, 4, 5: seeds 0 and 1 gain 10 failures per tenfold larger buffer, seed 2 loses 10, and
    # seed 3 has a value at two sizes only, too few for a slope
    records = (records_with_failures("fifo", 1_000, {0: 10, 1: 5, 2: 30, 3: 1})
               + records_with_failures("fifo", 10_000, {0: 20, 1: 15, 2: 20})
               + records_with_failures("fifo", 100_000, {0: 30, 1: 25, 2: 10, 3: 4})
               + records_with_failures("reservoir", 1_000, {0: 99, 1: 99, 2: 99}))
    trend = report(records, resamples=200)["fifo_trend"]["post_solve_failures"]
    assert trend["n"] == 3 and trend["sizes"] == [1_000, 10_000, 100_000]
    assert trend["slopes"] == pytest.approx({"0": 10.0, "1": 10.0, "2": -10.0})
    assert trend["mean_slope"]["estimate"] == pytest.approx(10 / 3)
    assert (trend["positive"], trend["zero"], trend["negative"]) == (2, 0, 1)
    assert 0 < trend["wilcoxon_p_two_sided"] <= 1
    assert "| post_solve_failures | 3 | 3.33 [" in markdown(report(records, resamples=200))


def test_two_fifo_sizes_make_no_trend():
    records = (records_with_failures("fifo", 2_500, {0: 10, 1: 12})
               + records_with_failures("fifo", 100_000, {0: 1, 1: 2}))
    result = report(records, resamples=200)
    assert result["fifo_trend"] == {} and "Dose-response over the FIFO sizes" not in markdown(result)


def test_report_refuses_records_made_with_other_settings():
    records = records_with_failures("fifo", 2_500, {0: 1}) + [hand_made_record(seed=1, steps=20_000)]
    with pytest.raises(ValueError, match="different settings"):
        report(records)


# -- the command, end to end ---------------------------------------------------------------------------

def run_command(*argv):
    parser = add_forgetting_arguments(argparse.ArgumentParser())
    return run_forgetting(parser.parse_args(list(argv)))


def test_dose_response_writes_a_record_per_run_resumes_and_regenerates_its_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("rollback_rl.experiments.forgetting.over_seeds.BOOTSTRAP_RESAMPLES", 100)
    overrides = [item for text in TINY_OVERRIDES for item in ("--set", text)]
    argv = ["--dose-response", "--steps", "300", "--eval-freq", "100", "--eval-episodes", "2", "--final-episodes", "2",
            "--buffer-sizes", "100,300", "--buffer-kinds", "fifo,reservoir", "--seeds", "1", "--workers", "1",
            "--results", str(tmp_path), *overrides]
    assert run_command(*argv) == 0
    folder = tmp_path / "dose_response"
    records = sorted(folder.glob("*/seed0.json"))
    assert [path.parent.name for path in records] == ["fifo-100", "fifo-300", "reservoir-100"]  # 300 never evicts
    record = json.loads((folder / "reservoir-100" / "seed0.json").read_text())
    assert record["hyperparameters"]["replay_buffer_class"] == "rollback_rl.buffers.ReservoirReplayBuffer"
    assert record["hyperparameters"]["buffer_size"] == 100 and record["eval_curve"]["timesteps"] == [100, 200, 300]
    assert record["buffer"]["transitions"][-1] == 100 and len(record["final_policy"]["returns"]) == 2
    assert record["provenance"]["settings"]["buffer_sizes"] == [100, 300] and "git_commit" in record["provenance"]
    result = json.loads((folder / "report.json").read_text())
    assert [cell["cell"] for cell in result["cells"]] == ["fifo-100", "reservoir-100", "fifo-300"]
    assert (folder / "dose_response.png").stat().st_size > 10_000 and "| reservoir-100 | 1 |" in \
        (folder / "report.md").read_text()
    capsys.readouterr()

    written = {path: path.read_bytes() for path in records}
    assert run_command(*argv) == 0
    assert "3 of 3 runs already have a record; running the other 0" in capsys.readouterr().out
    assert {path: path.read_bytes() for path in records} == written

    report_text = (folder / "report.json").read_text()
    for name in ("report.json", "report.md", "dose_response.png"):
        (folder / name).unlink()
    assert run_command("--dose-response", "--report-only", "--results", str(tmp_path)) == 0
    assert (folder / "report.json").read_text() == report_text and (folder / "dose_response.png").exists()


def test_a_failed_run_is_reported_the_others_are_kept_and_the_same_command_retries_only_it(tmp_path, capsys,
                                                                                           monkeypatch):
    calls = []

    def fake_run(kind, size, seed, settings, fail=True):
        calls.append((kind, size, seed))
        if kind == "reservoir" and fail:
            raise RuntimeError("out of memory")
        return {**hand_made_record(kind=kind, size=size, seed=seed, steps=settings.steps),
                "settings": {"steps": settings.steps, "eval_freq": settings.eval_freq,
                             "eval_episodes": settings.eval_episodes, "final_episodes": settings.final_episodes,
                             "overrides": []},
                "wall_seconds": 0.0}

    monkeypatch.setattr("rollback_rl.experiments.forgetting.dose_response.run_one", fake_run)
    argv = ["--dose-response", "--buffer-sizes", "2500", "--seeds", "2", "--workers", "1", "--results", str(tmp_path)]
    assert run_command(*argv) == 1
    error = capsys.readouterr().err
    assert "2 runs failed" in error and "reservoir 2,500 seed 1: RuntimeError: out of memory" in error
    assert sorted(path.parent.name for path in (tmp_path / "dose_response").glob("*/seed*.json")) == \
        ["fifo-2500", "fifo-2500", "half-2500", "half-2500"]

    calls.clear()
    monkeypatch.setattr("rollback_rl.experiments.forgetting.dose_response.run_one",
                        lambda *arguments: fake_run(*arguments, fail=False))
    assert run_command(*argv) == 0
    assert calls == [("reservoir", 2_500, 0), ("reservoir", 2_500, 1)]
    assert "4 of 6 runs already have a record; running the other 2" in capsys.readouterr().out
