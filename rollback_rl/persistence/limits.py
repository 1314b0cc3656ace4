"""Limits on what rollback-rl reads from outside, checked before anything of that size is allocated.

A file or value from outside the program (a model file, a checkpoint, run.json, an SB3 ``.zip``, a
hyperparameter file, a ``--set`` value) must not exhaust memory or the stack, however it was made. So
each reader checks the limit that applies before it allocates:

- a file's size from ``stat`` before reading it, and again while reading (``/dev/zero`` has size 0);
- a zip member's inflated size from the archive's directory, and again while inflating it, since a
  directory may lie: an 11 MB member that inflates to 10 GB is refused after reading its directory
  entry, having used a few kilobytes;
- a safetensors header's length from the 8 bytes that start the file;
- nesting depth: JSON and YAML parsers recurse once per level, so ``[[[[...]]]]`` 200,000 deep would
  end in a ``RecursionError`` rather than an error message.

An input over a limit raises :class:`LimitExceeded`, whose one-line message names the limit, e.g.
``member 'data' inflates to 10,737,418,240 bytes, over the limit of 16,777,216 (MAX_JSON_BYTES)``.
The readers turn it into their own error type (``SafeLoadError``, ``HyperparameterError``) with the file
name in front.

Messages quote what they were given through :func:`quote`, which shortens it without expanding it
first (a YAML alias bomb has a ``repr`` of gigabytes), and :func:`one_line` caps a whole message: an
error is one line of bounded length whatever the input. No message quotes a file's contents.

This module imports nothing from rollback-rl, Stable-Baselines3 or torch.
"""

from __future__ import annotations

import json
import os
import reprlib
import stat
import zipfile
from typing import IO, Any

# -- the limits -----------------------------------------------------------------------------------

#: A JSON document read from outside: run.json, a checkpoint's manifest.json, an SB3 zip's ``data``
#: entry (tens of kilobytes for the networks rollback-rl trains).
MAX_JSON_BYTES = 16 * 2**20
#: Lists and mappings inside each other, in JSON, YAML and Python-literal values. Real files nest
#: fewer than 10 levels (policy_kwargs: net_arch: pi: [64, 64]).
MAX_NESTING_DEPTH = 64
#: A safetensors file (model, snapshots, training state) or an SB3 ``.zip``: four times the weights
#: and Adam state of the largest network the hyperparameter checker allows.
MAX_TENSOR_FILE_BYTES = 4 * 2**30
#: A safetensors header (the JSON before the tensors): safetensors' own limit.
MAX_HEADER_BYTES = 100 * 2**20
#: Entries in an SB3 ``.zip``: SB3 writes 5 to 7.
MAX_ZIP_MEMBERS = 64
#: A hyperparameter YAML file: the RL Zoo's largest (ppo.yml) is about 20 KB.
MAX_YAML_BYTES = 2**20
#: Characters of an error message; longer ones are cut in the middle.
MAX_MESSAGE_CHARS = 400
#: Characters of a value quoted in an error message.
MAX_QUOTED_CHARS = 80

_READ_CHUNK_BYTES = 2**20


class LimitExceeded(ValueError):
    """An input is over one of this module's limits; the message names the limit."""


def _bytes(count: int) -> str:
    return f"{count:,} bytes"


# -- messages of bounded length ---------------------------------------------------------------------

class _ShortRepr(reprlib.Repr):
    """``repr`` that stops after a few items and levels, so its cost does not depend on the value."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = self.maxfrozenset = self.maxdeque = 6
        self.maxstring = self.maxother = MAX_QUOTED_CHARS
        self.maxlong = 40

    def repr_int(self, value: int, level: int) -> str:
        if value.bit_length() > 4 * self.maxlong:  # repr() itself refuses ints of over 4,300 digits
            return f"<an integer of {value.bit_length():,} bits>"
        return super().repr_int(value, level)


_SHORT_REPR = _ShortRepr()


def quote(value: Any, max_chars: int = MAX_QUOTED_CHARS) -> str:
    """``repr(value)`` on one line of at most ``max_chars`` characters, computed without expanding it."""
    try:
        text = _SHORT_REPR.repr(value)
    except Exception:  # noqa: BLE001 (a hostile __repr__ must not replace the message being built)
        text = f"<a {type(value).__name__}>"
    return _shorten(" ".join(text.split()), max_chars)


def one_line(message: str, max_chars: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` with its whitespace runs (newlines included) made single spaces, cut to ``max_chars``."""
    return _shorten(" ".join(str(message).split()), max_chars)


