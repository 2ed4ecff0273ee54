"""Firing-rate statistics: hand-computed rates, the rate scripts end to end, their files and refusals."""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import REPO
import get_rate
from modules import ARCHITECTURES, NETS, build_model
from modules.layers import Connection, Feedback
from modules.snn import FeedbackSNN
from tools.fakedata import make_cifar, make_mnist
from tests.nmnist_fakes import make_nmnist_tree
from tests.test_release_checkpoints import lively_, release_checkpoint, sample_input
from utils.data.datasets import get_datasets
from utils.files import checkpoint_stem
from utils.analysis.rates import (LayerRate, RateStats, evaluate_rates, format_table, logits_and_rates,
                         output_paths, weighted_total)
from utils.analysis.sops import network_links, sops_of

# The scripts run side by side: one thread each, rather than every process claiming every core.
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')


# ---------------------------------------------------------------- rates by hand

def hand_net(leak):
    """Two spiking layers (4 and 3 neurons, Vth 1) with weights chosen so that every current is known.

    Input x = 1 gives layer 1 the currents (0.5, 1, 0.25, 0); layer 2 gets 1·s1[1], 0.5·s1[1] and
    2·s1[0] at the same step; the feedback adds 0.5·s2[0] at the previous step to neuron 3 of layer 1.
    """
    input_layer = Connection(nn.Linear(1, 4), flatten=True)
    hidden = Connection(nn.Linear(4, 3))
    feedback = Feedback(nn.Linear(3, 4, bias=False))
    with torch.no_grad():
        input_layer.linear.weight.copy_(torch.tensor([[0.5], [1.0], [0.25], [0.0]]))
        input_layer.linear.bias.zero_()
        hidden.linear.weight.copy_(torch.tensor([[0, 1.0, 0, 0], [0, 0.5, 0, 0], [2.0, 0, 0, 0]]))
        hidden.linear.bias.zero_()
        # W = clamp(g)·V/σ with σ = u·(V v) = 1: W = 0.5 at (3, 0) only.
        raw = torch.zeros(4, 3)
        raw[3, 0] = 1.0
        feedback.linear.parametrizations.weight.original.copy_(raw)
        feedback.spectral.u.copy_(torch.tensor([0.0, 0, 0, 1]))
        feedback.spectral.v.copy_(torch.tensor([1.0, 0, 0]))
        feedback.spectral.g.fill_(0.5)
    return FeedbackSNN(input_layer, [hidden], feedback, time_step=4, vth=1.0, leak=leak)


class HandClassifier(nn.Module):
    """The hand-built SNN behind the classifier interface that utils.analysis.rates reads."""

    def __init__(self, snn):
        super().__init__()
        self.snn = snn
        self.arch = SimpleNamespace(input_shape=(1,))
        self.state_shapes = [(4,), (3,)]
        self.classifier = nn.Linear(3, 2)

    def check_input(self, x):
        """Any (B, 1) input is fine."""


# Spike trains over T = 4 (u[t] = λ(u[t-1] - s[t-1]) + I[t], spike when u >= 1):
#  IF  layer 1: I=.5 -> u .5,1,.5,1 -> 0101; I=1 -> 1111; I=.25 -> .25,.5,.75,1 -> 0001;
#      neuron 3 gets 0,.5,.5,.5 (s2[0] is 1111) -> 0,.5,1,.5 -> 0010.
#      layer 2: I=1 -> 1111; I=.5 -> 0101; I=2·0101 -> u 0,2,1,2 -> 0111.
#  LIF λ=.75 layer 1: I=.5 -> .5,.875,1.15625,.6171875 -> 0010; I=1 -> 1111; I=.25 -> never;
#      neuron 3: 0,.5,.875,1.15625 -> 0001.  layer 2: 1111; I=.5 -> 0010; I=2·0010 -> 0,0,2,.75 -> 0010.
HAND_RATES = {
    1.0: ([0.5, 1.0, 0.25, 0.25], [1.0, 0.5, 0.75]),
    0.75: ([0.25, 1.0, 0.0, 0.25], [1.0, 0.25, 0.25]),
}


