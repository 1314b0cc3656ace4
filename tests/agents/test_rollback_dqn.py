"""RollbackDQN trains exactly like SB3's DQN, undoes steps bitwise, survives NaNs and saves like DQN."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.save_util import load_from_zip_file

from rollback_rl.agents import RollbackDQN
from rollback_rl.callbacks import sb3_training_state
from rollback_rl.core.snapshots import SnapshotRing
from rollback_rl.core.undo import UndoUnavailableError

from helpers import assert_states_equal

torch.set_num_threads(1)

# A gradient step every 4 env steps from step 50, a target sync every 20 env steps (every 5 gradient
# steps), an anchor every 16 operations: a few hundred env steps cross several of each.
TINY = dict(learning_starts=50, train_freq=4, gradient_steps=1, target_update_interval=20, batch_size=16,
            buffer_size=1_000, policy_kwargs=dict(net_arch=[32, 32]), seed=0)


def clone_state(model: DQN) -> dict:
    return {"policy": copy.deepcopy(model.policy.state_dict()),
            "optimizer": copy.deepcopy(model.policy.optimizer.state_dict())}


class RecordingDQN(RollbackDQN):
    """Keeps the training state before every live gradient step, to compare undo results against."""

    def _setup_model(self) -> None:
        super()._setup_model()
        self.states_before_step: list[dict] = []
        self.recording = True

    def _gradient_step(self, batch, learning_rate):
        if self.recording:
            self.states_before_step.append(clone_state(self))
        return super()._gradient_step(batch, learning_rate)


def make(cls=RollbackDQN, **kwargs) -> RollbackDQN:
    return cls("MlpPolicy", "CartPole-v1", **{**TINY, "undo_anchor_interval": 16, **kwargs})


def test_trains_bitwise_like_sb3_dqn():
    ours = make().learn(300)
    theirs = DQN("MlpPolicy", "CartPole-v1", **TINY).learn(300)
    assert_states_equal(clone_state(ours), clone_state(theirs))


@pytest.mark.parametrize("n", [1, 3, 5, 17, 40, 63])
def test_undo_n_steps_restores_q_net_target_and_adam_bitwise(n):
    # 300 env steps: 63 gradient steps and 15 target syncs; n = 3 and 5 cross a sync, 17 and 40 cross
    # anchors, 63 goes back to before the first step (Adam without state).
    model = make(RecordingDQN).learn(300)
    steps = len(model.states_before_step)
    assert steps == 63
    model.recording = False
    model.undo(n)
    assert_states_equal(clone_state(model), model.states_before_step[steps - n])


def test_undo_to_mark_reverts_a_whole_learn_call():
    model = make().learn(150)
    before = clone_state(model)
    mark = model.undo_mark()
    model.learn(200, reset_num_timesteps=False)
    assert model.undo_log.depth == 26 + 50  # gradient steps of both learn() calls
    model.undo_to(mark)
    assert_states_equal(clone_state(model), before)


def test_undo_beyond_depth_raises():
    model = make(undo_depth=10).learn(300)
    with pytest.raises(ValueError, match="max_depth=10"):
        model.undo(11)
    fresh = make().learn(60)
    with pytest.raises(UndoUnavailableError, match="only 3"):
        fresh.undo(4)


def test_undo_log_respects_its_memory_budget():
    budget = 40_000  # about three full copies of this tiny training state
    model = make(undo_memory_budget=budget, undo_anchor_interval=8).learn(300)
    assert 0 < model.undo_log.nbytes <= budget
    assert 0 < model.undo_log.depth < 63


def test_undo_depth_zero_turns_the_log_off():
    model = make(undo_depth=0).learn(100)
    assert model.undo_log is None
    with pytest.raises(RuntimeError, match="undo_depth > 0"):
        model.undo(1)


def poison_rewards_of_sample(model: RollbackDQN, calls: set[int]) -> None:
    """Make the replay buffer return NaN rewards on the given sample() calls (0 = the first)."""
    sample = model.replay_buffer.sample
    counter = iter(range(10**9))

    def poisoned(*args, **kwargs):
        batch = sample(*args, **kwargs)
        if next(counter) in calls:
            batch.rewards[0] = float("nan")
        return batch

    model.replay_buffer.sample = poisoned


def test_nan_in_a_batch_is_skipped_and_counted_and_weights_stay_finite():
    model = make(RecordingDQN).learn(100)
    poison_rewards_of_sample(model, {2})
    model.train(gradient_steps=5, batch_size=16)
    assert model.nonfinite_steps == 1
    assert all(torch.isfinite(t).all() for t in model.policy.state_dict().values())
    assert model.undo_log.depth == len(model.states_before_step) - 1  # the skipped step is not in the log
    model.recording = False
    model.undo(4)  # the 4 good steps of that train() call
    assert_states_equal(clone_state(model), model.states_before_step[-5])


def test_step_leaving_nonfinite_weights_is_undone_at_once():
    model = make().learn(100)
    before = clone_state(model)
    model.lr_schedule = lambda _: float("nan")  # finite loss and gradients, NaN weights after the step
    model.train(gradient_steps=3, batch_size=16)
    assert model.nonfinite_steps == 3
    assert_states_equal(clone_state(model)["policy"], before["policy"])
    state = model.policy.optimizer.state_dict()["state"]
    assert all(torch.equal(state[i]["exp_avg"], before["optimizer"]["state"][i]["exp_avg"]) for i in state)


class MarkedBatchesDQN(RollbackDQN):
    """A RollbackDQN that treats some minibatches (``marked_batches``) specially; counts its weight checks."""

    def _setup_model(self) -> None:
        super()._setup_model()
        self.marked_batches: list = []
        self.weight_checks = 0

    def is_marked(self, batch) -> bool:
        return any(batch is marked for marked in self.marked_batches)

    def _weights_finite(self) -> bool:
        self.weight_checks += 1
        return super()._weights_finite()


class DivergingStepDQN(MarkedBatchesDQN):
    """Sets a Q-network weight to NaN right after the gradient step on a marked minibatch (replays
    included), as a diverging optimizer would."""

    def _gradient_step(self, batch, learning_rate):
        result = super()._gradient_step(batch, learning_rate)
        if self.is_marked(batch):
            with torch.no_grad():
                self.q_net.q_net[0].weight[0, 0] = float("nan")
        return result


class InfiniteGradientDQN(MarkedBatchesDQN):
    """Gives a marked minibatch an infinite gradient (its loss stays finite)."""

    def _setup_model(self) -> None:
        super()._setup_model()
        self.gradient_is_infinite = False
        self.q_net.q_net[0].weight.register_hook(
            lambda gradient: torch.full_like(gradient, float("inf")) if self.gradient_is_infinite else gradient)

    def _gradient_step(self, batch, learning_rate):
        self.gradient_is_infinite = self.is_marked(batch)
        try:
            return super()._gradient_step(batch, learning_rate)
        finally:
            self.gradient_is_infinite = False


def mark_samples(model: MarkedBatchesDQN, calls: set[int]) -> None:
    """Mark the minibatches the replay buffer returns on the given sample() calls (0 = the first)."""
    sample = model.replay_buffer.sample
    counter = iter(range(10**9))

    def marking(*args, **kwargs):
        batch = sample(*args, **kwargs)
        if next(counter) in calls:
            model.marked_batches.append(batch)
        return batch

    model.replay_buffer.sample = marking


def test_step_with_a_non_finite_gradient_is_undone_and_counted():
    model = make(InfiniteGradientDQN).learn(100)
    before = clone_state(model)
    mark_samples(model, {0, 1})
    model.train(gradient_steps=2, batch_size=16)
    assert model.nonfinite_steps == 2
    assert_states_equal(clone_state(model), before)


def test_checking_weights_once_per_call_ends_exactly_as_checking_every_step():
    models = []
    for check_every_step in (False, True):
        model = make(DivergingStepDQN).learn(100)
        if check_every_step:
            model.undo_log.keeps_current_state_over = lambda *args: False
        mark_samples(model, {2})
        model.train(gradient_steps=6, batch_size=16)
        models.append(model)
    once, every = models
    assert once.nonfinite_steps == every.nonfinite_steps == 1
    assert all(torch.isfinite(t).all() for t in once.policy.state_dict().values())
    assert_states_equal(clone_state(once), clone_state(every))
    assert once.logger.name_to_value["train/loss"] == every.logger.name_to_value["train/loss"]
    assert once.undo_log.depth == every.undo_log.depth


def test_weights_are_checked_once_per_call_while_the_undo_log_can_take_the_call_back():
    model = make(MarkedBatchesDQN).learn(100)
    model.weight_checks = 0
    model.train(gradient_steps=8, batch_size=16)
    assert model.weight_checks == 1
    shallow = make(MarkedBatchesDQN, undo_depth=4).learn(100)
    shallow.weight_checks = 0
    shallow.train(gradient_steps=8, batch_size=16)
    assert shallow.weight_checks == 8


def test_a_call_the_undo_log_lost_the_start_of_falls_back_to_the_last_snapshot():
    # Only if the estimate of what the log keeps were wrong: the step to blame cannot be found.
    model = make(DivergingStepDQN, undo_anchor_interval=1).learn(100)
    good = model.snapshot(score=1.0)
    model.undo_log.max_bytes = int(2.5 * good.nbytes)  # two or three anchors: the call's start falls off
    model.undo_log.keeps_current_state_over = lambda *args: True
    mark_samples(model, {4})
    model.train(gradient_steps=6, batch_size=16)
    assert model.nonfinite_steps == 1
    assert all(torch.isfinite(t).all() for t in model.policy.state_dict().values())


def test_streak_of_nonfinite_steps_rolls_back_to_the_last_snapshot():
    model = make(max_nonfinite_streak=3).learn(100)
    model.snapshot(score=100.0)
    good = clone_state(model)
    model.learn(100, reset_num_timesteps=False)
    poison_rewards_of_sample(model, {0, 1, 2})
    model.train(gradient_steps=3, batch_size=16)
    assert model.nonfinite_steps == 3 and model.nonfinite_rollbacks == 1
    assert_states_equal(clone_state(model), good)


def test_rollback_restores_the_snapshot_and_undo_can_cross_it():
    model = make().learn(120)
    model.snapshot(score=1.0)
    snapshot_state = clone_state(model)
    model.learn(100, reset_num_timesteps=False)
    mark = model.undo_mark()
    before_rollback = clone_state(model)
    model.rollback()
    assert_states_equal(clone_state(model), snapshot_state)
    model.train(gradient_steps=3, batch_size=16)
    model.undo(3)
    assert_states_equal(clone_state(model), snapshot_state)
    model.undo_to(mark)
    assert_states_equal(clone_state(model), before_rollback)


def test_restore_snapshot_of_another_ring_is_anchored_in_the_undo_log():
    # RollbackCallback restores through restore_snapshot(), also snapshots from its own rings.
    model = make().learn(120)
    other_ring = SnapshotRing(1, check_finite=False)
    snapshot = other_ring.take(sb3_training_state(model), timestep=model.num_timesteps, score=0.0)
    snapshot_state = clone_state(model)
    model.learn(100, reset_num_timesteps=False)
    model.restore_snapshot(snapshot)
    assert_states_equal(clone_state(model), snapshot_state)
    model.train(gradient_steps=2, batch_size=16)
    model.undo(2)
    assert_states_equal(clone_state(model), snapshot_state)


def test_rollback_without_snapshot_raises():
    with pytest.raises(RuntimeError, match="snapshot"):
        make().rollback()


def test_save_load_round_trip_leaves_the_undo_log_out(tmp_path):
    model = make(undo_depth=77, max_nonfinite_streak=4).learn(200)
    model.snapshot(score=5.0)
    model.nonfinite_steps = 2
    model.save(tmp_path / "model.zip")
    data, _, _ = load_from_zip_file(tmp_path / "model.zip")
    assert "undo_log" not in data and "rollback_snapshots" not in data

    loaded = RollbackDQN.load(tmp_path / "model.zip", env=model.get_env())
    assert_states_equal(clone_state(loaded), clone_state(model))
    assert loaded.undo_depth == 77 and loaded.max_nonfinite_streak == 4 and loaded.nonfinite_steps == 2
    assert loaded.undo_log.depth == 0 and len(loaded.rollback_snapshots) == 0
    after_load = clone_state(loaded)
    loaded.learn(100, reset_num_timesteps=False)
    loaded.undo(loaded.undo_log.depth)
    assert_states_equal(clone_state(loaded), after_load)
    observation = np.zeros(4, dtype=np.float32)
    assert loaded.predict(observation, deterministic=True)[0] == model.predict(observation, deterministic=True)[0]


def test_training_state_and_snapshot_ring_are_what_rollback_callback_uses():
    model = make()
    assert set(sb3_training_state(model)) == {"policy", "policy.optimizer"}
    assert sb3_training_state(model)["policy"] is model.policy
    assert model.rollback_snapshots.capacity == 3


def test_invalid_rollback_arguments_raise():
    with pytest.raises(ValueError, match="undo_depth"):
        make(undo_depth=-1)
    with pytest.raises(ValueError, match="max_nonfinite_streak"):
        make(max_nonfinite_streak=0)
