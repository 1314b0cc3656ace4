import argparse
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from helpers import CARTPOLE_BALANCER, RecordState, assert_states_equal, copy_training_state, \
    set_linear_cartpole_policy
from rollback_rl.callbacks import RollbackCallback
from rollback_rl.envs import SWITCHING_CARTPOLE_ID
from rollback_rl.callbacks.bank import TaskSnapshotBank
from rollback_rl.experiments.forgetting.command import add_forgetting_arguments, run_forgetting, write_a_b_a_report
from rollback_rl.experiments.forgetting.experiment import ForgettingSettings, _EvaluateTheTaskTrainedOn, markdown, \
    adaptation_steps, plan_runs, record_path, report, seed_metrics, summarise
from rollback_rl.experiments.forgetting.records import PlannedRun, run_missing, write_record
from rollback_rl.experiments.forgetting.stationary import analyse, label_moments

torch.set_num_threads(1)

TINY_OVERRIDES = ["policy_kwargs=dict(net_arch=[8])", "learning_starts=50", "train_freq=8", "gradient_steps=2",
                  "batch_size=16", "target_update_interval=50"]


def switching_env(tasks, switch_every=1):
    return gym.make(SWITCHING_CARTPOLE_ID, tasks=tuple(tasks), switch_every=switch_every)


class RecordStateAfterRestore(BaseCallback):
    """Copies the training state at every step where ``bank`` has just restored a snapshot."""

    def __init__(self, bank: TaskSnapshotBank) -> None:
        super().__init__()
        self.bank = bank
        self.records = {}

    def _on_step(self) -> bool:
        if self.bank.restores and self.bank.restores[-1].timestep == self.num_timesteps \
                and self.num_timesteps not in self.records:
            self.records[self.num_timesteps] = copy_training_state(self.model)
        return True


# -- the task bank ----------------------------------------------------------------------------------

def test_bank_restores_the_returning_tasks_snapshot_bitwise_and_never_on_a_new_task():
    tasks = ("default", "reversed", "long_pole", "default")  # A, B, C (new tasks), then A returns
    model = DQN("MlpPolicy", Monitor(switching_env(tasks, 200)), seed=0, learning_rate=1e-3, learning_starts=50,
                train_freq=4, gradient_steps=1, batch_size=16, policy_kwargs=dict(net_arch=[8]))
    bank = TaskSnapshotBank({name: switching_env((name,)) for name in set(tasks)}, eval_freq=100, n_eval_episodes=2)
    at_evaluations = RecordState(at_timesteps={100, 200, 300, 400, 500, 600})
    after_restore = RecordStateAfterRestore(bank)
    model.learn(800, callback=CallbackList([bank, at_evaluations, after_restore]))

    assert len(bank.restores) == 1  # not at B, not at C: only when A came back
    restore = bank.restores[0]
    assert restore.task == "default" and 800 > restore.timestep > 600
    assert restore.restored_timestep in (100, 200)  # A's last good snapshot, from the first phase
    assert_states_equal(at_evaluations.records[restore.restored_timestep], after_restore.records[restore.timestep])
    assert set(bank.snapshots) == {"default", "reversed", "long_pole"}


def test_bank_says_how_to_fix_an_env_without_task_labels():
    model = DQN("MlpPolicy", "CartPole-v1", learning_starts=1_000, policy_kwargs=dict(net_arch=[8]))
    bank = TaskSnapshotBank({"default": switching_env(("default",))})
    with pytest.raises(KeyError, match="info\\['task'\\]"):
        model.learn(10, callback=bank)


# -- the rollback arm after a real change of the environment -------------------------------------------

