import math

import pytest

from rollback_rl.core.detectors import (DropFromBest, Score, ScoreHistory, SignificantDrop, normalised_drop,
                                   welch_p_value)


def score(returns, timestep=0):
    return Score.from_returns(timestep, returns)


def test_normalised_drop_works_for_negative_and_sign_changing_returns():
    assert normalised_drop(500, 254.5, floor=9) == pytest.approx(0.5)  # CartPole
    assert normalised_drop(-80, -290, floor=-500) == pytest.approx(0.5)  # Acrobot: all negative
    assert normalised_drop(250, 50, floor=-150) == pytest.approx(0.5)  # LunarLander: sign changes
    assert normalised_drop(-100, -300, floor=-100) == 0.0  # nothing learned, nothing to lose


def test_drop_from_best_with_patience_needs_consecutive_bad_scores():
    detector = DropFromBest(drop=0.5, patience=2)
    reference = Score(0, -80.0)
    assert not detector.update(reference, Score(1, -400.0), floor=-500)
    assert not detector.update(reference, Score(2, -90.0), floor=-500)  # recovered: count resets
    assert not detector.update(reference, Score(3, -400.0), floor=-500)
    assert detector.update(reference, Score(4, -450.0), floor=-500)


def test_drop_from_best_ignores_small_drops_and_flags_nan():
    detector = DropFromBest(drop=0.5)
    assert not detector.update(Score(0, 500.0), Score(1, 300.0), floor=10)
    assert detector.update(Score(0, 500.0), Score(1, math.nan), floor=10)


def test_significant_drop_needs_the_drop_to_be_real_not_one_unlucky_episode():
    detector = SignificantDrop(drop=0.3, alpha=0.05)
    reference = score([500, 500, 480, 500, 490])
    unlucky = score([500, 20, 500, 30, 500])  # mean 310: a 0.4 drop, but noisy
    collapsed = score([120, 140, 110, 150, 130])
    assert not detector.update(reference, unlucky, floor=10)
    assert detector.update(reference, collapsed, floor=10)


def test_significant_drop_handles_zero_variance_on_both_sides():
    assert welch_p_value([500] * 5, [9] * 5) == 0.0
    assert welch_p_value([9] * 5, [500] * 5) == 1.0
    assert welch_p_value([500], [9]) == 1.0  # one episode: no variance estimate, cannot reject


def test_significant_drop_falls_back_to_the_drop_rule_without_episode_returns():
    detector = SignificantDrop(drop=0.5)
    assert detector.update(Score(0, 500.0), Score(1, 100.0), floor=10)


def test_score_history_counts_equal_and_near_best_scores_as_good():
    history = ScoreHistory(tolerance=0.05)
    for value in (9.0, 500.0, 500.0, 480.0, 400.0):
        history.observe(Score(0, value))
    assert history.is_good(Score(0, 500.0))
    assert history.is_good(Score(0, 480.0))  # within 5% of the 491 learned
    assert not history.is_good(Score(0, 400.0))
    assert not history.is_good(Score(0, math.nan))


@pytest.mark.parametrize("make", [lambda: DropFromBest(drop=0), lambda: DropFromBest(patience=0),
                                  lambda: SignificantDrop(alpha=1.5), lambda: ScoreHistory(tolerance=-1)])
def test_bad_detector_arguments_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_a_score_needs_episode_returns():
    with pytest.raises(ValueError, match="at least one"):
        Score.from_returns(0, [])
