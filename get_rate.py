"""Firing-rate and operation statistics of a trained checkpoint, for any of the paper's networks.

Evaluates the checkpoint on the test set (the one it was trained on unless
`--dataset` says otherwise): loss, accuracy, each spiking layer's average
firing rate and the neuron-weighted total, spikes, synaptic operations (SOPs),
MACs and energy per test sample next to those of the same net as an ANN
(utils.analysis.sops). Writes them next to the checkpoint as
rates_<checkpoint>_T<T>.{json,csv,png}; `--sweep-T` adds the same statistics
for several T (rates_<checkpoint>_sweepT<...>.*).

    python get_rate.py --arch alexnetf --dataset cifar10 --path ./data --time_step 30 --leaky 0.99 \
        --resume checkpoints/cifar10/model_best.pth.tar --sweep-T 10 30 100
"""
import inspect
import os
import signal
import sys

import torch

from modules import NETS, build_model, settings
from utils import flags, signals
from utils.analysis.sweep import LoadersByT, measure as evaluate, model_at
from utils.data.datasets import DataError
from utils.checkpoint import load_checkpoint, load_into_model, normalize_state_dict
from utils.files import CheckpointError, check_outputs
from utils.analysis.rates import (format_sweep, format_table, neuron_text, output_paths, rates_png, stats_dict,
                                  sweep_png, write_files)
from utils.analysis.sops import E_AC_PJ, E_MAC_PJ, EnergyCosts

_MODEL_KWARGS = set(inspect.signature(build_model).parameters) - {'name'}


def build_parser(arch=None, prog=None):
    """The flags; with a fixed `arch` there is no --arch flag and the data sets are that network's."""
    parser = flags.OneLineParser(prog=prog, description='Firing-rate statistics of a trained IDE-FSNN checkpoint: '
                                                      'test loss/accuracy, per-layer and total average rates.')
    if arch is None:
        parser.add_argument('--arch', required=True, choices=sorted(NETS), help='network of the checkpoint')
    names = sorted(NETS) if arch is None else [arch]
    parser.add_argument('-d', '--dataset', choices=sorted({d for n in names for d in NETS[n].datasets}),
                        help="test set (default: the checkpoint's, else the network's: " +
                             ', '.join(f"{n} {NETS[n].dataset}" for n in names) + ')')
    parser.add_argument('--path', default='./data', help='data folder')
    parser.add_argument('-j', '--workers', default=4, type=flags.NON_NEGATIVE_INT, help='data loading processes')
    parser.add_argument('-t', '--time_step', type=flags.POSITIVE_INT,
                        help="time steps T (default: the checkpoint's, else the paper's)")
    parser.add_argument('--vth', type=flags.POSITIVE, help="firing threshold (default: the checkpoint's, else 2.0)")
    parser.add_argument('--leaky', type=flags.ANY_FLOAT,
                        help="LIF leak in (0, 1); 1 means IF (default: the checkpoint's, else the paper's)")
    parser.add_argument('--test-batch', default=200, type=flags.POSITIVE_INT, help='test batch size')
    parser.add_argument('--resume', required=True, metavar='FILE',
                        help="checkpoint to evaluate (this project's or the paper's release)")
    parser.add_argument('--sweep-T', nargs='+', type=flags.POSITIVE_INT, metavar='T',
                        help='also measure the rates at each of these T (table, JSON/CSV, plot)')
    parser.add_argument('--out-dir', metavar='DIR',
                        help="folder for the statistics files (default: the checkpoint's)")
    parser.add_argument('--overwrite', action='store_true', help='replace statistics files that already exist')
    parser.add_argument('--e-ac', type=flags.NON_NEGATIVE, default=E_AC_PJ, metavar='PJ',
                        help=f'energy of one synaptic operation (accumulate), pJ (default: {E_AC_PJ}, '
                             f'32-bit float add, 45 nm)')
    parser.add_argument('--e-mac', type=flags.NON_NEGATIVE, default=E_MAC_PJ, metavar='PJ',
                        help=f'energy of one multiply-accumulate, pJ (default: {E_MAC_PJ}, 32-bit float, 45 nm)')
    parser.add_argument('--gpu-id', help='comma-separated GPU indices to use (default: all visible)')
    return parser


def parse_args(argv=None, arch=None, prog=None):
    """Parse and check the flags and select the GPUs; args.arch is set, args.dataset only if typed."""
    parser = build_parser(arch, prog)
    args = parser.parse_args(argv)
    if arch is not None:
        args.arch = arch
    net = NETS[args.arch]
    if args.dataset is not None and args.dataset not in net.datasets:
        parser.error(f"--dataset: {args.arch} reads {' or '.join(net.datasets)}, got {args.dataset}")
    if args.sweep_T:
        args.sweep_T = sorted(set(args.sweep_T))
    flags.select_gpus(parser, args.gpu_id)
    return args


def choose_device(gpu_id):
    """(device, one line naming it and why it was chosen)."""
    if torch.cuda.is_available():
        asked = f', --gpu-id {gpu_id}' if gpu_id is not None else ''
        return torch.device('cuda'), f'==> Device: cuda ({torch.cuda.get_device_name(0)}{asked})'
    why = (f'--gpu-id {gpu_id} asks for a GPU, but no CUDA GPU is available' if gpu_id is not None
           else 'no CUDA GPU available')
    return torch.device('cpu'), f'==> Device: cpu ({why})'


def trained_dataset(ckpt, arch):
    """The data set the checkpoint records it was trained on, if this network reads it; else None."""
    saved_args = ckpt.get('args')
    saved = saved_args.get('dataset') if isinstance(saved_args, dict) else None
    return saved if saved in NETS[arch].datasets else None


