"""End to end: the five training scripts on tiny data sets in the real on-disk formats, and their errors."""
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

from modules import build_model
from tests import nmnist_fakes
from tools import fakedata
from utils.flags import build_parser, neuron_line
from utils.checkpoint import save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('mnist_conv', 'fashion_mlp', 'nmnist_conv', 'cifar_alexnetf', 'cifar_cifarnetf')
# Tiny runs: two time steps, few solver iterations, one batch size everywhere.
FAST = ['-j', '0', '-t', '2', '--threshold', '3', '--train-batch', '16', '--test-batch', '32',
        '--manualSeed', '0', '--epochs', '1']


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    """One folder with fake MNIST, Fashion-MNIST and CIFAR-10, and an N-MNIST tree (text format) beside it."""
    root = tmp_path_factory.mktemp('data')
    for kind in ('MNIST', 'FashionMNIST'):
        fakedata.make_mnist(str(root), n_train=32, n_test=32, kind=kind)
    # The CIFAR nets are wide: keep them to a handful of images.
    fakedata.make_cifar(str(root), n_train=8, n_test=8)
    nmnist_fakes.make_nmnist_tree(root / 'nmnist', fmt='text', per_class=2)
    return root


def data_flags(script, root):
    """--path for a script's data set."""
    return ['--path', str(root / 'nmnist') if script == 'nmnist_conv' else str(root)]


def run_main(script, argv):
    """Call a script's main(argv) in this process."""
    return importlib.import_module(script).main(argv)


def run_script(script, *argv):
    """Run a script as a subprocess; return the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO, f'{script}.py'), *map(str, argv)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def log_rows(folder):
    """Data rows of folder/log.txt."""
    with open(os.path.join(folder, 'log.txt'), encoding='utf-8') as f:
        return f.read().splitlines()[1:]


def listing(folder):
    """{name: (size, mtime_ns)} of a folder's files but its lock, which names the last process that held it."""
    return {e.name: (e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder) if e.name != '.lock'}


def load(path):
    """A checkpoint as the scripts load it."""
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_one_line_error(proc):
    """A failed run: non-zero exit, one line on stderr, no traceback."""
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert 'Traceback' not in proc.stderr and 'error' in lines[0]
    return lines[0]


@pytest.mark.parametrize('script', SCRIPTS)
def test_train_resume_evaluate(script, data_root, tmp_path, capsys):
    folder = tmp_path / 'run'
    run_main(script, FAST + data_flags(script, data_root) + ['-c', str(folder)])
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar', 'log.txt', 'log.png'):
        assert (folder / name).is_file(), name
    assert len(log_rows(folder)) == 1
    ckpt = load(folder / 'checkpoint.pth.tar')
    assert ckpt['epoch'] == 1 and ckpt['best_acc'] == ckpt['acc']
    assert not any(k.startswith('module.') for k in ckpt['state_dict'])
    # The checkpoint rebuilds its own network.
    build_model(ckpt['arch'], **ckpt['model_args']).load_state_dict(ckpt['state_dict'])

    # Resuming without -c continues in the checkpoint's folder, with the flags it was trained with.
    run_main(script, ['--resume', str(folder / 'checkpoint.pth.tar'), '--epochs', '2'])
    assert len(log_rows(folder)) == 2
    ckpt = load(folder / 'checkpoint.pth.tar')
    assert ckpt['epoch'] == 2 and ckpt['args']['time_step'] == 2

    before = listing(folder)
    capsys.readouterr()
    result = run_main(script, ['-e', '--resume', str(folder / 'checkpoint.pth.tar')])
    out = capsys.readouterr().out
    assert re.search(r'Test Loss: \S+  Test Acc: (\S+)', out).group(1) == f"{ckpt['acc']:.2f}"
    assert result['acc'] == ckpt['acc']
    assert listing(folder) == before


def test_startup_names_neuron_and_device(data_root, tmp_path, capsys):
    run_main('fashion_mlp', FAST + data_flags('fashion_mlp', data_root) + ['-c', str(tmp_path / 'a')])
    out = capsys.readouterr().out
    assert 'Neuron: LIF (leaky=0.95)' in out and 'Device: ' in out
    run_main('fashion_mlp', FAST + data_flags('fashion_mlp', data_root) + ['-c', str(tmp_path / 'b'),
                                                                          '--leaky', '1', '--amp'])
    assert 'Neuron: IF' in capsys.readouterr().out
    assert load(tmp_path / 'b' / 'checkpoint.pth.tar')['model_args']['leaky'] == 1.0