def _shorten(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    head = (max_chars - 3) * 2 // 3  # keep the end too: it often says what is wrong
    return f"{text[:head]}...{text[len(text) - (max_chars - 3 - head):]}"


# -- bounded reads ----------------------------------------------------------------------------------

def check_size(size: int, limit: int, what: str, limit_name: str) -> None:
    """Raise :class:`LimitExceeded` if ``size`` (bytes) is over ``limit``."""
    if size > limit:
        raise LimitExceeded(f"{what} is {_bytes(size)}, over the limit of {_bytes(limit)} ({limit_name})")


def read_capped(file: IO[bytes], limit: int, what: str, limit_name: str) -> bytes:
    """Everything ``file`` holds from its position on, or :class:`LimitExceeded` once over ``limit`` bytes.

    A regular file's size is checked first from ``fstat``; a device or pipe (whose size says nothing)
    is read in chunks and stops one byte past the limit.
    """
    try:
        status = os.fstat(file.fileno())
    except (AttributeError, OSError, ValueError):  # not a real file (BytesIO)
        status = None
    if status is not None and stat.S_ISREG(status.st_mode):
        check_size(status.st_size - file.tell(), limit, what, limit_name)
    chunks, total = [], 0
    while True:
        chunk = file.read(min(_READ_CHUNK_BYTES, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise LimitExceeded(f"{what} is over the limit of {_bytes(limit)} ({limit_name})")


def check_zip_members(archive: zipfile.ZipFile, limit: int = MAX_ZIP_MEMBERS) -> None:
    """Raise :class:`LimitExceeded` if ``archive`` has more than ``limit`` entries."""
    count = len(archive.infolist())
    if count > limit:
        raise LimitExceeded(f"{count:,} entries, over the limit of {limit:,} (MAX_ZIP_MEMBERS)")


def read_zip_member(archive: zipfile.ZipFile, name: str, limit: int, limit_name: str) -> bytes:
    """The inflated bytes of entry ``name``, refused before inflating if its directory entry says it
    is over ``limit``, and while inflating if it turns out to be (the directory may lie)."""
    info = archive.getinfo(name)
    what = f"entry {quote(name)}"
    if info.file_size > limit:
        raise LimitExceeded(f"{what} inflates to {_bytes(info.file_size)}, over the limit of "
                            f"{_bytes(limit)} ({limit_name})")
    with archive.open(info) as member:
        return read_capped(member, limit, what, limit_name)


# -- JSON --------------------------------------------------------------------------------------------

def check_nesting(value: Any, limit: int = MAX_NESTING_DEPTH) -> None:
    """Raise :class:`LimitExceeded` if lists, tuples and dicts nest in ``value`` deeper than ``limit``.

    Walks the value with its own stack, so it cannot overflow Python's; a value reached twice (YAML
    aliases) is walked once.
    """
    pending, seen = [(value, 1)], set()
    while pending:
        item, depth = pending.pop()
        if not isinstance(item, (list, tuple, dict)) or id(item) in seen:
            continue
        if depth > limit:
            raise LimitExceeded(f"lists and mappings nested more than {limit} deep (MAX_NESTING_DEPTH)")
        seen.add(id(item))
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        pending.extend((child, depth + 1) for child in children)


def loads_json(text: str | bytes, limit: int = MAX_JSON_BYTES, limit_name: str = "MAX_JSON_BYTES") -> Any:
    """``json.loads(text)`` within the size and nesting limits.

    :raises LimitExceeded: if ``text`` is over ``limit`` bytes or nests deeper than MAX_NESTING_DEPTH
    :raises ValueError: if it is not JSON (``json.JSONDecodeError``, or an integer of over 4,300 digits)
    """
    check_size(len(text), limit, "the JSON text", limit_name)
    try:
        value = json.loads(text)
    except RecursionError:  # the C decoder recurses once per level, up to the interpreter's limit
        raise LimitExceeded(f"lists and mappings nested more than {MAX_NESTING_DEPTH} deep "
                            "(MAX_NESTING_DEPTH)") from None
    check_nesting(value)
    return value


def describe_json_error(error: ValueError) -> str:
    """What is wrong with a JSON text, without quoting it (``json``'s own message may)."""
    if isinstance(error, json.JSONDecodeError):
        return f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text: {error.reason} at byte {error.start:,}"
    if isinstance(error, LimitExceeded):
        return str(error)
    return f"not valid JSON: {one_line(str(error), 120)}"
