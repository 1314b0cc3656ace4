import json

import gymnasium as gym
import pytest
import torch
from stable_baselines3 import A2C, DQN, PPO, SAC, TD3
from stable_baselines3.common.callbacks import CallbackList, EvalCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor

from helpers import (CARTPOLE_BALANCER, CARTPOLE_WEAK, CARTPOLE_WOBBLER, CollapseAt, RecordState, ScrambleAt,
                     assert_states_equal, copy_training_state, linear_dqn, set_linear_cartpole_policy, states_equal)
from rollback_rl.callbacks import RollbackCallback
from rollback_rl.core.detectors import CollapseDetector
from rollback_rl.plotting import read_curves, read_scalars
from rollback_rl.tensorboard_layout import END_RESTORE_TAG, ROLLBACKS_TAG

torch.set_num_threads(1)


def test_injected_collapse_is_detected_at_next_evaluation_and_restored_bitwise():
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=1)
    after_restore = RecordState()
    rollback = RollbackCallback("CartPole-v1", eval_freq=500, n_eval_episodes=3,
                                callback_on_rollback=after_restore)
    at_snapshot = RecordState(at_timesteps={1000})
    model.learn(2000, callback=CallbackList([ScrambleAt(1200), rollback, at_snapshot]))

    assert len(rollback.rollbacks) == 1
    event = rollback.rollbacks[0]
    assert event.timestep == 1500  # the first evaluation after the scramble at 1200
    assert event.restored_timestep == 1000 and event.restored_score == 500.0
    assert event.score < 50
    assert_states_equal(at_snapshot.records[1000], after_restore.records[1500])
    # Training went on from the restored weights and kept the task.
    assert rollback.scores[-1].timestep == 2000 and rollback.scores[-1].mean == 500.0


def test_no_rollback_when_the_policy_is_not_learning():
    # A mediocre policy (scores 138 to 278) with learning_rate 0: evaluations vary, weights never change.
    model = linear_dqn(CARTPOLE_WOBBLER, learning_rate=0.0, seed=2)
    rollback = RollbackCallback("CartPole-v1", eval_freq=250, n_eval_episodes=4)
    model.learn(5_000, callback=rollback)
    assert len(rollback.scores) == 20
    assert len({s.mean for s in rollback.scores}) > 5  # the scores really were noisy
    assert rollback.rollbacks == [] and rollback.rebases == 0
    assert rollback.baseline.timestep == 0 and rollback.history.floor <= rollback.baseline.mean


def test_as_eval_callback_child_it_reuses_the_evaluation(tmp_path):
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=3)
    rollback = RollbackCallback()
    evaluation = EvalCallback(gym.make("CartPole-v1"), eval_freq=500, n_eval_episodes=3,
                              log_path=str(tmp_path), callback_after_eval=rollback)
    model.learn(2000, callback=CallbackList([ScrambleAt(1200), evaluation]))
    assert rollback.mode == "eval_callback"
    assert [s.timestep for s in rollback.scores] == [500, 1000, 1500, 2000]
    assert rollback.scores[0].episode_returns == (500.0, 500.0, 500.0)
    assert [(e.timestep, e.restored_timestep) for e in rollback.rollbacks] == [(1500, 1000)]


def test_online_mode_scores_training_episodes_and_restores():
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=4)
    rollback = RollbackCallback(eval_freq=1000, n_eval_episodes=2)  # keyword arguments only, as the RL Zoo
    model.learn(6000, callback=CallbackList([ScrambleAt(3300), rollback]))
    assert rollback.mode == "online"
    assert rollback.scores[0].mean == 500.0
    assert len(rollback.rollbacks) == 1
    event = rollback.rollbacks[0]
    assert event.timestep == 4000 and (event.restored_timestep, event.restored_score) == (3000, 500.0)
    assert rollback.scores[-1].mean == 500.0  # the restored weights balance again