@pytest.mark.parametrize('leak', sorted(HAND_RATES))
def test_hand_set_weights_give_hand_computed_rates(leak):
    layer1, layer2 = HAND_RATES[leak]
    snn = hand_net(leak).eval()
    rates = snn.all_rates(torch.ones(1, 1))
    assert rates[0].tolist() == [layer1] and rates[1].tolist() == [layer2]

    # Four samples with x = 1 and two silent ones (x = 0), split over uneven batches.
    x = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0], [1.0]])
    loader = DataLoader(TensorDataset(x, torch.zeros(6, dtype=torch.long)), batch_size=4)
    stats = evaluate_rates(HandClassifier(snn), loader)
    expected = [4 / 6 * sum(layer1) / 4, 4 / 6 * sum(layer2) / 3]
    assert [layer.rate for layer in stats.layers] == pytest.approx(expected, abs=1e-12)
    assert [layer.neurons for layer in stats.layers] == [4, 3]
    assert stats.total_rate == pytest.approx(4 / 6 * (sum(layer1) + sum(layer2)) / 7, abs=1e-12)
    assert stats.samples == 6 and stats.leaky == (None if leak == 1.0 else leak)


def test_weighted_total_is_spikes_over_neurons():
    assert weighted_total([0.5, 0.1], [10, 90]) == pytest.approx(0.14)
    stats = RateStats(30, 0.99, 2.0, 8, 1.0, 50.0, [LayerRate('layer1', (2, 5), 10, 0.5),
                                                    LayerRate('layer2', (90,), 90, 0.1)])
    assert stats.total_neurons == 100 and stats.total_rate == pytest.approx(0.14)
    table = format_table(stats).splitlines()
    assert table[0].split() == ['layer', 'shape', 'neurons', 'rate']
    assert table[1].split() == ['layer1', '2x5', '10', '0.500000']
    assert table[-1].split() == ['total', '-', '100', '0.140000']


def test_one_simulation_gives_the_logits_and_rates_of_two():
    model = lively_(build_model('mnist_conv', time_step=3, leaky=0.95)).eval()
    x = sample_input('mnist_conv', batch=3)
    with torch.no_grad():
        logits, rates = logits_and_rates(model, x)
        assert torch.equal(logits, model(x))
        assert all(torch.equal(a, b) for a, b in zip(rates, model.get_all_rate(x)))
    with pytest.raises(ValueError, match='evaluation mode'):
        logits_and_rates(model.train(), x)


def test_output_names_follow_checkpoint_and_T(tmp_path):
    assert checkpoint_stem('a/b/model_best.pth.tar') == 'model_best'
    assert checkpoint_stem('run.v2.pt') == 'run.v2'
    assert checkpoint_stem('.pth') == '.pth'
    paths = output_paths(tmp_path / 'model_best.pth.tar', 30)
    assert paths == {ext: str(tmp_path / f'rates_model_best_T30.{ext}') for ext in ('json', 'csv', 'png')}
    sweep = output_paths('x/ckpt.pth', [10, 30, 100], folder='out')
    assert sweep['csv'] == os.path.join('out', 'rates_ckpt_sweepT10-30-100.csv')


# ---------------------------------------------------------------- the scripts end to end

def write_project_checkpoint(path, name, num_classes=10, time_step=2, leaky=0.99, seed=0, dataset=None):
    """A checkpoint as this project's training scripts write it, with weights that make every layer fire.

    dataset: the training run's --dataset, recorded in the checkpoint's flags (none recorded if None).
    """
    torch.manual_seed(seed)
    model = lively_(build_model(name, num_classes=num_classes, time_step=time_step, leaky=leaky), seed)
    extra = {} if dataset is None else {'args': {'dataset': dataset, 'time_step': time_step, 'lr': 0.1}}
    torch.save({'arch': name, 'state_dict': model.state_dict(), 'epoch': 3, 'acc': 10.0, 'best_acc': 10.0,
                'model_args': {'num_classes': num_classes, 'time_step': time_step, 'leaky': leaky, 'vth': 2.0,
                               'dropout': 0.2, 'solver': NETS[name].solver, 'threshold': 30}, **extra},
               path)
    return model


