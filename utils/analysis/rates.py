"""Firing-rate and operation statistics of a feedback SNN over a data set, and their files (JSON, CSV, PNG).

The rate of a spiking neuron is its spike count over the T simulated steps
divided by T (for LIF too: this measures activity, not the λ-weighted state).
A layer's rate is the mean over its n_l neurons, averaged over the samples;
the total is the neuron-weighted mean over all spiking layers,
Σ_l n_l·r_l / Σ_l n_l, i.e. total spikes / (samples · neurons · T).
Synaptic operations, MACs and energy per sample come with them (utils.analysis.sops).
Longer than most modules: the measurement and its four renderings (table,
JSON, CSV, PNG) share the rows of `op_rows`, which stand here once.
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

from utils.files import atomic_write_all, checkpoint_stem, figure, make_folder_for, png_bytes
from utils.analysis.sops import EnergyCosts, SpikeCounter, op_counts, spike_links

CSV_FIELDS = ('time_step', 'neuron', 'leaky', 'vth', 'samples', 'loss', 'acc', 'layer', 'shape', 'neurons', 'rate',
              'spikes', 'sops', 'snn_macs', 'snn_macs_every_step', 'ann_macs', 'snn_energy_pj',
              'snn_energy_every_step_pj', 'ann_energy_pj', 'e_ac_pj', 'e_mac_pj')


@dataclass
class LayerRate:
    """Average firing rate of one spiking layer."""
    name: str
    shape: tuple
    neurons: int
    rate: float


@dataclass
class RateStats:
    """Loss, accuracy, per-layer firing rates and (when measured) operation counts over a data set at one T."""
    time_step: int
    leaky: float        # None for IF neurons
    vth: float
    samples: int
    loss: float
    acc: float
    layers: list
    ops: object = None  # utils.analysis.sops.OpCounts

    def spikes(self, layer):
        """Spikes of a layer (a LayerRate of this run) per sample: rate × neurons × T."""
        return layer.rate * layer.neurons * self.time_step

    @property
    def total_spikes(self):
        """Spikes of all spiking layers per sample."""
        return sum(self.spikes(layer) for layer in self.layers)

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
    with SpikeCounter(spike_links(model)) as counter:
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
                     samples=samples, loss=loss_sum / samples, acc=100.0 * correct / samples, layers=layers,
                     ops=op_counts(model, counter, samples))


# ---------------------------------------------------------------- rows

def op_rows(stats):
    """The per-sample counts as rows: input, each spiking layer, classifier, total (None: no such quantity).

    Keys: layer, shape, neurons, rate, spikes, sops, snn_macs (F once),
    snn_macs_every_step, ann_macs. Spiking layers make no MACs; the total's
    neurons, rate and spikes are the spiking layers' (as the rates always were).
    """
    ops = stats.ops
    spiking = ops.spike_input
    rows = [dict(layer='input', shape=ops.input_shape, neurons=ops.input_neurons, rate=ops.input_rate,
                 spikes=ops.input_spikes if spiking else None, sops=ops.input_sops,
                 snn_macs=ops.input_layer_macs(), snn_macs_every_step=ops.input_layer_macs(every_step=True),
                 ann_macs=ops.input_macs)]
    for layer, sops, macs in zip(stats.layers, ops.layer_sops, ops.layer_macs):
        rows.append(dict(layer=layer.name, shape=layer.shape, neurons=layer.neurons, rate=layer.rate,
                         spikes=stats.spikes(layer), sops=sops, snn_macs=0, snn_macs_every_step=0, ann_macs=macs))
    rows.append(dict(layer='classifier', shape=(ops.num_classes,), neurons=None, rate=None, spikes=None, sops=0.0,
                     snn_macs=ops.classifier_macs, snn_macs_every_step=ops.classifier_macs,
                     ann_macs=ops.classifier_macs))
    rows.append(dict(layer='total', shape=None, neurons=stats.total_neurons, rate=stats.total_rate,
                     spikes=stats.total_spikes, sops=ops.total_sops, snn_macs=ops.snn_macs(),
                     snn_macs_every_step=ops.snn_macs(every_step=True), ann_macs=ops.ann_macs))
    return rows


def row_energies(row, costs):
    """(SNN with F once, SNN with F every step, ANN) energy of one row of op_rows, in pJ."""
    return (row['sops'] * costs.e_ac + row['snn_macs'] * costs.e_mac,
            row['sops'] * costs.e_ac + row['snn_macs_every_step'] * costs.e_mac,
            row['ann_macs'] * costs.e_mac)


# ---------------------------------------------------------------- text

def shape_text(shape):
    """A layer shape as 'C×H×W' text, e.g. '96x16x16'."""
    return 'x'.join(str(d) for d in shape)


def neuron_text(stats):
    """'IF' or 'LIF (leaky 0.99)'."""
    return 'IF' if stats.leaky is None else f'LIF (leaky {stats.leaky:g})'


def count_text(x):
    """A count with 4 significant digits and an SI suffix: 17189952 -> '17.19M', 13e6 -> '13.00M'."""
    x = float(f'{x:.4g}')  # rounded first, so that 999,960 reads 1.000M rather than 1000k
    for factor, suffix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(x) >= factor:
            return f'{x / factor:#.4g}'.rstrip('.') + suffix
    return str(int(x)) if x == int(x) else f'{x:#.4g}'


def energy_text(picojoules):
    """An energy in pJ as text in pJ, nJ, µJ or mJ, 4 significant digits."""
    picojoules = float(f'{picojoules:.4g}')
    for factor, unit in ((1e9, 'mJ'), (1e6, 'µJ'), (1e3, 'nJ')):
        if abs(picojoules) >= factor:
            return f'{picojoules / factor:#.4g}'.rstrip('.') + f' {unit}'
    return f'{picojoules:#.4g}'.rstrip('.') + ' pJ'


def _aligned(header, rows, left=2):
    """Rows of cells as text columns: the first `left` columns left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ['  '.join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header] + rows]
    return '\n'.join(line.rstrip() for line in lines)


