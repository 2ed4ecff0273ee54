"""Firing-rate statistics of a trained checkpoint, for any of the paper's networks.

Evaluates the checkpoint on the test set (loss, accuracy), prints each spiking
layer's average firing rate and the neuron-weighted total, and writes them next
to the checkpoint as rates_<checkpoint>_T<T>.{json,csv,png}; `--sweep-T` adds
the same statistics for several T (rates_<checkpoint>_sweepT<...>.*).

    python get_rate.py --arch alexnetf --dataset cifar10 --path ./data --time_step 30 --leaky 0.99 \
        --resume checkpoints/cifar10/model_best.pth.tar --sweep-T 10 30 100
"""
import inspect
import os
import sys

import torch
from progress.bar import Bar
from torch.utils.data import DataLoader

from modules import ARCHITECTURES, NETS, build_model, settings
from utils import cli
from utils.data import DataError, get_datasets
from utils.io import CheckpointError, load_checkpoint, load_into_model
from utils.rates import (evaluate_rates, format_sweep, format_table, neuron_text, output_paths, plot_rates,
                         plot_sweep, stats_dict, write_csv, write_json)

_MODEL_KWARGS = set(inspect.signature(build_model).parameters) - {'name'}


def build_parser(arch=None, prog=None):
    """The flags; with a fixed `arch` there is no --arch flag and the data sets are that network's."""
    parser = cli.OneLineParser(prog=prog, description='Firing-rate statistics of a trained IDE-FSNN checkpoint: '
                                                      'test loss/accuracy, per-layer and total average rates.')
    if arch is None:
        parser.add_argument('--arch', required=True, choices=sorted(NETS), help='network of the checkpoint')
    names = sorted(NETS) if arch is None else [arch]
    parser.add_argument('-d', '--dataset', choices=sorted({d for n in names for d in NETS[n].datasets}),
                        help="test set (default: the network's: " +
                             ', '.join(f"{n} {NETS[n].dataset}" for n in names) + ')')
    parser.add_argument('--path', default='./data', help='data folder')
    parser.add_argument('-j', '--workers', default=4, type=cli.NON_NEGATIVE_INT, help='data loading processes')
    parser.add_argument('-t', '--time_step', type=cli.POSITIVE_INT,
                        help="time steps T (default: the checkpoint's, else the paper's)")
    parser.add_argument('--vth', type=cli.POSITIVE, help="firing threshold (default: the checkpoint's, else 2.0)")
    parser.add_argument('--leaky', type=cli.ANY_FLOAT,
                        help="LIF leak in (0, 1); 1 means IF (default: the checkpoint's, else the paper's)")
    parser.add_argument('--test-batch', default=200, type=cli.POSITIVE_INT, help='test batch size')
    parser.add_argument('--resume', required=True, metavar='FILE',
                        help="checkpoint to evaluate (this project's or the paper's release)")
    parser.add_argument('--sweep-T', nargs='+', type=cli.POSITIVE_INT, metavar='T',
                        help='also measure the rates at each of these T (table, JSON/CSV, plot)')
    parser.add_argument('--out-dir', metavar='DIR',
                        help="folder for the statistics files (default: the checkpoint's)")
    parser.add_argument('--overwrite', action='store_true', help='replace statistics files that already exist')
    parser.add_argument('--gpu-id', help='comma-separated GPU indices to use (default: all visible)')
    return parser


def parse_args(argv=None, arch=None, prog=None):
    """Parse and check the flags and select the GPUs; args.arch and args.dataset are always set."""
    parser = build_parser(arch, prog)
    args = parser.parse_args(argv)
    if arch is not None:
        args.arch = arch
    net = NETS[args.arch]
    if args.dataset is None:
        args.dataset = net.dataset
    elif args.dataset not in net.datasets:
        parser.error(f"--dataset: {args.arch} reads {' or '.join(net.datasets)}, got {args.dataset}")
    cli.select_gpus(parser, args.gpu_id)
    return args


def model_kwargs(args, ckpt):
    """build_model arguments but num_classes: the flags first, then the checkpoint's model_args, then the paper's."""
    saved = {k: v for k, v in (ckpt.get('model_args') or {}).items() if k in _MODEL_KWARGS}
    paper = settings.defaults(args.arch)
    return {**saved,
            'time_step': args.time_step or saved.get('time_step', paper['time_step']),
            'leaky': args.leaky if args.leaky is not None else saved.get('leaky', paper['leaky']),
            'vth': args.vth or saved.get('vth', paper['vth'])}


def prepare_outputs(folder, paths, overwrite):
    """Create folder; refuse (CheckpointError) to replace existing statistics files unless overwrite."""
    # Checked before the evaluation, which can take long, rather than when writing.
    for path in paths:
        if os.path.exists(path) and not overwrite:
            raise CheckpointError(f'{path} exists; pass --overwrite to replace it or --out-dir to write elsewhere')
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f'cannot create {folder}: {exc.strerror or exc}') from exc


