"""Checking what a user gave: the one usage-error class, the one integer check, the KEY=VALUE parser,
and the checks of folder names and paths typed on a command line.

The command line (``cli``), the experiments (``compare``, ``forgetting``) and the training module all
report bad input the same way: a :class:`UsageError` whose message names the option and what was
wrong, printed by the command line as one ``error:`` line with exit status 2 before anything is
written. The checks here raise ``ValueError`` (for library callers) or :class:`UsageError` (for input
typed by a user); :func:`integer_at_least` (and :func:`integer_in`, with an upper limit) is the one
integer check of the package.

Numbers that size time are bounded here, each limit named in the message that refuses it:
``MAX_SEED`` (seeds: numpy and SB3 seed with 32-bit integers) and ``MAX_EPISODES`` (greedy episodes of
one evaluation or of one final score); so are names and paths (``MAX_NAME_BYTES``, ``MAX_PATH_BYTES``:
a longer one makes every later file operation fail). The hyperparameter limits (``MAX_TIMESTEPS``...)
are in :mod:`rollback_rl.hyperparams`.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from rollback_rl.persistence.limits import quote

#: The largest seed: numpy's global generator and SB3's ``set_random_seed`` take 32-bit seeds.
MAX_SEED = 2**32 - 1
#: Greedy episodes of one evaluation, or of scoring one final policy (the protocol uses 5 and 100).
MAX_EPISODES = 100_000
#: Bytes of one file or folder name (NAME_MAX on Linux and macOS).
MAX_NAME_BYTES = 255
#: Bytes of a whole path (PATH_MAX on Linux).
MAX_PATH_BYTES = 4_096


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr, exit status 2, nothing written."""


def integer_at_least(minimum: int, value: Any, name: str | None = None) -> int:
    """``value`` as an ``int`` if it is a whole number of at least ``minimum``.

    Accepts an ``int`` or numpy integer (not a ``bool``) or the text of one (``"5000"``, ``"5_000"``),
    as typed on a command line.

    :param minimum: the smallest value allowed (1: a positive integer)
    :param name: what the value is (``"--steps"``, ``"eval_freq"``), put at the start of the message
    :raises ValueError: ``"<name> must be a positive integer, got 0"`` (or ``an integer >= <minimum>``)
    """
    description = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    number: int | None = None
    if isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            number = None
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        number = int(value)
    if number is None or number < minimum:
        prefix = f"{name} " if name else ""
        raise ValueError(f"{prefix}must be {description}, got {quote(value)}")
    return number


def integer_in(minimum: int, maximum: int, value: Any, name: str | None = None, limit_name: str = "") -> int:
    """``value`` as an ``int`` if it is a whole number in ``[minimum, maximum]`` (see :func:`integer_at_least`).

    :param limit_name: the name of ``maximum`` (``"MAX_TIMESTEPS"``), given in the message
    :raises ValueError: ``"<name> must be at most 1,000,000,000 (MAX_TIMESTEPS), got 99999999999"``
    """
    number = integer_at_least(minimum, value, name)
    if number > maximum:
        prefix = f"{name} " if name else ""
        limit = f" ({limit_name})" if limit_name else ""
        raise ValueError(f"{prefix}must be at most {maximum:,}{limit}, got {quote(number)}")
    return number


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8, kept by Python as surrogates
        return False
    return True


def check_folder_name(name: str, option: str) -> None:
    """Refuse ``name`` unless it is a plain folder name: not empty or blank, not ``.`` or ``..``, no
    separator or control character, UTF-8 text (TensorBoard writes the path as UTF-8), at most
    ``MAX_NAME_BYTES`` bytes.

    :param option: the option that gave it, for the message (``"--run-name"``)
    :raises UsageError: saying what is wrong with it
    """
    if not name.strip() or name in (".", "..") or "/" in name or os.sep in name \
            or any(unicodedata.category(character) == "Cc" for character in name):
        raise UsageError(f"{option} must be a plain folder name (no '/', no control characters), got {name!r}")
    if not _utf8(name):
        raise UsageError(f"{option} must be UTF-8 text, got {name!r}")
    size = len(os.fsencode(name))
    if size > MAX_NAME_BYTES:
        raise UsageError(f"{option} is {size:,} bytes long, over the limit of {MAX_NAME_BYTES} bytes of a folder "
                         "name (MAX_NAME_BYTES)")


def check_path_text(path: str | Path, option: str) -> Path:
    """``path`` as a ``Path`` if it can name a file at all: UTF-8 text, at most ``MAX_PATH_BYTES`` bytes,
    each name in it at most ``MAX_NAME_BYTES`` (a longer one would make every later ``exists()`` raise).

    :raises UsageError: naming ``option`` and the problem
    """
    text = str(path)
    if not _utf8(text):
        raise UsageError(f"{option} must be UTF-8 text, got {text!r}")
    if "\0" in text:
        raise UsageError(f"{option} must not hold a NUL character")
    size = len(os.fsencode(text))
    if size > MAX_PATH_BYTES:
        raise UsageError(f"{option} is {size:,} bytes long, over the limit of {MAX_PATH_BYTES:,} bytes of a path "
                         "(MAX_PATH_BYTES)")
    longest = max((len(os.fsencode(part)) for part in Path(text).parts), default=0)
    if longest > MAX_NAME_BYTES:
        raise UsageError(f"{option} holds a name of {longest:,} bytes, over the limit of {MAX_NAME_BYTES} bytes "
                         "(MAX_NAME_BYTES)")
    return Path(text)


def check_output_folder(path: Path, option: str) -> None:
    """Refuse a folder that cannot hold what will be written in it, checked without writing: ``path``
    is UTF-8 text, and its nearest existing ancestor (``path`` itself if it exists) is a folder this
    process may write into.

    What this cannot see (a pseudo-filesystem such as ``/proc``, which refuses new folders whatever the
    permissions say) is caught when the folder is created, still before anything else is written.

    :raises UsageError: naming ``option`` and the problem
    """
    path = check_path_text(path, option)
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {existing} is not writable")


def parse_assignment(text: str) -> tuple[str, str]:
    """``"KEY=VALUE"`` as ``(key, value text)``, the key stripped (``--set learning_rate=1e-3``).

    :raises ValueError: ``"expected KEY=VALUE, got 'text'"`` if there is no ``=`` or no key
    """
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value
