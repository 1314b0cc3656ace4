import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.env_util import make_vec_env

from rollback_rl import cli
from rollback_rl.buffers import (
    REPLAY_BUFFER_CLASSES,
    FifoReplayBuffer,
    HalfReservoirReplayBuffer,
    ReservoirReplayBuffer,
    transition_ages,
)
from rollback_rl.hyperparams import HyperparameterError, check_hyperparameters
from rollback_rl.training import build_model

torch.set_num_threads(1)

CARTPOLE = gym.make("CartPole-v1")
OUR_BUFFERS = (FifoReplayBuffer, ReservoirReplayBuffer, HalfReservoirReplayBuffer)
TINY = dict(policy_kwargs=dict(net_arch=[8]), learning_starts=50, train_freq=10, gradient_steps=2, batch_size=8,
            target_update_interval=50)


def make_buffer(cls: type[ReplayBuffer], size: int, n_envs: int = 1, seed: int = 0, **kwargs) -> ReplayBuffer:
    if cls in (ReservoirReplayBuffer, HalfReservoirReplayBuffer):
        kwargs["seed"] = seed
    return cls(size, CARTPOLE.observation_space, CARTPOLE.action_space, device="cpu", n_envs=n_envs, **kwargs)


def offer_steps(buffer: ReplayBuffer, count: int, start: int = 1) -> None:
    """Offer ``count`` steps; the step numbered ``k`` (from ``start``) has observation ``k`` in every env,
    and every 7th ends in failure, every 11th in a time-limit truncation."""
    n_envs = buffer.n_envs
    for k in range(start, start + count):
        obs = np.full((n_envs, 4), k, dtype=np.float32)
        done = np.full(n_envs, k % 7 == 0 or k % 11 == 0)
        infos = [{"TimeLimit.truncated": k % 11 == 0} for _ in range(n_envs)]
        buffer.add(obs, obs + 0.5, np.full((n_envs, 1), k % 2), np.full(n_envs, 1.0), done, infos)


def held_steps(buffer: ReplayBuffer) -> np.ndarray:
    """The step numbers held (from the observations), sorted."""
    rows = buffer.buffer_size if buffer.full else buffer.pos
    return np.sort(buffer.observations[:rows, 0, 0].astype(np.int64))


# -- what each buffer keeps ---------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [ReplayBuffer, FifoReplayBuffer])
def test_fifo_keeps_the_last_hundred_of_ten_thousand_steps(cls):
    buffer = make_buffer(cls, 100)
    offer_steps(buffer, 10_000)
    assert held_steps(buffer).tolist() == list(range(9_901, 10_001))
    if cls is FifoReplayBuffer:
        assert np.sort(buffer.insertion_step).tolist() == list(range(9_901, 10_001))
        assert (buffer.pos, buffer.full) == (0, True)  # SB3's meaning: next row written


def test_reservoir_keeps_a_sample_spread_over_the_whole_history():
    buffer = make_buffer(ReservoirReplayBuffer, 100, seed=0)
    offer_steps(buffer, 10_000)
    steps = held_steps(buffer)
    assert len(np.unique(steps)) == 100
    assert abs(steps.mean() - 5_000) < 1_000  # a FIFO's would be 9,950; 3.5 standard errors
    assert steps.min() < 1_000 and steps.max() > 9_000
    assert all(12 <= count <= 38 for count in np.histogram(steps, bins=4, range=(1, 10_001))[0])
    assert np.array_equal(np.sort(buffer.insertion_step), steps)  # one timestep per step with one env


def test_reservoir_is_deterministic_given_its_seed():
    def kept(seed):
        buffer = make_buffer(ReservoirReplayBuffer, 50, seed=seed)
        offer_steps(buffer, 2_000)
        return buffer.insertion_step.copy()

    assert np.array_equal(kept(3), kept(3))
    assert not np.array_equal(kept(3), kept(4))


def test_half_reservoir_keeps_the_recent_half_and_a_spread_sample_of_the_rest():
    buffer = make_buffer(HalfReservoirReplayBuffer, 100, seed=0)
    offer_steps(buffer, 10_000)
    assert (buffer.reservoir_rows, buffer.fifo_rows) == (50, 50)
    assert np.sort(buffer.insertion_step[50:]).tolist() == list(range(9_951, 10_001))  # the FIFO half
    old = buffer.insertion_step[:50]
    assert len(np.unique(old)) == 50 and old.max() <= 9_950  # nothing held twice
    assert abs(old.mean() - 4_975) < 1_400  # 3.5 standard errors
    assert old.min() < 2_000 and old.max() > 8_000
    assert buffer.pos == 50 and buffer.full  # the FIFO half wrapped: its first row is written next


