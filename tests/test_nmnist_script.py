"""End to end: nmnist_conv.py trains and evaluates on N-MNIST in either on-disk format."""
import re

import pytest
import torch

import nmnist_conv
from tests import nmnist_fakes
from utils.data.nmnist import NMNIST

FAST = ['-j', '0', '-t', '3', '--threshold', '3', '--train-batch', '10', '--test-batch', '20',
        '--manualSeed', '0', '--epochs', '1']


@pytest.mark.parametrize('fmt', ['text', 'raw'])
@pytest.mark.parametrize('leaky', ['0.95', '1'])
def test_train_then_evaluate(fmt, leaky, tmp_path, capsys):
    """One epoch trains on the format found under --path, IF or LIF, and -e reproduces the recorded accuracy."""
    data = tmp_path / 'nmnist'
    nmnist_fakes.make_nmnist_tree(data, fmt=fmt, per_class=2)
    folder = tmp_path / 'run'
    nmnist_conv.main(FAST + ['--path', str(data), '--leaky', leaky, '-c', str(folder)])
    out = capsys.readouterr().out
    assert ('Neuron: IF' if leaky == '1' else 'Neuron: LIF (leaky=0.95)') in out
    ckpt = torch.load(folder / 'checkpoint.pth.tar', map_location='cpu', weights_only=True)
    assert ckpt['arch'] == 'nmnist_conv' and ckpt['model_args']['solver'] == 'iter'
    assert torch.isfinite(torch.stack([p.float().sum() for p in ckpt['state_dict'].values()])).all()

    result = nmnist_conv.main(['-e', '--resume', str(folder / 'checkpoint.pth.tar'), '--path', str(data), '-j', '0'])
    shown = re.search(r'Test Acc: (\S+)', capsys.readouterr().out).group(1)
    assert shown == f"{ckpt['acc']:.2f}" and result['acc'] == ckpt['acc']


def test_both_formats_give_the_same_batches(tmp_path):
    """The text tree converted from a raw tree yields the same frames and labels, sample by sample."""
    raw, text = tmp_path / 'raw', tmp_path / 'text'
    nmnist_fakes.make_nmnist_tree(raw, fmt='raw', per_class=1, seed=3)
    nmnist_fakes.make_nmnist_tree(text, fmt='text', per_class=1, seed=3)
    for train in (True, False):
        a, b = NMNIST(str(raw), train, time_step=20), NMNIST(str(text), train, time_step=20)
        assert (a.format, b.format) == ('raw', 'text') and len(a) == len(b) == 10
        for i in range(len(a)):
            (xa, ya), (xb, yb) = a[i], b[i]
            assert ya == yb and torch.equal(xa, xb) and xa.shape == (2, 34, 34, 20)
