"""One training epoch (utils/training/epoch.py): the learning-rate schedule, steps with a non-finite loss,
gradient or solver result skipped and counted, and a stop request honoured after the current batch."""
import argparse
import math
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from utils.training.epoch import FaultGuard, TooManyFaults, get_lr, train_epoch
from utils.training.run import StopRequest


def schedule_args(**kw):
    """Flags for get_lr."""
    return argparse.Namespace(**{'lr': 0.1, 'gamma': 0.1, 'schedule': [2, 4], 'warmup': 0, **kw})


def test_get_lr_steps_at_milestones():
    args = schedule_args()
    assert [get_lr(args, e, 1000) for e in range(6)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_get_lr_warms_up_linearly_over_global_iterations():
    args = schedule_args(warmup=4)
    assert [get_lr(args, 0, i) for i in range(6)] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    # The warm-up position is global: an epoch boundary (or a resume) does not restart it.
    assert get_lr(args, 1, 2) == pytest.approx(0.075)
    assert get_lr(args, 2, 3) == pytest.approx(0.01)


class Toy(nn.Module):
    """A linear classifier whose output can be made non-finite, with the solver_stats attribute of the nets."""

    def __init__(self, poison=()):
        """Outputs become NaN at the forward calls numbered in poison (from 1)."""
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.poison = set(poison)
        self.calls = 0
        self.solver_stats = None

    def forward(self, x):
        """Logits, poisoned on request."""
        self.calls += 1
        out = self.fc(x)
        return out * math.nan if self.calls in self.poison else out


def toy_loader(batches=8):
    """Batches of 2 random samples."""
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(2 * batches, 4, generator=g),
                                    torch.randint(0, 3, (2 * batches,), generator=g)), batch_size=2)


def toy_epoch(model, faults=None, stop=None):
    """train_epoch of the toy model at lr 0.1."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return train_epoch(model, toy_loader(), nn.CrossEntropyLoss(), optimizer, torch.device('cpu'),
                       lr_at=lambda it: 0.1, iteration=0, faults=faults, stop=stop)


def test_solver_failure_skips_the_step():
    model = Toy()
    model.solver_stats = {'residual': math.inf, 'rel_residual': math.inf}
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TooManyFaults):
        toy_epoch(model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_five_faults_in_a_row_stop_the_run():
    with pytest.raises(TooManyFaults, match='5 optimizer steps in a row'):
        toy_epoch(Toy(poison={3, 4, 5, 6, 7}))
    # Not in a row: the counter restarts after a good step.
    assert toy_epoch(Toy(poison={1, 2, 3, 4, 6, 7, 8}), faults=FaultGuard())['skipped'] == 7


def test_stop_request_ends_the_epoch_after_the_current_batch():
    stop = StopRequest()
    model = Toy()
    original = model.forward

    def forward_then_signal(x):
        if model.calls == 2:
            stop.signum = signal.SIGTERM
        return original(x)

    model.forward = forward_then_signal
    stats = toy_epoch(model, stop=stop)
    assert stats['stopped'] and stats['iteration'] == 3