def test_online_mode_stops_rolling_back_after_max_consecutive_rollbacks(capsys):
    # The "collapse" is permanent (weights scrambled on every step): rolling back cannot help.
    def scramble(model):
        ScrambleAt._negate_and_shake(model) if model.num_timesteps > 2000 else None

    class ScrambleEveryStep(ScrambleAt):
        def _on_step(self):
            if self.num_timesteps > 2000 and self.num_timesteps % 100 == 0:
                self.scramble(self.model)
            return True

    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=5)
    rollback = RollbackCallback(eval_freq=500, n_eval_episodes=2, max_consecutive_rollbacks=2, max_restores=None,
                                verbose=1)
    model.learn(8000, callback=CallbackList([ScrambleEveryStep(0), rollback]))
    assert [(e.timestep, e.restored_timestep) for e in rollback.rollbacks] == [(2500, 2000), (3000, 2000)]
    assert rollback.rebases == 1  # the third collapse in a row became the reference
    assert "Rollback: none at timestep 3500 (2 rollbacks in a row)" in capsys.readouterr().out


def test_restore_is_refused_when_restored_weights_fail_too_so_a_changed_env_does_not_loop(capsys):
    # Evaluation env that changes for good at timestep 1200: reversed actions (a changed task).
    class ReversedActions(gym.ActionWrapper):
        def __init__(self, env, model):
            super().__init__(env)
            self.model = model

        def action(self, action):
            return 1 - action if self.model.num_timesteps >= 1200 else action

    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=6)
    rollback = RollbackCallback(ReversedActions(gym.make("CartPole-v1"), model), eval_freq=500,
                                n_eval_episodes=3, verbose=1)
    model.learn(3000, callback=rollback)
    assert rollback.rollbacks == []  # the old weights were checked, failed too, and were not forced back
    assert rollback.rebases == 1
    assert rollback.history.best < 50  # the new level became the reference
    # cool_on_solve: x0.1 at the first 500 (timestep 500), lifted when the solved weights failed their check
    printed = capsys.readouterr().out
    assert "Solved at timestep 500" in printed and "learning rate x10 back" in printed
    assert rollback.cooled_at is None and model.lr_schedule(1.0) == pytest.approx(1e-5)


def _tiny(algo_class, env_id, **kwargs):
    return algo_class("MlpPolicy", env_id, seed=0, policy_kwargs=dict(net_arch=[16, 16]), **kwargs)


@pytest.mark.parametrize("make_model, eval_freq", [
    (lambda: _tiny(PPO, "CartPole-v1", n_steps=64, batch_size=32, n_epochs=2), 128),
    (lambda: _tiny(A2C, "CartPole-v1", n_steps=8), 128),
    (lambda: _tiny(SAC, "Pendulum-v1", learning_starts=20, batch_size=16, buffer_size=1000), 200),
    (lambda: _tiny(TD3, "Pendulum-v1", learning_starts=20, batch_size=16, buffer_size=1000), 200),
    (lambda: linear_dqn(CARTPOLE_WOBBLER, learning_rate=1e-3, seed=7), 200),
], ids=["ppo", "a2c", "sac", "td3", "dqn"])
def test_rollback_restores_every_network_and_optimizer_of_each_algorithm(make_model, eval_freq):
    # Online mode (scores from training episodes; Pendulum's last 200 steps): a rollback is not
    # re-checked there, so the injected detection alone decides.
    model = make_model()
    before_restore = RecordState(at_timesteps={2 * eval_freq})
    at_snapshot = RecordState(at_timesteps={eval_freq})
    after_restore = RecordState()
    rollback = RollbackCallback(eval_freq=eval_freq, n_eval_episodes=1, min_delta=None,  # the detector alone decides
                                detector=CollapseAt(2 * eval_freq), callback_on_rollback=after_restore)
    model.learn(2 * eval_freq, callback=CallbackList([before_restore, rollback, at_snapshot]))
    assert [(e.timestep, e.restored_timestep) for e in rollback.rollbacks] == [(2 * eval_freq, eval_freq)]
    assert not states_equal(at_snapshot.records[eval_freq], before_restore.records[2 * eval_freq])
    assert_states_equal(at_snapshot.records[eval_freq], after_restore.records[2 * eval_freq])


def test_eval_freq_counts_timesteps_not_calls_with_several_envs():
    model = _tiny(PPO, "CartPole-v1", n_steps=32, batch_size=32, n_epochs=1)
    model = PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=4, seed=0), n_steps=32, batch_size=64,
                n_epochs=1, policy_kwargs=dict(net_arch=[8]), seed=0)
    rollback = RollbackCallback("CartPole-v1", eval_freq=256, n_eval_episodes=1)
    model.learn(1024, callback=rollback)
    assert [s.timestep for s in rollback.scores] == [256, 512, 768, 1024]


