"""A run's TensorBoard logs: the scalars, the rollback markers and the custom-scalars layout, read back
with TensorBoard's own reader and through a real TensorBoard server."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from helpers import TINY_YAML
from rollback_rl.cli import main
from rollback_rl.plotting import draw_curves, read_curves
from rollback_rl.tensorboard_layout import MAIN_CHART

torch.set_num_threads(1)



def train_tiny(logdir: Path, run_name: str, *extra: str) -> Path:
    hyperparams = logdir.parent / "tiny.yml"
    hyperparams.write_text(TINY_YAML)
    code = main(["train", "--hyperparams", str(hyperparams), "--logdir", str(logdir), "--run-name", run_name,
                 "--steps", "600", "--eval-freq", "200", "--eval-episodes", "2", "--no-progress", *extra])
    assert code == 0
    return logdir / run_name


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("tensorboard") / "runs"
    train_tiny(logdir, "rollback")
    return logdir


def load_events(run_dir: Path) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(
        str(run_dir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
    accumulator.Reload()
    return accumulator


def scalar_series(accumulator: event_accumulator.EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_evaluation_and_rollback_series_are_logged_at_each_evaluation(logdir):
    events = load_events(logdir / "rollback")
    info = json.loads((logdir / "rollback" / "run.json").read_text())
    evaluation = scalar_series(events, "eval/mean_reward")
    assert [step for step, _ in evaluation] == [200, 400, 600]
    assert [value for _, value in evaluation] == pytest.approx([e["mean"] for e in info["evaluations"]])
    assert scalar_series(events, "rollback/n_rollbacks") == [(200, 0.0), (400, 0.0), (600, 0.0)]
    best = [value for _, value in scalar_series(events, "rollback/best_score")]
    assert best == pytest.approx([max(v for _, v in evaluation[:i + 1]) for i in range(3)])
    assert "rollout/ep_rew_mean" in events.Tags()["scalars"]


def test_vanilla_run_logs_the_evaluation_curve_under_the_same_tag(logdir):
    run_dir = train_tiny(logdir.parent / "vanilla-runs", "vanilla", "--no-rollback")
    events = load_events(run_dir)
    assert [step for step, _ in scalar_series(events, "eval/mean_reward")] == [200, 400, 600]
    assert "rollback/n_rollbacks" not in events.Tags()["scalars"]


def test_custom_scalars_layout_puts_score_best_and_rollbacks_on_one_chart(logdir):
    events = load_events(logdir / "rollback")
    assert metadata.CONFIG_SUMMARY_TAG in events.Tags()["tensors"]
    proto = events.Tensors(metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(proto).item())
    charts = {chart.title: chart for category in layout.category for chart in category.chart}
    assert list(charts[MAIN_CHART].multiline.tag) == [
        "^eval/mean_reward$", "^rollback/best_score$", "^rollback/reference_score$", "^rollback/n_rollbacks$"]


def test_plot_marks_each_rollback_where_the_rollback_count_goes_up(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    for step, (score, n_rollbacks) in zip([100, 200, 300, 400, 500], [(50, 0), (500, 0), (20, 1), (480, 1), (9, 3)]):
        writer.add_scalar("eval/mean_reward", score, step)
        writer.add_scalar("rollback/n_rollbacks", n_rollbacks, step)
    writer.close()
    curves = read_curves(tmp_path)
    assert curves.rollback_timesteps == [300, 500]
    assert [value for _, value in curves.evaluation] == [50, 500, 20, 480, 9]
    assert draw_curves(curves, tmp_path / "plot.png").stat().st_size > 10_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:  # localhost only
        return json.loads(response.read())


def test_tensorboard_server_serves_the_evaluation_curve(logdir, tmp_path):
    tensorboard = Path(sys.executable).parent / "tensorboard"
    port = free_port()
    base = f"http://127.0.0.1:{port}/data"
    server_log = tmp_path / "tensorboard.log"
    with server_log.open("w") as log:
        server = subprocess.Popen([str(tensorboard), "--logdir", str(logdir), "--host", "127.0.0.1",
                                   "--port", str(port), "--load_fast", "false", "--reload_interval", "1"],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        runs: list[str] = []
        while "rollback" not in runs:
            assert server.poll() is None, server_log.read_text()[-2000:]
            assert time.monotonic() < deadline, "TensorBoard did not list the run within 60 s"
            try:
                runs = get_json(f"{base}/runs")
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        query = urllib.parse.urlencode({"run": "rollback", "tag": "eval/mean_reward"})
        served = get_json(f"{base}/plugin/scalars/scalars?{query}")  # [[wall_time, step, value], ...]
        info = json.loads((logdir / "rollback" / "run.json").read_text())
        assert [step for _, step, _ in served] == [200, 400, 600]
        assert [value for _, _, value in served] == pytest.approx([e["mean"] for e in info["evaluations"]])
        layout = get_json(f"{base}/plugin/custom_scalars/layout")
        assert MAIN_CHART in json.dumps(layout)
    finally:
        server.kill()
        server.wait(timeout=30)
