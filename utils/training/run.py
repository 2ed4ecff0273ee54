"""The command-line run every training script shares: flags → data → model → resume → epochs.

A script calls `run(arch, argv, description)`. `main` reads top to bottom; the
folder and resume policy lives in utils/checkpoint.py, one epoch and the
evaluation pass in utils/engine.py.
"""
import contextlib
import datetime
import functools
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from modules import ARCHITECTURES, NETS, build_model, precision
from utils import flags
from utils.analysis import sweep
from utils.training import distributed
from utils.training.resume import (FolderLock, check_folder, check_resumable, is_foreign, log_columns, open_log,
                              remove_stale_temporaries, restore_foreign, restore_training, save_state, saved_log,
                              seed_everything, set_aside_abandoned, training_state, PLOT_NAME)
from utils.training.console import error, warn
from utils.data.datasets import DataError, build_loaders, get_datasets
from utils.training.epoch import (DIAGNOSTICS, FaultGuard, RunError, TooManyFaults, evaluate, get_lr, make_optimizer,
                          native_bf16, train_epoch)
from utils.checkpoint import load_checkpoint, load_into_model
from utils.files import CheckpointError
from utils.training.logger import StepLog

__all__ = ['run', 'main', 'train_epoch', 'get_lr', 'FaultGuard', 'StopRequest', 'TooManyFaults', 'RunError']


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training at the end of a batch."""

    def __init__(self, signum):
        """Remember which signal it was."""
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into a request to stop at the end of the current batch."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        """No signal yet."""
        self.signum = None
        self._previous = {}

    @property
    def requested(self):
        """True once a signal has arrived."""
        return self.signum is not None

    def _handle(self, signum, frame):
        """Record the signal."""
        self.signum = signum
        # A second signal acts at once, as it would without this handler.
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        """Install the handlers."""
        try:
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:
            pass  # not the main thread: signals keep their usual meaning
        return self

    def __exit__(self, *exc):
        """Put the previous handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@dataclass
class Run:
    """What a training run works with, once set up."""
    arch: str
    args: object
    ctx: distributed.Context
    say: object                 # print on rank 0, nothing elsewhere
    device: torch.device = None
    folder: str = None
    model: nn.Module = None
    optimizer: torch.optim.Optimizer = None
    criterion: nn.Module = None
    model_args: dict = None
    train_loader: object = None
    test_loader: object = None
    train_sampler: object = None
    columns: list = None
    last_checkpoint: str = None  # what to resume from after a stop


def main(arch, args, explicit, ctx, state):
    """Evaluate or train network arch as the parsed flags say; return a dict of final numbers.

    `state` (a Run) is filled in as the run proceeds, so that the caller can
    say how to resume after an error or a signal.
    """
    say = state.say
    # 1. The checkpoint to resume and the flags it brings.
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        adopt_checkpoint_flags(arch, args, explicit, ckpt, say)
        if not args.evaluate:
            check_resumable(ckpt, args.resume)
    state.device = device = start_up(args, ctx, say)
    with contextlib.ExitStack() as stack:
        # 2. The folder: owned by this run for its lifetime, never another run's.
        if not args.evaluate:
            state.folder = run_folder(args, explicit)
            state.columns = log_columns(DIAGNOSTICS)
            on_rank0(ctx, device, lambda: claim_folder(stack, state.folder, args, ckpt, state.columns, say))
        # 3. Data, model, loss.
        train_set, test_set, num_classes = load_data(args, ctx, device)
        state.train_loader, state.test_loader, state.train_sampler = build_loaders(
            train_set, test_set, args.train_batch, args.test_batch, args.workers,
            distributed=ctx.enabled, seed=args.manualSeed)
        say(f'Data: {args.dataset}, {len(train_set)} train / {len(test_set)} test, {num_classes} classes')
        state.model_args = model_args_of(args, num_classes)
        model = build(arch, state.model_args, ckpt, say).to(device)
        state.criterion = nn.CrossEntropyLoss().to(device)
        if args.evaluate:
            return evaluate_only(state, model, ckpt)
        # 4. Optimizer, and where training stands.
        state.model = distributed.wrap(model, ctx, device, sync_bn=args.sync_bn)
        state.optimizer = make_optimizer(args, state.model.parameters())
        start_epoch, iteration, best_acc = resume_position(state, ckpt, len(state.train_loader))
        if start_epoch >= args.epochs:
            say(f'Nothing to do: {start_epoch} of --epochs {args.epochs} already done; '
                f'pass a larger --epochs to train further')
            return dict(best_acc=best_acc, epoch=start_epoch)
        if ctx.is_main:
            remove_stale_temporaries(state.folder, say)
        # 5. The epochs.
        step_log = open_step_log(stack, args.solver_log) if ctx.is_main and args.solver_log else None
        with StopRequest() as stop:
            return train_epochs(state, stop, start_epoch, iteration, best_acc,
                                saved_log(ckpt, len(state.columns)), step_log)