def test_each_step_offered_is_kept_with_the_same_probability():
    # 400 seeds, 50 steps into 5 rows: the reservoir keeps each step in 10% of runs; the half buffer
    # keeps the last 5 always and each older step in 5 / 45 of runs.
    reservoir_counts, half_counts = np.zeros(50), np.zeros(50)
    for seed in range(400):
        reservoir = make_buffer(ReservoirReplayBuffer, 5, seed=seed)
        half = make_buffer(HalfReservoirReplayBuffer, 10, seed=seed)
        offer_steps(reservoir, 50)
        offer_steps(half, 50)
        reservoir_counts[reservoir.insertion_step - 1] += 1
        half_counts[half.insertion_step - 1] += 1
    # Totals per block of 5 steps: 200 expected (standard deviation about 13).
    assert all(150 <= total <= 250 for total in reservoir_counts.reshape(10, 5).sum(axis=1))
    assert all(np.abs(half_counts[:45].reshape(9, 5).sum(axis=1) - 400 * 25 / 45) < 60)
    assert half_counts[45:].tolist() == [400] * 5


@pytest.mark.parametrize("cls", [ReservoirReplayBuffer, HalfReservoirReplayBuffer])
def test_until_full_it_holds_exactly_what_sb3_holds(cls):
    ours, sb3 = make_buffer(cls, 30), make_buffer(ReplayBuffer, 30)
    offer_steps(ours, 29)
    offer_steps(sb3, 29)
    for name in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        assert np.array_equal(getattr(ours, name), getattr(sb3, name)), name
    assert (ours.pos, ours.full, ours.size()) == (sb3.pos, sb3.full, sb3.size())


def test_several_envs_are_kept_as_whole_rows():
    buffer = make_buffer(ReservoirReplayBuffer, 20, n_envs=2, seed=1)  # 10 rows of 2 transitions
    offer_steps(buffer, 500)
    assert buffer.buffer_size == 10 and buffer.timesteps_offered == 1_000
    assert np.array_equal(buffer.observations[:, 0], buffer.observations[:, 1])  # both envs of one step
    # Row of step k was written at timestep 2k.
    assert np.array_equal(buffer.insertion_step, 2 * buffer.observations[:, 0, 0].astype(np.int64))


def test_reset_empties_the_buffer_and_its_counts():
    buffer = make_buffer(ReservoirReplayBuffer, 10)
    offer_steps(buffer, 30)
    buffer.reset()
    assert (buffer.pos, buffer.full, buffer.timesteps_offered) == (0, False, 0)
    assert (buffer.insertion_step == -1).all()


# -- the same contract as SB3's -------------------------------------------------------------------

@pytest.mark.parametrize("cls", OUR_BUFFERS)
@pytest.mark.parametrize("n_envs", [1, 3])
def test_samples_have_sb3s_shapes_dtypes_and_values(cls, n_envs):
    ours, sb3 = make_buffer(cls, 60, n_envs=n_envs), make_buffer(ReplayBuffer, 60, n_envs=n_envs)
    offer_steps(ours, 15)  # not full: the same rows as SB3's
    offer_steps(sb3, 15)
    np.random.seed(5)
    expected = sb3.sample(32)
    np.random.seed(5)
    samples = ours.sample(32)
    for name in expected._fields:
        got, want = getattr(samples, name), getattr(expected, name)
        if want is None:  # discounts: only n-step buffers fill them
            assert got is None, name
            continue
        assert (got.shape, got.dtype, got.device) == (want.shape, want.dtype, want.device), name
        assert torch.equal(got, want), name


@pytest.mark.parametrize("cls", OUR_BUFFERS)
def test_time_limit_truncations_are_not_sampled_as_terminations(cls):
    buffer = make_buffer(cls, 20)
    offer_steps(buffer, 15)
    samples = buffer._get_samples(np.array([6, 10, 13, 0]))  # steps 7 (failure), 11 (truncated), 14, 1
    assert samples.observations[:, 0].tolist() == [7, 11, 14, 1]
    assert samples.dones.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]
    assert buffer.timeouts[10, 0] == 1.0 and buffer.dones[10, 0] == 1.0


@pytest.mark.parametrize("cls", OUR_BUFFERS)
def test_optimize_memory_usage_is_refused_with_a_fix(cls):
    with pytest.raises(ValueError, match="optimize_memory_usage=False"):
        make_buffer(cls, 10, optimize_memory_usage=True, handle_timeout_termination=False)


def test_half_reservoir_needs_two_rows():
    with pytest.raises(ValueError, match="two rows"):
        make_buffer(HalfReservoirReplayBuffer, 3, n_envs=2)


# -- ages -------------------------------------------------------------------------------------------

