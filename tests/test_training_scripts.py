"""End to end: the five training scripts train, resume and evaluate on tiny data sets in the real on-disk formats.

Their refusals and faults are in tests/test_training_faults.py, the resume policy in tests/test_run_policy.py."""
import os
import re

import pytest

from modules import build_model
from tests import nmnist_fakes
from tests.conftest import BEST, CKPT, LOG, LOCK, fails, load, log_rows, run_main
from utils.checkpoint import PLOT_NAME, save_checkpoint

SCRIPTS = ('mnist_conv', 'fashion_mlp', 'nmnist_conv', 'cifar_alexnetf', 'cifar_cifarnetf')
# Tiny runs: two time steps, few solver iterations, one batch size everywhere.
FAST = ['-j', '0', '-t', '2', '--threshold', '3', '--train-batch', '16', '--test-batch', '32',
        '--manualSeed', '0', '--epochs', '1']


def data_flags(script, root):
    """--path for a script's data set."""
    return ['--path', root / 'nmnist' if script == 'nmnist_conv' else root]


def listing(folder):
    """{name: (size, mtime_ns)} of a folder's files but its lock, which names the last process that held it."""
    return {e.name: (e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder) if e.name != LOCK}


@pytest.mark.slow
@pytest.mark.parametrize('script', SCRIPTS)
def test_train_resume_evaluate(script, data_root, tmp_path, capsys):
    """One epoch writes the run's four files; --resume adds an epoch with the saved flags; -e reports the
    checkpoint's accuracy and changes no file."""
    folder = tmp_path / 'run'
    run_main(script, FAST + data_flags(script, data_root) + ['-c', folder])
    for name in (CKPT, BEST, LOG, PLOT_NAME):
        assert (folder / name).is_file(), name
    assert len(log_rows(folder)) == 1
    ckpt = load(folder / CKPT)
    assert ckpt['epoch'] == 1 and ckpt['best_acc'] == ckpt['acc']
    assert not any(k.startswith('module.') for k in ckpt['state_dict'])
    # The checkpoint rebuilds its own network.
    build_model(ckpt['arch'], **ckpt['model_args']).load_state_dict(ckpt['state_dict'])

    # Resuming without -c continues in the checkpoint's folder, with the flags it was trained with.
    run_main(script, ['--resume', folder / CKPT, '--epochs', '2'])
    assert len(log_rows(folder)) == 2
    ckpt = load(folder / CKPT)
    assert ckpt['epoch'] == 2 and ckpt['args']['time_step'] == 2

    before = listing(folder)
    capsys.readouterr()
    result = run_main(script, ['-e', '--resume', folder / CKPT])
    out = capsys.readouterr().out
    assert re.search(r'Test Loss: \S+  Test Acc: (\S+)', out).group(1) == f"{ckpt['acc']:.2f}"
    assert result['acc'] == ckpt['acc']
    assert listing(folder) == before


@pytest.mark.slow
def test_nmnist_conv_trains_on_the_raw_format(tmp_path, capsys):
    """nmnist_conv.py trains on the official raw layout (.bin events) too, as IF with its damped-iteration
    solver, and -e reproduces the recorded accuracy (the text layout is trained in test_train_resume_evaluate)."""
    data, folder = tmp_path / 'nmnist', tmp_path / 'run'
    nmnist_fakes.make_nmnist_tree(data, fmt='raw', per_class=2)
    run_main('nmnist_conv', FAST + ['--path', data, '--leaky', '1', '-c', folder, '--train-batch', '10'])
    assert 'Neuron: IF' in capsys.readouterr().out
    ckpt = load(folder / CKPT)
    assert ckpt['arch'] == 'nmnist_conv' and ckpt['model_args']['solver'] == 'iter'
    result = run_main('nmnist_conv', ['-e', '--resume', folder / CKPT, '--path', data, '-j', '0'])
    shown = re.search(r'Test Acc: (\S+)', capsys.readouterr().out).group(1)
    assert shown == f"{ckpt['acc']:.2f}" and result['acc'] == ckpt['acc']


@pytest.mark.slow
def test_digits_needs_no_files(tmp_path):
    """-d digits trains from scikit-learn's bundled set: no --path folder is read or made."""
    run_main('fashion_mlp', FAST + ['-d', 'digits', '--path', str(tmp_path / 'none'), '-c', tmp_path / 'run',
                                    '--train-batch', '128', '--test-batch', '450'])
    assert len(log_rows(tmp_path / 'run')) == 1 and not (tmp_path / 'none').exists()


def test_checkpoint_of_another_class_count_is_refused(data_root, tmp_path, capsys):
    """A CIFAR-100 checkpoint evaluated on CIFAR-10: one line naming both class counts, exit 1."""
    model = build_model('alexnetf', num_classes=100, time_step=2)
    save_checkpoint({'state_dict': model.state_dict(), 'arch': 'alexnetf', 'acc': 0.0,
                     'model_args': {'num_classes': 100}}, False, str(tmp_path))
    code, line = fails('cifar_alexnetf', FAST + ['-e', '--resume', tmp_path / CKPT, '-d', 'cifar10',
                                                 *data_flags('cifar_alexnetf', data_root)], capsys)
    assert code == 1 and 'num_classes=100' in line and 'num_classes=10)' in line
