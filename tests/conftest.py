"""Shared test helpers and fixtures.

The method's tests use tiny feedback spiking networks of every kind:
`tiny_snn(arch, ...)` builds a `FeedbackSNN` by hand (float64 by default):
  - "fc":    fc input layer 6 -> 5 neurons (+BN), fc feedback 5 -> 5;
  - "conv":  conv input layer 1 -> 2 channels on 4x4 (+BN), same-size conv feedback;
  - "multi": three spiking layers, 2x4x4 -> 3x2x2 (stride 2) -> 3x2x2, conv + BN + bias
             inside the loop, ConvTranspose feedback (stride 2) back to the first layer.
`tiny_input(arch, batch, spike, time_step)` draws a matching input: Gaussian images, or
Bernoulli spike frames with the time axis last.

The training scripts' tests run a script's `main(argv)` in this process (`run_main`, `fails`)
or as a process (`launch`, `finish`), on the fake data sets of `data_root`, and compare run
folders by content (`digest`, `log_rows`).
"""
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from modules.layers import Connection, Feedback
from modules.snn import FeedbackSNN
from tests import nmnist_fakes
from tools import fakedata
from utils.checkpoint import BEST_NAME as BEST, CHECKPOINT_NAME as CKPT, LOCK_NAME as LOCK, LOG_NAME as LOG
from utils.training.status import STATUS_NAME

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INPUT_SHAPES = {"fc": (6,), "conv": (1, 4, 4), "multi": (1, 4, 4)}


# Two runs of a training script agree bit for bit on the CPU; on a GPU only with --deterministic,
# which these tests do not pass (tools.smoke checks resume on a GPU with it).
cpu_bit_exact = pytest.mark.skipif(torch.cuda.is_available(),
                                   reason='bit-exact repeat holds on the CPU; on a GPU it needs --deterministic')


def build_tiny_snn(arch, leak=1.0, spike=False, dropout=0.0, bn=True, time_step=10, vth=2.0,
                   gain=0.8, solver="broyden", threshold=30, tol=None, randomize=True,
                   seed=0, dtype=torch.float64):
    """A tiny FeedbackSNN; `gain` sets the feedback scale g (the spectral norm of W)."""
    torch.manual_seed(seed)
    if arch == "fc":
        input_layer = Connection(nn.Linear(6, 5), bn=bn, dropout=dropout, flatten=True)
        layers = []
        feedback = Feedback(nn.Linear(5, 5, bias=False), dropout=dropout)
    elif arch == "conv":
        input_layer = Connection(nn.Conv2d(1, 2, 3, padding=1), bn=bn, dropout=dropout)
        layers = []
        feedback = Feedback(nn.Conv2d(2, 2, 3, padding=1, bias=False), dropout=dropout)
    elif arch == "multi":
        input_layer = Connection(nn.Conv2d(1, 2, 3, padding=1), bn=bn, dropout=dropout)
        layers = [Connection(nn.Conv2d(2, 3, 3, 2, 1), bn=True, dropout=dropout),
                  Connection(nn.Conv2d(3, 3, 3, 1, 1), bn=True, dropout=dropout)]
        feedback = Feedback(nn.ConvTranspose2d(3, 2, 3, 2, 1, output_padding=1, bias=False),
                            dropout=dropout)
    else:
        raise ValueError(arch)
    snn = FeedbackSNN(input_layer, layers, feedback, time_step=time_step, vth=vth, leak=leak,
                      spike_input=spike, solver=solver, threshold=threshold, tol=tol).to(dtype)
    with torch.no_grad():
        feedback.spectral.g.fill_(gain)
        if randomize:  # biases, BN affine and running statistics away from their trivial values
            for conn in [input_layer, *layers]:
                if conn.linear.bias is not None:
                    conn.linear.bias.uniform_(-0.5, 0.5)
                if conn.bn is not None:
                    conn.bn.weight.uniform_(0.6, 1.4)
                    conn.bn.bias.uniform_(-0.3, 0.3)
                    conn.bn.running_mean.normal_(0.0, 0.3)
                    conn.bn.running_var.uniform_(0.5, 2.0)
            for conn in layers:  # spikes are small: scale their normalised current up so deep layers fire
                conn.bn.bias.uniform_(0.5, 1.0)
                conn.bn.running_mean.normal_(0.0, 0.1)
                conn.bn.running_var.uniform_(0.05, 0.2)
    return snn


