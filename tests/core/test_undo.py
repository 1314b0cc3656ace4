"""The undo log puts a network, its target network and Adam's state back bitwise, within its bounds."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rollback_rl.core.undo import UndoLog, UndoUnavailableError

from helpers import assert_states_equal

torch.set_num_threads(1)

SYNC_EVERY = 5  # gradient steps between two target syncs in the scripted training below


class TinyLearner:
    """A Q-network, its target network and Adam, changed only by the two operations DQN has."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2))
        self.target = copy.deepcopy(self.net)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-2)
        self.batches = torch.Generator().manual_seed(seed + 1)

    def state(self) -> dict:
        return {"net": self.net, "target": self.target, "optimizer": self.optimizer}

    def new_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(8, 3, generator=self.batches), torch.randn(8, 1, generator=self.batches)

    def gradient_step(self, batch: tuple[torch.Tensor, torch.Tensor], learning_rate: float) -> float:
        observations, rewards = batch
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        with torch.no_grad():
            target = rewards + 0.9 * self.target(observations).max(dim=1, keepdim=True).values
        loss = F.smooth_l1_loss(self.net(observations)[:, :1], target)
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.net.parameters(), 10.0)
        self.optimizer.step()
        return loss.item()

    def sync_target(self, tau: float) -> None:
        with torch.no_grad():
            for parameter, target in zip(self.net.parameters(), self.target.parameters()):
                target.mul_(1 - tau).add_(parameter, alpha=tau)

    def train(self, log: UndoLog | None, gradient_steps: int, states: list | None = None) -> None:
        """Run ``gradient_steps`` steps (a sync after every SYNC_EVERY-th); keep the state before each."""
        for _ in range(gradient_steps):
            if states is not None:
                states.append(clone_state(self))
            step = len(states) if states is not None else 0
            learning_rate = 1e-2 / (1 + 0.01 * step)  # a schedule, so replay must use the recorded value
            if log is None:
                self.gradient_step(self.new_batch(), learning_rate)
            else:
                log.apply(self.gradient_step, self.new_batch(), learning_rate)
            if step % SYNC_EVERY == 0:
                if log is None:
                    self.sync_target(0.5)
                else:
                    log.apply(self.sync_target, 0.5, gradient_step=False)


def clone_state(learner: TinyLearner) -> dict:
    return {
        "net": copy.deepcopy(learner.net.state_dict()),
        "target": copy.deepcopy(learner.target.state_dict()),
        "optimizer": copy.deepcopy(learner.optimizer.state_dict()),
    }


def state_bytes(learner: TinyLearner) -> int:
    """Bytes of one full copy of the learner's training state."""
    tensors = [*learner.net.state_dict().values(), *learner.target.state_dict().values(),
               *(v for entries in learner.optimizer.state.values() for v in entries.values())]
    return sum(t.numel() * t.element_size() for t in tensors)


def trained(steps: int = 23, **log_kwargs) -> tuple[TinyLearner, UndoLog, list]:
    learner = TinyLearner()
    log = UndoLog(learner.state(), **{"anchor_interval": 4, **log_kwargs})
    states: list = []
    learner.train(log, steps, states)
    return learner, log, states


def test_replay_is_the_same_computation_as_live_training():
    with_log, _, _ = trained()
    without_log = TinyLearner()
    without_log.train(None, 23, [])
    assert_states_equal(clone_state(with_log), clone_state(without_log))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9, 12, 23])
def test_undo_n_steps_restores_weights_target_and_adam_bitwise(n):
    # 23 steps, anchors every 4, syncs after steps 0, 5, 10, ...: the n cover crossing an anchor,
    # crossing a sync, and going back to the very first state (Adam without any state yet).
    learner, log, states = trained()
    log.undo(n)
    assert_states_equal(clone_state(learner), states[23 - n])
    assert log.depth == 23 - n


def test_training_goes_on_after_an_undo_and_can_be_undone_again():
    learner, log, states = trained()
    log.undo(6)
    del states[17:]
    learner.train(log, 10, states)
    log.undo(8)
    assert_states_equal(clone_state(learner), states[19])


def test_undo_to_mark_reverts_a_whole_run_of_steps():
    learner, log, _ = trained(steps=3)
    before = clone_state(learner)
    mark = log.mark()
    learner.train(log, 17)
    log.undo_to(mark)
    assert_states_equal(clone_state(learner), before)
    log.undo_to(mark)  # already there: nothing to do
    assert_states_equal(clone_state(learner), before)


def test_mark_before_any_step_goes_back_to_the_initial_state():
    learner = TinyLearner()
    before = clone_state(learner)
    log = UndoLog(learner.state())
    mark = log.mark()
    learner.train(log, 5)
    log.undo_to(mark)
    assert_states_equal(clone_state(learner), before)


def test_undo_beyond_max_depth_or_beyond_the_log_raises():
    _, log, _ = trained(steps=12, max_depth=5)
    with pytest.raises(ValueError, match="max_depth=5"):
        log.undo(6)
    _, log, _ = trained(steps=3, max_depth=5)
    with pytest.raises(UndoUnavailableError, match="only 3"):
        log.undo(4)
    with pytest.raises(ValueError, match="non-negative"):
        log.undo(-1)