def test_rollback_rebases_instead_of_looping_when_the_task_changes():
    # A perfect balancer that never learns (learning rate 0): every score drop comes from the switch.
    training_env = switching_env(("default", "reversed", "default"), switch_every=1_000)
    model = DQN("MlpPolicy", Monitor(training_env), seed=0, learning_rate=0.0, learning_starts=0, train_freq=50,
                gradient_steps=1, exploration_initial_eps=0.0, exploration_final_eps=0.0,
                policy_kwargs=dict(net_arch=[]))
    set_linear_cartpole_policy(model, CARTPOLE_BALANCER)
    current_task_env = switching_env(("default",))
    rollback = RollbackCallback(DummyVecEnv([lambda: Monitor(current_task_env)]), eval_freq=500, n_eval_episodes=3)
    model.learn(3_000, callback=CallbackList([_EvaluateTheTaskTrainedOn(current_task_env), rollback]))

    scores = {score.timestep: score.mean for score in rollback.scores}
    assert scores[1_000] == 500 and scores[1_500] < 50  # the switch to reversed actions, seen at the next check
    assert rollback.rollbacks == []  # the old weights do no better on the new task: not a collapse
    assert rollback.rebases == 1  # one rebase at the switch, no loop during B, none when A returns
    assert scores[3_000] == 500


# -- metrics -----------------------------------------------------------------------------------------

SETTINGS = ForgettingSettings(phase_steps=(1_000, 1_000, 1_000), eval_freq=250, level_window=1)
TIMESTEPS = list(range(250, 3_001, 250))


def test_metrics_of_synthetic_curves():
    a = [100, 300, 450, 500, 400, 200, 150, 100, 200, 460, 480, 500]  # at 1000: 500; at 2000: 100
    b = [9, 9, 9, 9, 100, 300, 400, 480, 300, 100, 50, 20]
    metrics = seed_metrics(TIMESTEPS, {"default": a, "reversed": b}, SETTINGS)
    assert metrics["forgetting"] == 400
    assert metrics["score_b_end_of_b"] == 480
    assert metrics["relearn_steps"] == 500 and not metrics["relearn_censored"]  # 460 >= 0.9 * 500 at 2500
    current = a[:4] + b[4:8] + a[8:]
    assert metrics["average_score"] == pytest.approx(np.mean(current))


def test_phases_of_different_lengths():
    settings = ForgettingSettings(phase_steps=(1_000, 500, 500), eval_freq=250, level_window=1)
    assert settings.switches == (1_000, 1_500) and settings.total_steps == 2_000
    assert [settings.task_at(t) for t in (1_000, 1_250, 1_500, 1_750)] == ["default", "reversed", "reversed", "default"]
    a = [100, 200, 300, 400, 50, 10, 380, 390]
    metrics = seed_metrics(list(range(250, 2_001, 250)), {"default": a, "reversed": [9] * 8}, settings)
    assert metrics["forgetting"] == 390 and metrics["relearn_steps"] == 250  # 380 >= 0.9 * 400


def test_levels_average_the_last_evaluations_of_a_phase():
    settings = ForgettingSettings(phase_steps=(1_000, 1_000, 1_000), eval_freq=250, level_window=2)
    a = [100, 300, 500, 100, 400, 200, 20, 10, 200, 300, 290, 500]  # a dip to 100 right at the switch
    metrics = seed_metrics(TIMESTEPS, {"default": a, "reversed": [9] * 12}, settings)
    assert metrics["score_a_before_switch"] == 300 and metrics["score_a_end_of_b"] == 15
    assert metrics["forgetting"] == 285 and metrics["relearn_steps"] == 500  # 300 >= 0.9 * 300 at 2500


def test_relearning_is_censored_when_never_reached_and_undefined_when_a_was_never_learned():
    b = [0.0] * 12
    never = seed_metrics(TIMESTEPS, {"default": [500] * 4 + [100] * 8, "reversed": b}, SETTINGS)
    assert never["relearn_steps"] == 1_000 and never["relearn_censored"]
    kept = seed_metrics(TIMESTEPS, {"default": [500] * 12, "reversed": b}, SETTINGS)
    assert kept["forgetting"] == 0 and kept["relearn_steps"] == 0
    unlearned = seed_metrics(TIMESTEPS, {"default": [50] * 12, "reversed": b}, SETTINGS)
    assert unlearned["relearn_steps"] is None