def test_rollbacks_are_logged_and_printed(capsys, tmp_path):
    from stable_baselines3.common.logger import configure
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=1)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    rollback = RollbackCallback("CartPole-v1", eval_freq=500, n_eval_episodes=3, verbose=1)
    model.learn(2000, callback=CallbackList([ScrambleAt(1200), rollback]))
    assert "Rollback at timestep 1500" in capsys.readouterr().out
    header, *rows = (tmp_path / "progress.csv").read_text().splitlines()
    columns = header.split(",")
    assert {"rollback/n_rollbacks", "rollback/best_score", "eval/mean_reward"} <= set(columns)
    counts = [row.split(",")[columns.index("rollback/n_rollbacks")] for row in rows]
    assert "1" in counts


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(eval_freq=-5), ValueError, "eval_freq must be a positive int"),
    (dict(eval_freq=2.5), ValueError, "eval_freq"),
    (dict(n_eval_episodes=0), ValueError, "n_eval_episodes"),
    (dict(eval_env="NoSuchEnv-v9"), ValueError, "unknown env id 'NoSuchEnv-v9'"),
    (dict(eval_env=42), TypeError, "eval_env must be"),
    (dict(detector="drop"), TypeError, "detector must be a CollapseDetector"),
    (dict(tolerance=2.0), ValueError, "tolerance"),
])
def test_bad_arguments_raise_a_clear_error_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        RollbackCallback(**kwargs)


def test_eval_env_inside_eval_callback_is_refused():
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=0.0)
    evaluation = EvalCallback(gym.make("CartPole-v1"), eval_freq=100,
                              callback_after_eval=RollbackCallback("CartPole-v1"))
    with pytest.raises(ValueError, match="do not give it an eval_env"):
        model.learn(100, callback=evaluation)


class AlwaysCollapsed(CollapseDetector):
    def is_bad(self, reference, current, floor):
        return True


class NeverCollapsed(CollapseDetector):
    def is_bad(self, reference, current, floor):
        return False


@pytest.mark.parametrize("detector, rollbacks", [(AlwaysCollapsed(), [(1000, 500), (1500, 500)]),
                                                 (NeverCollapsed(), [])])
def test_a_custom_detector_decides_when_to_roll_back(detector, rollbacks):
    # Weights that never change (learning rate 0) and score 500 on every training episode (online mode,
    # unchecked restores): only the detector can tell a collapse.
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=0.0, seed=2)
    rollback = RollbackCallback(eval_freq=500, n_eval_episodes=1, detector=detector)
    model.learn(1500, callback=rollback)
    assert [s.mean for s in rollback.scores] == [500.0, 500.0, 500.0]
    assert [(e.timestep, e.restored_timestep) for e in rollback.rollbacks] == rollbacks
    assert rollback.ring.last_good.timestep == (500 if rollbacks else 1500)


class ScrambleAfterEach(ScrambleAt):
    """Injected faults: scramble the weights at each of ``timesteps`` (the same garbage each time)."""

    def __init__(self, timesteps, scramble=None) -> None:
        super().__init__(0, scramble)
        self.timesteps = set(timesteps)

    def _on_step(self) -> bool:
        if self.num_timesteps in self.timesteps:
            self.scramble(self.model)
        return True


def weaken(model) -> None:
    """Injected partial collapse: a weak linear policy (49-191 on CartPole-v1), not down to the floor."""
    set_linear_cartpole_policy(model, CARTPOLE_WEAK)