def _cell(value, text):
    """text(value), or '-' for a quantity that does not exist."""
    return '-' if value is None else text(value)


def format_table(stats, costs=EnergyCosts()):
    """The per-layer table, per test sample, and the energy lines below it (rates alone without op counts)."""
    if stats.ops is None:
        rows = [(layer.name, shape_text(layer.shape), str(layer.neurons), f'{layer.rate:.6f}')
                for layer in stats.layers]
        rows.append(('total', '-', str(stats.total_neurons), f'{stats.total_rate:.6f}'))
        return _aligned(('layer', 'shape', 'neurons', 'rate'), rows)
    header = ('layer', 'shape', 'neurons', 'rate', 'spikes', 'SOPs', 'MACs(SNN)', 'MACs(ANN)', 'SOPs/MAC')
    rows = [(row['layer'], _cell(row['shape'], shape_text), _cell(row['neurons'], str),
             _cell(row['rate'], '{:.6f}'.format), _cell(row['spikes'], count_text), count_text(row['sops']),
             count_text(row['snn_macs']), count_text(row['ann_macs']), f"{row['sops'] / row['ann_macs']:.4g}")
            for row in op_rows(stats)]
    return '\n'.join([_aligned(header, rows), *energy_lines(stats, costs)])


def energy_lines(stats, costs=EnergyCosts()):
    """What the MAC columns assume for the input layer, and the energy per sample of the SNN and the ANN."""
    ops = stats.ops
    prices = f'E_AC {costs.e_ac:g} pJ/SOP, E_MAC {costs.e_mac:g} pJ/MAC'
    ann = f'ANN {energy_text(ops.ann_energy_pj(costs))}'
    if ops.spike_input:
        return ['Input spikes drive F: counted as SOPs (no MACs in the SNN but the classifier).',
                f'Energy per sample ({prices}): SNN {energy_text(ops.energy_pj(costs))}; {ann}.']
    return [f'MACs(SNN) computes F(x) once (constant input current); computing it every step costs '
            f'T x {count_text(ops.input_macs)} = {count_text(ops.input_layer_macs(every_step=True))} '
            f'(total {count_text(ops.snn_macs(every_step=True))}).',
            f'Energy per sample ({prices}): SNN {energy_text(ops.energy_pj(costs))} with F once, '
            f'{energy_text(ops.energy_pj(costs, every_step=True))} with F every step; {ann}.']


def format_sweep(runs, costs=EnergyCosts()):
    """One line per T: loss, accuracy, each layer's rate, the total rate, SOPs and energy per sample."""
    names = [layer.name for layer in runs[0].layers]
    static = not runs[0].ops.spike_input
    header = ['T', 'loss', 'acc'] + names + ['total', 'SOPs', 'E_SNN'] + (['E_SNN(F every step)'] if static else [])
    rows = []
    for s in runs:
        energy = [energy_text(s.ops.energy_pj(costs))]
        if static:
            energy.append(energy_text(s.ops.energy_pj(costs, every_step=True)))
        rows.append([str(s.time_step), f'{s.loss:.4f}', f'{s.acc:.2f}'] + [f'{layer.rate:.6f}' for layer in s.layers]
                    + [f'{s.total_rate:.6f}', count_text(s.ops.total_sops)] + energy)
    ops = runs[0].ops
    input_rule = 'F once' if static else 'input spikes as SOPs'
    note = (f'Per sample; E_SNN with {input_rule}, E_AC {costs.e_ac:g} pJ/SOP, E_MAC {costs.e_mac:g} pJ/MAC; '
            f'ANN: {count_text(ops.ann_macs)} MACs, {energy_text(ops.ann_energy_pj(costs))}.')
    return '\n'.join([_aligned(header, rows, left=0), note])