def choose_dataset(typed, trained, arch):
    """(data set to evaluate on, one line to print or None): the typed one, else the trained one, else the default."""
    if typed is None:
        return (trained, f'==> Data set {trained}, as the checkpoint was trained') if trained else \
            (NETS[arch].dataset, None)
    if trained is not None and typed != trained:
        return typed, f'==> Note: evaluating on {typed}; the checkpoint was trained on {trained}'
    return typed, None


def model_kwargs(args, ckpt):
    """build_model arguments but num_classes: the flags first, then the checkpoint's model_args, then the paper's."""
    saved = {k: v for k, v in (ckpt.get('model_args') or {}).items() if k in _MODEL_KWARGS}
    paper = settings.defaults(args.arch)
    return {**saved,
            'time_step': args.time_step or saved.get('time_step', paper['time_step']),
            'leaky': args.leaky if args.leaky is not None else saved.get('leaky', paper['leaky']),
            'vth': args.vth or saved.get('vth', paper['vth'])}


def check_fits(ckpt, arch, kwargs):
    """CheckpointError unless the checkpoint's weights fit network arch (with its own number of classes)."""
    classifier = normalize_state_dict(ckpt['state_dict']).get('classifier.weight')
    classes = classifier.shape[0] if getattr(classifier, 'ndim', 0) == 2 else 10
    load_into_model(build_model(arch, **{**kwargs, 'num_classes': classes}), ckpt, expected_arch=arch)


def write_stats(paths, payload, runs, png, costs, written):
    """Write the JSON, CSV and PNG files of one or more runs together; append their paths to written."""
    # A stop while the files are moved into place would leave some replaced and some not.
    with signals.deferred():
        write_files(paths, payload, runs, png, costs)
        written.extend(paths.values())
    print('==> Wrote ' + ', '.join(paths.values()))


def run(args, written):
    """Evaluate, print and write the statistics, appending the paths written; raises DataError / CheckpointError."""
    device, device_line = choose_device(args.gpu_id)
    print(device_line)
    ckpt = load_checkpoint(args.resume)
    kwargs = model_kwargs(args, ckpt)
    check_fits(ckpt, args.arch, kwargs)
    folder = args.out_dir or os.path.dirname(os.path.abspath(args.resume))
    paths = output_paths(args.resume, kwargs['time_step'], folder)
    sweep_paths = output_paths(args.resume, args.sweep_T, folder) if args.sweep_T else {}
    # At start-up, creating nothing: the data's preparation and the evaluation can take hours.
    check_outputs(list(paths.values()) + list(sweep_paths.values()), args.overwrite,
                  ' or --out-dir to write elsewhere')
    args.dataset, dataset_line = choose_dataset(args.dataset, trained_dataset(ckpt, args.arch), args.arch)
    if dataset_line:
        print(dataset_line)
    costs = EnergyCosts(args.e_ac, args.e_mac)

    print(f'==> Preparing dataset {args.dataset}')
    data = LoadersByT(args.arch, args.dataset, args.path, args.test_batch, args.workers, device)
    data(kwargs['time_step'])
    kwargs['num_classes'] = data.num_classes
    print(f"==> Model {args.arch} ({data.num_classes} classes) from {args.resume}")
    model = build_model(args.arch, **kwargs)
    load_into_model(model, ckpt, expected_arch=args.arch, expected_args={'num_classes': data.num_classes})
    stats = evaluate(model, data(kwargs['time_step']), device, f"T={kwargs['time_step']}")
    print(f'==> {stats.samples} test samples, T={stats.time_step}, {neuron_text(stats)}, Vth {stats.vth:g}')
    print(' Test Loss:  %.8f, Test Acc:  %.2f' % (stats.loss, stats.acc))
    print('==> Per test sample:')
    print(format_table(stats, costs))

    meta = {'checkpoint': os.path.abspath(args.resume), 'arch': args.arch, 'dataset': args.dataset}
    title = f'{args.arch} on {args.dataset}, {neuron_text(stats)}'
    write_stats(paths, {**meta, **stats_dict(stats, costs)}, [stats],
                rates_png(stats, f'{title}, T={stats.time_step}, acc {stats.acc:.2f}%'), costs, written)
    if args.sweep_T:
        runs = [stats if t == stats.time_step else
                evaluate(model_at(args.arch, kwargs, model.state_dict(), t), data(t), device, f'T={t}')
                for t in args.sweep_T]
        print(f'==> Accuracy, rates, SOPs and energy as functions of T ({neuron_text(stats)})')
        print(format_sweep(runs, costs))
        write_stats(sweep_paths, {**meta, 'runs': [stats_dict(s, costs) for s in runs]}, runs,
                    sweep_png(runs, title, costs), costs, written)
    return stats


def interrupted_line(prog, written):
    """The one line after a stop by signal: what was written in full before it, if anything."""
    kept = f'; written before the stop: {", ".join(written)}' if written else '; no statistics file written'
    return f'{prog}: interrupted{kept}'


def main(argv=None, arch=None, prog=None):
    """Command-line entry point; returns the exit status (errors: one line on stderr; 130/143 after SIGINT/SIGTERM)."""
    prog = prog or os.path.basename(sys.argv[0])
    args = parse_args(argv, arch, prog)
    written = []
    try:
        # Ctrl-C raises KeyboardInterrupt already.
        with signals.interrupting((signal.SIGTERM,)):
            run(args, written)
    except (KeyboardInterrupt, signals.Interrupted) as exc:
        print(interrupted_line(prog, written), file=sys.stderr)
        return 128 + getattr(exc, 'signum', signal.SIGINT)
    except (DataError, CheckpointError) as exc:
        print(f'{prog}: error: {exc}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
