"""The checkpoint file (utils/checkpoint.py): save and load, the paper's layout read as ours, fitting a network,
the random-number state."""
import argparse
import os
import random
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from utils.checkpoint import (check_compatible, load_checkpoint, load_into_model, normalize_state_dict, rng_state,
                              save_checkpoint, set_rng_state)
from utils.files import CheckpointError
from tests.conftest import leftovers, load_checkpoint_raw, one_line_error  # noqa: F401

FB = 'snn.feedback.linear.parametrizations.weight.'


def bn_shapes(channels):
    """BatchNorm entries and their shapes."""
    c = channels
    return {'weight': (c,), 'bias': (c,), 'running_mean': (c,), 'running_var': (c,),
            'num_batches_tracked': ()}


# ---------------------------------------------------------------- checkpoints

def test_save_checkpoint_best_copy(tmp_path):
    save_checkpoint({'state_dict': {'w': torch.ones(2)}, 'epoch': 1}, True, tmp_path)
    save_checkpoint({'state_dict': {'w': torch.zeros(2)}, 'epoch': 2}, False, tmp_path)
    assert load_checkpoint(tmp_path / 'checkpoint.pth.tar')['epoch'] == 2
    best = load_checkpoint(tmp_path / 'model_best.pth.tar')
    assert best['epoch'] == 1 and torch.equal(best['state_dict']['w'], torch.ones(2))
    assert leftovers(tmp_path) == []


def test_checkpoint_with_optimizer_scheduler_and_rng_round_trips(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [30, 60])
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    state = {'epoch': 3, 'state_dict': model.state_dict(), 'acc': 50.0, 'best_acc': 60.0,
             'optimizer': opt.state_dict(), 'scheduler': sched.state_dict(), 'rng': rng_state(),
             'arch': 'fashion_mlp', 'model_args': {'hidden': 400, 'sizes': (1, 2)}}
    path = save_checkpoint(state, False, tmp_path)
    loaded = load_checkpoint(path)
    assert loaded['model_args'] == {'hidden': 400, 'sizes': (1, 2)}
    torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9).load_state_dict(loaded['optimizer'])


def test_load_missing_checkpoint(tmp_path):
    path = tmp_path / 'nothing.pth.tar'
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    assert one_line_error(excinfo) == f'no checkpoint found at {path}'