# ---------------------------------------------------------------- files

def stats_dict(stats, costs=EnergyCosts()):
    """The statistics of one T as plain JSON-ready values (counts and energies per test sample)."""
    ops = stats.ops
    rows = op_rows(stats)
    payload = {
        'time_step': stats.time_step, 'neuron': stats.neuron, 'leaky': stats.leaky, 'vth': stats.vth,
        'samples': stats.samples, 'loss': stats.loss, 'acc': stats.acc,
        'layers': [{'name': layer.name, 'shape': list(layer.shape), 'neurons': layer.neurons, 'rate': layer.rate,
                    'spikes': row['spikes'], 'sops': row['sops'], 'ann_macs': row['ann_macs']}
                   for layer, row in zip(stats.layers, rows[1:-2])],
        'total_neurons': stats.total_neurons, 'total_rate': stats.total_rate,
    }
    input_row, total_row = rows[0], rows[-1]
    payload.update({
        'input': {'shape': list(ops.input_shape), 'neurons': ops.input_neurons, 'spike_input': ops.spike_input,
                  'rate': ops.input_rate, 'spikes': input_row['spikes'], 'sops': ops.input_sops,
                  'macs_once': input_row['snn_macs'], 'macs_every_step': input_row['snn_macs_every_step'],
                  'ann_macs': ops.input_macs},
        'classifier': {'inputs': stats.layers[-1].neurons, 'outputs': ops.num_classes, 'macs': ops.classifier_macs},
        'total_spikes': total_row['spikes'], 'total_sops': ops.total_sops,
        'snn_macs': ops.snn_macs(), 'snn_macs_every_step': ops.snn_macs(every_step=True), 'ann_macs': ops.ann_macs,
        'sops_per_ann_mac': ops.sops_per_ann_mac,
        'energy_pj': {'e_ac': costs.e_ac, 'e_mac': costs.e_mac, 'snn': ops.energy_pj(costs),
                      'snn_every_step': ops.energy_pj(costs, every_step=True), 'ann': ops.ann_energy_pj(costs)},
    })
    return payload


