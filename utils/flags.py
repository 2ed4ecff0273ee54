"""The command-line flags every training script shares, their validation, and GPU selection.

Longer than most modules: every flag with its help text stands here once, grouped by what it sets.
"""
import argparse
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from modules import (ARCHITECTURES, BN_MODES, GRADIENTS, METHODS, NETS, PHANTOM_FORMS, SOLVERS, SURROGATES,
                     adjoint_solve, is_leaky, settings)

OPTIMIZERS = ('SGD', 'Adam')
# Flags that belong to this invocation or machine: a resumed run never takes them from the checkpoint.
LOCAL_FLAGS = ('checkpoint', 'resume', 'rewind', 'evaluate', 'gpu_id', 'sync_bn', 'start_epoch', 'deterministic',
               'dist_timeout', 'sweep_T', 'out_dir', 'overwrite')
# Defaults of the flags that are not the paper's settings (those come from modules.settings).
# The gradient's options besides the paper's solver settings (build_model's defaults).
GRADIENT_DEFAULTS = dict(solver_memory=None, grad='ide', phantom_k=5, phantom_tau=0.5, phantom_form='neumann',
                         forward_residual=True, jac_norm_every=0, jac_reg=0.0, jac_reg_freq=1.0, solver_log=None,
                         method='ide', surrogate='sigmoid', surrogate_alpha=None, detach_reset=False, bptt_bn='batch')
# Flags added after checkpoints were written, with the value that reproduces what such an older run did.
SAVED_BEFORE_FLAG = dict(bptt_bn='running')
RUN_DEFAULTS = dict(resume='', rewind=False, manualSeed=None, evaluate=False, sweep_T=None, out_dir=None,
                    overwrite=False, gpu_id=None, sync_bn=False, amp=False, tf32=False, deterministic=False,
                    dist_timeout=60.0)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line `<prog>: error: --flag: <what is accepted>`, exit code 2."""

    def error(self, message):
        """Print the message on one line (no usage dump) and exit with code 2."""
        # argparse writes 'argument -t/--time_step: ...'; name the first long flag alone.
        match = re.match(r'argument ([^:]+): (.*)', message, re.S)
        if match:
            names = match.group(1).split('/')
            flag = next((n for n in names if n.startswith('--')), names[0])
            message = f'{flag}: {match.group(2)}'
        unknown = re.match(r'unrecognized arguments: (.*)', message, re.S)
        if unknown:
            message = f'{unknown.group(1)}: not a flag of this script (see --help)'
        self.exit(2, f'{self.prog}: error: {" ".join(message.split())}\n')


# The networks compute in float32: a number it rounds to infinity or to zero cannot mean what was typed.
FLOAT32_MAX = torch.finfo(torch.float32).max


def _as_float32(value):
    """value rounded to float32 (inf beyond its range, 0 below its smallest number)."""
    return torch.tensor(value, dtype=torch.float32).item()


def _number(kind, accepted, test):
    """An argparse type: kind(text) that must pass test, else an error naming what is accepted."""
    def convert(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {accepted}, got {text!r}') from None
        if not test(value):
            beyond = isinstance(value, float) and math.isfinite(value) and not math.isfinite(_as_float32(value))
            why = f' (beyond float32\'s largest number, {FLOAT32_MAX:.3g})' if beyond else ''
            raise argparse.ArgumentTypeError(f'expected {accepted}, got {text!r}{why}')
        return value
    return convert


def _finite(test):
    """test of the value as float32 holds it, which must be finite."""
    return lambda v: math.isfinite(_as_float32(v)) and test(_as_float32(v))


POSITIVE_INT = _number(int, 'an integer >= 1', lambda v: v >= 1)
NON_NEGATIVE_INT = _number(int, 'an integer >= 0', lambda v: v >= 0)
# Below 2**31 so that seed + rank (one stream per process) stays a valid numpy seed.
SEED = _number(int, 'an integer in [0, 2**31)', lambda v: 0 <= v < 2 ** 31)
POSITIVE = _number(float, 'a number > 0', _finite(lambda v: v > 0))
NON_NEGATIVE = _number(float, 'a number >= 0', _finite(lambda v: v >= 0))
PROBABILITY = _number(float, 'a number in [0, 1)', _finite(lambda v: 0 <= v < 1))
ANY_FLOAT = _number(float, 'a number', _finite(lambda v: True))


DAMPING = _number(float, 'a number in (0, 1]', _finite(lambda v: 0 < v <= 1))
FRACTION = DAMPING  # the same interval (0, 1], for a fraction of the steps


def _or_none(kind):
    """An argparse type: kind(text), or None for the word none."""
    def convert(text):
        return None if text.strip().lower() == 'none' else kind(text)
    return convert


# The solver stops once the residual is below tol × its first value: only a fraction can ask for any iteration.
TOLERANCE = _or_none(_number(float, 'a fraction in (0, 1)', _finite(lambda v: 0 < v < 1)))
OPTIONAL_POSITIVE = _or_none(POSITIVE)
OPTIONAL_POSITIVE_INT = _or_none(POSITIVE_INT)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already says what the default is."""

    def _get_help_string(self, action):
        return action.help if '(default:' in (action.help or '') else super()._get_help_string(action)


