import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.logger import configure
from tensorboard.backend.event_processing import event_accumulator

import rollback_rl.envs  # noqa: F401 - registers SwitchingCartPole
from rollback_rl.buffers import FifoReplayBuffer, HalfReservoirReplayBuffer, ReservoirReplayBuffer
from rollback_rl.callbacks import BufferRecord, ReplayBufferDiagnostics
from rollback_rl.callbacks.diagnostics import buffer_failures, summarize_buffer_records

torch.set_num_threads(1)

TINY = dict(policy_kwargs=dict(net_arch=[8]), learning_starts=100, train_freq=20, gradient_steps=2, batch_size=8,
            buffer_size=1_000, target_update_interval=50)


def hand_built_buffer(outcomes: list[str], size: int = 10, n_envs: int = 1,
                      buffer_class: type[ReplayBuffer] = ReplayBuffer, **kwargs) -> ReplayBuffer:
    """A buffer holding one transition per entry of ``outcomes``: "step", "failure" (terminated) or
    "timeout" (truncated by the time limit). The observation is the transition's position in ``outcomes``."""
    env = gym.make("CartPole-v1")
    buffer = buffer_class(size, env.observation_space, env.action_space, n_envs=n_envs,
                          handle_timeout_termination=True, **kwargs)
    for index, outcome in enumerate(outcomes):
        obs = np.full((n_envs, 4), index, dtype=np.float32)
        done = np.full(n_envs, outcome != "step")
        infos = [{"TimeLimit.truncated": outcome == "timeout"} for _ in range(n_envs)]
        buffer.add(obs, obs, np.zeros((n_envs, 1)), np.ones(n_envs), done, infos)
    return buffer


def diagnostics_on(buffer: ReplayBuffer, timestep: int = 0) -> ReplayBufferDiagnostics:
    model = DQN("MlpPolicy", "CartPole-v1", buffer_size=buffer.buffer_size, policy_kwargs=dict(net_arch=[8]))
    model.replay_buffer = buffer
    model.num_timesteps = timestep
    model.set_logger(configure(None, [""]))
    diagnostics = ReplayBufferDiagnostics(log_freq=100)
    diagnostics.init_callback(model)
    diagnostics.on_training_start({}, {})
    return diagnostics


def test_failure_share_counts_terminations_but_not_time_limit_truncations():
    buffer = hand_built_buffer(["step", "failure", "step", "timeout", "step", "failure"])
    assert buffer_failures(buffer) == (6, 2)
    record = diagnostics_on(buffer, timestep=6).record_buffer()
    assert (record.timestep, record.transitions, record.failures) == (6, 6, 2)
    assert record.failure_share == pytest.approx(2 / 6)
    assert record.sampled == 0 and np.isnan(record.mean_sample_age)


def test_failure_share_after_the_buffer_wraps_counts_only_what_it_holds():
    # 13 transitions into 10 slots: the first three (two failures) were overwritten.
    buffer = hand_built_buffer(["failure", "failure", "step"] + ["step"] * 9 + ["failure"])
    assert buffer.full and buffer.pos == 3
    assert buffer_failures(buffer) == (10, 1)


def test_sampled_ages_and_failures_are_those_of_the_indices_drawn():
    buffer = hand_built_buffer(["failure", "failure", "step"] + ["step"] * 9 + ["failure"])
    diagnostics = diagnostics_on(buffer, timestep=13)
    # Slot 2 holds the newest transition (age 0), slot 3 the oldest (age 9), slot 9 is 3 steps old.
    samples = buffer._get_samples(np.array([2, 3, 9, 2]))
    assert samples.dones.flatten().tolist() == [1.0, 0.0, 0.0, 1.0]
    record = diagnostics.record_buffer()
    assert (record.sampled, record.sampled_failures) == (4, 2)
    assert record.mean_sample_age == pytest.approx((0 + 9 + 3 + 0) / 4)
    assert diagnostics.record_buffer().sampled == 0  # counts start afresh after each record


def test_sample_ages_count_timesteps_of_every_env():
    buffer = hand_built_buffer(["step"] * 5, n_envs=2)  # rows 0-4, two transitions each
    diagnostics = diagnostics_on(buffer)
    buffer._get_samples(np.array([0, 4]))
    assert diagnostics.record_buffer().mean_sample_age == pytest.approx((8 + 0) / 2)


@pytest.mark.parametrize("buffer_class", [ReservoirReplayBuffer, HalfReservoirReplayBuffer])
def test_failure_share_of_a_buffer_that_keeps_old_transitions_counts_what_it_holds(buffer_class):
    outcomes = (["step"] * 4 + ["failure"] + ["step"] * 2 + ["timeout"]) * 25  # 200 transitions
    buffer = hand_built_buffer(outcomes, size=20, buffer_class=buffer_class, seed=0)
    held = [outcomes[int(index)] for index in buffer.observations[:, 0, 0]]
    assert buffer_failures(buffer) == (20, held.count("failure"))


