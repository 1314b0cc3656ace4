"""Bounded reads and bounded messages: the building blocks every reader of outside files uses."""

from __future__ import annotations

import io
import json
import time

import pytest

from rollback_rl.persistence.limits import (
    MAX_JSON_BYTES,
    MAX_MESSAGE_CHARS,
    MAX_NESTING_DEPTH,
    MAX_QUOTED_CHARS,
    LimitExceeded,
    check_nesting,
    describe_json_error,
    loads_json,
    one_line,
    quote,
    read_capped,
)


def alias_bomb(levels: int = 12, width: int = 10) -> list:
    """A list whose full expansion holds ``width ** levels`` items (shared references, like YAML aliases)."""
    value: list = ["lol"] * width
    for _ in range(levels):
        value = [value] * width
    return value


# -- messages ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [alias_bomb(), 7 ** 20_000, "x" * 10**6,
                                   "line one\nline two\r\nline three", b"\x00" * 10**5, {"k" * 10**4: [1] * 10**4}],
                         ids=["alias-bomb", "huge-int", "long-string", "newlines", "long-bytes", "long-dict"])
def test_quote_is_short_one_line_and_fast_whatever_the_value(value):
    started = time.perf_counter()
    text = quote(value)
    assert len(text) <= MAX_QUOTED_CHARS and "\n" not in text and "\r" not in text
    assert time.perf_counter() - started < 0.5


def test_quote_keeps_short_values_as_repr():
    assert quote([64, 64]) == "[64, 64]" and quote("lin_1e-3") == "'lin_1e-3'" and quote(None) == "None"


def test_one_line_keeps_both_ends_of_a_long_message():
    message = one_line("start " + "y" * 10_000 + "\nthe limit (MAX_SOMETHING)")
    assert len(message) == MAX_MESSAGE_CHARS and "\n" not in message
    assert message.startswith("start ") and message.endswith("(MAX_SOMETHING)")


# -- reads with a cap --------------------------------------------------------------------------------

def test_reading_dev_zero_stops_one_byte_past_the_cap():
    with open("/dev/zero", "rb") as file, pytest.raises(LimitExceeded, match="over the limit of 1,000 bytes .MAX_X."):
        read_capped(file, 1_000, "the file", "MAX_X")


def test_a_regular_file_over_the_cap_is_refused_from_its_size_before_reading(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as file:
        file.truncate(20 * 2**30)
    started = time.perf_counter()
    with open(path, "rb") as file, pytest.raises(LimitExceeded, match=f"is {20 * 2**30:,} bytes, over the limit"):
        read_capped(file, 2**20, "the file", "MAX_X")
    assert time.perf_counter() - started < 0.5


def test_a_file_within_the_cap_is_read_whole(tmp_path):
    (tmp_path / "small").write_bytes(b"abc" * 1000)
    with open(tmp_path / "small", "rb") as file:
        assert read_capped(file, 3000, "the file", "MAX_X") == b"abc" * 1000
    assert read_capped(io.BytesIO(b"12345"), 5, "a stream", "MAX_X") == b"12345"
    with pytest.raises(LimitExceeded):
        read_capped(io.BytesIO(b"123456"), 5, "a stream", "MAX_X")


# -- JSON ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["[" * 200_000 + "]" * 200_000, '{"a":' * 200_000 + "1" + "}" * 200_000,
                                  "[" * (MAX_NESTING_DEPTH + 1) + "]" * (MAX_NESTING_DEPTH + 1)],
                         ids=["list-200000", "object-200000", "one-past-the-limit"])
def test_deep_json_gives_a_one_line_limit_error_not_a_recursion_error(text):
    with pytest.raises(LimitExceeded) as caught:
        loads_json(text)
    assert str(caught.value) == f"lists and mappings nested more than {MAX_NESTING_DEPTH} deep (MAX_NESTING_DEPTH)"


def test_json_at_the_nesting_limit_loads():
    assert loads_json("[" * MAX_NESTING_DEPTH + "]" * MAX_NESTING_DEPTH) is not None


def test_json_over_the_size_limit_is_refused_before_parsing():
    with pytest.raises(LimitExceeded, match="MAX_JSON_BYTES"):
        loads_json(b" " * (MAX_JSON_BYTES + 1))


def test_json_errors_are_described_without_quoting_the_text():
    for text in (b'{"password": "hunter2"', b"\xff\xfehunter2", b"1" * 5_000):
        with pytest.raises(ValueError) as caught:
            loads_json(text)
        description = describe_json_error(caught.value)
        assert "hunter2" not in description and "\n" not in description and len(description) < 200


def test_nesting_is_checked_on_shared_values_once():
    check_nesting(alias_bomb(levels=30))  # 10**31 items expanded, 31 levels deep: checked instantly
    deep: list = []
    for _ in range(MAX_NESTING_DEPTH):
        deep = [deep]
    with pytest.raises(LimitExceeded):
        check_nesting(deep)
    with pytest.raises(LimitExceeded):
        check_nesting({"a": {"b": deep}})


def test_json_round_trip_of_ordinary_values_is_unchanged():
    value = {"a": [1, 2.5, None, True, "x"], "b": {"c": []}}
    assert loads_json(json.dumps(value)) == value