def test_digits_needs_no_files(tmp_path):
    run_main('fashion_mlp', FAST + ['-d', 'digits', '--path', str(tmp_path / 'none'), '-c', str(tmp_path / 'run'),
                                    '--train-batch', '128', '--test-batch', '450'])
    assert len(log_rows(tmp_path / 'run')) == 1


def test_new_run_refuses_a_used_folder(data_root, tmp_path, capsys):
    folder = tmp_path / 'run'
    flags = FAST + data_flags('fashion_mlp', data_root) + ['-c', str(folder)]
    run_main('fashion_mlp', flags)
    before = listing(folder)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main('fashion_mlp', flags)
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(folder) in err and f'--resume {folder / "checkpoint.pth.tar"}' in err and '-c' in err
    assert listing(folder) == before


@pytest.mark.parametrize('flags, flag', [
    (['--time_step', '0'], '--time_step'), (['--vth', '0'], '--vth'), (['--lr', '-1'], '--lr'),
    (['--lr', 'nan'], '--lr'), (['--train-batch', '0'], '--train-batch'), (['--test-batch', '0'], '--test-batch'),
    (['--threshold', '0'], '--threshold'), (['--epochs', '0'], '--epochs'), (['--drop', '1'], '--drop'),
    (['--drop', '-0.1'], '--drop'), (['-d', 'cifar10'], '--dataset'), (['--solver', 'newton'], '--solver'),
    (['--optimizer', 'RMSprop'], '--optimizer'), (['--schedule', '30', '20'], '--schedule'),
    (['--schedule', '0', '10'], '--schedule'), (['--gpu-id', 'x'], '--gpu-id'), (['-e'], '--evaluate'),
    (['--start-epoch', '5', '--epochs', '5'], '--start-epoch'),
])
def test_bad_flags_are_one_line(flags, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        run_main('mnist_conv', flags)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith(f'mnist_conv.py: error: {flag}: ')


def test_leaky_outside_unit_interval_means_if():
    for value in ('0', '1', '1.5', '-2'):
        args = build_parser('mnist_conv').parse_args(['--leaky', value])
        assert neuron_line(args.leaky) == 'Neuron: IF'


def test_subprocess_errors_are_one_line(data_root, tmp_path):
    line = assert_one_line_error(run_script('mnist_conv', '--lr', '0'))
    assert line.startswith('mnist_conv.py: error: --lr: ')
    # N-MNIST cannot be downloaded, so this fails the same way online and offline.
    line = assert_one_line_error(run_script('nmnist_conv', '--path', tmp_path / 'empty', '-j', '0',
                                            '-c', tmp_path / 'run'))
    assert 'N-MNIST' in line and not (tmp_path / 'run').exists()
    line = assert_one_line_error(run_script('mnist_conv', '--resume', tmp_path / 'missing.pth.tar'))
    assert 'missing.pth.tar' in line
    # A Fashion-MNIST checkpoint handed to the MNIST script.
    model = build_model('fashion_mlp')
    save_checkpoint({'state_dict': model.state_dict(), 'arch': 'fashion_mlp', 'acc': 0.0,
                     'model_args': {'num_classes': 10}}, False, str(tmp_path))
    line = assert_one_line_error(run_script('mnist_conv', '-e', '--resume', tmp_path / 'checkpoint.pth.tar',
                                            *data_flags('mnist_conv', data_root)))
    assert 'fashion_mlp' in line and 'mnist_conv' in line


def test_checkpoint_of_another_class_count_is_refused(data_root, tmp_path, capsys):
    model = build_model('alexnetf', num_classes=100, time_step=2)
    save_checkpoint({'state_dict': model.state_dict(), 'arch': 'alexnetf', 'acc': 0.0,
                     'model_args': {'num_classes': 100}}, False, str(tmp_path))
    with pytest.raises(SystemExit) as exc:
        run_main('cifar_alexnetf', FAST + ['-e', '--resume', str(tmp_path / 'checkpoint.pth.tar'), '-d', 'cifar10',
                                           *data_flags('cifar_alexnetf', data_root)])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'num_classes=100' in err and 'num_classes=10)' in err