def build_parser(arch, description=None, suppress=False):
    """The training script's parser for network arch; suppress=True leaves out every default (to see what was typed)."""
    net = NETS[arch]
    values = {**settings.defaults(arch), **GRADIENT_DEFAULTS, **RUN_DEFAULTS,
              'checkpoint': os.path.join('checkpoints', os.path.splitext(net.script)[0])}

    def default(key):
        """The default of key, or nothing at all."""
        return argparse.SUPPRESS if suppress else values[key]

    parser = OneLineParser(prog=net.script, description=description, formatter_class=DefaultsHelpFormatter)
    for add_flags in (_data_flags, _network_flags, _gradient_flags, _optimisation_flags, _run_flags, _device_flags):
        add_flags(parser, default, net)
    return parser


def _data_flags(parser, default, net):
    """Where the data is and how it is loaded."""
    group = parser.add_argument_group('data')
    group.add_argument('-d', '--dataset', default=default('dataset'), choices=net.datasets)
    group.add_argument('--path', default=default('path'), help='data folder')
    group.add_argument('-j', '--workers', type=NON_NEGATIVE_INT, default=default('workers'),
                       help='data loading processes (0: load in the main process)')


def _network_flags(parser, default, net):
    """The network's dynamics."""
    group = parser.add_argument_group('network')
    group.add_argument('-t', '--time_step', type=POSITIVE_INT, default=default('time_step'),
                       help='simulation time steps T')
    group.add_argument('--vth', type=POSITIVE, default=default('vth'), help='firing threshold')
    group.add_argument('--leaky', type=ANY_FLOAT, default=default('leaky'),
                       help='LIF leak in (0, 1); any other value (or none) means IF neurons')
    group.add_argument('--drop', type=PROBABILITY, default=default('drop'), help='variational dropout rate')