def evaluate_only(state, model, ckpt):
    """-e: the test loss and accuracy, and with --sweep-T the accuracy as a function of T (files beside the
    checkpoint)."""
    args, ctx, say = state.args, state.ctx, state.say
    prefix = None
    if args.sweep_T:
        if ctx.enabled:
            raise RunError('--sweep-T runs in one process: start it without torchrun')
        prefix = sweep.sweep_prefix(args.resume, args.sweep_T)
        sweep.refuse_existing(prefix, args.overwrite)  # now, not after the evaluation
    loss, top1, _ = evaluate(model, state.test_loader, state.criterion, state.device, ctx=ctx, amp=args.amp)
    say(f'Test Loss: {loss:.4f}  Test Acc: {top1:.2f}')
    if prefix is None:
        return dict(loss=loss, acc=top1)

    def test_loader_for(time_step):
        """Static input: the same test set for every T; spike input is binned into T frames."""
        if not ARCHITECTURES[state.arch].spike_input:
            return state.test_loader
        _, test_set, _ = get_datasets(args.dataset, args.path, time_step=time_step)
        return build_loaders(test_set, test_set, args.train_batch, args.test_batch, args.workers)[1]

    rows = sweep.sweep_accuracy(state.arch, state.model_args, model.state_dict(), test_loader_for, args.sweep_T,
                                state.device, prefix, amp=args.amp, overwrite=args.overwrite)
    say(f'Test accuracy as a function of T ({flags.neuron_line(args.leaky)})')
    say(sweep.format_rows(rows))
    say('Wrote ' + ', '.join(sweep.sweep_paths(prefix).values()))
    return dict(loss=loss, acc=top1, sweep=rows)


def adopt_checkpoint_flags(arch, args, explicit, ckpt, say):
    """Refuse another network's checkpoint; take the flags not typed now from it, and say what changed."""
    saved_arch = ckpt.get('arch')
    if saved_arch is not None and saved_arch != arch:
        raise CheckpointError(f'{args.resume} holds a {saved_arch} network, {NETS[arch].script} builds {arch}')
    taken, overridden = flags.adopt_saved_flags(args, explicit, ckpt.get('args'))
    if taken:
        say(f'From the checkpoint: {flags.flag_changes(taken)}')
    if overridden:
        say(f'Typed flags override the checkpoint\'s: {flags.flag_changes(overridden)}')


def start_up(args, ctx, say):
    """Seed every generator, settle the number format, say which neuron and device are used; return the device."""
    if args.manualSeed is None:
        # Recorded in the flags, so that a resumed run keeps the same data order.
        # Rank 0's on every process: the processes split the data order this seed shuffles.
        args.manualSeed = distributed.broadcast_object(random.SystemRandom().randrange(2 ** 31), ctx)
    seed_everything(args.manualSeed + ctx.rank)
    device = distributed.device_for(ctx)
    if args.amp and device.type == 'cpu' and not native_bf16():
        if ctx.is_main:
            warn('warning: --amp: this CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX), where bf16 '
                 'convolutions run tens of times slower than float32; running in float32')
        args.amp = False
    precision.allow_tf32(args.tf32)
    say(flags.neuron_line(args.leaky))
    say(device_line(device, ctx, args.train_batch))
    say(f'Seed: {args.manualSeed}')
    return device


def device_line(device, ctx, train_batch):
    """One line naming the device (and the process group under torchrun)."""
    if device.type == 'cuda':
        text = f'Device: {device} ({torch.cuda.get_device_name(device)})'
    else:
        text = 'Device: cpu (no CUDA GPU available; running on the CPU)'
    if ctx.enabled:
        text += (f', {ctx.world_size} processes, global batch {ctx.world_size} x {train_batch} '
                 f'= {ctx.world_size * train_batch}')
    return text


def run_folder(args, explicit):
    """The folder a training run writes: -c, or when resuming without -c, the checkpoint's own folder."""
    if args.resume and 'checkpoint' not in explicit:
        return os.path.dirname(os.path.abspath(args.resume))
    return args.checkpoint


def claim_folder(stack, folder, args, ckpt, columns, say):
    """Lock the run's folder for this run's lifetime and refuse it if it holds another run; apply --rewind."""
    lock = FolderLock(folder)
    stack.callback(lock.release)
    abandoned = check_folder(folder, args.resume, ckpt, columns, rewind=args.rewind)
    if abandoned:
        epoch = len(saved_log(ckpt, len(columns)))
        kept = set_aside_abandoned(folder, epoch + abandoned)
        later = f'epoch {epoch + 1} is' if abandoned == 1 else f'epochs {epoch + 1}-{epoch + abandoned} are'
        say(f'Rewound to epoch {epoch}: {later} kept aside in {", ".join(kept)}')


