"""Test accuracy of trained weights as a function of the number of time steps T, and its files.

The weights of an IDE-FSNN do not depend on T: the same state_dict builds a
network for any T, whose rate approaches the equilibrium a* with error O(1/T).
`sweep_accuracy` evaluates one checkpoint's weights at several T and writes
`<prefix>.json`, `<prefix>.csv` and `<prefix>.png`, each atomically, after
refusing (before the evaluation, which can take long) to replace existing files
unless asked to.
"""
import csv
import io
import json
import os
import re

import torch
from torch import nn

from modules import build_model, is_leaky
from utils.training.epoch import evaluate
from utils.files import atomic_write, atomic_write_text, checkpoint_stem, check_outputs, make_folder_for

CSV_FIELDS = ('time_step', 'samples', 'loss', 'acc')
SUFFIXES = ('json', 'csv', 'png')


def sweep_prefix(checkpoint, time_steps, folder=None):
    """The files' common path without suffix: <folder>/acc_<checkpoint stem>_sweepT10-30-100.

    folder defaults to the checkpoint's own.
    """
    folder = os.path.dirname(os.path.abspath(checkpoint)) if folder is None else folder
    stem = re.sub(r'[^\w.-]', '_', checkpoint_stem(checkpoint))
    return os.path.join(folder, f'acc_{stem}_sweepT' + '-'.join(str(t) for t in time_steps))


def sweep_paths(out_prefix):
    """{'json', 'csv', 'png'}: the three file paths written for out_prefix."""
    return {suffix: f'{out_prefix}.{suffix}' for suffix in SUFFIXES}


def check_time_steps(time_steps):
    """The list of T values; ValueError unless they are distinct integers >= 1."""
    steps = [int(t) for t in time_steps]
    if not steps or any(t < 1 for t in steps) or len(set(steps)) != len(steps) \
            or any(int(t) != t for t in time_steps):
        raise ValueError(f'expected distinct time steps >= 1, got {list(time_steps)}')
    return steps


def refuse_existing(out_prefix, overwrite):
    """Raise CheckpointError if a sweep file exists and overwrite is False, or the folder is not writable."""
    check_outputs(sweep_paths(out_prefix).values(), overwrite, ' or --out-dir to write elsewhere')


@torch.no_grad()
def test_accuracy(model, loader, device, amp=False):
    """(samples, mean cross-entropy loss, top-1 accuracy in %) of model in evaluation mode over loader."""
    if len(loader.dataset) == 0:
        raise ValueError('the test set has no samples')
    loss, acc, _ = evaluate(model, loader, nn.CrossEntropyLoss(), device, amp=amp,
                            title=f'T={model.snn.time_step}')
    return len(loader.dataset), loss, acc


def csv_text(rows):
    """CSV with one row per T: time_step, samples, loss, acc."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator='\n')
    writer.writeheader()
    for row in rows:
        writer.writerow({key: repr(row[key]) if isinstance(row[key], float) else row[key] for key in CSV_FIELDS})
    return out.getvalue()


def plot_png(rows, title):
    """The PNG bytes of test accuracy against T."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and leaves pyplot's backend alone

    fig = Figure(figsize=(5.0, 3.5))
    ax = fig.add_subplot()
    steps = [row['time_step'] for row in rows]
    accs = [row['acc'] for row in rows]
    ax.plot(steps, accs, marker='o')
    for t, acc in zip(steps, accs):
        ax.annotate(f'{acc:.2f}', (t, acc), textcoords='offset points', xytext=(0, 6), ha='center', fontsize=8)
    ax.set_xlabel('time steps T')
    ax.set_ylabel('test accuracy (%)')
    ax.set_xticks(steps)
    ax.set_title(title, fontsize=9)
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=120, bbox_inches='tight')
    return buffer.getvalue()


def write_files(out_prefix, arch, model_args, rows):
    """Write the JSON, CSV and PNG of a sweep, each atomically; return their paths."""
    paths = sweep_paths(out_prefix)
    make_folder_for(paths.values())
    neuron = 'LIF' if is_leaky(model_args.get('leaky')) else 'IF'
    payload = {'arch': arch, 'neuron': neuron, 'model_args': model_args, 'rows': rows}
    atomic_write_text(paths['json'], json.dumps(payload, indent=2) + '\n')
    atomic_write_text(paths['csv'], csv_text(rows))
    png = plot_png(rows, f'{arch}, {neuron}: test accuracy against T')
    atomic_write(paths['png'], lambda f: f.write(png))
    return paths


def format_rows(rows):
    """The sweep as a small text table, one line per T."""
    lines = [f'{"T":>5}  {"loss":>8}  {"acc":>6}']
    lines += [f'{row["time_step"]:>5}  {row["loss"]:>8.4f}  {row["acc"]:>6.2f}' for row in rows]
    return '\n'.join(lines)


def sweep_accuracy(arch, model_args, state_dict, test_loader_for_T, time_steps, device, out_prefix,
                   amp=False, overwrite=False):
    """Test accuracy of state_dict's weights at each T in time_steps; write <out_prefix>.{json,csv,png}.

    arch: a name of modules.ARCHITECTURES; model_args: build_model's keyword
    arguments (those a checkpoint stores; its time_step is replaced by each T);
    state_dict: this project's keys (utils.checkpoint.normalize_state_dict turns the
    paper's release into them); test_loader_for_T(T): the test loader for T
    (spike input is binned into T frames; static input may return one loader
    for every T). Existing files are refused (CheckpointError) before anything
    is evaluated unless overwrite. Returns one dict per T, in the given order:
    {'time_step', 'samples', 'loss', 'acc'} (acc in %).
    """
    steps = check_time_steps(time_steps)
    device = torch.device(device)
    refuse_existing(out_prefix, overwrite)
    base = {key: value for key, value in model_args.items() if key != 'time_step'}
    rows = []
    for t in steps:
        model = build_model(arch, **base, time_step=t)
        model.load_state_dict(state_dict)
        samples, loss, acc = test_accuracy(model.to(device), test_loader_for_T(t), device, amp)
        rows.append({'time_step': t, 'samples': samples, 'loss': loss, 'acc': acc})
    write_files(out_prefix, arch, dict(model_args), rows)
    return rows
