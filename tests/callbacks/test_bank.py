"""LabelFreeSnapshotBank: regimes inferred from the rollback callback's rebases, never from task labels."""

import gymnasium as gym
import pytest
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv

from helpers import CARTPOLE_BALANCER, RecordState, assert_states_equal, set_linear_cartpole_policy
from rollback_rl.agents import RollbackDQN
from rollback_rl.callbacks import RollbackCallback
from rollback_rl.callbacks.bank import LabelFreeSnapshotBank, pick_banked_snapshot
from rollback_rl.core.detectors import Score
from rollback_rl.envs import SWITCHING_CARTPOLE_ID

torch.set_num_threads(1)

DO_NOTHING = (0.0, 0.0, 0.0, 0.0)  # always action 0: falls over in about 9 steps on either task
REVERSED_BALANCER = tuple(-w for w in CARTPOLE_BALANCER)  # 500 with reversed actions, about 9 without


# -- the decision, with numbers ----------------------------------------------------------------------

def score(*returns: float) -> Score:
    return Score.from_returns(0, list(returns))


def test_the_best_banked_snapshot_is_kept_when_it_clearly_beats_the_current_weights():
    trials = {0: score(500, 500, 500), 1: score(200, 210, 190), 2: score(9, 10, 9)}
    assert pick_banked_snapshot(trials, current=score(9, 10, 11), floor=9.0) == 0


def test_no_snapshot_is_kept_that_beats_the_current_weights_by_less_than_min_gain():
    trials = {0: score(100, 101, 102), 1: score(103, 102, 104)}  # best mean 103 over 101: 2 / 94 of the range
    assert pick_banked_snapshot(trials, current=score(101, 101, 101), floor=9.0, min_gain=0.05) is None
    assert pick_banked_snapshot(trials, current=score(101, 101, 101), floor=9.0, min_gain=0.01, alpha=None) == 1


def test_a_lucky_trial_must_also_beat_the_current_weights_significantly():
    trials = {3: score(500, 12, 10, 11, 500)}  # mean 206.6: well above 100, but two lucky episodes
    current = score(100, 95, 105, 100, 100)
    assert pick_banked_snapshot(trials, current, floor=9.0) is None
    assert pick_banked_snapshot(trials, current, floor=9.0, alpha=None) == 3


def test_nothing_banked_keeps_the_current_weights():
    assert pick_banked_snapshot({}, current=score(9, 9), floor=9.0) is None


# -- the bank in training: a toy whose "training" is written by hand ------------------------------------

class InstallPolicyAt(BaseCallback):
    """Stands in for learning: at each given timestep, set the linear greedy policy to the given weights."""

    def __init__(self, policies: dict[int, tuple[float, ...]]) -> None:
        super().__init__()
        self.policies = policies

    def _on_step(self) -> bool:
        if self.num_timesteps in self.policies:
            set_linear_cartpole_policy(self.model, self.policies[self.num_timesteps])
        return True


class FollowTheWorld(BaseCallback):
    """Keeps the evaluation env on the task the training env runs now: the world the agent acts in,
    which the experiment knows and the bank is never told."""

    def __init__(self, training_env: gym.Env, eval_env: gym.Env) -> None:
        super().__init__()
        self.training, self.evaluation = training_env.unwrapped, eval_env.unwrapped

    def _on_step(self) -> bool:
        self.evaluation.set_task(self.training.task)
        return True