def _gradient_flags(parser, default, net):
    """How the gradient is obtained: the implicit backward pass and its solver, or BPTT."""
    group = parser.add_argument_group('gradient')
    group.add_argument('--solver', default=default('solver'), choices=sorted(SOLVERS),
                       help='adjoint solver of the implicit backward pass')
    group.add_argument('--threshold', type=POSITIVE_INT, default=default('threshold'),
                       help='maximum solver iterations')
    group.add_argument('--tol', type=TOLERANCE, default=default('tol'),
                       help='stop the solver once the residual is below this fraction of its first value, e.g. '
                            '1e-3 (a fall by 1000x); none: the paper\'s rule, run all iterations (default: none)')
    group.add_argument('--solver-memory', type=OPTIONAL_POSITIVE_INT, default=default('solver_memory'),
                       metavar='M', help='terms kept by broyden (default 27) or anderson (default 5); none: the '
                                         'solver\'s default (default: none)')
    group.add_argument('--grad', default=default('grad'), choices=sorted(GRADIENTS),
                       help='ide: the exact implicit gradient (adjoint solve); jfb: Jacobian-free, y = dL/da; '
                            'phantom: --phantom-k damped steps of the adjoint iteration')
    group.add_argument('--phantom-k', type=POSITIVE_INT, default=default('phantom_k'), help='phantom: steps K')
    group.add_argument('--phantom-tau', type=DAMPING, default=default('phantom_tau'),
                       help='phantom: damping tau in (0, 1]')
    group.add_argument('--phantom-form', default=default('phantom_form'), choices=PHANTOM_FORMS,
                       help='phantom: neumann, the Neumann-series phantom gradient (K damped adjoint steps with J at '
                            'one point); unroll, the unrolled one (K damped steps of f from the state, '
                            'differentiated), as Geng et al. 2021 name them')
    group.add_argument('--forward-residual', action=argparse.BooleanOptionalAction,
                       default=default('forward_residual'),
                       help='measure |f(a) - a| / |a| of the simulated rate at every training step (one more '
                            'application of f without autograd)')
    group.add_argument('--jac-norm-every', type=NON_NEGATIVE_INT, default=default('jac_norm_every'), metavar='N',
                       help='every N training steps measure the feedback operator\'s spectral norm over Vth and '
                            '||df/da||_2 where the backward linearises f, by power iteration (0: never)')
    group.add_argument('--jac-reg', type=NON_NEGATIVE, default=default('jac_reg'), metavar='GAMMA',
                       help='add GAMMA ||df/da||_F^2 / d to the loss where the backward linearises f (Bai et al. '
                            '2021; Hutchinson estimate, one random vector a step; 0: off)')
    group.add_argument('--jac-reg-freq', type=FRACTION, default=default('jac_reg_freq'), metavar='P',
                       help='apply --jac-reg on a random fraction P in (0, 1] of the training steps')
    group.add_argument('--solver-log', metavar='FILE', default=default('solver_log'),
                       help='append every training step\'s solver statistics to this CSV file')
    group.add_argument('--method', default=default('method'), choices=METHODS,
                       help='ide: implicit differentiation on the equilibrium; bptt: backpropagation through '
                            'the T steps with a surrogate spike derivative')
    group.add_argument('--surrogate', default=default('surrogate'), choices=sorted(SURROGATES),
                       help='bptt: the surrogate of the spike\'s derivative')
    group.add_argument('--surrogate-alpha', type=OPTIONAL_POSITIVE, default=default('surrogate_alpha'),
                       help='bptt: the surrogate\'s sharpness alpha, as SpikingJelly defines it (rect: height alpha, '
                            'width 1/alpha); none: its default (sigmoid 4, atan 2, rect 1) (default: none)')
    group.add_argument('--detach-reset', action=argparse.BooleanOptionalAction, default=default('detach_reset'),
                       help='bptt: cut the gradient of the reset term')
    group.add_argument('--bptt-bn', default=default('bptt_bn'), choices=BN_MODES,
                       help='bptt: how BN inside the feedback loop normalises in training: batch, each time step\'s '
                            'batch statistics; running, the running statistics (IDE\'s forward exactly)')


def _optimisation_flags(parser, default, net):
    """The optimizer and its schedule."""
    group = parser.add_argument_group('optimisation')
    group.add_argument('--epochs', type=POSITIVE_INT, default=default('epochs'))
    group.add_argument('--start-epoch', type=NON_NEGATIVE_INT, default=default('start_epoch'),
                       help='epoch to start a new run at (a resumed run continues from its checkpoint)')
    group.add_argument('--train-batch', type=POSITIVE_INT, default=default('train_batch'),
                       help='training batch per process (global batch = processes x this)')
    group.add_argument('--test-batch', type=POSITIVE_INT, default=default('test_batch'))
    group.add_argument('--optimizer', default=default('optimizer'), choices=OPTIMIZERS)
    group.add_argument('--lr', type=POSITIVE, default=default('lr'), help='initial learning rate')
    group.add_argument('--warmup', type=NON_NEGATIVE_INT, default=default('warmup'),
                       help='iterations of linear learning-rate warm-up')
    group.add_argument('--schedule', type=POSITIVE_INT, nargs='+', default=default('schedule'),
                       help='epochs at which the learning rate is multiplied by --gamma')
    group.add_argument('--gamma', type=POSITIVE, default=default('gamma'))
    group.add_argument('--momentum', type=NON_NEGATIVE, default=default('momentum'), help='SGD momentum')
    group.add_argument('--weight-decay', '--wd', type=NON_NEGATIVE, default=default('weight_decay'))