def test_adaptation_to_b_counts_steps_to_a_target_within_phase_b_only():
    b = [480, 9, 9, 9, 100, 300, 450, 480, 500, 500, 500, 500]  # 480 before B and 500 after B do not count
    assert adaptation_steps(TIMESTEPS, b, SETTINGS, target=432) == (750, False)  # 450 at 1,750
    assert adaptation_steps(TIMESTEPS, b, SETTINGS, target=480) == (1_000, False)  # 480 at 2,000, B's last
    assert adaptation_steps(TIMESTEPS, b, SETTINGS, target=490) == (1_000, True)  # never during B: censored


def test_summary_gives_intervals_over_seeds_and_pairs_every_arm_with_vanilla_the_task_bank_and_rollback():
    def metrics(forgetting, relearn):
        return dict(forgetting=forgetting, relearn_steps=relearn, relearn_censored=False, average_score=1.0,
                    online_return=1.0, final_score_a=1.0, rollbacks=0, rebases=1, bank_restores=0,
                    rollbacks_after_switches=0)

    per_seed = {"vanilla": {s: metrics(400.0 + s, 5_000.0) for s in range(5)},
                "task_bank": {s: metrics(400.0 + s, 2_500.0 if s else None) for s in range(5)},
                "label_free_bank": {s: metrics(400.0, 2_500.0 if s % 2 else 5_000.0) for s in range(5)},
                "rollback": {s: metrics(300.0, 5_000.0) for s in range(5)}}
    summary = summarise(per_seed, resamples=200)
    forgetting = summary["vanilla"]["forgetting"]
    assert forgetting["values"] == {"0": 400, "1": 401, "2": 402, "3": 403, "4": 404}
    assert forgetting["iqm"]["estimate"] == 402 and forgetting["iqm"]["low"] <= 402 <= forgetting["iqm"]["high"]
    relearn = summary["task_bank"]["relearn_steps"]
    assert relearn["n"] == 4 and relearn["undefined"] == 1 and relearn["censored"] == 0
    paired = relearn["minus_vanilla"]
    assert paired["n"] == 4 and paired["mean_difference"] == {"estimate": -2_500.0, "low": -2_500.0, "high": -2_500.0}
    assert (paired["wins"], paired["ties"], paired["losses"]) == (4, 0, 0)
    assert paired["ratio_of_means"]["estimate"] == 0.5
    assert "minus_task_bank" not in summary["vanilla"]["relearn_steps"]  # task_bank - vanilla says it already
    label_free = summary["label_free_bank"]["relearn_steps"]["minus_task_bank"]  # seeds 1-4: 2,500, 5,000, 2,500, 5,000
    assert label_free["n"] == 4 and label_free["ratio_of_means"]["estimate"] == 1.5
    assert (label_free["wins"], label_free["ties"], label_free["losses"]) == (0, 2, 2)
    # what the bank adds to the rollback it runs on: seeds 1 and 3 relearn in 2,500 instead of 5,000
    bank = summary["label_free_bank"]["relearn_steps"]["minus_rollback"]
    assert bank["mean_difference"]["estimate"] == -1_000 and (bank["wins"], bank["ties"], bank["losses"]) == (2, 3, 0)
    assert summary["label_free_bank"]["forgetting"]["minus_rollback"]["mean_difference"]["estimate"] == 100
    assert "minus_rollback" not in summary["vanilla"]["forgetting"]  # rollback - vanilla says it already
    assert "minus_rollback" not in summary["task_bank"]["forgetting"]


