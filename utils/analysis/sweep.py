"""Trained weights evaluated at several numbers of time steps T: the one sweep over T, and its accuracy files.

The weights of an IDE-FSNN do not depend on T: the same state_dict builds a
network for any T (`model_at`), whose rate approaches the equilibrium a*
(for IF with error O(1/T); for LIF down to a floor of order 1 − λ). `measure` evaluates one such network (loss, accuracy, firing
rates and operation counts: utils.analysis.rates); get_rate.py --sweep-T
writes all of it for each T, and the training scripts' `-e --sweep-T`
(`sweep_accuracy`) the accuracy alone, as `<prefix>.json`, `<prefix>.csv` and
`<prefix>.png`, each atomically, after refusing (before the evaluation, which
can take long) to replace existing files unless asked to.
"""
import csv
import io
import json
import sys

import torch
from progress.bar import Bar
from torch.utils.data import DataLoader

from modules import ARCHITECTURES, build_model, is_leaky
from utils.analysis.rates import evaluate_rates, file_prefix
from utils.data.datasets import DataError, get_datasets
from utils.files import atomic_write, atomic_write_text, check_outputs, figure, make_folder_for, png_bytes

CSV_FIELDS = ('time_step', 'samples', 'loss', 'acc')
SUFFIXES = ('json', 'csv', 'png')


def sweep_prefix(checkpoint, time_steps, folder=None):
    """The files' common path without suffix: <folder>/acc_<checkpoint stem>_sweepT10-30-100.

    folder defaults to the checkpoint's own.
    """
    return file_prefix('acc', checkpoint, list(time_steps), folder)


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


def model_at(arch, model_args, state_dict, time_step):
    """Network `arch` with build_model's model_args but T = time_step, holding state_dict's weights."""
    model = build_model(arch, **{**model_args, 'time_step': time_step})
    model.load_state_dict(state_dict)
    return model


class LoadersByT:
    """The test loader of a data set for each T: spike input is binned into T frames, images are loaded once."""

    def __init__(self, arch, dataset, path, batch, workers, device):
        """Remember where and how to load the test set; nothing is read yet."""
        self.dataset, self.path, self.batch, self.workers, self.device = dataset, path, batch, workers, device
        self.spike_input = ARCHITECTURES[arch].spike_input
        self.num_classes = None
        self._loaders = {}

    def __call__(self, time_step):
        """The test loader for time_step; DataError if the test set is empty."""
        key = time_step if self.spike_input else None
        if key not in self._loaders:
            _, test_set, self.num_classes = get_datasets(self.dataset, self.path, time_step)
            if len(test_set) == 0:
                raise DataError(f'the {self.dataset} test set under {self.path} has no samples')
            self._loaders[key] = DataLoader(test_set, batch_size=self.batch, shuffle=False, num_workers=self.workers,
                                            pin_memory=torch.device(self.device).type == 'cuda')
        return self._loaders[key]


def measure(model, loader, device, title, amp=False):
    """utils.analysis.rates.evaluate_rates of model over loader (bf16 autocast with amp), with a progress bar.

    The bar is drawn only on a terminal.
    """
    bar = Bar(title, max=len(loader), file=sys.stderr)
    try:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            return evaluate_rates(model.to(device), loader, device, progress=lambda done, total: bar.next())
    finally:
        bar.finish()  # ends the bar's line, also before the message of a stop


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
    fig = figure(figsize=(5.0, 3.5))
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
    return png_bytes(fig)


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
    refuse_existing(out_prefix, overwrite)
    rows = []
    for t in steps:
        stats = measure(model_at(arch, model_args, state_dict, t), test_loader_for_T(t), device, f'T={t}', amp)
        rows.append({'time_step': t, 'samples': stats.samples, 'loss': stats.loss, 'acc': stats.acc})
    write_files(out_prefix, arch, dict(model_args), rows)
    return rows