@pytest.mark.parametrize("max_restores", [2, None])
def test_a_snapshot_that_keeps_collapsing_is_set_aside_and_comes_back_at_the_end(max_restores, tmp_path):
    # Good weights (500) snapshotted at 1,000; collapses injected before the evaluations of 1,500 and 2,000
    # (to the floor) and 2,500 (partial, above the floor). With max_restores=2 the third collapse keeps the
    # current weights (a rebase) and sets the snapshot aside; training ends right there on weakened weights,
    # so the snapshot comes back at the end.
    from stable_baselines3.common.logger import configure
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=1)
    model.set_logger(configure(str(tmp_path), ["tensorboard"]))
    rollback = RollbackCallback("CartPole-v1", eval_freq=500, n_eval_episodes=3, max_restores=max_restores)
    at_snapshot = RecordState(at_timesteps={1000})
    model.learn(2500, callback=CallbackList([ScrambleAfterEach({1200, 1700}), ScrambleAfterEach({2200}, weaken), rollback,
                                            at_snapshot]))

    timesteps = [(event.timestep, event.restored_timestep) for event in rollback.rollbacks]
    assert timesteps == [(1500, 1000), (2000, 1000), (2500, 1000)]
    if max_restores is None:
        assert rollback.rebases == 0 and rollback.retired.last_good is None
    else:
        assert rollback.rebases == 1  # the last one when learn() ended, from the set-aside snapshot
        assert 20 < rollback.scores[-1].mean < 250
        assert rollback.rollbacks[-1].verified_score == 500.0
        assert_states_equal(at_snapshot.records[1000], copy_training_state(model))  # the snapshot, bitwise
        resumed = RollbackCallback("CartPole-v1", max_restores=max_restores)
        resumed.load_state_dict(json.loads(json.dumps(rollback.state_dict())))
        assert resumed.policy.restore_counts == {1000: 2} and resumed.policy.in_place == 500.0
    # TensorBoard: one point per evaluation (the final one included); the restore at the end has its own tag.
    scalars = read_scalars(tmp_path)
    assert [step for step, _ in scalars[ROLLBACKS_TAG]] == list(range(500, 2501, 500))
    assert scalars[ROLLBACKS_TAG][-1][1] == (3 if max_restores is None else 2)
    assert scalars.get(END_RESTORE_TAG) == (None if max_restores is None else [(2500, 500.0)])
    assert read_curves(tmp_path).rollback_timesteps == [step for step, _ in timesteps]


def test_after_giving_up_a_fall_to_the_floor_brings_the_set_aside_snapshot_back_at_the_next_evaluation():
    # As above with max_restores=2 (rebase at 2,500), but training goes on: the weights are scrambled at
    # 2,700, at the floor at 3,000 while the set-aside snapshot scores 500, so it is restored then and there.
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=1)
    rollback = RollbackCallback("CartPole-v1", eval_freq=500, n_eval_episodes=3, max_restores=2)
    at_snapshot, after_restore = RecordState(at_timesteps={1000}), RecordState(at_timesteps={3000})
    rollback.callback = after_restore
    after_restore.parent = rollback
    faults = [ScrambleAfterEach({1200, 1700, 2700}), ScrambleAfterEach({2200}, weaken)]
    model.learn(3500, callback=CallbackList([*faults, rollback, at_snapshot]))
    assert [(e.timestep, e.restored_timestep) for e in rollback.rollbacks] == [
        (1500, 1000), (2000, 1000), (3000, 1000)]
    assert rollback.rebases == 1
    assert_states_equal(at_snapshot.records[1000], after_restore.records[3000])
    assert rollback.scores[-1].mean == 500.0  # and it holds


def test_set_aside_snapshot_stays_away_when_the_final_weights_are_as_good():
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=1)
    rollback = RollbackCallback("CartPole-v1", eval_freq=500, n_eval_episodes=3, max_restores=1)
    # Collapses before 1,500 and 2,000; the second keeps the scrambled weights, which are then
    # replaced by good ones again (as if training recovered) before the next evaluation.
    recover = RecordState(at_timesteps={1000})

    class Recover(ScrambleAt):
        def _on_step(self):
            if self.num_timesteps == 2100:
                for name, value in recover.records[1000]["policy"].items():
                    model.policy.state_dict()[name].copy_(value)
            return True

    model.learn(3000, callback=CallbackList([ScrambleAfterEach({1200}), ScrambleAfterEach({1700}, weaken), rollback, recover, Recover(0)]))
    assert [(e.timestep, e.restored_timestep) for e in rollback.rollbacks] == [(1500, 1000)]
    assert rollback.rebases == 1 and rollback.retired.last_good.timestep == 1000
    assert rollback.scores[-1].mean == 500.0  # recovered: the set-aside snapshot was not put back