def _run_flags(parser, default, net):
    """Where the run's files go, what it continues from, and what it does."""
    group = parser.add_argument_group('run')
    group.add_argument('-c', '--checkpoint', default=default('checkpoint'),
                       help='folder for checkpoints and logs (resuming: the resumed file\'s folder)')
    group.add_argument('--resume', default=default('resume'), metavar='FILE',
                       help='checkpoint to continue training from (or to evaluate with -e)')
    group.add_argument('--rewind', action='store_true', default=default('rewind'),
                       help='resume an earlier checkpoint of the folder\'s run (e.g. model_best) in that folder; '
                            'the later epochs\' log and checkpoint are kept aside')
    group.add_argument('-e', '--evaluate', action='store_true', default=default('evaluate'),
                       help='only evaluate the --resume checkpoint on the test set; writes nothing')
    group.add_argument('--sweep-T', type=POSITIVE_INT, nargs='+', default=default('sweep_T'), metavar='T',
                       help='with -e: test accuracy at each of these T, written beside the checkpoint '
                            '(acc_<checkpoint>_sweepT<...>.json/.csv/.png)')
    group.add_argument('--out-dir', default=default('out_dir'), metavar='DIR',
                       help='with --sweep-T: the folder for its files (default: the checkpoint\'s)')
    group.add_argument('--overwrite', action='store_true', default=default('overwrite'),
                       help='with --sweep-T: replace the files of an earlier sweep')
    group.add_argument('--manualSeed', type=SEED, default=default('manualSeed'),
                       help='random seed (default: a random one, printed)')


def _device_flags(parser, default, net):
    """Devices, processes and number formats."""
    group = parser.add_argument_group('devices')
    group.add_argument('--gpu-id', default=default('gpu_id'),
                       help='comma-separated GPU indices to use (default: all visible)')
    group.add_argument('--sync-bn', action='store_true', default=default('sync_bn'),
                       help='synchronise BatchNorm statistics across processes (torchrun)')
    group.add_argument('--amp', action=argparse.BooleanOptionalAction, default=default('amp'),
                       help='bfloat16 autocast for the linear operators (GPUs, and CPUs with AVX512-BF16 or AMX)')
    group.add_argument('--tf32', action=argparse.BooleanOptionalAction, default=default('tf32'),
                       help='let the simulation and f use TF32 on Ampere and later GPUs (the adjoint solve stays '
                            'full float32)')
    group.add_argument('--deterministic', action='store_true', default=default('deterministic'),
                       help='deterministic cuDNN and cuBLAS kernels, so that a GPU run repeats exactly (slower)')
    group.add_argument('--dist-timeout', type=POSITIVE, default=default('dist_timeout'), metavar='MINUTES',
                       help='how long a process under torchrun waits for the others (e.g. while one prepares data)')


@dataclass(frozen=True)
class Mode:
    """The mode in which a flag acts: `when`, as a user would type it, and the test of the parsed flags for it."""
    when: str
    holds: Callable


def _exact_solve(args):
    """True when the gradient is the exact implicit one, found by an adjoint solve."""
    return args.method == 'ide' and args.grad == 'ide'


