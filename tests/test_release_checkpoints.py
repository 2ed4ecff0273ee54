"""Checkpoints in the layout of the paper's release load wherever a checkpoint is accepted.

The release saved its nets from GPUs under nn.DataParallel. `release_checkpoint` rebuilds that layout from one
of this project's models: `module.` prefix, the `snn_func.*` and
`snn_ide_conv|fc.snn_func.*` aliases, the stale `snn_func_copy.*` copies (with
other values, and a plain `weight`), the feedback weight as
weight_g/_w/_u/_v, an SGD optimizer state, and no arch/model_args.
CUDA tensors cannot be created here; `save_as_cuda` writes CPU tensors with
the storage location tag 'cuda:0', so the file is read exactly like one saved
from a GPU (it fails to load without map_location on a CPU-only machine).
"""
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.serialization

from tests.conftest import REPO
import get_rate
import get_rate_cifar_alexnetf
import mnist_conv
from modules import ARCHITECTURES, build_model
from tools.fakedata import make_cifar, make_mnist
from utils.data.datasets import get_datasets
from utils.checkpoint import load_checkpoint, load_into_model
from utils.files import CheckpointError


FEEDBACK = 'snn.feedback.linear.parametrizations.weight.'
FEEDBACK_RELEASE = {'original': 'weight_w', '0.g': 'weight_g', '0.u': 'weight_u', '0.v': 'weight_v'}

# Entry counts per key prefix, as read from the released files (model_best.pth.tar of each net).
RELEASE_GROUPS = {
    'mnist_conv': {'network_x': 7, 'network_s': 4, 'snn_func': 11, 'snn_func_copy': 8,
                   'snn_ide_conv.snn_func': 11, 'snn_ide_conv.snn_func_copy': 8, 'classifier': 2},
    'fashion_mlp': {'network_x': 7, 'network_s': 4, 'snn_func': 11, 'snn_func_copy': 8,
                    'snn_ide_fc.snn_func': 11, 'snn_ide_fc.snn_func_copy': 8, 'classifier': 2},
    'alexnetf': {'network_x': 7, **{f'network_s{i}': 7 for i in range(1, 5)}, 'network_s5': 4, 'snn_func': 39,
                 'snn_func_copy': 36, 'snn_ide_conv.snn_func': 39, 'snn_ide_conv.snn_func_copy': 36,
                 'classifier': 2},
}
RELEASE_GROUPS['nmnist_conv'] = RELEASE_GROUPS['mnist_conv']
RELEASE_GROUPS['cifarnetf'] = RELEASE_GROUPS['alexnetf']


def lively_(model, seed=0, gain=0.9):
    """Set BN statistics/affine and the feedback scale so that every layer fires (in place)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                shape = module.bias.shape
                module.bias.copy_(0.2 + 1.5 * torch.rand(shape, generator=gen))
                module.weight.copy_(0.5 + torch.rand(shape, generator=gen))
                module.running_mean.copy_(0.2 * torch.randn(shape, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(shape, generator=gen))
                module.num_batches_tracked.fill_(17)
        model.snn.feedback.spectral.g.fill_(gain)
        # The power-iteration vectors move away from their SVD start, as they do in training.
        for _ in range(2):
            model.snn.feedback.power_iteration()
    return model


def _release_name(key, kind, n_layers):
    """The canonical release key of one of this project's state_dict keys."""
    if key.startswith('classifier.'):
        return key
    op = 'fc' if kind == 'fc' else 'conv'
    match = re.match(r'snn\.input_layer\.(linear|bn)\.(.*)', key)
    if match:
        return f"network_x.{op if match.group(1) == 'linear' else 'bn'}.{match.group(2)}"
    match = re.match(r'snn\.layers\.(\d+)\.(linear|bn)\.(.*)', key)
    if match:
        index, part, name = match.groups()
        return f"network_s{int(index) + 1}.{'conv' if part == 'linear' else 'bn'}.{name}"
    if key.startswith(FEEDBACK):
        layer = f'network_s{n_layers}' if n_layers > 1 else 'network_s'
        return f"{layer}.{'convT' if n_layers > 1 else op}.{FEEDBACK_RELEASE[key[len(FEEDBACK):]]}"
    raise AssertionError(f'no release name for {key}')