def test_a_buffer_that_never_evicts_is_run_once_with_the_fifo(tmp_path):
    cells = [ForgettingSettings(buffer_size=size, buffer_kind=kind) for size in (10_000, 60_000)
             for kind in ("reservoir", "fifo")]  # 60,000: the whole run
    plan = plan_runs(cells, ["vanilla", "task_bank"], [0], tmp_path)
    assert sorted(str(path.relative_to(tmp_path)) for path in plan) == [
        "default-reversed/fifo-10000/task_bank/seed0.json", "default-reversed/fifo-10000/vanilla/seed0.json",
        "default-reversed/fifo-60000/task_bank/seed0.json", "default-reversed/fifo-60000/vanilla/seed0.json",
        "default-reversed/reservoir-10000/task_bank/seed0.json", "default-reversed/reservoir-10000/vanilla/seed0.json"]
    assert all(run.arguments[2].buffer_kind == run.path.parts[-3].split("-")[0] for run in plan.values())


def hand_made_record(arm, seed, a_scores, kind="fifo", size=10_000, b_scores=(9.0,) * 12):
    """An A -> B -> A record as ``run_arm`` writes it (phases of 1,000 steps, an evaluation every 250)."""
    settings = ForgettingSettings(phase_steps=(1_000, 1_000, 1_000), eval_freq=250, level_window=1, buffer_kind=kind,
                                  buffer_size=size)
    record = {"experiment": "a_b_a", "arm": arm, "seed": seed, "settings": json.loads(json.dumps(settings.__dict__)),
              "timesteps": TIMESTEPS, "scores": {"default": list(a_scores), "reversed": list(b_scores)},
              "buffer": {"timesteps": TIMESTEPS, "transitions": [250 * (k + 1) for k in range(12)],
                         "failures": [5] * 12},
              "final_returns_a": [500.0], "online_return": 100.0 + seed, "rollbacks": [], "rebases": 0,
              "bank_restores": [], "cpu_seconds": 60.0}
    return settings, record


A_FORGOTTEN = [100, 300, 450, 500, 400, 200, 150, 100]  # 500 at the switch, 100 when A returns