def a_b_a_toy(with_bank: bool = True, trial_task: str | None = None, max_regimes: int = 10, algorithm=DQN):
    """Default CartPole to step 1,000, reversed actions to 3,000, then default again; the agent "learns"
    the balancer at step 100 and the reversed balancer at step 1,600 (and nothing else: no gradient step)."""
    training_env = gym.make(SWITCHING_CARTPOLE_ID, tasks=("default", "reversed", "default"), switch_at=[1_000, 3_000],
                            max_episode_steps=100)  # short episodes: the switches land within 100 steps
    model = algorithm("MlpPolicy", Monitor(training_env), seed=0, learning_starts=100_000, exploration_initial_eps=0.0,
                exploration_final_eps=0.0, policy_kwargs=dict(net_arch=[]))
    set_linear_cartpole_policy(model, DO_NOTHING)
    world = gym.make(SWITCHING_CARTPOLE_ID, tasks=("default",))
    rollback = RollbackCallback(DummyVecEnv([lambda: Monitor(world)]), eval_freq=500, n_eval_episodes=3)
    callbacks = [InstallPolicyAt({100: CARTPOLE_BALANCER, 1_600: REVERSED_BALANCER}),
                 FollowTheWorld(training_env, world), rollback]
    before_bank = RecordState(at_timesteps={3_500})
    bank = after_bank = None
    if with_bank:
        trial_env = None if trial_task is None else gym.make(SWITCHING_CARTPOLE_ID, tasks=(trial_task,))
        bank = LabelFreeSnapshotBank(rollback, n_trial_episodes=3, eval_env=trial_env, max_regimes=max_regimes)
        after_bank = RecordState(at_timesteps={1_000, 3_500})
        callbacks += [before_bank, bank, after_bank]
    model.learn(4_000, callback=CallbackList(callbacks))
    scores = {s.timestep: s.mean for s in rollback.scores}
    return scores, rollback, bank, before_bank, after_bank


@pytest.mark.parametrize("algorithm", [DQN, RollbackDQN])  # RollbackDQN restores through its own undo log
def test_the_bank_restores_the_first_regimes_weights_bitwise_when_the_environment_switches_back(algorithm):
    scores, rollback, bank, _, after_bank = a_b_a_toy(algorithm=algorithm)

    assert scores[1_000] == 500 and scores[1_500] < 50  # reversed actions: the balancer falls over
    assert scores[3_000] == 500 and scores[3_500] < 50  # back to default: the reversed balancer falls over
    assert rollback.rebases == 2 and rollback.rollbacks == []  # both switches: the newest snapshot failed too
    first, second = bank.switches
    assert (first.timestep, first.left, first.entered, first.trial_scores) == (1_500, 0, 1, {})  # nothing to try
    assert (second.timestep, second.left, second.entered) == (3_500, 1, 0)
    assert second.trial_scores == {0: 500.0} and second.restored_timestep == 1_000
    assert bank.restores == [second] and len(bank.regimes) == 2
    assert_states_equal(after_bank.records[1_000], after_bank.records[3_500])
    assert scores[4_000] == 500  # the agent continues from the balancer


def test_without_the_bank_the_agent_stays_with_the_weights_that_fail():
    scores, rollback, *_ = a_b_a_toy(with_bank=False)
    assert rollback.rebases == 2 and scores[4_000] < 50


@pytest.mark.parametrize("max_regimes, entered", [(10, 2), (2, 0)])
def test_a_banked_snapshot_that_does_no_better_is_tried_and_the_current_weights_go_back(max_regimes, entered):
    # The trials run on reversed actions, where the balancer of regime 0 falls over too.
    scores, _, bank, before_bank, after_bank = a_b_a_toy(trial_task="reversed", max_regimes=max_regimes)

    switch = bank.switches[1]
    assert switch.timestep == 3_500 and list(switch.trial_scores) == [0] and switch.trial_scores[0] < 50
    assert switch.restored_timestep is None and bank.restores == []
    assert_states_equal(before_bank.records[3_500], after_bank.records[3_500])
    # A new regime: appended, or (max_regimes=2) in place of regime 0, the least recently active one.
    assert switch.entered == entered and len(bank.regimes) == min(3, max_regimes)
    assert bank.regimes[1].snapshot.last_good.timestep == 3_000  # the regime left keeps its weights
    assert scores[4_000] < 50


def test_the_bank_must_come_after_its_rollback_callback():
    rollback = RollbackCallback(gym.make("CartPole-v1"), eval_freq=100)
    model = DQN("MlpPolicy", "CartPole-v1", learning_starts=1_000, policy_kwargs=dict(net_arch=[8]))
    with pytest.raises(ValueError, match="before it in the same CallbackList"):
        model.learn(10, callback=CallbackList([LabelFreeSnapshotBank(rollback), rollback]))


def test_the_bank_needs_an_env_to_try_snapshots_on():
    rollback = RollbackCallback(eval_freq=100)  # online mode: no evaluation env
    model = DQN("MlpPolicy", "CartPole-v1", learning_starts=1_000, policy_kwargs=dict(net_arch=[8]))
    with pytest.raises(ValueError, match="give it eval_env"):
        model.learn(10, callback=CallbackList([rollback, LabelFreeSnapshotBank(rollback)]))