def make_tiny_input(arch, batch, spike=False, time_step=10, seed=1, dtype=torch.float64, scale=1.0):
    """An input for `build_tiny_snn(arch, spike=spike)`: images, or spike frames (time last)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *INPUT_SHAPES[arch])
    if spike:
        return (torch.rand(*shape, time_step, generator=gen) < 0.5).to(dtype)
    return (scale * torch.randn(*shape, generator=gen)).to(dtype)


@pytest.fixture(autouse=True)
def python_signal_handlers():
    """Each test starts with Python's own SIGINT (KeyboardInterrupt) and SIGTERM handling and leaves it so: tests
    that signal this process expect it, and a shell starts background jobs with SIGINT ignored."""
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in signals}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="module")
def single_thread():
    """Run a test module on one intra-op thread. The tests' tensors are small (or, for the paper
    nets, a batch of 2): handing work between threads costs more than it saves, up to tens of
    times more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_snn(single_thread):
    """Factory fixture: `tiny_snn(arch, **options)` (see `build_tiny_snn`), on one thread."""
    return build_tiny_snn


@pytest.fixture
def tiny_input():
    """Factory fixture: `tiny_input(arch, batch, spike, time_step, ...)` (see `make_tiny_input`)."""
    return make_tiny_input


# ---------------------------------------------------------------- the training scripts

# Tiny runs: two time steps, three solver iterations, two training batches per epoch on `data_root`.
TINY = ['-j', '0', '-t', '2', '--threshold', '3', '--train-batch', '16', '--test-batch', '16', '--manualSeed', '0']
CHILD_ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
WAIT_S = 600  # generous: a loaded machine can take minutes to start a process importing torch