def csv_text(runs, costs=EnergyCosts()):
    """CSV with the rows of op_rows per T (the run's settings repeated on each row), counts per test sample."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator='\n')
    writer.writeheader()
    for s in runs:
        common = dict(time_step=s.time_step, neuron=s.neuron, leaky='' if s.leaky is None else s.leaky,
                      vth=s.vth, samples=s.samples, loss=repr(s.loss), acc=repr(s.acc),
                      e_ac_pj=costs.e_ac, e_mac_pj=costs.e_mac)
        for row in op_rows(s):
            snn, snn_every_step, ann = row_energies(row, costs)
            values = {key: '' if row[key] is None else row[key] for key in CSV_FIELDS if key in row}
            values['shape'] = '' if row['shape'] is None else shape_text(row['shape'])
            for key in ('rate', 'spikes', 'sops'):
                if row[key] is not None:
                    values[key] = repr(float(row[key]))
            writer.writerow(dict(common, **values, snn_energy_pj=repr(snn),
                                 snn_energy_every_step_pj=repr(snn_every_step), ann_energy_pj=repr(ann)))
    return out.getvalue()


def file_prefix(kind, checkpoint, time_steps, folder=None):
    """<folder>/<kind>_<checkpoint stem>_T30 for one T (an int), ..._sweepT10-30-100 for a sweep (a list).

    folder defaults to the checkpoint's own.
    """
    folder = os.path.dirname(os.path.abspath(checkpoint)) if folder is None else folder
    stem = re.sub(r'[^\w.-]', '_', checkpoint_stem(checkpoint))
    tag = f'T{time_steps}' if isinstance(time_steps, int) else 'sweepT' + '-'.join(str(t) for t in time_steps)
    return os.path.join(folder, f'{kind}_{stem}_{tag}')


def output_paths(checkpoint, time_steps, folder=None):
    """{'json', 'csv', 'png'} paths for the statistics of checkpoint at one T (an int) or a sweep (a list).

    e.g. rates_model_best_T30.json or rates_model_best_sweepT10-30-100.json (see file_prefix).
    """
    prefix = file_prefix('rates', checkpoint, time_steps, folder)
    return {ext: f'{prefix}.{ext}' for ext in ('json', 'csv', 'png')}


def rates_png(stats, title=''):
    """PNG of two panels: the per-layer rates (total dashed) and the SOPs per sample of each layer's spikes."""
    ops = stats.ops
    width = max(4.0, 1.0 + 0.8 * len(stats.layers))
    fig = figure(figsize=(2 * width if ops else width, 3.8), layout='constrained')
    axes = fig.subplots(1, 2 if ops else 1, squeeze=False)[0]
    ax = axes[0]
    names = [layer.name for layer in stats.layers]
    bars = ax.bar(names, [layer.rate for layer in stats.layers], color='tab:blue')
    ax.bar_label(bars, fmt='%.4f', fontsize=8)
    ax.axhline(stats.total_rate, color='tab:red', linestyle='--', label=f'total {stats.total_rate:.4f}')
    ax.set_ylabel('average firing rate')
    ax.set_ylim(0, max([stats.total_rate] + [layer.rate for layer in stats.layers] + [1e-3]) * 1.2)
    ax.legend(fontsize=8)
    if ops:
        ax = axes[1]
        labels = (['input'] if ops.spike_input else []) + names
        values = ([ops.input_sops] if ops.spike_input else []) + list(ops.layer_sops)
        bars = ax.bar(labels, values, color='tab:orange')
        ax.bar_label(bars, labels=[count_text(v) for v in values], fontsize=8)
        ax.set_ylabel('SOPs per sample')
        ax.set_ylim(0, max(values + [1.0]) * 1.2)
        ax.set_title(f'total {count_text(ops.total_sops)} SOPs, ANN {count_text(ops.ann_macs)} MACs', fontsize=9)
    fig.suptitle(title or f'T={stats.time_step}, {neuron_text(stats)}, acc {stats.acc:.2f}%', fontsize=9)
    return png_bytes(fig)


def sweep_png(runs, title='', costs=EnergyCosts()):
    """PNG of four panels against T: accuracy, per-layer and total rates, SOPs, energy (SNN and ANN)."""
    fig = figure(figsize=(9.0, 6.5), layout='constrained')
    (acc_ax, rate_ax), (sops_ax, energy_ax) = fig.subplots(2, 2)
    steps = [s.time_step for s in runs]
    acc_ax.plot(steps, [s.acc for s in runs], marker='o', color='tab:green')
    acc_ax.set_ylabel('test accuracy (%)')
    for i, layer in enumerate(runs[0].layers):
        rate_ax.plot(steps, [s.layers[i].rate for s in runs], marker='o', label=layer.name)
    rate_ax.plot(steps, [s.total_rate for s in runs], marker='s', color='black', linestyle='--', label='total')
    rate_ax.set_ylabel('average firing rate')
    rate_ax.legend(fontsize=7)
    sops_ax.plot(steps, [s.ops.total_sops for s in runs], marker='o', color='tab:orange')
    sops_ax.set_ylabel('SOPs per sample')
    energy_ax.plot(steps, [s.ops.energy_pj(costs) / 1e6 for s in runs], marker='o', label='SNN')
    if not runs[0].ops.spike_input:
        energy_ax.plot(steps, [s.ops.energy_pj(costs, every_step=True) / 1e6 for s in runs], marker='^',
                       label='SNN, F every step')
    energy_ax.axhline(runs[0].ops.ann_energy_pj(costs) / 1e6, color='black', linestyle='--', label='ANN')
    energy_ax.set_ylabel('energy per sample (µJ)')
    energy_ax.legend(fontsize=7)
    for ax in (acc_ax, rate_ax, sops_ax, energy_ax):
        ax.set_xlabel('time steps T')
        ax.set_xticks(steps)
    fig.suptitle(title or neuron_text(runs[0]), fontsize=9)
    return png_bytes(fig)


def write_files(paths, payload, runs, png, costs=EnergyCosts()):
    """Write the JSON (payload), CSV (runs) and PNG (bytes) files together: all three or none are replaced."""
    make_folder_for(paths.values())
    contents = {'json': (json.dumps(payload, indent=2) + '\n').encode('utf-8'),
                'csv': csv_text(runs, costs).encode('utf-8'), 'png': png}
    atomic_write_all([(paths[key], lambda f, data=data: f.write(data)) for key, data in contents.items()])