def on_rank0(ctx, device, work):
    """Run work() on rank 0 alone; if it fails, every process raises (the same error on rank 0)."""
    error_seen = None
    if ctx.is_main:
        try:
            work()
        except (RunError, CheckpointError) as exc:
            error_seen = exc
    (failed,) = distributed.any_all([error_seen is not None], ctx, device)
    if failed:
        raise error_seen or RunError('rank 0 could not set up the checkpoint folder')


def load_data(args, ctx, device):
    """(train set, test set, number of classes); one process per machine fetches or unpacks missing files
    before the others read them, so that no two processes write the same file."""
    sets, error_seen = None, None
    if ctx.local_rank == 0:
        try:
            sets = get_datasets(args.dataset, args.path, time_step=args.time_step)
        except DataError as exc:
            error_seen = exc
    (failed,) = distributed.any_all([error_seen is not None], ctx, device)
    if failed:
        raise error_seen or DataError(f'{args.dataset}: another process could not prepare the data set')
    return sets if sets is not None else get_datasets(args.dataset, args.path, time_step=args.time_step)


def model_args_of(args, num_classes):
    """Everything build_model needs besides the architecture's name."""
    return dict(num_classes=num_classes, time_step=args.time_step, leaky=args.leaky, vth=args.vth,
                dropout=args.drop, solver=args.solver, threshold=args.threshold, tol=args.tol,
                solver_memory=args.solver_memory, grad=args.grad, phantom_k=args.phantom_k,
                phantom_tau=args.phantom_tau, forward_residual=args.forward_residual, jac_reg=args.jac_reg,
                jac_reg_freq=args.jac_reg_freq, method=args.method,
                surrogate=args.surrogate, surrogate_alpha=args.surrogate_alpha, detach_reset=args.detach_reset)


def build(arch, model_args, ckpt, say):
    """The network, with the checkpoint's weights if there is one."""
    model = build_model(arch, **model_args)
    if ckpt is not None:
        saved = ckpt.get('model_args') or {}
        changed = [f'{k} {saved[k]} -> {v}' for k, v in model_args.items()
                   if k in saved and k != 'num_classes' and saved[k] != v]
        if changed:
            say(f'Note: network settings differ from the checkpoint\'s: {", ".join(changed)}')
        load_into_model(model, ckpt, expected_arch=arch, expected_args={'num_classes': model_args['num_classes']})
    say(f'Model: {arch} ({ARCHITECTURES[arch].description}), '
        f'{model.count_neurons():,} neurons, {model.count_parameters():,} parameters')
    return model


def resume_position(state, ckpt, batches):
    """(first epoch, global iteration, best accuracy): from the checkpoint, or a new run's start."""
    args = state.args
    if ckpt is None:
        return args.start_epoch, 0, None
    # Last: everything before may draw random numbers that the saved state already accounts for.
    if is_foreign(ckpt):
        position = restore_foreign(ckpt, args.resume, state.optimizer, batches, args.manualSeed, state.ctx,
                                   state.say)
    else:
        position = restore_training(ckpt, args.resume, state.optimizer, args, state.ctx)
    state.last_checkpoint = args.resume
    epoch, iteration, best_acc = position
    best = 'none' if best_acc is None else f'{best_acc:.2f}'
    state.say(f'Resuming from {args.resume}: epoch {epoch + 1}, iteration {iteration}, best accuracy {best}')
    return position


def open_step_log(stack, path):
    """The --solver-log CSV, closed when the run ends."""
    try:
        step_log = StepLog(path)
    except OSError as exc:
        raise RunError(f'--solver-log: cannot write {path}: {exc.strerror or exc}') from exc
    stack.callback(step_log.close)
    return step_log


