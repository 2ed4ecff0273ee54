"""Exact resumption, the learning-rate schedule, signals, numerical faults and failed saves."""
import argparse
import importlib
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tools import fakedata
from tests.conftest import cpu_bit_exact
from utils.training import resume as checkpoint
from utils.files import CheckpointError
from utils.training.run import FaultGuard, StopRequest, TooManyFaults, get_lr, train_epoch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['-j', '0', '-t', '2', '--threshold', '3', '--manualSeed', '7']


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """Fake MNIST and CIFAR-10 in torchvision's layouts."""
    root = tmp_path_factory.mktemp('data')
    fakedata.make_mnist(str(root), n_train=48, n_test=16)
    fakedata.make_cifar(str(root), n_train=8, n_test=4)
    return str(root)


def run_main(script, argv):
    """Call a script's main(argv) in this process."""
    return importlib.import_module(script).main(argv)


def load(path):
    """A checkpoint as the scripts load it."""
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same_tensors(a, b):
    """Two nested structures hold bit-identical tensors and equal plain values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


# Dropout (all), augmentation in worker processes (CIFAR) and a warm-up that spans the epoch
# boundary all need the restored state.
@pytest.mark.parametrize('script, flags', [
    ('mnist_conv', ['--train-batch', '16', '--test-batch', '16']),
    ('cifar_alexnetf', ['--train-batch', '4', '--test-batch', '4', '--warmup', '3', '-j', '2']),
])
@cpu_bit_exact
def test_two_epochs_equal_one_plus_resume(script, flags, data_root, tmp_path):
    common = FAST + flags + ['--path', data_root]
    run_main(script, common + ['--epochs', '2', '-c', str(tmp_path / 'straight')])
    run_main(script, common + ['--epochs', '1', '-c', str(tmp_path / 'split')])
    run_main(script, ['--resume', str(tmp_path / 'split' / 'checkpoint.pth.tar'), '--epochs', '2'])
    straight = load(tmp_path / 'straight' / 'checkpoint.pth.tar')
    split = load(tmp_path / 'split' / 'checkpoint.pth.tar')
    assert_same_tensors(straight['state_dict'], split['state_dict'])
    assert_same_tensors(straight['optimizer'], split['optimizer'])
    assert_same_tensors(straight['rng'], split['rng'])
    for key in ('epoch', 'iteration', 'acc', 'best_acc'):
        assert straight[key] == split[key]
    with open(tmp_path / 'straight' / 'log.txt') as a, open(tmp_path / 'split' / 'log.txt') as b:
        assert a.read() == b.read()


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


def test_non_finite_steps_are_skipped_and_counted(capsys):
    model = Toy(poison={2, 5})
    stats = toy_epoch(model)
    assert stats['skipped'] == 2 and stats['iteration'] == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(stats['loss'])
    assert capsys.readouterr().err.count('optimizer step skipped') == 2


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


def test_sigterm_stops_with_a_resumable_checkpoint(data_root, tmp_path):
    folder = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, 'mnist_conv.py', *FAST, '--path', data_root, '--train-batch', '16',
                             '--epochs', '1000', '-c', str(folder)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (folder / 'log.txt').exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143
    path = folder / 'checkpoint.pth.tar'
    assert err.strip().splitlines()[-1] == f'interrupted; resume with: python mnist_conv.py --resume {path}'
    ckpt = load(path)
    with open(folder / 'log.txt') as f:
        assert len(f.read().splitlines()) == 1 + ckpt['epoch']


def test_failed_save_is_one_line_and_keeps_the_previous_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    folder = tmp_path / 'run'
    flags = FAST + ['--path', data_root, '--train-batch', '16', '-c', str(folder)]
    run_main('mnist_conv', flags + ['--epochs', '1'])
    saved = (folder / 'checkpoint.pth.tar').read_bytes()

    def disk_full(*args, **kwargs):
        raise CheckpointError(f'cannot write {folder / "checkpoint.pth.tar"}: No space left on device')

    monkeypatch.setattr(checkpoint, 'save_checkpoint', disk_full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main('mnist_conv', ['--resume', str(folder / 'checkpoint.pth.tar'), '--epochs', '2'])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith('No space left on device')
    assert (folder / 'checkpoint.pth.tar').read_bytes() == saved