def test_report_from_hand_made_records_pairs_seeds_and_draws_forgetting_against_the_buffer(tmp_path):
    folder = tmp_path / "a_b_a"
    relearn_at = {"vanilla": [460, 480, 500, 500], "label_free_bank": [200, 480, 500, 500]}  # from 2,250 on
    # Vanilla's level on B at its end (2,000) is 200, 350, 500 in seeds 0-2: 90% of it is 180, 315, 450.
    # label_free_bank reaches 400 at 1,500 (500 steps into B), which is short of 450 in seed 2: censored.
    b_curves = {"vanilla": lambda seed: [9] * 4 + [50, 100, 150, 200 + 150 * seed] + [9] * 4,
                "label_free_bank": lambda seed: [9] * 4 + [50, 400, 9, 9] + [9] * 4}
    for seed in range(3):
        for arm, after in relearn_at.items():
            settings, record = hand_made_record(arm, seed, A_FORGOTTEN + after, b_scores=b_curves[arm](seed))
            write_record(record_path(folder, settings, arm, seed), record)
        settings, record = hand_made_record("vanilla", seed, A_FORGOTTEN + [100, 100, 460, 500], kind="reservoir")
        write_record(record_path(folder, settings, "vanilla", seed), record)

    result = report([json.loads(path.read_text()) for path in sorted(folder.rglob("seed*.json"))], resamples=100)
    assert [cell["cell"] for cell in result["cells"]] == ["default-reversed/fifo-10000",
                                                         "default-reversed/reservoir-10000"]
    fifo = result["cells"][0]["summary"]
    assert fifo["vanilla"]["relearn_steps"]["values"] == {"0": 250.0, "1": 250.0, "2": 250.0}  # 460 >= 0.9 * 500
    assert fifo["label_free_bank"]["relearn_steps"]["mean"]["estimate"] == 500
    paired = fifo["label_free_bank"]["relearn_steps"]["minus_vanilla"]
    assert paired["mean_difference"]["estimate"] == 250 and paired["losses"] == 3
    assert paired["ratio_of_means"]["estimate"] == 2
    assert fifo["vanilla"]["forgetting"]["mean"]["estimate"] == 400
    assert fifo["vanilla"]["adapt_b_steps"]["values"] == {"0": 1_000.0, "1": 1_000.0, "2": 1_000.0}
    adapt = fifo["label_free_bank"]["adapt_b_steps"]
    assert adapt["values"] == {"0": 500.0, "1": 500.0, "2": 1_000.0} and adapt["censored"] == 1
    paired = adapt["minus_vanilla"]
    assert (paired["wins"], paired["ties"], paired["losses"]) == (2, 1, 0)
    # The reservoir cell's vanilla stays at 9 on B: 90% of its own level is reached at the first evaluation.
    assert result["cells"][1]["summary"]["vanilla"]["adapt_b_steps"]["values"] == {"0": 250.0, "1": 250.0, "2": 250.0}
    assert "| relearn_steps | label_free_bank - vanilla | 3 |" in markdown(result)
    # The reservoir's vanilla against the FIFO's, paired by seed: relearned at 2,750, not 2,250; forgot as much.
    [kinds] = result["buffer_kinds"]
    assert (kinds["cell"], kinds["reference"], kinds["arm"]) == ("default-reversed/reservoir-10000",
                                                                 "default-reversed/fifo-10000", "vanilla")
    relearn = kinds["differences"]["relearn_steps"]
    assert relearn["mean_difference"]["estimate"] == 500 and (relearn["wins"], relearn["losses"]) == (0, 3)
    assert kinds["differences"]["forgetting"]["ties"] == 3
    assert "adapt_b_steps" not in kinds["differences"]  # measured against each cell's own vanilla
    assert "| default-reversed/reservoir-10000 | vanilla | relearn_steps | 3 | +500 [+500, +500] | 0/0/3 |" in \
        markdown(result)

    written = write_a_b_a_report(folder)
    names = [path.name for path in written]
    assert names == ["report.json", "report.md", "curves-default-reversed-fifo-10000.png", "forgetting_vs_buffer.png"]
    assert all(path.stat().st_size > 100 for path in written)


# -- the stationary analysis --------------------------------------------------------------------------

def test_collapse_labels():
    scores = [20, 450, 500, 480, 100, 90, 500, 500, 200]
    assert label_moments(scores) == [None, "control", "control", "case", "collapsed", "collapsed", "control",
                                     "case", "collapsed"]


def test_analysis_matches_cases_with_controls_at_the_same_timestep():
    grid = [0, 1, 2, 3]
    runs = [
        {"seed": 0, "timesteps": grid, "scores": [500, 500, 100, 500], "failure_share": [0.5, 0.01, 0.9, 0.9]},
        {"seed": 1, "timesteps": grid, "scores": [500, 500, 500, 500], "failure_share": [0.5, 0.03, 0.04, 0.9]},
        {"seed": 2, "timesteps": grid, "scores": [500, 500, 500, 500], "failure_share": [0.5, 0.05, 0.06, 0.9]},
    ]
    result = analyse(runs, permutations=200)
    assert result["n_cases"] == 1 and result["cases"][0] == {"timestep": 1, "seed": 0, "value": 0.01}
    assert result["matched_difference"]["estimate"] == pytest.approx(0.01 - 0.04)
    assert result["seeds_with_collapse"]["rate"] == pytest.approx(1 / 3)
    # Shuffled, the case is 0.01 (-0.03), 0.03 (0) or 0.05 (+0.03): two of three are as extreme.
    assert 0.55 < result["permutation_p"] < 0.78