def train_epochs(state, stop, start_epoch, iteration, best_acc, history, step_log=None):
    """Train, evaluate, checkpoint and log each remaining epoch; history holds the earlier epochs' log rows."""
    args, ctx, say = state.args, state.ctx, state.say
    faults, logger, test_top1 = FaultGuard(), None, None
    for epoch in range(start_epoch, args.epochs):
        if distributed.any_all([stop.requested], ctx, state.device)[0]:
            raise Interrupted(stop.signum or signal.SIGTERM)
        started = time.monotonic()
        set_data_epoch(state.train_loader, state.train_sampler, args.manualSeed, epoch)
        if step_log is not None:
            step_log.epoch = epoch + 1
        stats = train_epoch(state.model, state.train_loader, state.criterion, state.optimizer, state.device,
                            lr_at=functools.partial(get_lr, args, epoch), iteration=iteration, ctx=ctx,
                            amp=args.amp, stop=stop, faults=faults, title=f'Epoch {epoch + 1}/{args.epochs}',
                            step_log=step_log, norm_every=args.jac_norm_every)
        if stats['stopped']:
            raise Interrupted(stop.signum or signal.SIGTERM)
        iteration = stats['iteration']
        test_loss, test_top1, _ = evaluate(state.model, state.test_loader, state.criterion, state.device,
                                           ctx=ctx, amp=args.amp)
        is_best = best_acc is None or test_top1 > best_acc
        best_acc = test_top1 if is_best else best_acc
        history = history + [log_row(stats, test_loss, test_top1)]
        checkpoint = training_state(state.arch, state.model, state.optimizer, state.model_args, args, ctx,
                                    epoch=epoch + 1, iteration=iteration, acc=test_top1, best_acc=best_acc,
                                    history=history)
        state.last_checkpoint = save_state(checkpoint, is_best, state.folder, ctx, state.device)
        if step_log is not None:
            step_log.flush()
        if ctx.is_main:
            # Opened after the first epoch's save, so that a run stopped before it leaves no log behind.
            logger = logger or open_log(state.folder, f'{NETS[state.arch].script} {state.arch}', state.columns)
            logger.catch_up(history)
            logger.plot(os.path.join(state.folder, PLOT_NAME))
        say(f'Epoch {epoch + 1}/{args.epochs}  lr {stats["lr"]:.4g}  train loss {stats["loss"]:.4f} '
            f'acc {stats["top1"]:.2f}  test loss {test_loss:.4f} acc {test_top1:.2f}  '
            f'best {best_acc:.2f}  skipped {stats["skipped"]}  ({time.monotonic() - started:.1f}s)')
    say(f'Best accuracy: {best_acc:.2f}')
    return dict(acc=test_top1, best_acc=best_acc, epoch=args.epochs)


def log_row(stats, test_loss, test_top1):
    """One epoch's log row, in the order of utils.training.resume.log_columns."""
    row = [stats['lr'], stats['loss'], test_loss, stats['top1'], test_top1, stats['skipped']]
    return [float(v) for v in row + [stats['diagnostics'][column] for column in DIAGNOSTICS]]


def set_data_epoch(loader, sampler, seed, epoch):
    """Make the epoch's sample order a function of (seed, epoch) alone, so that a resumed run sees the same data."""
    if sampler is not None:
        sampler.set_epoch(epoch)
    elif loader.generator is not None:
        # Also fixes the DataLoader's worker seeds, which are drawn from this generator.
        loader.generator.manual_seed(seed + epoch)


def resume_command(state):
    """The shell command that continues the run from its last checkpoint."""
    return shlex.join(['python', NETS[state.arch].script, '--resume', state.last_checkpoint])


def run(arch, argv=None, description=None):
    """Parse argv as network arch's training script, then train or evaluate it.

    Errors a user can fix (flags, data, checkpoints, a full disk) end in one
    line on stderr and exit code 1 (2 for flags); SIGINT/SIGTERM during
    training exit with 130/143 after saying how to resume.
    """
    prog = NETS[arch].script
    args, explicit, notes = flags.parse_args(arch, argv, description)
    try:
        ctx = distributed.init_from_env(timeout=datetime.timedelta(minutes=args.dist_timeout))
    except distributed.DistributedError as exc:
        if int(os.environ.get('RANK', '0')) == 0:  # every process meets it: one line is enough
            error(prog, exc)
        sys.exit(1)
    if args.deterministic:
        make_deterministic()
    state = Run(arch, args, ctx, print if ctx.is_main else (lambda *a, **k: None))
    for note in notes if ctx.is_main else ():
        warn(note)
    try:
        return main(arch, args, explicit, ctx, state)
    except (Interrupted, KeyboardInterrupt) as exc:
        if ctx.is_main:
            print(interrupted_message(state), file=sys.stderr)
        sys.exit(128 + getattr(exc, 'signum', signal.SIGINT))
    except (DataError, CheckpointError, RunError) as exc:
        # Every process meets the same error; one line is enough.
        if ctx.is_main:
            text = str(exc)
            if isinstance(exc, TooManyFaults) and state.last_checkpoint:
                text += f'; the last good checkpoint is {state.last_checkpoint}'
            error(prog, text)
        sys.exit(1)
    finally:
        distributed.shutdown(ctx)


def make_deterministic():
    """Deterministic cuDNN and cuBLAS kernels (and an error from any op that has none), before CUDA starts."""
    # cuBLAS reads its workspace setting when it starts: set it before the first CUDA operation.
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)


def interrupted_message(state):
    """How to continue after a stop by signal."""
    if state.args.evaluate:
        return 'interrupted'
    if state.last_checkpoint:
        return f'interrupted; resume with: {resume_command(state)}'
    return 'interrupted before the first epoch finished; nothing was saved'