def release_state_dict(model):
    """model's weights as the paper's DataParallel scripts saved them (aliases, stale copies, module.)."""
    kind, n_layers = model.arch.kind, len(model.state_shapes)
    outer = 'snn_ide_fc' if kind == 'fc' else 'snn_ide_conv'
    sd = {}
    for key, value in model.state_dict().items():
        name = _release_name(key, kind, n_layers)
        sd[name] = value.clone()
        if name.startswith('classifier.'):
            continue
        alias = re.sub(r'^network_s(\d+)\.', lambda m: f'network_s_list.{int(m.group(1)) - 1}.', name)
        # The aliases are the same modules registered again: one tensor, several names.
        sd[f'snn_func.{alias}'] = sd[f'{outer}.snn_func.{alias}'] = sd[name]
        if not alias.endswith(('weight_g', 'weight_u', 'weight_v')):
            # The frozen copy used in the release's backward: a plain weight, other numbers.
            stale = alias.replace('weight_w', 'weight')
            sd[f'snn_func_copy.{stale}'] = value + 100
            sd[f'{outer}.snn_func_copy.{stale}'] = value - 100
    return {f'module.{k}': v for k, v in sd.items()}


def release_checkpoint(model, epoch=99, acc=91.5):
    """A checkpoint dict as the paper's scripts saved it: no arch/model_args, an SGD state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer.step()  # creates the momentum buffers; weights are put back below
    model.load_state_dict(state)
    for p in model.parameters():
        p.grad = None
    return {'epoch': epoch, 'state_dict': release_state_dict(model), 'acc': acc, 'best_acc': acc,
            'optimizer': optimizer.state_dict()}


def save_as_cuda(obj, path, monkeypatch):
    """torch.save obj with every storage tagged 'cuda:0', as a checkpoint saved from a GPU is."""
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, 'location_tag', lambda storage: 'cuda:0')
        torch.save(obj, path)


def sample_input(name, batch=2, time_step=3, seed=1):
    """An input batch for network name (spike frames for N-MNIST)."""
    arch = ARCHITECTURES[name]
    gen = torch.Generator().manual_seed(seed)
    if arch.spike_input:
        return (torch.rand(batch, *arch.input_shape, time_step, generator=gen) < 0.3).float()
    return torch.randn(batch, *arch.input_shape, generator=gen)


@pytest.mark.parametrize('name', sorted(ARCHITECTURES))
def test_release_layout_has_the_documented_entries(name):
    sd = release_state_dict(build_model(name))
    groups = Counter(re.match(r'module\.((?:snn_ide_\w+\.)?[a-z_]+\d*)\.', k).group(1) for k in sd)
    assert dict(groups) == RELEASE_GROUPS[name]
    assert len(sd) == sum(RELEASE_GROUPS[name].values())


@pytest.mark.parametrize('name,num_classes', [('mnist_conv', 10), ('fashion_mlp', 10), ('nmnist_conv', 10),
                                              ('alexnetf', 10), ('cifarnetf', 100)])
def test_release_checkpoint_gives_identical_logits(tmp_path, monkeypatch, name, num_classes):
    kwargs = dict(num_classes=num_classes, time_step=3, leaky=0.95)
    torch.manual_seed(0)
    original = lively_(build_model(name, **kwargs)).eval()
    path = tmp_path / 'model_best.pth.tar'
    save_as_cuda(release_checkpoint(original), path, monkeypatch)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='CUDA'):
            torch.load(path, weights_only=True)

    torch.manual_seed(1)
    fresh = build_model(name, **kwargs)
    ckpt = load_into_model(fresh, path, map_location='cpu', expected_arch=name,
                           expected_args={'num_classes': num_classes})
    assert ckpt['epoch'] == 99 and ckpt['best_acc'] == 91.5 and 'momentum_buffer' in ckpt['optimizer']['state'][0]
    fresh.eval()
    x = sample_input(name)
    with torch.no_grad():
        assert torch.equal(fresh(x), original(x))
        rates, expected = fresh.get_all_rate(x), original.get_all_rate(x)
    assert all(torch.equal(a, b) for a, b in zip(rates, expected))
    assert min(r.mean().item() for r in rates) > 0.01  # every layer fires: the comparison means something


def test_released_nmnist_padding_is_refused_in_one_line():
    # The release's N-MNIST net had 16x16 hidden maps; the paper's table (ours) has 17x17.
    released = build_model('nmnist_conv')
    sd = release_state_dict(released)
    sd['module.classifier.weight'] = torch.zeros(10, 64 * 16 * 16)
    with pytest.raises(CheckpointError) as excinfo:
        load_into_model(build_model('nmnist_conv'), {'state_dict': sd}, expected_arch='nmnist_conv')
    message = str(excinfo.value)
    assert '\n' not in message
    assert message == ('checkpoint does not fit this network: classifier.weight is (10, 16384) in the checkpoint, '
                       '(10, 18496) here (another input size or padding?)')


# ---------------------------------------------------------------- through the scripts

def direct_eval(model, dataset):
    """(loss, top-1 %, per-layer mean rates) of model on a whole data set, from model(x) and get_all_rate."""
    model.eval()
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(x)
        rates = [r.double().mean().item() for r in model.get_all_rate(x)]
    loss = torch.nn.functional.cross_entropy(logits.double(), y).item()
    return loss, 100.0 * (logits.argmax(1) == y).double().mean().item(), rates


@pytest.mark.slow
def test_release_file_in_the_evaluation_and_rate_scripts(tmp_path, monkeypatch, capsys):
    make_cifar(tmp_path / 'data', n_train=4, n_test=8, num_classes=10)
    torch.manual_seed(0)
    original = lively_(build_model('alexnetf', time_step=2, leaky=0.99))
    path = tmp_path / 'released' / 'model_best.pth.tar'
    path.parent.mkdir()
    save_as_cuda(release_checkpoint(original), path, monkeypatch)
    _, test_set, _ = get_datasets('cifar10', str(tmp_path / 'data'))
    loss, acc, rates = direct_eval(original, test_set)

    flags = ['--path', str(tmp_path / 'data'), '-t', '2', '--leaky', '0.99', '--test-batch', '4', '-j', '0']
    done = subprocess.run([sys.executable, 'cifar_alexnetf.py', '--evaluate', '--resume', str(path)] + flags,
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
    assert done.returncode == 0, done.stderr
    evaluated = re.search(r'Test Loss: (\S+)  Test Acc: (\S+)', done.stdout).groups()
    assert float(evaluated[0]) == pytest.approx(loss, abs=1e-4) and evaluated[1] == f'{acc:.2f}'

    # No model_args in the file: the rate script builds the net from its flags.
    assert get_rate_cifar_alexnetf.main(['--resume', str(path)] + flags) == 0
    printed = re.search(r' Test Loss:  (\S+), Test Acc:  (\S+)', capsys.readouterr().out).groups()
    assert float(printed[0]) == pytest.approx(loss, rel=1e-6) and printed[1] == f'{acc:.2f}'
    saved = json.loads((path.parent / 'rates_model_best_T2.json').read_text())
    assert [layer['rate'] for layer in saved['layers']] == pytest.approx(rates, abs=1e-9)
    assert min(rates) > 0.01


@pytest.mark.slow
def test_model_best_written_by_training_loads_everywhere(tmp_path, monkeypatch):
    make_mnist(tmp_path / 'data', n_train=16, n_test=8)
    run = tmp_path / 'run'
    common = ['--path', str(tmp_path / 'data'), '--test-batch', '8', '-j', '0']
    mnist_conv.main(common + ['-c', str(run), '--epochs', '1', '--train-batch', '8', '-t', '3',
                              '--threshold', '3', '--manualSeed', '0'])
    path = run / 'model_best.pth.tar'
    ckpt = load_checkpoint(path)
    trained = build_model('mnist_conv', **ckpt['model_args'])
    load_into_model(trained, path, expected_arch='mnist_conv', expected_args={'num_classes': 10})
    trained.eval()

    # Its weights in the release layout, and in DistributedDataParallel's, give the same network.
    released = tmp_path / 'released.pth.tar'
    save_as_cuda(release_checkpoint(trained), released, monkeypatch)
    ddp = {'arch': 'mnist_conv', 'state_dict': {f'module.{k}': v for k, v in trained.state_dict().items()}}
    x = sample_input('mnist_conv', batch=4)
    for source in (released, ddp):
        fresh = build_model('mnist_conv', **ckpt['model_args'])
        load_into_model(fresh, source, map_location='cpu', expected_arch='mnist_conv')
        fresh.eval()
        with torch.no_grad():
            assert torch.equal(fresh(x), trained(x))
            assert torch.equal(fresh.get_all_rate(x)[0], trained.get_all_rate(x)[0])
    with torch.no_grad():
        assert trained.get_all_rate(x)[0].mean() > 0.01

    # The accuracy recorded at training time is what --evaluate and the rate script find.
    assert mnist_conv.main(common + ['--evaluate', '--resume', str(path)])['acc'] == pytest.approx(ckpt['acc'])
    assert get_rate.main(['--arch', 'mnist_conv', '--resume', str(path)] + common) == 0
    saved = json.loads((run / 'rates_model_best_T3.json').read_text())
    assert saved['acc'] == pytest.approx(ckpt['acc']) and saved['time_step'] == 3
