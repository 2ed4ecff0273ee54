"""The command-line run every training script shares: flags → data → model → resume → epochs.

A script calls `run(arch, argv, description)`. `main` reads top to bottom; the
folder and resume policy lives in utils/training/resume.py, one epoch and the
evaluation pass in utils/training/epoch.py. Longer than most modules because
it is the whole run in one file, read in order: each step is a short function
of its own.
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
from utils.signals import Interrupted, StopRequest
from utils.analysis import sweep
from utils.training import distributed
from utils.training.resume import (FolderLock, check_folder, check_resumable, is_foreign, log_columns, open_log,
                              remove_stale_temporaries, restore_foreign, restore_training, run_files, same_file,
                              save_state, saved_log, seed_everything, set_aside_abandoned, training_state, PLOT_NAME)
from utils.training.console import error, warn
from utils.data.datasets import DataError, build_loaders, get_datasets
from utils.training.epoch import (AMP_EMULATED, DIAGNOSTICS, IDLE_SOLVES, FaultGuard, RunError, TooManyFaults,
                                  bf16_emulated, evaluate, get_lr, likely_cause, make_optimizer, native_bf16,
                                  train_epoch)
from utils.checkpoint import load_checkpoint, load_into_model
from utils.files import CheckpointError
from utils.training.logger import StepLog
from utils.training.status import recorded

__all__ = ['run', 'main', 'train_epoch', 'get_lr', 'FaultGuard', 'StopRequest', 'TooManyFaults', 'RunError']


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
    status: object = None        # the run's status file (utils.training.status), on rank 0
    step_log: StepLog = None     # --solver-log, on rank 0


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
    sweep_prefix = None
    if args.sweep_T:  # where the sweep writes, checked before any work
        sweep_prefix = sweep.sweep_prefix(args.resume, args.sweep_T, args.out_dir)
        sweep.refuse_existing(sweep_prefix, args.overwrite)
    state.device = device = start_up(args, ctx, say)
    with contextlib.ExitStack() as stack:
        # 2. The folder and the solver log: owned by this run for its lifetime, never another run's.
        if not args.evaluate:
            state.folder = run_folder(args, explicit)
            state.columns = log_columns([*DIAGNOSTICS, IDLE_SOLVES])
            distributed.first_then_all(lambda: claim_run_files(stack, state, ckpt),
                                       ctx, device, (RunError, CheckpointError),
                                       RunError('rank 0 could not set up the checkpoint folder'))
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
            return evaluate_only(state, model, sweep_prefix)
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
        with StopRequest() as stop, recorded(state.folder, args.epochs, start_epoch, best_acc,
                                             ctx.is_main) as state.status:
            return train_epochs(state, stop, start_epoch, iteration, best_acc,
                                saved_log(ckpt, len(state.columns)), state.step_log)


def evaluate_only(state, model, prefix):
    """-e: the test loss and accuracy; with --sweep-T the accuracy at each T instead, in files at prefix (beside
    the checkpoint or in --out-dir; utils.analysis.sweep)."""
    args, say = state.args, state.say
    if prefix is not None:
        if state.ctx.enabled:
            raise RunError('--sweep-T runs in one process: start it without torchrun')
        loaders = sweep.LoadersByT(state.arch, args.dataset, args.path, args.test_batch, args.workers, state.device)
        rows = sweep.sweep_accuracy(state.arch, state.model_args, model.state_dict(), loaders, args.sweep_T,
                                    state.device, prefix, amp=args.amp, overwrite=args.overwrite)
        say(f'Test accuracy as a function of T ({flags.neuron_line(args.leaky)})\n{sweep.format_rows(rows)}')
        say('Wrote ' + ', '.join(sweep.sweep_paths(prefix).values()))
        return dict(sweep=rows)
    loss, top1, _ = evaluate(model, state.test_loader, state.criterion, state.device, ctx=state.ctx, amp=args.amp)
    say(f'Test Loss: {loss:.4f}  Test Acc: {top1:.2f}')
    return dict(loss=loss, acc=top1)


def adopt_checkpoint_flags(arch, args, explicit, ckpt, say):
    """Refuse another network's checkpoint; take the flags not typed now from it, and say what changed."""
    saved_arch = ckpt.get('arch')
    if saved_arch is not None and saved_arch != arch:
        raise CheckpointError(f'{args.resume} holds a {saved_arch} network, {NETS[arch].script} builds {arch}')
    taken, overridden = flags.adopt_saved_flags(args, explicit, ckpt.get('args'))
    # Typed flags against the mode the checkpoint brings (the flags taken from it are never refused).
    refusal = flags.inert_flag(args, explicit)
    if refusal:
        raise RunError(refusal)
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
    if args.amp and bf16_emulated(device, native_bf16):
        if ctx.is_main:
            warn(AMP_EMULATED)
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


