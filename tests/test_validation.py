"""The one integer check and the KEY=VALUE parser that the command line, the callbacks and compare share."""

from __future__ import annotations

import numpy as np
import pytest

from rollback_rl.validation import integer_at_least, parse_assignment


@pytest.mark.parametrize(("value", "expected"), [(5, 5), (np.int64(7), 7), ("5000", 5000), ("5_000", 5000), (1, 1)])
def test_whole_numbers_and_their_text_are_accepted(value, expected):
    number = integer_at_least(1, value)
    assert number == expected and type(number) is int


@pytest.mark.parametrize(("minimum", "value", "message"), [
    (1, 0, "--steps must be a positive integer, got 0"),
    (1, True, "--steps must be a positive integer, got True"),  # a bool is not a count
    (1, 2.0, "--steps must be a positive integer, got 2.0"),
    (1, "1.5", "--steps must be a positive integer, got '1.5'"),
    (0, -1, "--steps must be an integer >= 0, got -1"),
    (0, "x", "--steps must be an integer >= 0, got 'x'"),
])
def test_anything_else_is_refused_with_its_name(minimum, value, message):
    with pytest.raises(ValueError) as error:
        integer_at_least(minimum, value, "--steps")
    assert str(error.value) == message


def test_without_a_name_the_message_starts_with_must():
    with pytest.raises(ValueError, match="^must be a positive integer, got 0$"):
        integer_at_least(1, 0)


def test_key_value_pairs_keep_everything_after_the_first_equals():
    assert parse_assignment(" policy_kwargs =dict(net_arch=[32])") == ("policy_kwargs", "dict(net_arch=[32])")
    assert parse_assignment("learning_rate=") == ("learning_rate", "")


@pytest.mark.parametrize("text", ["learning_rate", "=1e-3", "  =1"])
def test_key_value_without_a_key_or_equals_is_refused(text):
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_assignment(text)