def evaluate(model, loader, device, title):
    """evaluate_rates with a progress bar (shown only on a terminal)."""
    bar = Bar(title, max=len(loader), file=sys.stderr)
    stats = evaluate_rates(model.to(device), loader, device, progress=lambda done, total: bar.next())
    bar.finish()
    return stats


class EvalData:
    """The test set's loader for a given T, and its class count; spike input is binned into T frames."""

    def __init__(self, args, device):
        """Remember where and how to load the test set; nothing is read yet."""
        self.args, self.device = args, device
        self.spike_input = ARCHITECTURES[args.arch].spike_input
        self.num_classes = None
        self._loaders = {}

    def loader(self, time_step):
        """The test loader for time_step (images are loaded once for every T)."""
        key = time_step if self.spike_input else None
        if key not in self._loaders:
            args = self.args
            _, test_set, self.num_classes = get_datasets(args.dataset, args.path, time_step)
            if len(test_set) == 0:
                raise DataError(f'the {args.dataset} test set under {args.path} has no samples')
            self._loaders[key] = DataLoader(test_set, batch_size=args.test_batch, shuffle=False,
                                            num_workers=args.workers, pin_memory=self.device.type == 'cuda')
        return self._loaders[key]


def measure(arch, kwargs, state_dict, data, device):
    """Statistics of the given weights for a network built with kwargs."""
    model = build_model(arch, **kwargs)
    model.load_state_dict(state_dict)
    return evaluate(model, data.loader(kwargs['time_step']), device, f"T={kwargs['time_step']}")


def write_stats(paths, payload, runs, draw):
    """Write the JSON and CSV files of one or more runs, and draw(path) the PNG."""
    write_json(paths['json'], payload)
    write_csv(paths['csv'], runs)
    draw(paths['png'])
    print('==> Wrote ' + ', '.join(paths.values()))


def run(args):
    """Evaluate, print and write the statistics; raises DataError / CheckpointError."""
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    print(f'==> Device: {device}' + ('' if device.type == 'cuda' else ' (no CUDA GPU available)'))
    ckpt = load_checkpoint(args.resume)
    kwargs = model_kwargs(args, ckpt)
    folder = args.out_dir or os.path.dirname(os.path.abspath(args.resume))
    paths = output_paths(args.resume, kwargs['time_step'], folder)
    sweep_paths = output_paths(args.resume, args.sweep_T, folder) if args.sweep_T else {}
    prepare_outputs(folder, list(paths.values()) + list(sweep_paths.values()), args.overwrite)

    print(f'==> Preparing dataset {args.dataset}')
    data = EvalData(args, device)
    data.loader(kwargs['time_step'])
    kwargs['num_classes'] = data.num_classes
    print(f"==> Model {args.arch} ({data.num_classes} classes) from {args.resume}")
    model = build_model(args.arch, **kwargs)
    load_into_model(model, ckpt, expected_arch=args.arch, expected_args={'num_classes': data.num_classes})
    stats = evaluate(model, data.loader(kwargs['time_step']), device, f"T={kwargs['time_step']}")
    print(f'==> {stats.samples} test samples, T={stats.time_step}, {neuron_text(stats)}, Vth {stats.vth:g}')
    print(' Test Loss:  %.8f, Test Acc:  %.2f' % (stats.loss, stats.acc))
    print(format_table(stats))

    meta = {'checkpoint': os.path.abspath(args.resume), 'arch': args.arch, 'dataset': args.dataset}
    title = f'{args.arch} on {args.dataset}, {neuron_text(stats)}'
    write_stats(paths, {**meta, **stats_dict(stats)}, [stats],
                lambda path: plot_rates(path, stats, f'{title}, T={stats.time_step}, acc {stats.acc:.2f}%'))
    if args.sweep_T:
        runs = [stats if t == stats.time_step else measure(args.arch, dict(kwargs, time_step=t), model.state_dict(),
                                                           data, device)
                for t in args.sweep_T]
        print(f'==> Rates as a function of T ({neuron_text(stats)})')
        print(format_sweep(runs))
        write_stats(sweep_paths, {**meta, 'runs': [stats_dict(s) for s in runs]}, runs,
                    lambda path: plot_sweep(path, runs, title))
    return stats


def main(argv=None, arch=None, prog=None):
    """Command-line entry point; returns the exit status (errors: one line on stderr)."""
    args = parse_args(argv, arch, prog)
    try:
        run(args)
    except (DataError, CheckpointError) as exc:
        print(f'{prog or os.path.basename(sys.argv[0])}: error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
