"""RollbackPolicy on score sequences alone: no SB3, no environment, no weights.

``Run`` plays the caller's part with the least bookkeeping a caller needs: it keeps the metadata of the
last good and the set-aside snapshot as the actions say, and answers each ``CheckSnapshot`` with the
fresh score the test scripts for it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from rollback_rl.core.detectors import CollapseDetector, DropFromBest, Score
from rollback_rl.core.policy import (CheckSnapshot, KeptFinalWeights, Rebase, RescoreSnapshot, Restore, RollbackEvent,
                                     RollbackPolicy, RolledBack, SetAside, TakeSnapshot)

CARTPOLE_FLOOR = 9.4


def score(timestep: int, *returns: float) -> Score:
    return Score.from_returns(timestep, returns)


def episodes(timestep: int, value: float, n: int = 3) -> Score:
    """``n`` episodes of the same return (CartPole's 500, or a collapse to ~10)."""
    return score(timestep, *[value] * n)


class Run:
    """The caller of a policy: rings reduced to the snapshots' metadata, checks answered from a script.

    :param fresh_scores: the fresh score each ``CheckSnapshot`` gets, in order
    """

    def __init__(self, policy: RollbackPolicy, fresh_scores: list[Score] = ()) -> None:
        self.policy = policy
        self.fresh_scores = list(fresh_scores)
        self.last_good: Score | None = None
        self.set_aside: Score | None = None
        self.actions: list = []
        self.refuse_snapshots = False

    def feed(self, *scores: Score) -> list:
        """Feed each score in turn; the actions of the last one."""
        for new in scores:
            self.actions = []
            self._carry_out(self.policy.on_score(new, self.last_good, self.set_aside))
        return self.actions

    def end(self, timestep: int) -> list:
        self.actions = []
        self._carry_out(self.policy.on_training_end(timestep, self.set_aside))
        return self.actions

    def _carry_out(self, actions: list) -> None:
        for action in actions:
            self.actions.append(action)
            if isinstance(action, TakeSnapshot) and not self.refuse_snapshots:
                self.last_good = action.score
                self.policy.on_snapshot_taken()
            elif isinstance(action, RescoreSnapshot):
                self.last_good = action.score
            elif isinstance(action, SetAside) and action.replaces_kept:
                self.set_aside = action.snapshot
            elif isinstance(action, CheckSnapshot):
                self._carry_out(self.policy.on_check(self.fresh_scores.pop(0)))

    def kinds(self) -> list[str]:
        return [type(action).__name__ for action in self.actions]

    def rollback_timesteps(self) -> list[tuple[int, int]]:
        return [(event.timestep, event.restored_timestep) for event in self.policy.rollbacks]


# -- snapshots ------------------------------------------------------------------------------------

def test_a_score_as_good_as_the_best_asks_for_a_snapshot_equal_scores_included():
    run = Run(RollbackPolicy())
    run.policy.on_baseline(episodes(0, CARTPOLE_FLOOR))
    assert run.feed(episodes(500, 500.0)) == [TakeSnapshot(episodes(500, 500.0))]
    assert run.feed(episodes(1000, 500.0)) == [TakeSnapshot(episodes(1000, 500.0))]  # 500 again counts
    assert run.last_good.timestep == 1000


def test_a_score_within_tolerance_of_the_learned_range_is_good_and_one_below_is_not():
    run = Run(RollbackPolicy(tolerance=0.05))
    run.policy.on_baseline(episodes(0, 0.0))
    run.feed(episodes(500, 100.0))
    assert run.feed(episodes(1000, 95.0)) == [TakeSnapshot(episodes(1000, 95.0))]  # 5% below the best: good
    assert run.feed(episodes(1500, 94.0)) == []  # 6% below: neither good nor a collapse


def test_the_baseline_sets_the_floor_but_is_not_a_score_of_training():
    policy = RollbackPolicy()
    policy.on_baseline(episodes(0, CARTPOLE_FLOOR))
    assert policy.scores == [] and policy.history.floor == CARTPOLE_FLOOR


def test_a_refused_snapshot_is_no_good_score_between_rollbacks():
    # Online mode, two rollbacks in a row allowed. The good score at 2,000 asks for a snapshot; refused
    # (e.g. non-finite weights), it does not reset the count, so the collapse at 3,000 is the third in a row.
    run = Run(RollbackPolicy(checks_restores=False, max_consecutive_rollbacks=2, max_restores=None))
    run.feed(episodes(500, 10.0), episodes(1000, 500.0), episodes(1500, 9.0))
    run.refuse_snapshots = True
    assert run.feed(episodes(2000, 500.0)) == [TakeSnapshot(episodes(2000, 500.0))]
    run.feed(episodes(2500, 9.0))
    assert run.feed(episodes(3000, 9.0))[0] == Rebase("2 rollbacks in a row", reference=9.0)
    assert run.rollback_timesteps() == [(1500, 1000), (2500, 1000)]


# -- restores, checked -----------------------------------------------------------------------------

def test_a_collapse_checks_the_last_good_snapshot_and_keeps_it_when_clearly_better():
    run = Run(RollbackPolicy(), fresh_scores=[episodes(1500, 500.0)])
    run.policy.on_baseline(episodes(0, CARTPOLE_FLOOR))
    run.feed(episodes(500, 500.0), episodes(1000, 500.0))
    actions = run.feed(episodes(1500, 12.0))
    assert actions[0] == CheckSnapshot(episodes(1000, 500.0), current=12.0)
    assert run.kinds() == ["CheckSnapshot", "RescoreSnapshot", "RolledBack"]
    assert run.policy.rollbacks == [RollbackEvent(1500, 12.0, 1000, 500.0, verified_score=500.0)]
    assert actions[-1] == RolledBack(run.policy.rollbacks[-1])
    # Both evaluations of the snapshot now make its score: three recorded episodes and three fresh ones.
    assert run.last_good == Score(1000, 500.0, (500.0,) * 6)
    assert run.policy.in_place == 500.0 and run.policy.restore_counts == {1000: 1}


def test_the_pooled_score_mixes_the_recorded_and_the_fresh_episodes():
    run = Run(RollbackPolicy(), fresh_scores=[score(1500, 300.0, 320.0, 340.0)])
    run.policy.on_baseline(episodes(0, 10.0))
    run.feed(score(1000, 480.0, 500.0, 520.0))
    run.feed(episodes(1500, 12.0))
    assert run.last_good == Score(1000, 410.0, (480.0, 500.0, 520.0, 300.0, 320.0, 340.0))
    assert run.policy.rollbacks[-1].restored_score == 500.0  # the event keeps the score recorded before the check


def test_false_alarm_when_the_restored_snapshot_is_not_clearly_better_keeps_the_current_weights():
    # The environment changed at 1,200: the old weights fail too (fresh score 10, no better than 10.5).
    run = Run(RollbackPolicy(), fresh_scores=[episodes(1500, 10.0)])
    run.policy.on_baseline(episodes(0, CARTPOLE_FLOOR))
    run.feed(episodes(500, 500.0), episodes(1000, 500.0))
    actions = run.feed(episodes(1500, 10.5))
    assert run.kinds() == ["CheckSnapshot", "PutBackCurrent", "RescoreSnapshot", "Rebase", "TakeSnapshot"]
    assert actions[2] == RescoreSnapshot(1000, episodes(1000, 10.0))  # the snapshot's score is now its fresh one
    assert actions[3] == Rebase("the snapshot of timestep 1000 now scores 10.00", reference=10.0, snapshot_failed=True)
    assert actions[4] == TakeSnapshot(episodes(1500, 10.5))  # as good as the new reference
    assert run.policy.rollbacks == [] and run.policy.rebases == 1 and run.policy.history.best == 10.0


def test_a_restored_snapshot_must_beat_the_collapsed_score_by_more_than_the_tolerance():
    # Floor 0, collapsed to 10, tolerance 5%: the fresh score must beat 10 by more than 5% of its own
    # learned range (fresh - 0): 10.5 beats it by 4.8%, 10.6 by 5.7%.
    for fresh, stays in [(10.5, False), (10.6, True)]:
        run = Run(RollbackPolicy(tolerance=0.05), fresh_scores=[episodes(1000, fresh)])
        run.policy.on_baseline(episodes(0, 0.0))
        run.feed(episodes(500, 100.0))
        run.feed(episodes(1000, 10.0))
        assert ("RolledBack" in run.kinds()) is stays, fresh


def test_an_unanswered_check_refuses_the_next_score():
    policy = RollbackPolicy()
    policy.on_baseline(episodes(0, 0.0))
    policy.on_score(episodes(500, 100.0), None)
    policy.on_snapshot_taken()
    assert isinstance(policy.on_score(episodes(1000, 1.0), episodes(500, 100.0))[0], CheckSnapshot)
    with pytest.raises(RuntimeError, match="on_check"):
        policy.on_score(episodes(1500, 1.0), episodes(500, 100.0))
    with pytest.raises(RuntimeError, match="without a CheckSnapshot"):
        RollbackPolicy().on_check(episodes(0, 1.0))


# -- max_restores and the end of training ----------------------------------------------------------

def collapses_at_1500_2000_2500(max_restores: int | None) -> Run:
    """Good weights (500) snapshotted at 500 and 1,000; collapses at 1,500 and 2,000 (to the floor) and 2,500
    (to 150, not the floor), each restore checked afresh at 500 (the setting of the SB3 test of the same name)."""
    run = Run(RollbackPolicy(max_restores=max_restores), fresh_scores=[episodes(t, 500.0) for t in (1500, 2000, 2500)])
    run.policy.on_baseline(episodes(0, CARTPOLE_FLOOR))
    run.feed(episodes(500, 500.0), episodes(1000, 500.0), episodes(1500, 12.0), episodes(2000, 9.8),
             episodes(2500, 150.0))
    return run


def test_a_snapshot_restored_max_restores_times_is_set_aside_and_the_next_collapse_is_a_rebase():
    run = collapses_at_1500_2000_2500(max_restores=2)
    assert run.rollback_timesteps() == [(1500, 1000), (2000, 1000)]
    assert run.kinds() == ["SetAside", "Rebase", "TakeSnapshot"]  # at 2,500
    assert run.actions[0] == SetAside(Score(1000, 500.0, (500.0,) * 9), replaces_kept=True)
    assert run.actions[1] == Rebase("the snapshot of timestep 1000 was restored 2 times and training collapsed "
                                    "again", reference=150.0)
    assert run.policy.rebases == 1 and run.policy.restore_counts == {1000: 2}
    assert [(s.timestep, s.mean) for s in run.policy.scores] == [(500, 500.0), (1000, 500.0), (1500, 12.0),
                                                                 (2000, 9.8), (2500, 150.0)]
    assert run.last_good.timestep == 2500  # 150 is the reference now: the collapsed weights are the last good


def test_a_fall_to_the_floor_is_restored_however_many_restores_came_before():
    run = Run(RollbackPolicy(max_restores=2), fresh_scores=[episodes(t, 500.0) for t in (1500, 2000, 2500)])
    run.policy.on_baseline(episodes(0, CARTPOLE_FLOOR))
    run.feed(episodes(500, 500.0), episodes(1000, 500.0), episodes(1500, 12.0), episodes(2000, 9.8),
             episodes(2500, 10.0))
    assert run.rollback_timesteps() == [(1500, 1000), (2000, 1000), (2500, 1000)]
    assert run.policy.rebases == 0 and run.set_aside is None and run.policy.restore_counts == {1000: 3}


def test_the_set_aside_snapshot_comes_back_at_the_end_when_its_fresh_score_is_better():
    run = collapses_at_1500_2000_2500(max_restores=2)
    run.fresh_scores = [episodes(3000, 500.0)]
    run.feed(episodes(3000, 200.0))  # partly recovered: not back at the floor, so nothing is restored yet
    actions = run.end(3000)
    assert actions[0] == CheckSnapshot(run.set_aside, current=200.0, set_aside=True)
    assert run.rollback_timesteps() == [(1500, 1000), (2000, 1000), (3000, 1000)]
    assert actions[-1] == RolledBack(RollbackEvent(3000, 200.0, 1000, 500.0, 500.0), at_end=True)
    assert run.policy.in_place == 500.0
    assert run.policy.restore_counts == {1000: 2}  # the end restore is not a restore during training


def test_without_a_restore_limit_every_collapse_restores_the_snapshot():
    run = collapses_at_1500_2000_2500(max_restores=None)
    assert run.rollback_timesteps() == [(1500, 1000), (2000, 1000), (2500, 1000)]
    assert run.policy.rebases == 0 and run.set_aside is None
    assert run.end(2500) == []


def test_the_set_aside_snapshot_stays_away_when_its_fresh_score_is_not_better():
    run = collapses_at_1500_2000_2500(max_restores=2)
    run.fresh_scores = [episodes(3000, 190.0)]
    run.feed(episodes(3000, 200.0))
    actions = run.end(3000)
    assert run.kinds() == ["CheckSnapshot", "PutBackCurrent", "KeptFinalWeights"]
    assert actions[-1] == KeptFinalWeights(final_score=200.0, snapshot_timestep=1000, snapshot_fresh_score=190.0)
    assert len(run.policy.rollbacks) == 2 and run.policy.in_place == 200.0


def test_after_giving_up_a_fall_to_the_floor_brings_the_set_aside_snapshot_back_at_once():
    run = collapses_at_1500_2000_2500(max_restores=2)
    run.fresh_scores = [episodes(3000, 500.0)]
    actions = run.feed(score(3000, 9.0, 10.0, 11.0))
    assert run.kinds() == ["CheckSnapshot", "TakeSnapshot", "RolledBack"]
    assert actions[0] == CheckSnapshot(run.set_aside, current=10.0, set_aside=True)
    assert run.rollback_timesteps()[-1] == (3000, 1000)
    assert run.last_good == episodes(3000, 500.0)  # the restored weights are the newest good snapshot again
    assert run.policy.in_place == 500.0


def test_after_giving_up_a_set_aside_snapshot_that_fails_its_check_is_rescored_and_the_weights_stay():
    run = collapses_at_1500_2000_2500(max_restores=2)
    run.fresh_scores = [episodes(3000, 9.5)]  # e.g. the environment changed
    run.feed(score(3000, 9.0, 10.0, 11.0))
    assert run.kinds() == ["CheckSnapshot", "PutBackCurrent", "RescoreSnapshot", "Rebase"]
    assert run.actions[2].set_aside and run.actions[2].score.mean == 9.5
    assert len(run.policy.rollbacks) == 2


def test_no_collapse_is_judged_from_a_level_not_significantly_above_the_floor():
    # Online mode on a barely trained agent: the floor is the lowest score seen, 12.8, and 13.0 is noise above it.
    run = Run(RollbackPolicy(checks_restores=False))
    run.feed(score(500, 12.0, 13.0, 13.4), score(1000, 12.0, 14.0, 13.0))
    assert run.last_good.timestep == 1000
    assert run.feed(score(1500, 9.0, 9.4, 9.8)) == []
    assert run.policy.rollbacks == []


def test_a_collapse_from_a_level_learned_significantly_is_judged():
    run = Run(RollbackPolicy(checks_restores=False))
    run.feed(score(500, 9.0, 10.0, 11.0), score(1000, 480.0, 500.0, 490.0))
    assert run.feed(score(1500, 9.0, 9.4, 9.8))[0] == Restore(1000)


def test_min_delta_sets_how_far_above_the_floor_a_level_must_be_in_return_units():
    # Acrobot-like negative returns: -480 over a floor of -500 is significant, but not 50 above it.
    run = Run(RollbackPolicy(checks_restores=False, min_delta=50.0))
    run.feed(score(500, -500.0, -499.0, -500.0), score(1000, -480.0, -481.0, -479.0))
    assert run.feed(score(1500, -500.0, -499.0, -498.0)) == []
    run.feed(score(2000, -100.0, -90.0, -80.0))
    assert run.feed(score(2500, -500.0, -499.0, -498.0))[0] == Restore(2000)


def test_the_set_aside_snapshot_is_not_checked_when_the_final_weights_are_as_good():
    run = collapses_at_1500_2000_2500(max_restores=2)
    run.feed(episodes(3000, 500.0))
    assert run.end(3000) == []


def test_a_snapshot_set_aside_later_replaces_the_kept_one_only_if_it_scored_better():
    policy = RollbackPolicy(max_restores=1)
    kept = episodes(1000, 500.0)
    policy.on_baseline(episodes(0, 0.0))
    for candidate, replaces in [(episodes(3000, 400.0), False), (episodes(3000, 500.0), False),
                                (episodes(3000, 501.0), True)]:
        policy.restore_counts = {3000: 1}
        policy.on_score(candidate, None)
        actions = policy.on_score(episodes(3500, 150.0), candidate, set_aside=kept)  # a fall, not to the floor
        assert actions[0] == SetAside(candidate, replaces_kept=replaces), candidate.mean


# -- online mode: no checks ------------------------------------------------------------------------

def test_online_mode_restores_without_a_check_and_holds_the_snapshot_score():
    run = Run(RollbackPolicy(checks_restores=False))
    run.feed(episodes(1000, 10.0), episodes(2000, 500.0), episodes(3000, 500.0))
    actions = run.feed(episodes(4000, 9.0))
    assert actions == [Restore(3000), RolledBack(RollbackEvent(4000, 9.0, 3000, 500.0, None))]
    assert run.policy.in_place == 500.0 and run.last_good == episodes(3000, 500.0)


def test_online_mode_accepts_the_current_level_after_max_consecutive_rollbacks():
    run = Run(RollbackPolicy(checks_restores=False, max_consecutive_rollbacks=2, max_restores=None))
    run.feed(episodes(500, 10.0), episodes(1000, 500.0))
    run.feed(episodes(1500, 9.0), episodes(2000, 9.0))  # two rollbacks in a row, no good score between
    assert run.rollback_timesteps() == [(1500, 1000), (2000, 1000)]
    actions = run.feed(episodes(2500, 9.0))
    assert actions == [Rebase("2 rollbacks in a row", reference=9.0), TakeSnapshot(episodes(2500, 9.0))]
    assert run.policy.rebases == 1 and run.policy.consecutive_rollbacks == 0


def test_a_good_score_between_rollbacks_resets_the_count_in_a_row():
    run = Run(RollbackPolicy(checks_restores=False, max_consecutive_rollbacks=2, max_restores=None))
    run.feed(episodes(500, 10.0), episodes(1000, 500.0))
    run.feed(episodes(1500, 9.0), episodes(2000, 500.0), episodes(2500, 9.0), episodes(3000, 9.0))
    assert run.rollback_timesteps() == [(1500, 1000), (2500, 2000), (3000, 2000)]
    assert run.policy.rebases == 0


def test_max_restores_applies_before_the_count_in_a_row():
    run = Run(RollbackPolicy(checks_restores=False, max_consecutive_rollbacks=3, max_restores=1))
    run.feed(episodes(500, 10.0), episodes(1000, 500.0), episodes(1500, 9.0))
    assert run.feed(episodes(2000, 150.0))[:2] == [SetAside(episodes(1000, 500.0), True),
                                                    Rebase("the snapshot of timestep 1000 was restored 1 times and "
                                                           "training collapsed again", reference=150.0)]


# -- the detector decides ---------------------------------------------------------------------------

class Always(CollapseDetector):
    def is_bad(self, reference, current, floor):
        return True


def test_the_detector_decides_what_is_a_collapse():
    # With DropFromBest(drop=0.9) a fall to 60% of the learned range is tolerated; with 0.3 it is not.
    for drop, collapsed in [(0.9, False), (0.3, True)]:
        run = Run(RollbackPolicy(detector=DropFromBest(drop=drop)), fresh_scores=[episodes(1000, 100.0)])
        run.policy.on_baseline(episodes(0, 0.0))
        run.feed(episodes(500, 100.0), episodes(1000, 40.0))
        assert (run.policy.rollbacks != []) is collapsed, drop


def test_nothing_is_judged_before_the_first_snapshot():
    policy = RollbackPolicy(detector=Always())
    assert policy.on_score(episodes(500, 5.0), None) == [TakeSnapshot(episodes(500, 5.0))]
    assert policy.detector.bad_in_a_row == 0


def test_a_nan_score_is_bad_and_never_good():
    run = Run(RollbackPolicy(detector=DropFromBest(patience=2)))
    run.feed(episodes(500, 10.0), episodes(1000, 100.0))
    assert run.feed(Score(1500, math.nan)) == [] and run.policy.detector.bad_in_a_row == 1


# -- saving progress -------------------------------------------------------------------------------

def test_state_dict_round_trips_through_json_and_the_restored_policy_decides_the_same():
    run = collapses_at_1500_2000_2500(max_restores=2)
    state = json.loads(json.dumps(run.policy.state_dict()))
    assert set(state) == {"scores", "rollbacks", "best", "floor", "floor_returns", "bad_in_a_row", "rebases",
                          "consecutive_rollbacks", "in_place", "restore_counts"}
    restored = RollbackPolicy(max_restores=2)
    restored.load_state_dict(state)
    assert restored.state_dict() == run.policy.state_dict()
    assert restored.scores == run.policy.scores and restored.rollbacks == run.policy.rollbacks
    assert restored.restore_counts == {1000: 2}
    following = episodes(3000, 9.5)
    assert restored.on_score(following, run.last_good, run.set_aside) == \
        run.policy.on_score(following, run.last_good, run.set_aside)


def test_a_checkpoint_of_version_0_1_without_in_place_and_restore_counts_loads():
    state = RollbackPolicy().state_dict()
    del state["in_place"], state["restore_counts"]
    policy = RollbackPolicy()
    policy.load_state_dict(state)
    assert math.isnan(policy.in_place) and policy.restore_counts == {}


@pytest.mark.parametrize("broken", [{"scores": [{"mean": 1.0}]}, {"best": "high"}, {"rollbacks": [{"when": 1}]}])
def test_a_malformed_state_raises(broken):
    state = {**RollbackPolicy().state_dict(), **broken}
    with pytest.raises((KeyError, TypeError, ValueError)):
        RollbackPolicy().load_state_dict(state)


def test_the_policy_loads_no_stable_baselines3():
    loaded = subprocess.run([sys.executable, "-c", "import sys, rollback_rl.core.policy; "
                             "print('stable_baselines3' in sys.modules)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"


def test_with_a_reward_threshold_a_level_counts_once_it_is_a_tenth_of_the_way_there():
    # CartPole-v1: floor 9.4, threshold 475, so a level must beat the floor by more than 46.6.
    def run_from(level: float) -> Run:
        run = Run(RollbackPolicy(checks_restores=False, solved_score=475.0))
        run.policy.on_baseline(score(0, 9.0, 9.4, 9.8))
        run.feed(score(500, level - 1, level, level + 1))
        return run

    assert run_from(40.0).feed(score(1000, 9.0, 9.4, 9.8)) == []  # 30.6 above the floor: noise, however regular
    assert run_from(60.0).feed(score(1000, 9.0, 9.4, 9.8))[0] == Restore(500)
    assert run_from(475.0).policy.history.has_learned(score(500, 475.0, 475.0), solved_score=475.0)
