"""Firing-rate statistics of a feedback SNN over a data set, and their files (JSON, CSV, bar chart).

The rate of a spiking neuron is its spike count over the T simulated steps
divided by T (for LIF too: this measures activity, not the λ-weighted state).
A layer's rate is the mean over its n_l neurons, averaged over the samples;
the total is the neuron-weighted mean over all spiking layers,
Σ_l n_l·r_l / Σ_l n_l, i.e. total spikes / (samples · neurons · T).
"""
import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils.io import atomic_write, atomic_write_text

# Suffixes dropped from a checkpoint's file name to name its statistics files.
_CHECKPOINT_SUFFIXES = ('.tar', '.pth', '.pt', '.ckpt', '.pkl', '.bin')
CSV_FIELDS = ('time_step', 'neuron', 'leaky', 'vth', 'samples', 'loss', 'acc', 'layer', 'shape', 'neurons', 'rate')


@dataclass
class LayerRate:
    """Average firing rate of one spiking layer."""
    name: str
    shape: tuple
    neurons: int
    rate: float


@dataclass
class RateStats:
    """Loss, accuracy and per-layer firing rates of a network over a data set at one T."""
    time_step: int
    leaky: float        # None for IF neurons
    vth: float
    samples: int
    loss: float
    acc: float
    layers: list

    @property
    def neuron(self):
        """'LIF' or 'IF'."""
        return 'IF' if self.leaky is None else 'LIF'

    @property
    def total_neurons(self):
        """Number of spiking neurons (input neurons excluded)."""
        return sum(layer.neurons for layer in self.layers)

    @property
    def total_rate(self):
        """Neuron-weighted average rate over all spiking layers."""
        return weighted_total([layer.rate for layer in self.layers], [layer.neurons for layer in self.layers])


def weighted_total(rates, neurons):
    """Σ_l n_l·r_l / Σ_l n_l."""
    return sum(n * r for n, r in zip(neurons, rates)) / sum(neurons)


def layer_names(model):
    """'layer1'..'layerN' for the spiking layers, in input-flow order (as the paper's script prints them)."""
    return [f'layer{i + 1}' for i in range(len(model.state_shapes))]


def logits_and_rates(model, x):
    """Logits and per-layer rates (B, n_l) of an SNNClassifier in evaluation mode, from one simulation.

    Equal to `model(x)` and `model.get_all_rate(x)`, which would simulate twice.
    """
    if model.training:
        raise ValueError('firing rates are measured in evaluation mode: call model.eval() first')
    model.check_input(x)
    state, rates = model.snn.simulate(x, all_rates=True)
    return model.classifier(state.flatten(1)), [r.flatten(1) for r in rates]


@torch.no_grad()
def evaluate_rates(model, loader, device='cpu', progress=None):
    """Test loss, top-1 accuracy (%) and per-layer average firing rates of model over loader.

    `progress(done, total)` is called after each batch when given.
    """
    model.eval()
    rate_sums = None
    loss_sum, correct, samples = 0.0, 0, 0
    for i, (inputs, targets) in enumerate(loader):
        inputs, targets = inputs.to(device), targets.to(device)
        logits, rates = logits_and_rates(model, inputs)
        # float64 sums: a test set of 10^4 samples would lose digits in float32.
        batch_sums = [r.double().mean(dim=1).sum() for r in rates]
        rate_sums = batch_sums if rate_sums is None else [a + b for a, b in zip(rate_sums, batch_sums)]
        loss_sum += F.cross_entropy(logits.double(), targets, reduction='sum').item()
        correct += (logits.argmax(dim=1) == targets).sum().item()
        samples += targets.numel()
        if progress is not None:
            progress(i + 1, len(loader))
    if not samples:
        raise ValueError('the data set has no samples')
    layers = [LayerRate(name, tuple(shape), math.prod(shape), (total / samples).item())
              for name, shape, total in zip(layer_names(model), model.state_shapes, rate_sums)]
    leak = model.snn.leak
    return RateStats(time_step=model.snn.time_step, leaky=leak if leak < 1.0 else None, vth=model.snn.vth,
                     samples=samples, loss=loss_sum / samples, acc=100.0 * correct / samples, layers=layers)


# ---------------------------------------------------------------- text

def shape_text(shape):
    """A layer shape as 'C×H×W' text, e.g. '96x16x16'."""
    return 'x'.join(str(d) for d in shape)


def neuron_text(stats):
    """'IF' or 'LIF (leaky 0.99)'."""
    return 'IF' if stats.leaky is None else f'LIF (leaky {stats.leaky:g})'


def format_table(stats):
    """The per-layer table (layer, shape, neurons, rate) and the neuron-weighted total, as text."""
    rows = [(layer.name, shape_text(layer.shape), str(layer.neurons), f'{layer.rate:.6f}') for layer in stats.layers]
    rows.append(('total', '', str(stats.total_neurons), f'{stats.total_rate:.6f}'))
    header = ('layer', 'shape', 'neurons', 'rate')
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    lines = ['  '.join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    return '\n'.join(line.rstrip() for line in lines)


def format_sweep(runs):
    """One line per T: loss, accuracy, each layer's rate and the total."""
    names = [layer.name for layer in runs[0].layers]
    header = ['T', 'loss', 'acc'] + names + ['total']
    rows = [[str(s.time_step), f'{s.loss:.4f}', f'{s.acc:.2f}'] + [f'{layer.rate:.6f}' for layer in s.layers]
            + [f'{s.total_rate:.6f}'] for s in runs]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    return '\n'.join('  '.join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header] + rows)