def write_truncated(path):
    """A real checkpoint cut in half, as a full disk or a killed copy leaves it."""
    torch.save({'state_dict': {'w': torch.arange(5000.0)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def write_legacy_truncated(path):
    """The pre-1.6 (non-zip) torch format cut in half."""
    torch.save({'state_dict': {'w': torch.arange(5000.0)}}, path,
               _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize('make', [
    write_truncated,
    write_legacy_truncated,
    lambda path: path.write_text('epoch 3, acc 91.2\n'),
    lambda path: path.write_bytes(b''),
])
def test_load_refuses_unreadable_file(tmp_path, make):
    path = tmp_path / 'checkpoint.pth.tar'
    make(path)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    message = one_line_error(excinfo)
    assert message.startswith(f'{path} is not a readable checkpoint (truncated or not a torch file): ')
    assert len(message) < len(str(path)) + 250


def test_load_refuses_directory_and_non_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match='cannot read .*Is a directory'):
        load_checkpoint(tmp_path)
    torch.save({'epoch': 3, 'acc': 1.0}, tmp_path / 'a.pth')
    with pytest.raises(CheckpointError, match=r"has no 'state_dict' entry \(it has: epoch, acc\)"):
        load_checkpoint(tmp_path / 'a.pth')
    torch.save(torch.ones(2), tmp_path / 'b.pth')
    with pytest.raises(CheckpointError, match='holds a Tensor'):
        load_checkpoint(tmp_path / 'b.pth')
    torch.save({'state_dict': {}, 'args': argparse.Namespace(lr=1)}, tmp_path / 'c.pth')
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(tmp_path / 'c.pth')
    assert 'holds an object of type argparse.Namespace, which weights_only loading refuses' in one_line_error(excinfo)


def test_load_legacy_format(tmp_path):
    torch.save({'state_dict': {'w': torch.ones(3)}}, tmp_path / 'old.pth',
               _use_new_zipfile_serialization=False)
    assert torch.equal(load_checkpoint(tmp_path / 'old.pth')['state_dict']['w'], torch.ones(3))


# ---------------------------------------------------------------- the paper's layout

MNIST_CANONICAL = {
    'network_x.conv.weight': (64, 1, 5, 5), 'network_x.conv.bias': (64,),
    **{f'network_x.bn.{k}': s for k, s in bn_shapes(64).items()},
    'network_s.conv.weight_g': (), 'network_s.conv.weight_w': (64, 64, 5, 5),
    'network_s.conv.weight_u': (64,), 'network_s.conv.weight_v': (1600,),
    'classifier.weight': (10, 12544), 'classifier.bias': (10,),
}
MNIST_PROJECT = {
    'network_x.conv.weight': 'snn.input_layer.linear.weight',
    'network_x.conv.bias': 'snn.input_layer.linear.bias',
    **{f'network_x.bn.{k}': f'snn.input_layer.bn.{k}' for k in bn_shapes(1)},
    'network_s.conv.weight_w': FB + 'original', 'network_s.conv.weight_g': FB + '0.g',
    'network_s.conv.weight_u': FB + '0.u', 'network_s.conv.weight_v': FB + '0.v',
    'classifier.weight': 'classifier.weight', 'classifier.bias': 'classifier.bias',
}
FASHION_CANONICAL = {
    'network_x.fc.weight': (400, 784), 'network_x.fc.bias': (400,),
    **{f'network_x.bn.{k}': s for k, s in bn_shapes(400).items()},
    'network_s.fc.weight_g': (), 'network_s.fc.weight_w': (400, 400),
    'network_s.fc.weight_u': (400,), 'network_s.fc.weight_v': (400,),
    'classifier.weight': (10, 400), 'classifier.bias': (10,),
}
FASHION_PROJECT = {k.replace('.conv.', '.fc.'): v for k, v in MNIST_PROJECT.items()}

ALEX_WIDTHS = [96, 256, 384, 384, 256]
ALEX_CANONICAL = {
    'network_x.conv.weight': (96, 3, 3, 3), 'network_x.conv.bias': (96,),
    **{f'network_x.bn.{k}': s for k, s in bn_shapes(96).items()},
}
ALEX_PROJECT = {'network_x.conv.weight': 'snn.input_layer.linear.weight',
                'network_x.conv.bias': 'snn.input_layer.linear.bias',
                **{f'network_x.bn.{k}': f'snn.input_layer.bn.{k}' for k in bn_shapes(1)}}
for _i in range(1, 5):
    _cin, _cout = ALEX_WIDTHS[_i - 1], ALEX_WIDTHS[_i]
    ALEX_CANONICAL[f'network_s{_i}.conv.weight'] = (_cout, _cin, 3, 3)
    ALEX_CANONICAL[f'network_s{_i}.conv.bias'] = (_cout,)
    ALEX_PROJECT[f'network_s{_i}.conv.weight'] = f'snn.layers.{_i - 1}.linear.weight'
    ALEX_PROJECT[f'network_s{_i}.conv.bias'] = f'snn.layers.{_i - 1}.linear.bias'
    for _k, _s in bn_shapes(_cout).items():
        ALEX_CANONICAL[f'network_s{_i}.bn.{_k}'] = _s
        ALEX_PROJECT[f'network_s{_i}.bn.{_k}'] = f'snn.layers.{_i - 1}.bn.{_k}'
ALEX_CANONICAL.update({'network_s5.convT.weight_g': (), 'network_s5.convT.weight_w': (256, 96, 3, 3),
                       'network_s5.convT.weight_u': (256,), 'network_s5.convT.weight_v': (864,),
                       'classifier.weight': (10, 16384), 'classifier.bias': (10,)})
ALEX_PROJECT.update({'network_s5.convT.weight_w': FB + 'original', 'network_s5.convT.weight_g': FB + '0.g',
                     'network_s5.convT.weight_u': FB + '0.u', 'network_s5.convT.weight_v': FB + '0.v',
                     'classifier.weight': 'classifier.weight', 'classifier.bias': 'classifier.bias'})

PAPER_NETS = {  # name: (canonical shapes, project keys, outer wrapper, multi-layer, entry count)
    'mnist_conv': (MNIST_CANONICAL, MNIST_PROJECT, 'snn_ide_conv', False, 51),
    'fashionmnist_fc': (FASHION_CANONICAL, FASHION_PROJECT, 'snn_ide_fc', False, 51),
    'cifar_alexnetf': (ALEX_CANONICAL, ALEX_PROJECT, 'snn_ide_conv', True, 191),
}


def paper_state_dict(canonical_shapes, outer, multi, seed=0):
    """A state_dict as the paper's DataParallel scripts saved it, and its canonical tensors."""
    gen = torch.Generator().manual_seed(seed)
    canonical = {}
    for key, shape in canonical_shapes.items():
        if key.endswith('num_batches_tracked'):
            canonical[key] = torch.tensor(7 + seed)
        else:
            canonical[key] = torch.randn(shape, generator=gen)
    sd = dict(canonical)
    for key, value in canonical.items():
        if key.startswith('classifier.'):
            continue
        alias = re.sub(r'^network_s(\d+)\.', lambda m: f'network_s_list.{int(m.group(1)) - 1}.', key) \
            if multi else key
        sd[f'snn_func.{alias}'] = value
        sd[f'{outer}.snn_func.{alias}'] = value
        if alias.endswith(('weight_g', 'weight_u', 'weight_v')):
            continue
        # The frozen copy holds different numbers (and a plain weight), which must never be used.
        stale = alias.replace('weight_w', 'weight')
        sd[f'snn_func_copy.{stale}'] = value + 100
        sd[f'{outer}.snn_func_copy.{stale}'] = value - 100
    return {f'module.{k}': v for k, v in sd.items()}, canonical


@pytest.mark.parametrize('name', list(PAPER_NETS))
def test_normalize_paper_layout(name):
    shapes, project, outer, multi, count = PAPER_NETS[name]
    sd, canonical = paper_state_dict(shapes, outer, multi)
    assert len(sd) == count
    before = dict(sd)
    out = normalize_state_dict(sd)
    assert sd == before
    assert set(out) == set(project.values())
    for paper_key, project_key in project.items():
        assert torch.equal(out[project_key], canonical[paper_key]), paper_key


def test_normalize_alias_fills_a_missing_canonical_entry():
    sd, canonical = paper_state_dict(MNIST_CANONICAL, 'snn_ide_conv', False)
    del sd['module.network_x.bn.weight']
    out = normalize_state_dict(sd)
    assert torch.equal(out['snn.input_layer.bn.weight'], canonical['network_x.bn.weight'])


def test_normalize_refuses_unknown_paper_entry():
    sd, _ = paper_state_dict(MNIST_CANONICAL, 'snn_ide_conv', False)
    sd['module.network_s.bn.weight'] = torch.ones(64)
    with pytest.raises(CheckpointError, match='network_s.bn.weight has no counterpart'):
        normalize_state_dict(sd)


def test_normalize_own_layout_strips_ddp_prefix():
    own = {'snn.input_layer.linear.weight': torch.ones(2), 'classifier.bias': torch.zeros(1)}
    out = normalize_state_dict({f'module.{k}': v for k, v in own.items()})
    assert out.keys() == own.keys()
    assert normalize_state_dict(own).keys() == own.keys()


# ---------------------------------------------------------------- fitting a network

class _Scale(nn.Module):
    """Stand-in for the feedback reparameterisation: a scalar g and power-iteration buffers."""

    def __init__(self, weight):
        super().__init__()
        self.g = nn.Parameter(torch.tensor(1.0))
        self.register_buffer('u', torch.zeros(weight.shape[0]))
        self.register_buffer('v', torch.zeros(weight[0].numel()))

    def forward(self, weight):
        return self.g * weight


class _Layer(nn.Module):
    def __init__(self, linear, channels):
        super().__init__()
        self.linear = linear
        self.bn = nn.BatchNorm2d(channels)


class _Feedback(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Conv2d(64, 64, 5, padding=2, bias=False)
        parametrize.register_parametrization(self.linear, 'weight', _Scale(self.linear.weight))


class _SNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layer = _Layer(nn.Conv2d(1, 64, 5, stride=2, padding=2), 64)
        self.feedback = _Feedback()


class TinyMnistNet(nn.Module):
    """Same state_dict keys and shapes as this project's mnist_conv network."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.snn = _SNN()
        self.classifier = nn.Linear(12544, num_classes)


class _Wrapped(nn.Module):
    """Stands in for DistributedDataParallel: the network is model.module."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_tiny_net_has_the_project_keys():
    assert set(TinyMnistNet().state_dict()) == set(MNIST_PROJECT.values())


def test_load_paper_checkpoint_into_network(tmp_path):
    sd, canonical = paper_state_dict(MNIST_CANONICAL, 'snn_ide_conv', False)
    torch.save({'epoch': 99, 'state_dict': sd, 'acc': 99.5, 'best_acc': 99.6}, tmp_path / 'paper.pth')
    model = TinyMnistNet()
    ckpt = load_into_model(_Wrapped(model), tmp_path / 'paper.pth',
                           expected_arch='mnist_conv', expected_args={'num_classes': 10})
    assert ckpt['best_acc'] == 99.6
    loaded = model.state_dict()
    for paper_key, project_key in MNIST_PROJECT.items():
        assert torch.equal(loaded[project_key], canonical[paper_key]), paper_key


def test_load_own_ddp_checkpoint_from_dict():
    source = TinyMnistNet()
    nn.init.constant_(source.classifier.bias, 3.0)
    ckpt = {'state_dict': _Wrapped(source).state_dict(), 'arch': 'mnist_conv'}
    model = TinyMnistNet()
    load_into_model(model, ckpt, expected_arch='mnist_conv')
    assert torch.equal(model.classifier.bias, torch.full((10,), 3.0))


def test_wrong_class_count_is_refused_and_weights_untouched():
    model = TinyMnistNet(num_classes=10)
    before = model.classifier.weight.clone()
    ckpt = {'state_dict': TinyMnistNet(num_classes=100).state_dict()}
    with pytest.raises(CheckpointError) as excinfo:
        load_into_model(model, ckpt)
    assert one_line_error(excinfo) == (
        'checkpoint does not fit this network: classifier.weight is (100, 12544) in the '
        'checkpoint, (10, 12544) here (another class count?)')
    assert torch.equal(model.classifier.weight, before)


def test_check_compatible_architecture_mismatch():
    sd, _ = paper_state_dict(ALEX_CANONICAL, 'snn_ide_conv', True)
    with pytest.raises(CheckpointError) as excinfo:
        check_compatible(TinyMnistNet().state_dict(), normalize_state_dict(sd))
    assert one_line_error(excinfo) == ("checkpoint does not fit this network: checkpoint has 5 "
                                       "spiking layers' keys, this network 1 — another architecture?")


def test_check_compatible_names_missing_and_unexpected_keys():
    model_sd = TinyMnistNet().state_dict()
    ckpt_sd = dict(model_sd)
    del ckpt_sd[FB + '0.u']
    ckpt_sd['classifier.extra'] = torch.ones(1)
    with pytest.raises(CheckpointError) as excinfo:
        check_compatible(model_sd, ckpt_sd)
    assert one_line_error(excinfo) == ('checkpoint does not fit this network: missing '
                                       f'{FB}0.u; unexpected classifier.extra')


def test_classifier_input_size_hint():
    model_sd = {'classifier.weight': torch.zeros(10, 18496)}
    with pytest.raises(CheckpointError, match=r'\(10, 16384\) in the checkpoint, \(10, 18496\) '
                                              r'here \(another input size or padding\?\)'):
        check_compatible(model_sd, {'classifier.weight': torch.zeros(10, 16384)})


def test_arch_arguments_mismatch_is_refused():
    ckpt = {'state_dict': TinyMnistNet().state_dict(), 'arch': 'cifar_alexnetf',
            'model_args': {'num_classes': 100, 'time_step': 30, 'schedule': (50, 75)}}
    with pytest.raises(CheckpointError) as excinfo:
        load_into_model(TinyMnistNet(), ckpt, expected_arch='cifar_alexnetf',
                        expected_args={'num_classes': 10, 'time_step': 30, 'schedule': [50, 75],
                                       'added_later': 1})
    assert one_line_error(excinfo) == ('checkpoint is for cifar_alexnetf (num_classes=100), '
                                       'this run builds cifar_alexnetf (num_classes=10)')
    with pytest.raises(CheckpointError, match='^checkpoint is for cifar_alexnetf, this run builds mnist_conv$'):
        load_into_model(TinyMnistNet(), ckpt, expected_arch='mnist_conv')


# ---------------------------------------------------------------- RNG state

def draws():
    """One draw from each generator, including the cached-Gaussian paths."""
    return (random.random(), random.gauss(0, 1), np.random.rand(2).tolist(),
            np.random.randn(3).tolist(), torch.rand(3).tolist())


def test_rng_state_round_trip():
    random.gauss(0, 1)
    np.random.randn(1)  # leaves a cached Gaussian in numpy's state
    state = rng_state()
    expected = draws()
    draws()
    set_rng_state(state)
    assert draws() == expected


def test_rng_state_through_checkpoint_without_cuda(tmp_path, monkeypatch):
    state = rng_state()
    state['cuda'] = [torch.zeros(16, dtype=torch.uint8)]  # as saved on a GPU machine
    expected = draws()
    save_checkpoint({'state_dict': {}, 'rng': state}, False, tmp_path)
    draws()
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    set_rng_state(load_checkpoint(tmp_path / 'checkpoint.pth.tar')['rng'])
    assert draws() == expected