def test_final_weights_are_put_back_bitwise_when_the_set_aside_snapshot_fails_its_check_at_the_end(capsys):
    # The snapshot of 1,000 is set aside at 2,000, training recovers by 2,500 (good weights copied back at
    # 2,100). From 2,600 on the evaluation env pays no reward: at 3,000 the last good snapshot (2,500) fails its
    # check (a false alarm), and at the end the set-aside snapshot scores no better than the final weights (0):
    # they are put back.
    class NoRewardAfter2600(gym.RewardWrapper):
        def __init__(self, env, model):
            super().__init__(env)
            self.model = model

        def reward(self, reward):
            return 0.0 if self.model.num_timesteps >= 2600 else reward

    class RecordBeforeEndCheck(RecordState):
        def _on_training_end(self):
            self.records[self.num_timesteps] = copy_training_state(self.model)

    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=1)
    rollback = RollbackCallback(NoRewardAfter2600(gym.make("CartPole-v1"), model), eval_freq=500, n_eval_episodes=3,
                                max_restores=1, verbose=1)
    final = RecordBeforeEndCheck(at_timesteps=set())  # listed first: its training end comes before the check
    good = RecordState(at_timesteps={1000})

    class Recover(ScrambleAt):
        def _on_step(self):
            if self.num_timesteps == 2100:
                for name, value in good.records[1000]["policy"].items():
                    model.policy.state_dict()[name].copy_(value)
            return True

    model.learn(3000, callback=CallbackList([final, ScrambleAfterEach({1200}), ScrambleAfterEach({1700}, weaken), rollback, good, Recover(0)]))
    assert [(e.timestep, e.restored_timestep) for e in rollback.rollbacks] == [(1500, 1000)]
    assert rollback.retired.last_good.timestep == 1000 and rollback.scores[-1].mean == 0.0
    assert_states_equal(final.records[3000], copy_training_state(model))
    assert ("Rollback: kept the final weights (score 0.00); the snapshot of timestep 1000 set aside earlier now "
            "scores 0.00") in capsys.readouterr().out


def force_action_zero(model) -> None:
    """Injected catastrophic collapse: the greedy policy always pushes left (CartPole fails in ~9 steps)."""
    with torch.no_grad():
        for q_net in (model.policy.q_net,):
            layer = q_net.q_net[-1]
            layer.weight.zero_()
            layer.bias.copy_(torch.tensor([1.0, 0.0]))


def test_a_catastrophic_collapse_is_repaired_at_the_next_evaluation_however_many_restores_came_before():
    model = linear_dqn(CARTPOLE_BALANCER, learning_rate=1e-5, seed=1)
    collapses = [1200, 1700, 2200, 2700, 3200, 3700]
    rollback = RollbackCallback("CartPole-v1", eval_freq=500, n_eval_episodes=3)  # the defaults
    forced = ScrambleAfterEach(collapses)
    forced.scramble = force_action_zero
    model.learn(4000, callback=CallbackList([forced, rollback]))
    assert [e.timestep for e in rollback.rollbacks] == [t + 300 for t in collapses]
    assert all(e.score < 20 and e.verified_score == 500.0 for e in rollback.rollbacks)
    assert rollback.rebases == 0 and rollback.policy.in_place == 500.0


@pytest.mark.parametrize("mode", ["evaluate", "eval_callback", "online"])
def test_an_agent_that_has_learned_nothing_is_never_rolled_back(mode, tmp_path):
    # Random initial weights that never change (learning rate 0): every score is the untrained policy's
    # noise (training episodes also carry exploration noise), so no fall can be a collapse.
    model = DQN("MlpPolicy", "CartPole-v1", learning_rate=0.0, learning_starts=0, train_freq=4, seed=3,
                policy_kwargs=dict(net_arch=[64]))
    if mode == "evaluate":
        rollback = RollbackCallback("CartPole-v1", eval_freq=500, n_eval_episodes=5)
        callback = rollback
    elif mode == "eval_callback":
        rollback = RollbackCallback()
        callback = EvalCallback(Monitor(gym.make("CartPole-v1")), eval_freq=500, n_eval_episodes=5,
                                log_path=str(tmp_path), callback_after_eval=rollback, verbose=0)
    else:
        rollback = RollbackCallback(eval_freq=500, n_eval_episodes=5)
        callback = rollback
    model.learn(10_000, callback=callback)
    assert len(rollback.scores) >= 15
    assert rollback.rollbacks == []