IDE = Mode('--method ide', lambda args: args.method == 'ide')
BPTT = Mode('--method bptt', lambda args: args.method == 'bptt')
EXACT = Mode('--method ide --grad ide', _exact_solve)
PHANTOM = Mode('--method ide --grad phantom', lambda args: args.method == 'ide' and args.grad == 'phantom')
SOLVER_MEMORY = Mode('--method ide --grad ide --solver ' + '|'.join(
    sorted(name for name, solver in SOLVERS.items() if 'memory' in solver.options)),
    lambda args: _exact_solve(args) and 'memory' in SOLVERS[args.solver].options)
EVALUATE = Mode('-e --resume FILE', lambda args: args.evaluate)
SWEEP = Mode('-e --resume FILE --sweep-T ...', lambda args: args.evaluate and bool(args.sweep_T))
RESUME = Mode('--resume FILE (training)', lambda args: bool(args.resume) and not args.evaluate)
JAC_REG = Mode('--method ide --jac-reg γ (γ > 0)', lambda args: args.method == 'ide' and args.jac_reg > 0)

# Every flag that acts only in some mode: typed outside it, it would change nothing (and be saved in the
# checkpoint as if it had), so it is refused. A new flag of that kind joins with one entry.
FLAG_MODES = {
    'grad': IDE, 'forward_residual': IDE, 'solver_log': IDE,
    'solver': EXACT, 'threshold': EXACT, 'tol': EXACT, 'solver_memory': SOLVER_MEMORY,
    'phantom_k': PHANTOM, 'phantom_tau': PHANTOM, 'phantom_form': PHANTOM,
    'jac_norm_every': IDE, 'jac_reg': IDE, 'jac_reg_freq': JAC_REG,
    'surrogate': BPTT, 'surrogate_alpha': BPTT, 'detach_reset': BPTT, 'bptt_bn': BPTT,
    'sweep_T': EVALUATE, 'out_dir': SWEEP, 'overwrite': SWEEP, 'rewind': RESUME,
}


def flag_name(dest):
    """The command-line name of the flag stored as dest: 'solver_memory' -> '--solver-memory'."""
    return '--' + dest.replace('_', '-')


def inert_flag(args, typed):
    """The one-line refusal of the first typed flag (a dest in typed) that has no effect in the mode of args, or None.

    Only typed flags count: a default, or a flag a resumed run takes from its checkpoint, is never refused.
    """
    for dest, mode in FLAG_MODES.items():
        if dest in typed and not mode.holds(args):
            return f'{flag_name(dest)}: has no effect unless {mode.when}; leave it out'
    return None


def check_args(parser, args, arch):
    """Cross-flag checks argparse cannot express; parser.error on the first failure."""
    schedule = args.schedule
    if any(b <= a for a, b in zip(schedule, schedule[1:])):
        parser.error(f'--schedule: expected strictly increasing epochs, got {" ".join(map(str, schedule))}')
    if args.evaluate and not args.resume:
        parser.error('--evaluate: needs --resume FILE, the checkpoint to evaluate')
    if not args.resume and args.start_epoch >= args.epochs:
        parser.error(f'--start-epoch: expected an epoch below --epochs ({args.epochs}), got {args.start_epoch}')
    if args.sweep_T:
        # One set of T, one file name and a curve drawn left to right, however they were typed (as get_rate.py).
        args.sweep_T = sorted(set(args.sweep_T))
    try:
        adjoint_solve(args.grad, args.solver, args.threshold, args.tol, args.solver_memory, args.phantom_k,
                      args.phantom_tau, args.phantom_form)
    except ValueError as exc:
        parser.error(f'--grad/--solver: {exc}')
    if args.train_batch < 2 and not args.evaluate and ARCHITECTURES[arch].kind == 'fc':
        # BatchNorm1d normalises each unit over the batch alone: one sample has no variance.
        parser.error(f'--train-batch: {arch} normalises each unit over the training batch, which needs at '
                     f'least 2 samples, got {args.train_batch}')


def parse_gpu_ids(text):
    """The distinct indices in 'a,b,...', or None if the text is not such a list."""
    parts = [part.strip() for part in text.split(',')]
    if not all(part.isdigit() for part in parts):
        return None
    ids = [int(part) for part in parts]
    return ids if len(set(ids)) == len(ids) else None