@pytest.mark.parametrize("buffer_class", [ReservoirReplayBuffer, HalfReservoirReplayBuffer])
def test_sample_ages_of_a_buffer_that_keeps_old_transitions_come_from_when_each_row_was_written(buffer_class):
    buffer = hand_built_buffer(["step"] * 50, size=10, buffer_class=buffer_class, seed=1)
    diagnostics = diagnostics_on(buffer, timestep=50)
    written_at = buffer.observations[:, 0, 0].astype(int) + 1  # the k-th transition is timestep k
    rows = np.array([0, 3, 7, 9, 3])
    buffer._get_samples(rows)
    assert diagnostics.record_buffer().mean_sample_age == pytest.approx(np.mean(50 - written_at[rows]))
    fifo_arithmetic = (buffer.pos - 1 - rows) % 10
    assert not np.array_equal(fifo_arithmetic, 50 - written_at[rows])  # what the old measure would say


def test_sample_ages_of_a_fifo_that_records_them_equal_sb3s_derived_ones():
    outcomes = ["step"] * 13
    derived = diagnostics_on(hand_built_buffer(outcomes), timestep=13)
    recorded = diagnostics_on(hand_built_buffer(outcomes, buffer_class=FifoReplayBuffer), timestep=13)
    for diagnostics in (derived, recorded):
        diagnostics.model.replay_buffer._get_samples(np.array([2, 3, 9, 2]))
    assert recorded.record_buffer().mean_sample_age == derived.record_buffer().mean_sample_age == (0 + 9 + 3 + 0) / 4


def test_the_run_summary_weights_ages_by_samples_and_averages_the_failure_share():
    records = [BufferRecord(100, 0, 0, 0, 0, float("nan")),  # empty buffer, nothing drawn: left out
               BufferRecord(200, 100, 10, 40, 4, 30.0),
               BufferRecord(300, 200, 10, 10, 2, 80.0)]
    summary = summarize_buffer_records(records)
    assert (summary.records, summary.sampled) == (3, 50)
    assert summary.mean_sample_age == pytest.approx((40 * 30 + 10 * 80) / 50)
    assert summary.failure_share == pytest.approx((0.1 + 0.05) / 2)
    assert summary.sampled_failure_share == pytest.approx(6 / 50)
    later = summarize_buffer_records(records, start_timestep=300)
    assert (later.records, later.mean_sample_age, later.failure_share) == (1, 80.0, 0.05)
    assert np.isnan(summarize_buffer_records([]).mean_sample_age)


def test_during_training_a_reservoir_buffer_samples_older_transitions_than_a_fifo_of_its_size():
    summaries = {}
    for buffer_class in (FifoReplayBuffer, ReservoirReplayBuffer):
        model = DQN("MlpPolicy", "CartPole-v1", seed=0, learning_rate=1e-3, replay_buffer_class=buffer_class,
                    **{**TINY, "buffer_size": 100})
        model.set_logger(configure(None, [""]))
        diagnostics = ReplayBufferDiagnostics(log_freq=200)
        model.learn(800, callback=diagnostics)
        summaries[buffer_class] = diagnostics.summary(start_timestep=400)
    fifo, reservoir = summaries[FifoReplayBuffer], summaries[ReservoirReplayBuffer]
    assert fifo.sampled == reservoir.sampled > 0
    assert 40 < fifo.mean_sample_age < 60  # uniform over the last 100 timesteps: 49.5 on average
    assert reservoir.mean_sample_age > 2 * fifo.mean_sample_age


def test_during_training_it_records_every_sample_drawn_and_scores_each_task(tmp_path):
    model = DQN("MlpPolicy", "CartPole-v1", seed=0, learning_rate=1e-3, **TINY)
    model.set_logger(configure(str(tmp_path), ["tensorboard"]))
    tasks = {name: gym.make("rollback_rl/SwitchingCartPole-v0", tasks=(name,)) for name in ("default", "reversed")}
    diagnostics = ReplayBufferDiagnostics(log_freq=200, task_eval_envs=tasks, n_eval_episodes=2)
    model.learn(600, callback=diagnostics)

    assert [r.timestep for r in diagnostics.records] == [200, 400, 600]
    # Every minibatch drawn before the last record (the train() at 600 runs after the callback).
    assert sum(r.sampled for r in diagnostics.records) == (model._n_updates - TINY["gradient_steps"]) * 8
    assert all(0 <= r.mean_sample_age < r.timestep for r in diagnostics.records if r.sampled)
    # SB3 calls the callback before it stores the step's transition: the record at 600 saw 599 of them.
    buffer = model.replay_buffer
    last = diagnostics.records[-1]
    assert last.transitions == 599
    assert last.failures == int((buffer.dones[:599] * (1 - buffer.timeouts[:599])).sum())
    assert {name: [s.timestep for s in scores] for name, scores in diagnostics.task_scores.items()} == {
        "default": [200, 400, 600], "reversed": [200, 400, 600]}
    assert "_get_samples" not in vars(model.replay_buffer)  # the wrapper is gone after training

    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"buffer/failure_share", "buffer/sampled_failure_share", "buffer/mean_sample_age",
            "eval_task/default", "eval_task/reversed"} <= tags
    assert [e.step for e in events.Scalars("eval_task/reversed")] == [200, 400, 600]


def test_needs_a_replay_buffer():
    from stable_baselines3 import PPO

    with pytest.raises(TypeError, match="ReplayBuffer"):
        ReplayBufferDiagnostics().init_callback(PPO("MlpPolicy", "CartPole-v1", n_steps=64))