def test_ages_of_a_hand_made_sequence():
    fifo = make_buffer(FifoReplayBuffer, 4)
    offer_steps(fifo, 6)  # rows hold steps 5, 6, 3, 4
    assert fifo.insertion_step.tolist() == [5, 6, 3, 4]
    assert transition_ages(fifo, np.array([1, 0, 3, 2])).tolist() == [0, 1, 2, 3]

    sb3 = make_buffer(ReplayBuffer, 4)
    offer_steps(sb3, 6)
    assert transition_ages(sb3, np.array([1, 0, 3, 2])).tolist() == [0, 1, 2, 3]  # derived from pos

    two_envs = make_buffer(FifoReplayBuffer, 8, n_envs=2)
    offer_steps(two_envs, 3)  # rows written at timesteps 2, 4, 6
    assert transition_ages(two_envs, np.array([0, 2])).tolist() == [4, 0]


def test_reservoir_ages_count_from_the_step_each_row_was_written():
    buffer = make_buffer(ReservoirReplayBuffer, 3, seed=2)
    offer_steps(buffer, 40)
    steps = buffer.observations[:, 0, 0].astype(np.int64)
    assert transition_ages(buffer, np.arange(3)).tolist() == (40 - steps).tolist()


# -- with DQN and the command line -----------------------------------------------------------------

def train_dqn(replay_buffer_class: type[ReplayBuffer], steps: int, buffer_size: int, n_envs: int = 1) -> DQN:
    env = make_vec_env("CartPole-v1", n_envs=n_envs, seed=0)
    model = DQN("MlpPolicy", env, seed=0, device="cpu", buffer_size=buffer_size,
                replay_buffer_class=replay_buffer_class, **TINY)
    model.learn(steps)
    return model


@pytest.mark.parametrize("cls", OUR_BUFFERS)
@pytest.mark.parametrize("n_envs", [1, 2])
def test_dqn_learns_with_each_buffer(cls, n_envs):
    model = train_dqn(cls, 400, buffer_size=100, n_envs=n_envs)
    buffer = model.replay_buffer
    assert type(buffer) is cls and buffer.full and model._n_updates > 0
    assert buffer.timesteps_offered == model.num_timesteps == 400
    assert all(torch.isfinite(parameter).all() for parameter in model.policy.parameters())
    held = buffer.insertion_step
    if cls is FifoReplayBuffer:
        assert held.min() == 400 - 100 + n_envs
    else:
        assert held.min() < 300  # keeps steps a FIFO of the same size has dropped


def test_dqn_trains_identically_with_any_buffer_until_the_buffer_is_full():
    reference = train_dqn(ReplayBuffer, 300, buffer_size=1_000)
    for cls in OUR_BUFFERS:
        model = train_dqn(cls, 300, buffer_size=1_000)
        for ours, theirs in zip(model.policy.parameters(), reference.policy.parameters()):
            assert torch.equal(ours, theirs), cls.__name__


TINY_RUN = ["--steps", "400", "--eval-freq", "200", "--eval-episodes", "2", "--no-progress", "--set", "buffer_size=100",
            "--set", "learning_starts=50", "--set", "train_freq=10", "--set", "gradient_steps=2",
            "--set", "policy_kwargs=dict(net_arch=[8])"]


@pytest.mark.parametrize("name", ["ReplayBuffer", "ReservoirReplayBuffer", "HalfReservoirReplayBuffer"])
def test_train_on_the_command_line_with_a_named_buffer_class(tmp_path, name):
    code = cli.main(["train", "CartPole-v1", "--logdir", str(tmp_path), "--run-name", "run",
                     "--set", f"replay_buffer_class={name}", *TINY_RUN])
    assert code == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["hyperparameters"]["replay_buffer_class"] == f"{REPLAY_BUFFER_CLASSES[name].__module__}.{name}"


def test_the_command_line_passes_the_class_to_the_model(tmp_path, capsys):
    # The refusal comes from ReservoirReplayBuffer's own check (SB3's words it otherwise): the class reached the model.
    code = cli.main(["train", "CartPole-v1", "--logdir", str(tmp_path),
                     "--set", "replay_buffer_class=ReservoirReplayBuffer", "--set", "optimize_memory_usage=true",
                     *TINY_RUN])
    assert code == 2
    assert "ReservoirReplayBuffer does not support optimize_memory_usage=True" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", [*REPLAY_BUFFER_CLASSES, "rollback_rl.buffers.ReservoirReplayBuffer",
                                  "stable_baselines3.common.buffers.ReplayBuffer"])
def test_the_hyperparameter_check_maps_allowed_names_to_classes(name):
    checked = check_hyperparameters({"replay_buffer_class": name}, DQN, "--set")
    assert checked["replay_buffer_class"].__name__ == name.rsplit(".", 1)[-1]


@pytest.mark.parametrize("value", ["os.system", "PrioritizedReplayBuffer", "rollback_rl.buffers.transition_ages",
                                   ["ReplayBuffer"], 3])
def test_the_hyperparameter_check_refuses_anything_else(value):
    with pytest.raises(HyperparameterError, match="replay_buffer_class must be one of ReplayBuffer, "):
        check_hyperparameters({"replay_buffer_class": value}, DQN, "--set")