def test_analysis_finds_a_planted_difference():
    rng = np.random.default_rng(0)
    runs = []
    for seed in range(12):
        scores = [500.0] * 20
        share = list(0.05 + 0.01 * rng.standard_normal(20))
        if seed < 6:
            k = 5 + seed
            scores[k + 1] = 50.0
            share[k] -= 0.04  # failure-starved just before the collapse
        runs.append({"seed": seed, "timesteps": list(range(20)), "scores": scores, "failure_share": share})
    result = analyse(runs, permutations=2_000)
    assert result["n_cases"] == 6
    assert result["matched_difference"]["high"] < 0 and result["permutation_p"] < 0.01


# -- the command, end to end --------------------------------------------------------------------------

def run_command(*argv):
    parser = add_forgetting_arguments(argparse.ArgumentParser())
    return run_forgetting(parser.parse_args(list(argv)))


def _fake_run(value):
    return {"value": value, "wall_seconds": 0.0, "torch_threads": 1}


def test_a_record_names_the_runs_thread_count_not_that_of_the_process_that_started_it(tmp_path):
    made_by = {"git_commit": "abc", "machine": {"cpu_count": 2, "torch_threads": 7}}
    plan = {k: PlannedRun(tmp_path / f"seed{k}.json", {"k": k}, (k,), f"run {k}") for k in range(2)}
    outcome = run_missing(_fake_run, plan, "fake", 1, made_by, progress=lambda line: None)
    assert outcome.done == 2
    record = json.loads((tmp_path / "seed1.json").read_text())
    assert record["value"] == 1 and "torch_threads" not in record
    assert record["provenance"]["machine"] == {"cpu_count": 2, "torch_threads": 1}
    assert made_by["machine"]["torch_threads"] == 7  # the caller's provenance is not changed