def claim_run_files(stack, state, ckpt):
    """Claim the run's folder, and its --solver-log (state.step_log), for the run's lifetime."""
    args = state.args
    claim_folder(stack, state.folder, args, ckpt, state.columns, state.say)
    if args.solver_log:
        state.step_log = open_step_log(stack, args.solver_log, state.folder, ckpt, args.resume, state.say)


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


def load_data(args, ctx, device):
    """(train set, test set, number of classes); one process per machine fetches or unpacks missing files
    before the others read them, so that no two processes write the same file."""
    def read():
        return get_datasets(args.dataset, args.path, time_step=args.time_step)
    sets = distributed.first_then_all(read, ctx, device, (DataError,), DataError(
        f'{args.dataset}: another process could not prepare the data set'), per_machine=True)
    return sets or read()


def model_args_of(args, num_classes):
    """Everything build_model needs besides the architecture's name."""
    return dict(num_classes=num_classes, time_step=args.time_step, leaky=args.leaky, vth=args.vth,
                dropout=args.drop, solver=args.solver, threshold=args.threshold, tol=args.tol,
                solver_memory=args.solver_memory, grad=args.grad, phantom_k=args.phantom_k,
                phantom_tau=args.phantom_tau, phantom_form=args.phantom_form, forward_residual=args.forward_residual,
                jac_reg=args.jac_reg, jac_reg_freq=args.jac_reg_freq, method=args.method, surrogate=args.surrogate,
                surrogate_alpha=args.surrogate_alpha, detach_reset=args.detach_reset, bptt_bn=args.bptt_bn)


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


def open_step_log(stack, path, folder, ckpt, resume, say):
    """The --solver-log CSV, closed when the run ends; refused if it is a file of the run or another's.

    A resumed run continues the file its checkpoint wrote in the same folder,
    without the rows of an epoch that was interrupted before its checkpoint.
    """
    if any(same_file(path, own) or os.path.abspath(path) == os.path.abspath(own) for own in run_files(folder)):
        raise RunError(f'--solver-log: {path} is a file of the run itself; choose another file')
    saved = (ckpt.get('args') or {}).get('solver_log') if ckpt is not None else None
    continues = (ckpt is not None and not is_foreign(ckpt) and saved is not None and same_file(path, saved)
                 and same_file(folder, os.path.dirname(os.path.abspath(resume))))
    try:
        step_log = StepLog(path, resumed_at=ckpt['iteration'] if continues else None)
    except OSError as exc:
        raise RunError(f'--solver-log: cannot write {path}: {exc.strerror or exc}') from exc
    stack.callback(step_log.close)
    if step_log.removed:
        say(f'Removed from {path} the {step_log.removed} row(s) of the interrupted epoch')
    return step_log


def train_epochs(state, stop, start_epoch, iteration, best_acc, history, step_log=None):
    """Train, evaluate, checkpoint and log each remaining epoch; history holds the earlier epochs' log rows."""
    args, ctx, say = state.args, state.ctx, state.say
    hint = functools.partial(likely_cause, method=args.method, surrogate=args.surrogate,
                             surrogate_alpha=args.surrogate_alpha)
    faults, logger, test_top1 = FaultGuard(hint=hint), None, None
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
        if state.status is not None:
            state.status.epoch_done(epoch + 1, best_acc, time.monotonic() - started)
        say(f'Epoch {epoch + 1}/{args.epochs}  lr {stats["lr"]:.4g}  train loss {stats["loss"]:.4f} '
            f'acc {stats["top1"]:.2f}  test loss {test_loss:.4f} acc {test_top1:.2f}  '
            f'best {best_acc:.2f}  skipped {stats["skipped"]}  ({time.monotonic() - started:.1f}s)')
    say(f'Best accuracy: {best_acc:.2f}')
    return dict(acc=test_top1, best_acc=best_acc, epoch=args.epochs)


def log_row(stats, test_loss, test_top1):
    """One epoch's log row, in the order of utils.training.resume.log_columns."""
    row = [stats['lr'], stats['loss'], test_loss, stats['top1'], test_top1, stats['skipped']]
    return [float(v) for v in row + [stats['diagnostics'][column] for column in DIAGNOSTICS] + [stats['idle']]]


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