def direct_stats(model, dataset, time_step):
    """Loss, accuracy, per-layer rates, neurons and the weighted total, straight from model(x) and get_all_rate."""
    model.snn.time_step = time_step
    model.eval()
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    with torch.no_grad():
        logits = model(x)
        rates = [r.double().mean(dim=1).mean().item() for r in model.get_all_rate(x)]
    neurons = [math.prod(shape) for shape in model.state_shapes]
    total = sum(n * r for n, r in zip(neurons, rates)) / sum(neurons)
    acc = 100.0 * (logits.argmax(1) == y).double().mean().item()
    return nn.functional.cross_entropy(logits.double(), y).item(), acc, rates, neurons, total


def printed_table(out):
    """{layer: (neurons, rate)} from the printed table, 'total' included."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and (cells[0].startswith('layer') and cells[0] != 'layer' or cells[0] == 'total'):
            rows[cells[0]] = (int(cells[2]), float(cells[3]))
    return rows


@pytest.mark.slow
def test_cifar_rate_script_matches_direct_computation(tmp_path, capsys):
    make_cifar(tmp_path / 'data', n_train=4, n_test=8, num_classes=10)
    ckpt = tmp_path / 'run' / 'model_best.pth.tar'
    ckpt.parent.mkdir()
    model = write_project_checkpoint(ckpt, 'alexnetf', time_step=30)
    code = get_rate.main(['--arch', 'alexnetf', '--dataset', 'cifar10', '--path', str(tmp_path / 'data'),
                          '--time_step', '2', '--resume', str(ckpt), '--test-batch', '4', '-j', '0',
                          '--sweep-T', '1', '2', '3'])
    out = capsys.readouterr().out
    assert code == 0

    _, test_set, _ = get_datasets('cifar10', str(tmp_path / 'data'))
    loss, acc, rates, neurons, total = direct_stats(model, test_set, 2)
    assert min(rates) > 0.01
    names = [f'layer{i}' for i in range(1, 6)]
    printed = printed_table(out.split('==> Rates as a function of T')[0])
    assert list(printed) == names + ['total']
    for name, n, r in zip(names, neurons, rates):
        assert printed[name][0] == n and printed[name][1] == pytest.approx(r, abs=6e-7)
    assert printed['total'] == (sum(neurons), pytest.approx(total, abs=6e-7))
    printed_loss, printed_acc = re.search(r' Test Loss:  (\S+), Test Acc:  (\S+)', out).groups()
    assert float(printed_loss) == pytest.approx(loss, rel=1e-6) and printed_acc == f'{acc:.2f}'

    paths = output_paths(ckpt, 2)
    saved = json.loads(open(paths['json']).read())
    assert (saved['arch'], saved['dataset'], saved['time_step'], saved['leaky'], saved['neuron']) == \
        ('alexnetf', 'cifar10', 2, 0.99, 'LIF')
    assert [layer['rate'] for layer in saved['layers']] == pytest.approx(rates, abs=1e-9)
    assert [layer['neurons'] for layer in saved['layers']] == neurons
    assert saved['layers'][0]['shape'] == [96, 16, 16]
    assert saved['total_rate'] == pytest.approx(total, abs=1e-9)
    assert saved['loss'] == pytest.approx(loss, rel=1e-6) and saved['acc'] == pytest.approx(acc)
    with open(paths['csv'], newline='') as f:
        rows = list(csv.DictReader(f))
    assert [row['layer'] for row in rows] == ['input'] + names + ['classifier', 'total']
    assert [float(row['rate']) for row in rows[1:-2] + rows[-1:]] == pytest.approx(rates + [total], abs=1e-9)
    assert [float(row['sops']) for row in rows] == pytest.approx(
        [0.0] + [layer['sops'] for layer in saved['layers']] + [0.0, saved['total_sops']], rel=1e-12)
    assert int(rows[-1]['ann_macs']) == saved['ann_macs'] == 236_754_208  # tests/test_sops.py derives it
    assert open(paths['png'], 'rb').read(8) == b'\x89PNG\r\n\x1a\n'

    sweep = json.loads(open(output_paths(ckpt, [1, 2, 3])['json']).read())
    assert [run['time_step'] for run in sweep['runs']] == [1, 2, 3]
    assert sweep['runs'][1]['layers'] == saved['layers']
    for run in sweep['runs'][::2]:
        _, _, rates_t, _, total_t = direct_stats(model, test_set, run['time_step'])
        assert [layer['rate'] for layer in run['layers']] == pytest.approx(rates_t, abs=1e-9)
        assert run['total_rate'] == pytest.approx(total_t, abs=1e-9)
    with open(output_paths(ckpt, [1, 2, 3])['csv'], newline='') as f:
        assert len(list(csv.DictReader(f))) == 3 * 8  # input, 5 layers, classifier, total
    assert os.path.getsize(output_paths(ckpt, [1, 2, 3])['png']) > 0


def test_existing_statistics_are_never_overwritten_silently(tmp_path, capsys):
    make_mnist(tmp_path / 'data', n_train=4, n_test=4)
    ckpt = tmp_path / 'checkpoint.pth.tar'
    write_project_checkpoint(ckpt, 'mnist_conv', time_step=3, leaky=0.95)
    argv = ['--arch', 'mnist_conv', '--path', str(tmp_path / 'data'), '--resume', str(ckpt), '-j', '0']
    assert get_rate.main(argv) == 0
    paths = output_paths(ckpt, 3)
    before = {p: open(p, 'rb').read() for p in paths.values()}
    capsys.readouterr()

    assert get_rate.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f"{paths['json']} exists; pass --overwrite" in err
    assert {p: open(p, 'rb').read() for p in paths.values()} == before

    assert get_rate.main(argv + ['--overwrite']) == 0
    assert get_rate.main(argv + ['--out-dir', str(tmp_path / 'elsewhere')]) == 0
    assert os.path.exists(tmp_path / 'elsewhere' / 'rates_checkpoint_T3.json')
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith('.')) == []  # no temporary files left


def make_data(name, root):
    """A tiny test set of the given data set under root."""
    if name in ('cifar10', 'cifar100'):
        make_cifar(root, n_train=4, n_test=6, num_classes=int(name[5:]))
    elif name in ('mnist', 'fashionmnist'):
        make_mnist(root, n_train=4, n_test=6, kind='MNIST' if name == 'mnist' else 'FashionMNIST')
    elif name == 'nmnist':
        make_nmnist_tree(root, 'raw', per_class=1)


@pytest.mark.slow
@pytest.mark.parametrize('arch,dataset,leaky', [('mnist_conv', 'mnist', 1.0), ('fashion_mlp', 'digits', 0.95),
                                                ('nmnist_conv', 'nmnist', 0.95), ('cifarnetf', 'cifar100', 1.0)])
def test_every_network_and_data_set(tmp_path, capsys, arch, dataset, leaky):
    make_data(dataset, tmp_path / 'data')
    num_classes = 100 if dataset == 'cifar100' else 10
    ckpt = tmp_path / 'ckpt.pth'
    model = write_project_checkpoint(ckpt, arch, num_classes=num_classes, time_step=2, leaky=leaky)
    code = get_rate.main(['--arch', arch, '--dataset', dataset, '--path', str(tmp_path / 'data'),
                          '--resume', str(ckpt), '-j', '0', '--test-batch', '64', '--e-ac', '1.5', '--e-mac', '3'])
    out = capsys.readouterr().out
    assert code == 0, out
    # T and leaky come from the checkpoint's model_args when the flags do not give them.
    saved = json.loads(open(output_paths(ckpt, 2)['json']).read())
    assert saved['neuron'] == ('IF' if leaky == 1.0 else 'LIF') and saved['time_step'] == 2
    _, test_set, _ = get_datasets(dataset, str(tmp_path / 'data'), 2)
    _, _, rates, neurons, total = direct_stats(model, test_set, 2)
    assert [layer['rate'] for layer in saved['layers']] == pytest.approx(rates, abs=1e-9)
    assert saved['total_rate'] == pytest.approx(total, abs=1e-9)
    assert printed_table(out)['total'] == (sum(neurons), pytest.approx(total, abs=6e-7))

    # SOPs from the rates: a layer inside the loop reads every step's spikes (rate x T spikes per
    # position), the feedback the last layer's spikes of steps 0..T-2 (a simulation one step shorter).
    x = torch.stack([test_set[i][0] for i in range(len(test_set))])
    with torch.no_grad():
        counts = [r.sum(0) * 2 for r in model.get_all_rate(x)]
        model.snn.time_step = 1
        counts[-1] = model.get_all_rate(x)[-1].sum(0)
    links = [link for link in network_links(model) if link.source is not None and link.source >= 0]
    expected = [sops_of(c.reshape(link.input_shape), link.fanout()) / len(x) for c, link in zip(counts, links)]
    assert min(expected) > 0
    assert [layer['sops'] for layer in saved['layers']] == pytest.approx(expected, rel=1e-9)
    if ARCHITECTURES[arch].spike_input:
        input_counts = x[..., :2].sum(dim=(0, -1))
        assert saved['input']['sops'] == pytest.approx(
            sops_of(input_counts, network_links(model)[0].fanout()) / len(x), rel=1e-9)
        assert saved['input']['macs_once'] == 0
    energy = saved['energy_pj']
    assert energy['snn'] == pytest.approx(1.5 * saved['total_sops'] + 3 * saved['snn_macs'], rel=1e-12)
    assert energy['ann'] == 3 * saved['ann_macs'] and (energy['e_ac'], energy['e_mac']) == (1.5, 3.0)


@pytest.mark.parametrize('argv,message', [
    (['--arch', 'alexnetf', '--dataset', 'mnist'], '--dataset: alexnetf reads cifar10 or cifar100, got mnist'),
    (['--arch', 'resnet'], "--arch: invalid choice: 'resnet'"),
    (['--arch', 'mnist_conv', '--time_step', '0'], "--time_step: expected an integer >= 1, got '0'"),
])
def test_bad_flags_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as excinfo:
        get_rate.main(argv + ['--resume', 'x.pth'], prog='get_rate.py')
    err = capsys.readouterr().err
    assert excinfo.value.code == 2
    assert err.count('\n') == 1 and err.startswith('get_rate.py: error: ') and message in err


def run_scripts(commands):
    """Run the command lines concurrently; return their CompletedProcess-like (code, out, err)."""
    procs = [subprocess.Popen([sys.executable] + cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=ENV)
             for cmd in commands]
    return [(p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=300)]]


@pytest.mark.slow
def test_refusals_are_one_line_with_nonzero_exit(tmp_path):
    data = tmp_path / 'data'
    make_cifar(data, n_train=4, n_test=4, num_classes=10)
    torch.manual_seed(0)
    released100 = tmp_path / 'released100.pth.tar'
    torch.save(release_checkpoint(build_model('alexnetf', num_classes=100)), released100)
    released10 = tmp_path / 'released10.pth.tar'
    torch.save(release_checkpoint(build_model('alexnetf', num_classes=10)), released10)
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(released10.read_bytes()[:5000])

    common = ['--path', str(data), '--time_step', '2', '--test-batch', '4', '-j', '0']
    paper = ['get_rate_cifar_alexnetf.py', '--gpu-id', '0', '--dataset', 'cifar10', '--leaky', '0.99']
    results = run_scripts([
        paper + common + ['--resume', str(released100)],
        ['get_rate.py', '--arch', 'cifarnetf'] + common + ['--resume', str(released10)],
        paper + common + ['--resume', str(truncated)],
    ])
    expected = [
        'get_rate_cifar_alexnetf.py: error: checkpoint does not fit this network: classifier.weight is '
        '(100, 16384) in the checkpoint, (10, 16384) here (another class count?)',
        'get_rate.py: error: checkpoint does not fit this network: snn.input_layer.linear.weight is '
        '(96, 3, 3, 3) in the checkpoint, (128, 3, 3, 3) here',
        f'get_rate_cifar_alexnetf.py: error: {truncated} is not a readable checkpoint (truncated or not a torch '
        f'file): incomplete zip archive',
    ]
    for (code, out, err), message in zip(results, expected):
        assert code == 1 and err == message + '\n', err
    assert not any(name.startswith('rates_') for name in os.listdir(tmp_path))


def test_checkpoint_of_another_network_is_refused(tmp_path, capsys):
    for num_classes in (10, 100):
        make_cifar(tmp_path / 'data', n_train=4, n_test=4, num_classes=num_classes)
    ckpt = tmp_path / 'model_best.pth.tar'
    write_project_checkpoint(ckpt, 'alexnetf')
    argv = ['--path', str(tmp_path / 'data'), '--resume', str(ckpt), '-j', '0']
    assert get_rate.main(['--arch', 'cifarnetf'] + argv, prog='get_rate.py') == 1
    assert capsys.readouterr().err == 'get_rate.py: error: checkpoint is for alexnetf, this run builds cifarnetf\n'
    assert get_rate.main(['--arch', 'alexnetf', '--dataset', 'cifar100'] + argv, prog='get_rate.py') == 1
    assert capsys.readouterr().err == ('get_rate.py: error: checkpoint is for alexnetf (num_classes=10), '
                                       'this run builds alexnetf (num_classes=100)\n')


# ---------------------------------------------------------------- data set, folder, signals, sweep, device

def test_the_checkpoints_data_set_is_the_default(tmp_path, capsys):
    make_mnist(tmp_path / 'FAKE', n_train=4, n_test=6)  # MNIST files sit there: the wrong default would run
    ckpt = tmp_path / 'run' / 'model_best.pth.tar'
    ckpt.parent.mkdir()
    write_project_checkpoint(ckpt, 'mnist_conv', time_step=2, leaky=0.95, dataset='digits')
    common = ['--arch', 'mnist_conv', '--path', str(tmp_path / 'FAKE'), '--resume', str(ckpt), '-j', '0',
              '--test-batch', '450']
    assert get_rate.main(common) == 0
    out = capsys.readouterr().out
    saved = json.loads(open(output_paths(ckpt, 2)['json']).read())
    assert (saved['dataset'], saved['samples']) == ('digits', 450)  # scikit-learn's 450 test digits
    assert '==> Data set digits, as the checkpoint was trained\n' in out

    # Another data set typed on the command line is used, and said in one line.
    assert get_rate.main(common + ['-d', 'mnist', '--out-dir', str(tmp_path / 'other')]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if 'digits' in line] == \
        ['==> Note: evaluating on mnist; the checkpoint was trained on digits']
    saved = json.loads(open(output_paths(ckpt, 2, str(tmp_path / 'other'))['json']).read())
    assert (saved['dataset'], saved['samples']) == ('mnist', 6)


def unwritable_folder(tmp_path):
    """A folder that refuses new files: read-only, or for root (who ignores that) a kernel folder."""
    folder = tmp_path / 'readonly'
    folder.mkdir()
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return str(folder)
    try:
        open('/sys/.rates-probe', 'w').close()
    except OSError:
        return '/sys'
    pytest.skip('no folder here refuses new files')


def test_an_unwritable_output_folder_is_refused_before_the_evaluation(tmp_path, capsys):
    make_mnist(tmp_path / 'data', n_train=4, n_test=4)
    ckpt = tmp_path / 'ckpt.pth'
    write_project_checkpoint(ckpt, 'mnist_conv', time_step=2)
    folder = unwritable_folder(tmp_path)
    code = get_rate.main(['--arch', 'mnist_conv', '--path', str(tmp_path / 'data'), '--resume', str(ckpt),
                          '-j', '0', '--out-dir', folder, '--sweep-T', '2', '3'], prog='get_rate.py')
    out, err = capsys.readouterr()
    assert code == 1
    assert err.count('\n') == 1 and err.startswith(f'get_rate.py: error: cannot write in {folder}: ')
    assert 'Preparing dataset' not in out and 'Test Loss' not in out


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_a_stop_by_signal_is_one_line_and_writes_nothing(tmp_path, signum):
    make_mnist(tmp_path / 'data', n_train=4, n_test=16)
    ckpt = tmp_path / 'ckpt.pth'
    write_project_checkpoint(ckpt, 'mnist_conv', time_step=5000, leaky=0.95)  # minutes of simulation
    proc = subprocess.Popen([sys.executable, '-u', 'get_rate.py', '--arch', 'mnist_conv', '--path',
                             str(tmp_path / 'data'), '--resume', str(ckpt), '-j', '0', '--test-batch', '8'],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        for line in proc.stdout:
            if line.startswith('==> Model'):  # the evaluation starts now
                break
        time.sleep(0.5)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum
    assert err == 'get_rate.py: interrupted; no statistics file written\n'
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pth', 'data']


def test_sweep_T_is_measured_once_per_T_in_order(tmp_path, capsys, monkeypatch):
    make_mnist(tmp_path / 'data', n_train=4, n_test=4)
    ckpt = tmp_path / 'ckpt.pth'
    write_project_checkpoint(ckpt, 'mnist_conv', time_step=3)
    evaluated, evaluate = [], get_rate.evaluate
    monkeypatch.setattr(get_rate, 'evaluate', lambda *args: evaluated.append(args[-1]) or evaluate(*args))
    assert get_rate.main(['--arch', 'mnist_conv', '--path', str(tmp_path / 'data'), '--resume', str(ckpt),
                          '-j', '0', '--sweep-T', '4', '2', '4']) == 0
    out = capsys.readouterr().out
    assert evaluated == ['T=3', 'T=2', 'T=4']
    sweep = json.loads(open(output_paths(ckpt, [2, 4])['json']).read())
    assert [run['time_step'] for run in sweep['runs']] == [2, 4]
    table = out.split('as functions of T')[1].splitlines()[1:]
    assert table[0].split()[:3] == ['T', 'loss', 'acc'] and [row.split()[0] for row in table[1:3]] == ['2', '4']


def test_the_device_line_says_why_a_gpu_id_runs_on_the_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)  # a machine without CUDA GPUs
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    code = get_rate.main(['--arch', 'mnist_conv', '--gpu-id', '3', '--resume', str(tmp_path / 'missing.pth')])
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == '==> Device: cpu (--gpu-id 3 asks for a GPU, but no CUDA GPU is available)'
    assert code == 1 and err.count('\n') == 1


def test_a_stop_while_the_files_are_written_comes_after_all_three(tmp_path, monkeypatch):
    stats = evaluate_rates(HandClassifier(hand_net(1.0)), [(torch.ones(2, 1), torch.zeros(2, dtype=torch.long))])
    paths = output_paths(tmp_path / 'ckpt.pth', 4)
    write_files = get_rate.write_files

    def interrupted_write(*args):
        signal.raise_signal(signal.SIGINT)  # Ctrl-C just as the files are being written
        write_files(*args)
    monkeypatch.setattr(get_rate, 'write_files', interrupted_write)
    written = []
    with pytest.raises(KeyboardInterrupt):
        get_rate.write_stats(paths, {'x': 1}, [stats], b'png', get_rate.EnergyCosts(), written)
    assert written == list(paths.values()) and all(os.path.exists(p) for p in written)