def select_gpus(parser, gpu_id):
    """Validate --gpu-id and restrict CUDA_VISIBLE_DEVICES to it (before CUDA is initialised).

    Returns the lines a user should read about the choice (none when there is nothing to say).
    """
    if gpu_id is None:
        return []
    ids = parse_gpu_ids(gpu_id)
    if ids is None:
        parser.error(f'--gpu-id: expected distinct comma-separated GPU indices such as 0 or 0,1, got {gpu_id!r}')
    # NVML counts the GPUs without initialising CUDA, so the mask set below still takes effect.
    visible = torch.cuda.device_count()
    if visible == 0:
        return [f'warning: --gpu-id {gpu_id}: no CUDA GPU is available here; running on the CPU']
    if any(i >= visible for i in ids):
        parser.error(f'--gpu-id: expected indices in 0..{visible - 1} ({visible} GPUs visible), got {gpu_id}')
    # Indices count among the GPUs already visible, so an outer CUDA_VISIBLE_DEVICES is respected.
    outer = os.environ.get('CUDA_VISIBLE_DEVICES')
    names = [part.strip() for part in outer.split(',')] if outer else [str(i) for i in range(visible)]
    os.environ['CUDA_VISIBLE_DEVICES'] = ','.join(names[i] for i in ids)
    if len(ids) > 1 and int(os.environ.get('WORLD_SIZE', '1')) == 1:
        return [f'warning: --gpu-id {gpu_id}: one process trains on one GPU, the first of them; '
                f'launch torchrun --nproc_per_node={len(ids)} to train on all {len(ids)}']
    return []


def parse_args(arch, argv=None, description=None):
    """Parse and validate argv for network arch's script.

    Returns (args, the set of flags typed, lines to show the user about the devices).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(arch, description)
    args = parser.parse_args(argv)
    explicit = set(vars(build_parser(arch, description, suppress=True).parse_args(argv)))
    # A resumed run's mode comes in part from its checkpoint: its typed flags are checked once it is read.
    refusal = inert_flag(args, explicit if not args.resume else explicit & set(LOCAL_FLAGS))
    if refusal:
        parser.error(refusal)
    check_args(parser, args, arch)
    notes = select_gpus(parser, args.gpu_id)
    if args.sync_bn and not torch.cuda.is_available():
        parser.error('--sync-bn: needs CUDA GPUs (SyncBatchNorm runs only there)')
    return args, explicit, notes


def adopt_saved_flags(args, explicit, saved):
    """Take every flag not typed now from a resumed run's flags (saved).

    A typed flag wins. Returns (taken, overridden): the saved values taken
    where they differ from this script's defaults, and the saved values a typed
    flag replaced, each as {flag: (saved value, value used)}.
    """
    taken, overridden = {}, {}
    if saved is not None:
        saved = {**SAVED_BEFORE_FLAG, **saved}
    for key, value in (saved or {}).items():
        if not hasattr(args, key) or key in LOCAL_FLAGS:
            continue
        if key in explicit:
            if getattr(args, key) != value:
                overridden[key] = (value, getattr(args, key))
        else:
            if getattr(args, key) != value:
                taken[key] = (getattr(args, key), value)
            setattr(args, key, value)
    return taken, overridden


def hyperparameters(args):
    """The optimizer's settings that come from the flags (the learning rate is set at every step)."""
    if args.optimizer == 'Adam':
        return dict(weight_decay=args.weight_decay)
    return dict(momentum=args.momentum, weight_decay=args.weight_decay)


def flag_changes(changes):
    """'name=value, ...' or 'name old -> new, ...' for the dicts adopt_saved_flags returns."""
    return ', '.join(f'--{k.replace("_", "-")} {a} -> {b}' for k, (a, b) in sorted(changes.items()))


def neuron_line(leaky):
    """'Neuron: LIF (leaky=λ)' or 'Neuron: IF' for a --leaky value."""
    return f'Neuron: LIF (leaky={leaky:g})' if is_leaky(leaky) else 'Neuron: IF'
