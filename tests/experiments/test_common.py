"""The plumbing every experiment shares: the pool, provenance, atomic JSON records, option parsing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import rollback_rl
from rollback_rl.experiments import common
from rollback_rl.experiments.common import comma_list, free_folder, json_text, provenance, run_in_pool, seed_list, write_json
from rollback_rl.validation import UsageError

JOBS = {"a": (7, 2), "zero": (1, 0), "b": (9, 4)}  # divmod(1, 0) raises ZeroDivisionError


@pytest.mark.parametrize("workers", [1, 2])
def test_the_pool_reports_a_failed_call_and_finishes_the_others(workers):
    done, failed = {}, {}
    run_in_pool(divmod, JOBS, workers, on_done=done.__setitem__,
                on_failed=lambda key, error: failed.__setitem__(key, type(error).__name__))
    assert done == {"a": (3, 1), "b": (2, 1)} and failed == {"zero": "ZeroDivisionError"}


def test_the_pool_without_on_failed_raises_the_first_failure():
    done = {}
    with pytest.raises(ZeroDivisionError):
        run_in_pool(divmod, JOBS, 1, on_done=done.__setitem__)
    assert done == {"a": (3, 1)}  # in order, here: the call after the failure never ran


def test_provenance_names_the_code_libraries_machine_and_settings(monkeypatch):
    monkeypatch.setattr(common, "git_provenance", lambda: {"git_commit": "abc123", "git_dirty": False})
    made_by = provenance({"steps": 600, "out": Path("runs/x"), "pair": ("lr", "1e-3")})
    assert made_by["rollback_rl"] == rollback_rl.__version__
    assert (made_by["git_commit"], made_by["git_dirty"]) == ("abc123", False)
    assert {"stable_baselines3", "torch", "gymnasium", "numpy", "python"} <= set(made_by["versions"])
    assert {"platform", "cpu_count", "torch_threads"} == set(made_by["machine"])
    assert made_by["settings"] == {"steps": 600, "out": "runs/x", "pair": ["lr", "1e-3"]}
    json.dumps(made_by, allow_nan=False)  # plain JSON


def test_git_provenance_of_this_checkout_names_a_commit():
    made_by = common.git_provenance()
    assert made_by["git_dirty"] in (True, False, None)
    assert made_by["git_commit"] is None or len(made_by["git_commit"]) == 40


def test_json_records_write_nan_as_null_and_a_failed_write_leaves_the_old_record(tmp_path):
    path = write_json(tmp_path / "deep" / "record.json", {"score": math.nan, "returns": [1.0, math.inf], "n": 2},
                      one_field_per_line=True)
    assert path.read_text() == '{\n  "score": null,\n  "returns": [1.0, null],\n  "n": 2\n}\n'

    class Unwritable:
        pass

    with pytest.raises(TypeError):
        write_json(path, {"score": 1.0, "object": Unwritable()})
    assert json.loads(path.read_text())["n"] == 2  # the old record is untouched
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]  # no temporary file left


def test_json_text_is_indented_by_default():
    assert json_text({"a": [1]}) == '{\n "a": [\n  1\n ]\n}\n'


@pytest.mark.parametrize(("text", "message"), [
    ("", "--tasks needs at least one name"),
    (" , ", "--tasks needs at least one name"),
    ("a,b,a,b,c", "--tasks names a, b twice"),
])
def test_a_comma_list_refuses_nothing_or_a_name_twice(text, message):
    with pytest.raises(UsageError, match=message):
        comma_list(text, "--tasks")


def test_a_comma_list_strips_blanks_and_keeps_the_order():
    assert comma_list(" b, a ,,c ", "--arms") == ["b", "a", "c"]


def test_a_seed_list_keeps_the_order_and_refuses_what_is_not_a_seed():
    assert seed_list("103, 100,101") == [103, 100, 101]
    for text, message in (("1,01", "names a seed twice"), ("1,-2", "must be integers >= 0"),
                          (",".join(map(str, range(1_001))), "MAX_SEEDS"), (" , ", "needs at least one name")):
        with pytest.raises(UsageError, match=message):
            seed_list(text, "--seed-list")


def test_free_folder_never_names_an_existing_one(tmp_path):
    assert free_folder(tmp_path / "run") == tmp_path / "run"
    (tmp_path / "run").mkdir()
    (tmp_path / "run-2").mkdir()
    assert free_folder(tmp_path / "run") == tmp_path / "run-3"
