"""progress.csv: whatever moment a kill comes at, the file left behind parses, and holds SB3's rows."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from stable_baselines3.common.logger import CSVOutputFormat, FormatUnsupportedError, Logger, Video

from rollback_rl.persistence.run_logs import TIMESTEP_COLUMN, ProgressCSV, cut_progress_csv

REPOSITORY = Path(__file__).resolve().parents[2]


def rows_logged(count: int = 12) -> list[dict]:
    """Rows as training logs them: new keys at rows 3 (train/) and 7 (rollback/, as at a first rollback)."""
    rows = []
    for index in range(count):
        row = {"rollout/ep_rew_mean": 10.0 + index, "time/fps": 100 + index, TIMESTEP_COLUMN: 100 * (index + 1)}
        if index >= 3:
            row["train/loss"] = 1.0 / (index + 1)
        if index >= 7:
            row.update({"rollback/restores": index - 6, "rollback/note": 'a "quoted", \ntwo-line text'})
        rows.append(row)
    return rows


def write_rows(path: Path, rows: list[dict]) -> list[bytes]:
    """Write ``rows`` with a ProgressCSV; the file's bytes after each row."""
    writer = ProgressCSV(path)
    states = [path.read_bytes()]
    for row in rows:
        writer.write(row, {key: None for key in row}, step=row[TIMESTEP_COLUMN])
        states.append(path.read_bytes())
    writer.close()
    return states


def parse(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode())))


def assert_parses_with_whole_rows(data: bytes) -> int:
    """``data`` parses as CSV; every line that ends in a newline has the header's fields. Returns how many
    rows are whole (-1: not even the header is)."""
    lines = parse(data)
    complete = data.count(b"\n")
    if not lines:
        return 0
    width = len(lines[0])
    for fields in lines[1:complete]:
        assert len(fields) == width, (fields, lines[0])
    if len(lines) > complete:  # a row cut short by the kill: no more fields than the header
        assert len(lines[-1]) <= width
    return complete - 1


def test_every_byte_prefix_a_kill_could_leave_parses(tmp_path):
    states = write_rows(tmp_path / "progress.csv", rows_logged())
    # Between two states the file either grew by one appended row (a kill leaves any prefix of it)
    # or was replaced by a rename (a kill leaves the old or the new one): check every prefix.
    checked = 0
    for before, after in zip(states, states[1:]):
        start = len(before) if after.startswith(before) else 0
        for length in range(start, len(after) + 1):
            prefix = after[:length]
            whole_rows = assert_parses_with_whole_rows(prefix)
            checked += 1
            if length % 5 == 0 or prefix.endswith(b"\n"):  # resuming keeps the whole rows (fsyncs: not at every length)
                (tmp_path / "cut.csv").write_bytes(prefix)
                cut_progress_csv(tmp_path / "cut.csv", 10**9)
                assert assert_parses_with_whole_rows((tmp_path / "cut.csv").read_bytes()) == max(whole_rows, 0)
    assert checked >= len(states[-1])  # at least every length once


def test_the_header_changes_only_by_replacing_the_file(tmp_path):
    path = tmp_path / "progress.csv"
    writer = ProgressCSV(path)
    inodes, headers, kept_open = [], [], []  # open files keep their inode numbers from being reused
    for row in rows_logged():
        writer.write(row, {key: None for key in row}, step=row[TIMESTEP_COLUMN])
        kept_open.append(open(path, "rb"))  # noqa: SIM115
        inodes.append(os.fstat(kept_open[-1].fileno()).st_ino)
        headers.append(parse(kept_open[-1].read())[0])
    writer.close()
    for file in kept_open:
        file.close()
    for index in range(1, len(headers)):
        if headers[index] != headers[index - 1]:
            assert inodes[index] != inodes[index - 1] and headers[index][:len(headers[index - 1])] == headers[index - 1]
        else:
            assert inodes[index] == inodes[index - 1]
    assert len(set(inodes)) == 3  # the first row, then train/, then rollback/


def test_a_kill_during_the_rewrite_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "progress.csv"
    rows = rows_logged()
    writer = ProgressCSV(path)
    for row in rows[:3]:
        writer.write(row, {key: None for key in row})
    before = path.read_bytes()

    def killed(*args):
        raise KeyboardInterrupt  # stands for the kill: nothing after it runs

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.write(rows[3], {key: None for key in rows[3]})  # brings train/loss: a rewrite
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["progress.csv"]


def test_rows_read_back_as_sb3s_own_writer_writes_them(tmp_path):
    rows = rows_logged()
    write_rows(tmp_path / "ours.csv", rows)
    theirs = CSVOutputFormat(str(tmp_path / "theirs.csv"))
    for row in rows:
        theirs.write(row, {key: None for key in row})
    theirs.close()
    ours_rows = list(csv.DictReader(io.StringIO((tmp_path / "ours.csv").read_text())))
    their_rows = list(csv.DictReader(io.StringIO((tmp_path / "theirs.csv").read_text())))
    for ours, theirs_row in zip(ours_rows, their_rows, strict=True):
        note = ours.pop("rollback/note"), theirs_row.pop("rollback/note")
        assert ours == theirs_row
        assert note[0] == note[1].replace("\n", " ")  # the same text, on one line


def test_a_continued_file_keeps_its_header_and_grows_by_rows(tmp_path):
    path = tmp_path / "progress.csv"
    rows = rows_logged()
    write_rows(path, rows[:6])
    header = cut_progress_csv(path, 300)
    writer = ProgressCSV(path, header=header)
    for row in rows[3:6]:
        writer.write(row, {key: None for key in row})
    writer.close()
    table = parse(path.read_bytes())
    assert table[0] == header and [int(fields[header.index(TIMESTEP_COLUMN)]) for fields in table[1:]] == \
        [100, 200, 300, 400, 500, 600]


def test_values_csv_cannot_hold_are_refused_as_sb3_refuses_them(tmp_path):
    writer = ProgressCSV(tmp_path / "progress.csv")
    with pytest.raises(FormatUnsupportedError):
        writer.write({"video": Video(frames=None, fps=1)}, {"video": None})
    writer.close()


def test_a_logger_writes_progress_csv_through_it(tmp_path):
    logger = Logger(folder=str(tmp_path), output_formats=[ProgressCSV(tmp_path / "progress.csv")])
    for step, loss in ((100, 0.5), (200, 0.25)):
        logger.record("train/loss", loss)
        logger.dump(step)
    logger.record("rollback/restores", 1)
    logger.dump(300)
    logger.close()
    assert (tmp_path / "progress.csv").read_text() == \
        "time/total_timesteps,train/loss,rollback/restores\n100,0.5,\n200,0.25,\n300,,1\n"


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL")
def test_sigkill_at_random_moments_leaves_a_file_that_parses(tmp_path):
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from rollback_rl.persistence.run_logs import ProgressCSV
        writer = ProgressCSV(Path(sys.argv[1]))
        print("ready", flush=True)
        for index in range(10**9):
            row = {f"key/{k}": index * 0.5 for k in range(20 + index // 200)}  # a new column every 200 rows
            row["time/total_timesteps"] = index
            writer.write(row, {key: None for key in row})
        """)
    for kill, delay in enumerate((0.1, 0.4)):
        path = tmp_path / f"progress-{kill}.csv"
        child = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True,
                                 cwd=REPOSITORY, env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
        assert child.stdout.readline() == "ready\n"
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        rows = assert_parses_with_whole_rows(path.read_bytes())
        assert rows > 0