# ---------------------------------------------------------------- files

def stats_dict(stats):
    """The statistics of one T as plain JSON-ready values."""
    return {
        'time_step': stats.time_step, 'neuron': stats.neuron, 'leaky': stats.leaky, 'vth': stats.vth,
        'samples': stats.samples, 'loss': stats.loss, 'acc': stats.acc,
        'layers': [{'name': layer.name, 'shape': list(layer.shape), 'neurons': layer.neurons, 'rate': layer.rate}
                   for layer in stats.layers],
        'total_neurons': stats.total_neurons, 'total_rate': stats.total_rate,
    }


def csv_text(runs):
    """CSV with one row per layer and one 'total' row per T (the run's settings repeated on each row)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator='\n')
    writer.writeheader()
    for s in runs:
        common = dict(time_step=s.time_step, neuron=s.neuron, leaky='' if s.leaky is None else s.leaky,
                      vth=s.vth, samples=s.samples, loss=repr(s.loss), acc=repr(s.acc))
        for layer in s.layers:
            writer.writerow(dict(common, layer=layer.name, shape=shape_text(layer.shape),
                                 neurons=layer.neurons, rate=repr(layer.rate)))
        writer.writerow(dict(common, layer='total', shape='', neurons=s.total_neurons, rate=repr(s.total_rate)))
    return out.getvalue()


def checkpoint_stem(path):
    """A checkpoint's file name without its suffixes: 'model_best.pth.tar' -> 'model_best'."""
    name = os.path.basename(os.fspath(path))
    while True:
        root, ext = os.path.splitext(name)
        if ext.lower() not in _CHECKPOINT_SUFFIXES or not root:
            return name
        name = root


def output_paths(checkpoint, time_steps, folder=None):
    """{'json', 'csv', 'png'} paths for the statistics of checkpoint at one T (an int) or a sweep (a list).

    Named after the checkpoint and T, e.g. rates_model_best_T30.json or
    rates_model_best_sweepT10-30-100.json, in folder (default: the checkpoint's).
    """
    folder = os.path.dirname(os.path.abspath(checkpoint)) if folder is None else folder
    stem = re.sub(r'[^\w.-]', '_', checkpoint_stem(checkpoint))
    tag = f'T{time_steps}' if isinstance(time_steps, int) else 'sweepT' + '-'.join(str(t) for t in time_steps)
    return {ext: os.path.join(folder, f'rates_{stem}_{tag}.{ext}') for ext in ('json', 'csv', 'png')}


def write_json(path, payload):
    """Write payload as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2) + '\n')


def write_csv(path, runs):
    """Write the CSV of runs (see csv_text), atomically."""
    atomic_write_text(path, csv_text(runs))


def _save_figure(fig, path):
    """Render a matplotlib Figure to PNG and write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=120, bbox_inches='tight')
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def plot_rates(path, stats, title=''):
    """Bar chart of the per-layer rates, with the neuron-weighted total as a dashed line."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's backend alone

    fig = Figure(figsize=(max(4.0, 1.0 + 0.8 * len(stats.layers)), 3.5))
    ax = fig.add_subplot()
    names = [layer.name for layer in stats.layers]
    bars = ax.bar(names, [layer.rate for layer in stats.layers], color='tab:blue')
    ax.bar_label(bars, fmt='%.4f', fontsize=8)
    ax.axhline(stats.total_rate, color='tab:red', linestyle='--', label=f'total {stats.total_rate:.4f}')
    ax.set_ylabel('average firing rate')
    ax.set_ylim(0, max([stats.total_rate] + [layer.rate for layer in stats.layers] + [1e-3]) * 1.2)
    ax.set_title(title or f'T={stats.time_step}, {neuron_text(stats)}, acc {stats.acc:.2f}%', fontsize=9)
    ax.legend(fontsize=8)
    _save_figure(fig, path)


def plot_sweep(path, runs, title=''):
    """Per-layer and total rate as a function of the number of time steps T."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 3.5))
    ax = fig.add_subplot()
    steps = [s.time_step for s in runs]
    for i, layer in enumerate(runs[0].layers):
        ax.plot(steps, [s.layers[i].rate for s in runs], marker='o', label=layer.name)
    ax.plot(steps, [s.total_rate for s in runs], marker='s', color='black', linestyle='--', label='total')
    ax.set_xlabel('time steps T')
    ax.set_ylabel('average firing rate')
    ax.set_xticks(steps)
    ax.set_title(title or f'{neuron_text(runs[0])}', fontsize=9)
    ax.legend(fontsize=8)
    _save_figure(fig, path)
