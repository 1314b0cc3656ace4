import numpy as np
import pytest
from scipy import stats

from rollback_rl.core.statistics import (iqm, normalised_area_under_curve, performance_profile,
                                    stratified_bootstrap_interval, wilson_interval)


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm([0, 100, 200, 300, 400, 500, 600, 10_000]) == pytest.approx(350.0)  # mean of 200..500
    assert iqm([500] * 7 + [17]) == 500.0  # one collapsed seed among eight does not move the IQM
    values = np.random.default_rng(0).normal(size=37)
    assert iqm(values) == pytest.approx(stats.trim_mean(values, 0.25))


def test_stratified_bootstrap_keeps_tasks_apart_and_brackets_the_estimate():
    rng = np.random.default_rng(0)
    scores = {"a": rng.normal(100, 10, 20), "b": rng.normal(-50, 5, 10)}
    estimate, low, high = stratified_bootstrap_interval(scores, resamples=500, seed=1)
    assert low < estimate < high
    # The same seed gives the same interval; a constant task gives a zero-width one.
    assert stratified_bootstrap_interval(scores, resamples=500, seed=1) == (estimate, low, high)
    assert stratified_bootstrap_interval({"c": [3.0] * 5}, resamples=200) == (3.0, 3.0, 3.0)


def test_stratified_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    covered = 0
    for trial in range(100):
        sample = rng.normal(0.0, 1.0, 30)
        _, low, high = stratified_bootstrap_interval({"t": sample}, statistic=np.mean, resamples=400, seed=trial)
        covered += low <= 0.0 <= high
    assert 85 <= covered <= 100


def test_wilson_interval_matches_the_textbook_values():
    rate, low, high = wilson_interval(3, 10)
    assert rate == 0.3
    assert low == pytest.approx(0.1078, abs=1e-4) and high == pytest.approx(0.6032, abs=1e-4)
    assert wilson_interval(0, 20)[1] == 0.0 and wilson_interval(0, 20)[2] > 0.1  # never a zero-width 0%
    with pytest.raises(ValueError):
        wilson_interval(1, 0)


def test_normalised_area_under_curve_and_performance_profile():
    assert normalised_area_under_curve([0, 10, 20], [500, 500, 500], low=0, high=500) == 1.0
    assert normalised_area_under_curve([0, 10, 20], [0, 500, 0], low=0, high=500) == 0.5
    assert list(performance_profile([10, 200, 500, 500], [0, 100, 499])) == [1.0, 0.75, 0.5]