# Faults inside a running script are injected by HOOKED, a wrapper run with `python -c` that patches
# the library in that process only and then runs the script as `__main__`; the scripts have no flag
# for any of this. FAULT_HOOKS (JSON) chooses the faults: a write that stalls or fails half way,
# NaN training batches, a batch held until a mark file appears, adjoint solves with a NaN residual.
HOOKED = r'''
import errno, io, json, math, os, runpy, sys, time
import torch
import utils.files
import utils.training.run
from modules.snn import FeedbackSNN

spec = json.loads(os.environ['FAULT_HOOKS'])
count = {'batch': 0, 'solve': 0}


def mark(name):
    open(os.path.join(spec['marks'], name), 'w').close()


real_write = utils.files._write_temporary


def write_temporary(path, write):
    # The write of the chosen file stops half way, then stalls (to be killed) or fails as a full disk does.
    name = os.path.basename(path)
    if name not in (spec.get('stall_write'), spec.get('fail_write')):
        return real_write(path, write)

    def half(f):
        buffer = io.BytesIO()
        write(buffer)
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        if name == spec.get('fail_write'):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        mark('writing')
        time.sleep(600)

    return real_write(path, half)


class Batches:
    # Training batches counted over the whole run: chosen ones become NaN, one can be held.
    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for inputs, targets in self.loader:
            count['batch'] += 1
            if count['batch'] in spec.get('nan_batches', ()):
                inputs = torch.full_like(inputs, math.nan)
            if count['batch'] == spec.get('hold_batch'):
                mark('held')
                while not os.path.exists(os.path.join(spec['marks'], 'release')):
                    time.sleep(0.01)
            yield inputs, targets


real_epoch = utils.training.run.train_epoch


def train_epoch(model, loader, *args, **kwargs):
    return real_epoch(model, Batches(loader), *args, **kwargs)


real_solve = FeedbackSNN._solve


def solve(self, func, y0, f0=None):
    # The chosen adjoint solves report a NaN residual; their result is left as it is.
    y, info = real_solve(self, func, y0, f0=f0)
    count['solve'] += 1
    if count['solve'] in spec.get('bad_solves', ()):
        info = dict(info, residual=math.nan)
    return y, info


utils.files._write_temporary = write_temporary
utils.training.run.train_epoch = train_epoch
FeedbackSNN._solve = solve
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''



def run_main(script, argv):
    """Call a script's (or program's) main(argv) in this process; argv items may be paths or numbers."""
    return importlib.import_module(script).main([str(a) for a in argv])


def launch(script, argv, hooks=None, marks=None, cwd=REPO, stderr=subprocess.PIPE):
    """Start `script`.py with argv (through HOOKED when hooks are given); return the Popen."""
    env = dict(CHILD_ENV)
    path = os.path.join(REPO, f'{script}.py')
    command = [sys.executable, path, *map(str, argv)]
    if hooks is not None:
        env['FAULT_HOOKS'] = json.dumps({**hooks, 'marks': str(marks)})
        command = [sys.executable, '-c', HOOKED, path, *map(str, argv)]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)


def finish(proc):
    """Wait for proc; return (exit code, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        proc.kill()
    return proc.returncode, out, err


def wait_for(path, proc):
    """Wait until path exists while proc runs; fail with its output if it ends first."""
    deadline = time.monotonic() + WAIT_S
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f'{path} never appeared (exit {proc.returncode}): {err[-2000:]}')
        time.sleep(0.02)


def error_line(err):
    """The single line a failed run printed on stderr (no traceback)."""
    assert 'Traceback' not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def fails(script, argv, capsys):
    """Run main(argv) in this process, expecting an exit; return (exit code, its one stderr line)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(script, argv)
    return exc.value.code, error_line(capsys.readouterr().err)


def digest(folder):
    """{name: sha256} of every file in folder (hidden ones included) but the lock and the status file, which
    describe the process that holds the folder now, not what a run saved."""
    result = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and entry.name not in (LOCK, STATUS_NAME):
            with open(entry.path, 'rb') as f:
                result[entry.name] = hashlib.sha256(f.read()).hexdigest()
    return result


def log_rows(folder):
    """The data rows of folder/log.txt as dicts keyed by column name (None for a diagnostic not recorded: nan)."""
    with open(os.path.join(folder, LOG), encoding='utf-8') as f:
        header, *rows = [line.rstrip('\t').split('\t') for line in f.read().splitlines()]
    return [dict(zip(header, (None if v == 'nan' else float(v) for v in row))) for row in rows]


def load(path):
    """A checkpoint as the scripts load it (weights only, on the CPU)."""
    return torch.load(path, map_location='cpu', weights_only=True)


def copy_run(source, folder):
    """A copy of the run folder source at folder; returns folder."""
    shutil.copytree(source, folder)
    return folder


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    """Fake data sets in their real on-disk formats, shared read-only by the scripts' tests: MNIST and
    Fashion-MNIST (32 training, 16 test images: two training batches of 16), CIFAR-10 (8 and 8: the CIFAR
    nets are wide) in torchvision's layouts, and an N-MNIST text tree in data_root/nmnist."""
    root = tmp_path_factory.mktemp('data')
    for kind in ('MNIST', 'FashionMNIST'):
        fakedata.make_mnist(str(root), n_train=32, n_test=16, kind=kind)
    fakedata.make_cifar(str(root), n_train=8, n_test=8)
    nmnist_fakes.make_nmnist_tree(root / 'nmnist', fmt='text', per_class=2)
    return root


@pytest.fixture(scope='session')
def trained(tmp_path_factory, data_root):
    """A fashion_mlp run folder after one epoch of TINY (checkpoint, best, log, plot); tests work on copies."""
    folder = tmp_path_factory.mktemp('trained') / 'run'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_main('fashion_mlp', TINY + ['--path', data_root, '--epochs', '1', '-c', folder])
    finally:
        torch.set_num_threads(threads)
    return folder


# ---------------------------------------------------------------- file checks

def leftovers(folder):
    """Temporary files an atomic write would leave behind."""
    return [name for name in os.listdir(folder) if name.endswith('.tmp')]


def one_line_error(excinfo):
    """The error message, asserted to be a single line."""
    message = str(excinfo.value)
    assert '\n' not in message
    return message


def load_checkpoint_raw(path):
    """torch.load as a consumer of the file would do it."""
    return torch.load(path, weights_only=True)