def test_experiment_writes_a_record_per_run_resumes_and_reports_from_the_records(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("rollback_rl.experiments.forgetting.over_seeds.BOOTSTRAP_RESAMPLES", 100)
    overrides = [item for text in TINY_OVERRIDES for item in ("--set", text)]
    argv = ["--seeds", "1", "--steps-per-task", "300", "--eval-freq", "100", "--eval-episodes", "2",
            "--final-episodes", "3", "--workers", "1", "--results", str(tmp_path), *overrides]
    assert run_command(*argv) == 0
    folder = tmp_path / "a_b_a"
    records = sorted(folder.glob("default-reversed/fifo-10000/*/seed0.json"))
    assert [path.parent.name for path in records] == ["label_free_bank", "rollback", "task_bank", "vanilla"]
    record = json.loads((folder / "default-reversed/fifo-10000/vanilla/seed0.json").read_text())
    assert record["timesteps"] == list(range(100, 901, 100)) and record["settings"]["phase_steps"] == [300, 300, 300]
    assert set(record["scores"]) == {"default", "reversed"} and len(record["buffer"]["failures"]) == 9
    assert record["provenance"]["settings"]["arms"] == ["vanilla", "rollback", "task_bank", "label_free_bank"]
    assert "git_commit" in record["provenance"] and len(record["final_returns_a"]) == 3
    label_free = json.loads((folder / "default-reversed/fifo-10000/label_free_bank/seed0.json").read_text())
    assert len(label_free["bank_switches"]) == label_free["rebases"]  # the bank acts on every rebase
    report = json.loads((folder / "report.json").read_text())
    (cell,) = report["cells"]
    assert cell["cell"] == "default-reversed/fifo-10000" and list(cell["summary"]) == list(cell["arms"])
    assert cell["per_seed"]["vanilla"]["0"]["final_score_a"] == pytest.approx(np.mean(record["final_returns_a"]))
    assert "| label_free_bank | 1 |" in (folder / "report.md").read_text()
    assert (folder / "curves-default-reversed-fifo-10000.png").stat().st_size > 10_000
    capsys.readouterr()

    written = {path: path.read_bytes() for path in records}
    assert run_command(*argv) == 0  # the same command again: nothing to run
    assert "4 of 4 runs already have a record" in capsys.readouterr().out
    assert {path: path.read_bytes() for path in records} == written

    report_text = (folder / "report.json").read_text()
    (folder / "report.json").unlink()
    assert run_command("--report-only", "--results", str(tmp_path)) == 0
    assert (folder / "report.json").read_text() == report_text

    changed = [argument if argument != "3" else "4" for argument in argv]  # --final-episodes 4
    assert run_command(*changed) == 2
    error = capsys.readouterr().err
    assert "was made with other settings (final_episodes: 3, this command: 4)" in error


def test_stationary_analysis_runs_end_to_end(tmp_path):
    overrides = [item for text in TINY_OVERRIDES for item in ("--set", text)]
    status = run_command("--stationary", "--seeds", "2", "--steps", "300", "--eval-freq", "100", "--eval-episodes",
                         "2", "--workers", "1", "--logdir", str(tmp_path), "--no-tensorboard", *overrides)
    assert status == 0
    (run_dir,) = tmp_path.iterdir()
    results = json.loads((run_dir / "stationary.json").read_text())
    assert [len(run["failure_share"]) for run in results["records"]] == [3, 3]
    assert results["analysis"]["seeds"] == 2
    assert (run_dir / "stationary.png").exists()
    assert results["provenance"]["settings"]["steps"] == 300 and "git_commit" in results["provenance"]
    assert json.loads((run_dir / "records" / "seed1.json").read_text())["provenance"] == results["provenance"]


@pytest.mark.parametrize("argv, message", [
    (["--steps-per-task", "1000", "--eval-freq", "300"], "multiples of --eval-freq"),
    (["--steps-per-task", "1000,500"], "three separated by commas"),
    (["--tasks", "default,default"], "--tasks names default twice"),
    (["--tasks", "default,upside_down"], "unknown task 'upside_down'"),
    (["--tasks", "default"], "--tasks needs task A and at least one task B"),
    (["--arms", "vanilla,magic"], "unknown arm 'magic'"),
    (["--buffer-kinds", "fifo,lifo"], "unknown buffer kind 'lifo'"),
    (["--buffer-sizes", "5000,0"], "--buffer-sizes must be a positive integer"),
    (["--set", "buffer_size=5000"], "--set buffer_size: the buffer is what these experiments vary"),
    (["--set", "learning_rat=1"], "did you mean 'learning_rate'"),
    (["--steps", "1000"], "--steps is not for the A -> B -> A experiment"),
    (["--report-only"], "no records under"),
    (["--seed-list", "100,x"], "--seed-list must be integers >= 0"),
    (["--dose-response", "--seed-list", "100,101,100"], "--seed-list names 100 twice"),
    (["--dose-response", "--tasks", "default,long_pole"], "--tasks is not for --dose-response"),
    (["--dose-response", "--steps-per-task", "100"], "--steps-per-task is not for --dose-response"),
    (["--dose-response", "--buffer-kinds", "reservoir,fifo,reservoir"], "--buffer-kinds names reservoir twice"),
    (["--dose-response", "--report-only"], "no records under"),
])
def test_bad_input_is_one_error_line_and_status_2(tmp_path, capsys, argv, message):
    assert run_command(*argv, "--results", str(tmp_path)) == 2
    error = capsys.readouterr().err
    assert error.startswith("rollback-rl forgetting: error:") and message in error
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--stationary", "--steps-per-task", "100"], "--steps-per-task is not for --stationary"),
    (["--stationary", "--buffer-sizes", "100"], "--buffer-sizes is not for --stationary"),
    (["--logdir", "runs"], "--logdir is not for the A -> B -> A experiment or --dose-response"),
])
def test_options_of_another_mode_are_refused(tmp_path, capsys, argv, message):
    assert run_command(*argv) == 2
    assert message in capsys.readouterr().err