def test_oldest_records_fall_off_beyond_max_depth():
    learner, log, states = trained(steps=40, max_depth=10)
    assert log.depth == 10
    assert log.n_anchors <= 10 // 4 + 2  # anchors older than max_depth steps are dropped
    log.undo(10)
    assert_states_equal(clone_state(learner), states[30])


def test_mark_that_fell_off_or_was_undone_past_raises():
    learner, log, _ = trained(steps=2, max_depth=4)
    old_mark = log.mark()
    learner.train(log, 20)
    with pytest.raises(UndoUnavailableError, match="fell off"):
        log.undo_to(old_mark)
    mark = log.mark()
    learner.train(log, 2)
    log.undo(3)
    learner.train(log, 1)
    with pytest.raises(UndoUnavailableError, match="went back past"):
        log.undo_to(mark)


def test_memory_budget_is_respected_and_oldest_anchors_go_first():
    learner = TinyLearner()
    learner.train(None, 1)  # Adam's state exists: anchors have their final size
    budget = 3 * state_bytes(learner) + 2_000
    log = UndoLog(learner.state(), max_depth=1_000, max_bytes=budget, anchor_interval=4)
    states: list = []
    for _ in range(30):
        learner.train(log, 1, states)
        assert log.nbytes <= budget
    assert 4 <= log.depth < 30
    depth = log.depth
    log.undo(depth)
    assert_states_equal(clone_state(learner), states[30 - depth])


def test_budget_smaller_than_one_anchor_raises_with_advice():
    learner = TinyLearner()
    log = UndoLog(learner.state(), max_bytes=100)
    with pytest.raises(ValueError, match="raise it"):
        learner.train(log, 1)


def test_budget_too_small_for_records_keeps_a_fresh_anchor_only():
    learner = TinyLearner()
    learner.train(None, 1)
    log = UndoLog(learner.state(), max_bytes=10**9, anchor_interval=1_000)
    learner.train(log, 1)
    log.max_bytes = log.nbytes + 2 * 44 * 4  # room for the anchor and about two minibatches
    learner.train(log, 5)
    assert log.nbytes <= log.max_bytes
    assert log.depth <= 2


def test_external_change_is_anchored_and_undo_can_cross_it():
    learner, log, _ = trained(steps=6)
    mark = log.mark()
    before = clone_state(learner)
    with torch.no_grad():
        learner.net[0].weight.zero_()  # e.g. a snapshot restored by someone else
    log.note_external_change()
    changed = clone_state(learner)
    learner.train(log, 3)
    log.undo(3)
    assert_states_equal(clone_state(learner), changed)
    learner.train(log, 2)
    log.undo_to(mark)
    assert_states_equal(clone_state(learner), before)


def test_forget_last_drops_a_step_that_changed_nothing():
    learner, log, states = trained(steps=5)
    log.apply(lambda: None)  # e.g. a gradient step skipped for its non-finite loss
    log.forget_last()
    assert log.depth == 5
    with pytest.raises(UndoUnavailableError, match="must follow apply"):
        log.forget_last()
    log.undo(2)
    assert_states_equal(clone_state(learner), states[3])


def test_nbytes_counts_anchors_and_minibatches():
    _, log, _ = trained(steps=8, anchor_interval=100)
    minibatch_bytes = (8 * 3 + 8) * 4
    assert log.nbytes == state_bytes(TinyLearner()) + 8 * minibatch_bytes  # anchored before Adam had state
    assert log.bytes_per_step == pytest.approx(log.nbytes / 8)


def test_invalid_arguments_raise():
    learner = TinyLearner()
    for kwargs in ({"max_depth": 0}, {"max_bytes": -1}, {"anchor_interval": 1.5}):
        with pytest.raises(ValueError, match="positive int"):
            UndoLog(learner.state(), **kwargs)


def test_dropped_anchors_buffers_are_reused_not_doubled():
    learner, log, _ = trained(steps=60, max_depth=10)
    full_copy = state_bytes(learner)
    assert all(segment.anchor.nbytes == full_copy for segment in log._segments)
    assert log.nbytes <= (log.n_anchors + 1) * full_copy + 20 * (8 * 3 + 8) * 4


@pytest.mark.parametrize("copies, promised", [(4, False), (6, False), (9, True), (64, True)])
def test_keeping_the_current_state_is_promised_only_when_the_budget_holds_it(copies, promised):
    learner = TinyLearner()
    learner.train(None, 1)  # Adam's state exists: anchors have their final size
    log = UndoLog(learner.state(), max_depth=20, max_bytes=copies * state_bytes(learner) + 1_000, anchor_interval=4)
    learner.train(log, 3)
    mark, before = log.mark(), clone_state(learner)
    batches = [learner.new_batch() for _ in range(10)]
    assert log.keeps_current_state_over(10, (batches[0], 0.01)) is promised
    assert not log.keeps_current_state_over(21, (batches[0], 0.01))  # more gradient steps than max_depth
    for batch in batches:
        log.apply(learner.gradient_step, batch, 0.01)
    if promised:
        log.undo_to(mark)
        assert_states_equal(clone_state(learner), before)
