"""utils.analysis.sweep: test accuracy of a trained checkpoint at several T, and its JSON/CSV/PNG files."""
import csv
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader

import mnist_conv
from modules import build_model
from utils.data.datasets import digits_sets
from utils.checkpoint import load_checkpoint, normalize_state_dict
from utils.files import CheckpointError
from utils.analysis.sweep import sweep_accuracy, sweep_paths, sweep_prefix

# Every test here uses one mnist_conv run trained for an epoch on digits.
pytestmark = pytest.mark.slow

TRAINED_T = 4


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """(checkpoint dict, its path, the digits test loader) of mnist_conv trained one epoch on digits at T = 4."""
    folder = tmp_path_factory.mktemp('sweep_run')
    mnist_conv.main(['--dataset', 'digits', '-j', '0', '-t', str(TRAINED_T), '--threshold', '5',
                     '--train-batch', '64', '--epochs', '1', '--manualSeed', '0', '-c', str(folder)])
    path = os.path.join(folder, 'checkpoint.pth.tar')
    _, test_set = digits_sets()
    return load_checkpoint(path), path, DataLoader(test_set, batch_size=150)


def by_hand(ckpt, loader, time_step):
    """Top-1 accuracy (%) of the checkpoint's weights rebuilt at time_step, computed here independently."""
    model = build_model('mnist_conv', **{**ckpt['model_args'], 'time_step': time_step})
    model.load_state_dict(normalize_state_dict(ckpt['state_dict']))
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return 100.0 * correct / len(loader.dataset)


def test_sweep_evaluates_each_T_and_writes_three_files(trained, tmp_path):
    ckpt, path, loader = trained
    asked = []

    def loader_for(t):
        asked.append(t)
        return loader

    prefix = sweep_prefix(path, [1, TRAINED_T], folder=str(tmp_path))
    assert os.path.basename(prefix) == 'acc_checkpoint_sweepT1-4'
    rows = sweep_accuracy('mnist_conv', ckpt['model_args'], normalize_state_dict(ckpt['state_dict']), loader_for,
                          [1, TRAINED_T], 'cpu', prefix)
    assert asked == [1, TRAINED_T]
    assert [r['time_step'] for r in rows] == [1, TRAINED_T]
    assert all(r['samples'] == 450 for r in rows)
    # At the trained T the sweep repeats the training script's own test evaluation.
    assert rows[1]['acc'] == pytest.approx(ckpt['acc'], abs=1e-6)
    assert rows[0]['acc'] == pytest.approx(by_hand(ckpt, loader, 1), abs=1e-9)

    paths = sweep_paths(prefix)
    with open(paths['json']) as f:
        payload = json.load(f)
    # The script's default leak is 0.95: LIF.
    assert payload['rows'] == rows and payload['arch'] == 'mnist_conv' and payload['neuron'] == 'LIF'
    with open(paths['csv'], newline='') as f:
        table = list(csv.DictReader(f))
    assert [(int(r['time_step']), float(r['acc'])) for r in table] == [(r['time_step'], r['acc']) for r in rows]
    with open(paths['png'], 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths.values())


def test_existing_files_are_refused_before_evaluating_unless_overwrite(trained, tmp_path):
    ckpt, path, loader = trained
    prefix = str(tmp_path / 'acc')
    with open(prefix + '.csv', 'w') as f:
        f.write('keep me\n')
    asked = []
    state = normalize_state_dict(ckpt['state_dict'])
    with pytest.raises(CheckpointError, match='exists'):
        sweep_accuracy('mnist_conv', ckpt['model_args'], state, lambda t: asked.append(t) or loader, [2],
                       'cpu', prefix)
    assert asked == [] and open(prefix + '.csv').read() == 'keep me\n'
    assert not os.path.exists(prefix + '.json')
    sweep_accuracy('mnist_conv', ckpt['model_args'], state, lambda t: loader, [2], 'cpu', prefix, overwrite=True)
    assert open(prefix + '.csv').readline().startswith('time_step,')


@pytest.mark.parametrize('steps', [[], [0, 4], [4, 4]])
def test_bad_time_steps_are_refused(trained, tmp_path, steps):
    ckpt, _, loader = trained
    with pytest.raises(ValueError, match='time steps'):
        sweep_accuracy('mnist_conv', ckpt['model_args'], normalize_state_dict(ckpt['state_dict']),
                       lambda t: loader, steps, 'cpu', str(tmp_path / 'acc'))
    assert os.listdir(tmp_path) == []
