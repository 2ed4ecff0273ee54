"""The training and evaluation loop every script shares: schedule, checkpoints, resumption, signals, faults.

A script calls `run(arch, argv, script, defaults, datasets, description)`;
the pieces (`get_lr`, `train_epoch`, `evaluate`) take every dependency as an
argument and can be used on their own.
"""
import datetime
import functools
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from progress.bar import Bar
from torch import nn

from modules import ARCHITECTURES, NETS, build_model
from utils import cli, distributed
from utils.data import DataError, build_loaders, get_datasets
from utils.io import (BEST_NAME, CheckpointError, load_checkpoint, load_into_model, rng_state,
                      save_checkpoint, set_rng_state, stale_temporaries)
from utils.logger import Logger
from utils.meters import AverageMeter, accuracy

CHECKPOINT_NAME = 'checkpoint.pth.tar'
LOG_NAME = 'log.txt'
PLOT_NAME = 'log.png'
LOG_COLUMNS = ['Learning Rate', 'Train Loss', 'Valid Loss', 'Train Acc.', 'Valid Acc.', 'Skipped']
MAX_BAD_STEPS = 5
# Flags that belong to this invocation or machine: a resumed run never takes them from the checkpoint.
LOCAL_FLAGS = ('checkpoint', 'resume', 'evaluate', 'gpu_id', 'sync_bn', 'start_epoch')
# What each optimizer keeps per parameter: a saved state with anything else was made by another optimizer.
OPTIMIZER_STATE = {'SGD': {'momentum_buffer'}, 'Adam': {'step', 'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'}}


class RunError(Exception):
    """A run cannot go on; the message is one line meant for the user."""


class TooManyFaults(RunError):
    """MAX_BAD_STEPS optimizer steps in a row were skipped."""


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


class FaultGuard:
    """Counts skipped optimizer steps; MAX_BAD_STEPS in a row end the run."""

    def __init__(self, limit=MAX_BAD_STEPS):
        """Allow up to limit - 1 skipped steps in a row."""
        self.limit = limit
        self.in_a_row = 0

    def good(self):
        """A step was taken."""
        self.in_a_row = 0

    def bad(self, where):
        """A step was skipped at `where`; raise TooManyFaults at the limit."""
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise TooManyFaults(f'{self.limit} optimizer steps in a row had a non-finite loss, gradient or '
                                f'solver result (last at {where}); stopped (a lower --lr may help)')


def get_lr(args, epoch, iteration):
    """Learning rate at 0-based `epoch` and global `iteration`.

    args.lr × args.gamma^(milestones of args.schedule ≤ epoch), times
    (iteration+1)/args.warmup during the first args.warmup iterations (the
    paper's linear warm-up).
    """
    lr = args.lr * args.gamma ** sum(1 for milestone in args.schedule if milestone <= epoch)
    if iteration < args.warmup:
        lr *= (iteration + 1) / args.warmup
    return lr


def set_lr(optimizer, lr):
    """Use lr in every parameter group."""
    for group in optimizer.param_groups:
        group['lr'] = lr


def make_optimizer(args, params):
    """SGD with momentum and weight decay, or Adam with weight decay."""
    if args.optimizer == 'Adam':
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def autocast(device, enabled):
    """bfloat16 autocast on device's type when enabled (a no-op context otherwise)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def step_is_finite(loss, model):
    """True when the loss, every gradient and the adjoint solver's residual are finite."""
    checks = [torch.isfinite(loss.detach()).all()]
    checks += [torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None]
    stats = getattr(model, 'solver_stats', None)
    solved = stats is None or math.isfinite(float(stats['residual']))
    return solved and bool(torch.stack(checks).all())


def snapshot_buffers(net):
    """Copies of net's buffers (BN statistics, power-iteration vectors), to undo a skipped step."""
    return [b.detach().clone() for b in net.buffers()]


@torch.no_grad()
def restore_buffers(net, saved):
    """Put back what snapshot_buffers copied."""
    for buffer, value in zip(net.buffers(), saved):
        buffer.copy_(value)


def make_bar(title, n, ctx):
    """A progress bar on rank 0 (silent when stderr is not a terminal), None elsewhere."""
    return Bar(title, max=n, file=sys.stderr) if ctx.is_main else None


def warn(text, bar=None):
    """Print a line on stderr, on a line of its own even while a progress bar is drawn on the terminal."""
    # The bar leaves the cursor at the end of its line; erase that line, the bar redraws itself below.
    clear = '\r\x1b[K' if bar is not None and bar.is_tty() else ''
    print(clear + text, file=sys.stderr)


def train_epoch(model, loader, criterion, optimizer, device, *, lr_at, iteration, ctx=distributed.Context(),
                amp=False, stop=None, faults=None, title='Train'):
    """Train one epoch from global `iteration`; lr_at(iteration) gives each step's learning rate.

    Steps with a non-finite loss, gradient or solver result are skipped, and
    the buffers they moved put back (counted; `faults` raises after too many
    in a row). A requested stop ends the epoch after the current batch.
    Returns a dict: loss, top1, top5 (over the steps taken, all processes),
    skipped, iteration (the next one), lr (the last used), rel_residual (mean
    relative adjoint residual), stopped.
    """
    model.train()
    net = distributed.unwrap(model)
    faults = faults or FaultGuard()
    losses, top1, top5, rel_res, batch_time = (AverageMeter() for _ in range(5))
    skipped, stopped, lr = 0, False, float('nan')
    bar = make_bar(title, len(loader), ctx)
    end = time.monotonic()
    for i, (inputs, targets) in enumerate(loader):
        lr = lr_at(iteration)
        set_lr(optimizer, lr)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        # The forward moves BN statistics: a NaN batch would leave them NaN for good.
        buffers = snapshot_buffers(net)
        with autocast(device, amp):
            outputs = model(inputs)
            loss = criterion(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Every process must take the same decision, or the next collective hangs.
        bad, stopped = distributed.any_all([not step_is_finite(loss, net), stop is not None and stop.requested],
                                           ctx, device)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            restore_buffers(net, buffers)
            skipped += 1
            if ctx.is_main:
                warn(f'warning: {title}, batch {i + 1}: non-finite loss, gradient or solver result; '
                     f'optimizer step skipped', bar)
            faults.bad(f'{title}, batch {i + 1}')
        else:
            optimizer.step()
            faults.good()
            n = targets.size(0)
            acc1, acc5 = accuracy(outputs.float(), targets, topk=(1, min(5, outputs.size(1))))
            losses.update(loss.item(), n)
            top1.update(acc1.item(), n)
            top5.update(acc5.item(), n)
            if net.solver_stats is not None:
                rel_res.update(float(net.solver_stats['rel_residual']))
        iteration += 1
        batch_time.update(time.monotonic() - end)
        end = time.monotonic()
        if bar is not None:
            eta = datetime.timedelta(seconds=round(batch_time.avg * (len(loader) - i - 1)))
            bar.suffix = (f'({i + 1}/{len(loader)}) Loss: {losses.avg:.4f} | Top1: {top1.avg:.2f} | '
                          f'{batch_time.avg:.3f}s/batch | ETA: {eta} | Res: {rel_res.avg:.1e} | '
                          f'Skipped: {skipped}')
            bar.next()
        if stopped:
            break
    if bar is not None:
        bar.finish()
    loss_sum, count, top1_sum, top5_sum, skipped_all = distributed.sum_all(
        [losses.sum, losses.count, top1.sum, top5.sum, skipped], ctx, device)
    mean = (lambda total: total / count) if count else (lambda total: float('nan'))
    return dict(loss=mean(loss_sum), top1=mean(top1_sum), top5=mean(top5_sum), skipped=int(skipped_all),
                iteration=iteration, lr=lr, rel_residual=rel_res.avg, stopped=stopped)


@torch.no_grad()
def evaluate(model, loader, criterion, device, *, ctx=distributed.Context(), amp=False, title='Test'):
    """(loss, top-1 %, top-5 %) on the whole loader, summed over all processes."""
    # The bare network: evaluation needs no gradient synchronisation.
    net = distributed.unwrap(model)
    # Each process's last training step moved its own BN statistics; evaluate rank 0's network everywhere.
    distributed.broadcast_buffers(net, ctx)
    net.eval()
    losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    bar = make_bar(title, len(loader), ctx)
    for i, (inputs, targets) in enumerate(loader):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            outputs = net(inputs)
            loss = criterion(outputs, targets)
        n = targets.size(0)
        acc1, acc5 = accuracy(outputs.float(), targets, topk=(1, min(5, outputs.size(1))))
        losses.update(loss.item(), n)
        top1.update(acc1.item(), n)
        top5.update(acc5.item(), n)
        if bar is not None:
            bar.suffix = f'({i + 1}/{len(loader)}) Loss: {losses.avg:.4f} | Top1: {top1.avg:.2f}'
            bar.next()
    if bar is not None:
        bar.finish()
    loss_sum, count, top1_sum, top5_sum = distributed.sum_all(
        [losses.sum, losses.count, top1.sum, top5.sum], ctx, device)
    return loss_sum / count, top1_sum / count, top5_sum / count


# ---------------------------------------------------------------- run plumbing

def seed_everything(seed):
    """Seed python's, numpy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_data_epoch(loader, sampler, seed, epoch):
    """Make the epoch's sample order a function of (seed, epoch) alone, so that a resumed run sees the same data."""
    if sampler is not None:
        sampler.set_epoch(epoch)
    elif loader.generator is not None:
        # Also fixes the DataLoader's worker seeds, which are drawn from this generator.
        loader.generator.manual_seed(seed + epoch)


def inherit_args(args, explicit, saved):
    """Take every flag not typed on this command line from the resumed run's flags; return what was taken."""
    taken = {}
    for key, value in (saved or {}).items():
        if hasattr(args, key) and key not in explicit and key not in LOCAL_FLAGS:
            if getattr(args, key) != value:
                taken[key] = value
            setattr(args, key, value)
    return taken


def refuse_existing_run(folder, names=(LOG_NAME, CHECKPOINT_NAME, BEST_NAME), keep=None):
    """Raise RunError if a run would write over the log or checkpoints of another run in folder.

    Only the files in names count, and never the file keep (the checkpoint being resumed).
    """
    found = [name for name in names if os.path.exists(os.path.join(folder, name))
             and not (keep and same_file(os.path.join(folder, name), keep))]
    if found:
        raise RunError(f'{folder} already holds a run ({", ".join(found)}): continue it with '
                       f'--resume {os.path.join(folder, CHECKPOINT_NAME)}, or choose another folder with -c')


def same_file(a, b):
    """True when paths a and b name one existing file or folder."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_run_folder(folder, resume, foreign):
    """Refuse a training run's folder if writing there would overwrite another run's files.

    A new run needs a folder without a run. A resumed run continues in its
    checkpoint's folder, or starts in a folder without a run; a checkpoint of
    the paper's release (`foreign`) continues in its own folder only if no log
    or other checkpoint is there.
    """
    if not resume or not same_file(folder, os.path.dirname(os.path.abspath(resume))):
        refuse_existing_run(folder)
    elif foreign:
        refuse_existing_run(folder, keep=resume)


def model_args_of(args, num_classes):
    """Everything build_model needs besides the architecture's name."""
    return dict(num_classes=num_classes, time_step=args.time_step, leaky=args.leaky, vth=args.vth,
                dropout=args.drop, solver=args.solver, threshold=args.threshold, tol=args.tol)


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


def is_foreign(ckpt):
    """True for a checkpoint with an epoch but without this project's iteration and RNG state (the paper's release)."""
    return 'epoch' in ckpt and 'iteration' not in ckpt and 'rng' not in ckpt


def check_resumable(ckpt, path):
    """Raise CheckpointError unless ckpt holds this project's training state, or is a foreign one with an epoch."""
    missing = [key for key in ('epoch', 'optimizer', 'iteration', 'rng') if key not in ckpt]
    if missing and not is_foreign(ckpt):
        raise CheckpointError(f'{path} has no training state of this project ({", ".join(missing)} missing); '
                              f'it can only be evaluated with -e')


def restore_training(ckpt, path, optimizer, ctx):
    """Load the optimizer and this process's RNG state; return (next epoch, global iteration, best accuracy)."""
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f'{path}: optimizer state does not fit this run ({exc}); '
                              f'was it saved with another --optimizer?') from exc
    states = ckpt['rng']
    if ctx.rank < len(states):
        set_rng_state(states[ctx.rank])
    else:
        # More processes than when it was saved: the newcomers get fresh, distinct streams.
        seed_everything(ckpt['seed'] + ctx.rank + ckpt['epoch'] * ctx.world_size)
    return ckpt['epoch'], ckpt['iteration'], ckpt['best_acc']


def optimizer_mismatch(optimizer, saved):
    """Why the optimizer state `saved` does not fit `optimizer`, or None if it does.

    It fits when it has the same groups and parameter counts, and each
    parameter's state holds only what this optimizer keeps, shaped like the parameter.
    """
    kept = OPTIMIZER_STATE[type(optimizer).__name__]
    try:
        groups, states = saved['param_groups'], saved['state']
        if [len(g['params']) for g in groups] != [len(g['params']) for g in optimizer.param_groups]:
            return 'other parameter groups'
        for group, own in zip(groups, optimizer.param_groups):
            for index, param in zip(group['params'], own['params']):
                state = states.get(index, {})
                if not set(state) <= kept:
                    return f'it holds {", ".join(sorted(set(state) - kept))}, not {type(optimizer).__name__} state'
                if any(torch.is_tensor(v) and v.dim() and v.shape != param.shape for v in state.values()):
                    return 'other parameter shapes'
    except (KeyError, TypeError, AttributeError):
        return 'not an optimizer state'
    return None


def restore_foreign(ckpt, path, optimizer, batches, seed, ctx, say):
    """Load what a checkpoint of the paper's release holds; return (next epoch, global iteration, best accuracy).

    The optimizer state is taken if it fits (this run's flags keep their
    hyperparameters); the iteration is epoch × batches per epoch; the random
    generators start afresh from seed, since the file has no RNG state.
    """
    epoch = int(ckpt['epoch'])
    saved = ckpt.get('optimizer')
    why = 'none in the file' if saved is None else optimizer_mismatch(optimizer, saved)
    if why is None:
        flags = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
        optimizer.load_state_dict(saved)
        for group, own in zip(optimizer.param_groups, flags):
            group.update(own)
    else:
        say(f'warning: {path}: optimizer state not used ({why}); starting from a fresh one', file=sys.stderr)
    say(f'warning: {path} holds no random-number state (not saved by this project); '
        f'fresh streams from --manualSeed {seed}', file=sys.stderr)
    seed_everything(seed + ctx.rank)
    best = ckpt.get('best_acc', ckpt.get('acc'))
    return epoch, epoch * batches, None if best is None else float(best)


def save_state(state, is_best, folder, ctx, device):
    """Rank 0 saves; every process learns whether it worked and raises the same error if not."""
    error = None
    if ctx.is_main:
        try:
            save_checkpoint(state, is_best, folder, CHECKPOINT_NAME)
        except CheckpointError as exc:
            error = exc
    (failed,) = distributed.any_all([error is not None], ctx, device)
    if failed:
        raise error or RunError('rank 0 could not write the checkpoint')
    return os.path.join(folder, CHECKPOINT_NAME)


def saved_log(ckpt):
    """The log rows a checkpoint of this project carries ([] for none, a release file or an unusable entry)."""
    rows = ckpt.get('log') if ckpt is not None else None
    if not isinstance(rows, list) or not all(
            isinstance(row, list) and len(row) == len(LOG_COLUMNS)
            and all(isinstance(v, (int, float)) for v in row) for row in rows):
        return []
    return [[float(v) for v in row] for row in rows]


def open_log(folder, title, resuming):
    """The run's Logger in folder with LOG_COLUMNS (appending when resuming)."""
    try:
        logger = Logger(os.path.join(folder, LOG_NAME), title=title, resume=resuming)
        logger.set_names(LOG_COLUMNS)
    except (ValueError, FileExistsError) as exc:
        raise RunError(str(exc)) from exc
    return logger


def make_folder(folder):
    """Create the checkpoint folder (and parents) and make sure files can be written there."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f'cannot create {folder}: {exc.strerror or exc}') from exc
    # Found now rather than at the end of the first epoch, which can take hours.
    probe = os.path.join(folder, f'.write-test.{os.getpid()}.tmp')
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.remove(probe)
    except OSError as exc:
        raise CheckpointError(f'cannot write in {folder}: {exc.strerror or exc}') from exc


@dataclass
class Loop:
    """What the epoch loop works with."""
    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    device: torch.device
    model_args: dict
    train_loader: object
    test_loader: object
    train_sampler: object
    folder: str


class Run:
    """One invocation of a training script: parsed flags in, training (or evaluation) out."""

    def __init__(self, arch, args, explicit, prog, ctx):
        """Hold the flags (and which were typed) of a run of network `arch` by script `prog`."""
        self.arch, self.args, self.explicit, self.prog, self.ctx = arch, args, explicit, prog, ctx
        self.say = print if ctx.is_main else (lambda *a, **k: None)
        self.last_checkpoint = args.resume or None

    def execute(self):
        """Evaluate or train as the flags say; return a dict of final numbers."""
        args = self.args
        ckpt = load_checkpoint(args.resume) if args.resume else None
        if ckpt is not None:
            self.adopt_checkpoint_flags(ckpt)
            if not args.evaluate:
                check_resumable(ckpt, args.resume)
        folder = args.checkpoint
        if args.resume and 'checkpoint' not in self.explicit:
            folder = os.path.dirname(os.path.abspath(args.resume))
        if not args.evaluate:
            check_run_folder(folder, args.resume, ckpt is not None and is_foreign(ckpt))
        device = self.start_up()
        train_set, test_set, num_classes = self.load_data(device)
        train_loader, test_loader, train_sampler = build_loaders(
            train_set, test_set, args.train_batch, args.test_batch, args.workers,
            distributed=self.ctx.enabled, seed=args.manualSeed)
        self.say(f'Data: {args.dataset}, {len(train_set)} train / {len(test_set)} test, {num_classes} classes')
        model_args = model_args_of(args, num_classes)
        model = self.build(model_args, ckpt).to(device)
        criterion = nn.CrossEntropyLoss().to(device)
        if args.evaluate:
            loss, top1, _ = evaluate(model, test_loader, criterion, device, ctx=self.ctx, amp=args.amp)
            self.say(f'Test Loss: {loss:.4f}  Test Acc: {top1:.2f}')
            return dict(loss=loss, acc=top1)
        model = distributed.wrap(model, self.ctx, device, sync_bn=args.sync_bn)
        optimizer = make_optimizer(args, model.parameters())
        loop = Loop(model, optimizer, criterion, device, model_args, train_loader, test_loader, train_sampler,
                    folder)
        return self.train(loop, ckpt)

    def start_up(self):
        """Seed every generator, say which neuron and device are used; return the device."""
        args = self.args
        if args.manualSeed is None:
            # Recorded in the flags, so that a resumed run keeps the same data order.
            # Rank 0's on every process: the processes split the data order this seed shuffles.
            args.manualSeed = distributed.broadcast_object(random.SystemRandom().randrange(2 ** 31), self.ctx)
        seed_everything(args.manualSeed + self.ctx.rank)
        device = distributed.device_for(self.ctx)
        self.say(cli.neuron_line(args.leaky))
        self.say(device_line(device, self.ctx, args.train_batch))
        self.say(f'Seed: {args.manualSeed}')
        return device

    def load_data(self, device):
        """(train set, test set, number of classes); one process per machine fetches or unpacks missing files
        before the others read them, so that no two processes write the same file."""
        args, ctx = self.args, self.ctx
        sets, error = None, None
        if ctx.local_rank == 0:
            try:
                sets = get_datasets(args.dataset, args.path, time_step=args.time_step)
            except DataError as exc:
                error = exc
        (failed,) = distributed.any_all([error is not None], ctx, device)
        if failed:
            raise error or DataError(f'{args.dataset}: another process could not prepare the data set')
        return sets if sets is not None else get_datasets(args.dataset, args.path, time_step=args.time_step)

    def build(self, model_args, ckpt):
        """The network, with the checkpoint's weights if there is one."""
        model = build_model(self.arch, **model_args)
        if ckpt is not None:
            self.note_model_changes(ckpt, model_args)
            load_into_model(model, ckpt, expected_arch=self.arch,
                            expected_args={'num_classes': model_args['num_classes']})
        self.say(f'Model: {self.arch} ({ARCHITECTURES[self.arch].description}), '
                 f'{model.count_neurons():,} neurons, {model.count_parameters():,} parameters')
        return model

    def adopt_checkpoint_flags(self, ckpt):
        """Refuse another network's checkpoint; take the flags not typed now from the resumed run."""
        saved_arch = ckpt.get('arch')
        if saved_arch is not None and saved_arch != self.arch:
            raise CheckpointError(f'{self.args.resume} holds a {saved_arch} network, {self.prog} builds '
                                  f'{self.arch}')
        taken = inherit_args(self.args, self.explicit, ckpt.get('args'))
        if taken:
            listed = ', '.join(f'{k}={v}' for k, v in sorted(taken.items()))
            self.say(f'From the checkpoint: {listed}')

    def note_model_changes(self, ckpt, model_args):
        """Say which network settings typed now differ from the checkpoint's (allowed: same weights)."""
        saved = ckpt.get('model_args') or {}
        changed = [f'{k} {saved[k]} -> {v}' for k, v in model_args.items()
                   if k in saved and k != 'num_classes' and saved[k] != v]
        if changed:
            self.say(f'Note: network settings differ from the checkpoint\'s: {", ".join(changed)}')

    def train(self, loop, ckpt):
        """Resume if asked, then the epoch loop under a SIGINT/SIGTERM guard; return the final numbers."""
        args = self.args
        start_epoch, iteration, best_acc = args.start_epoch, 0, None
        if ckpt is not None:
            # Last: everything before may draw random numbers that the saved state already accounts for.
            if is_foreign(ckpt):
                start_epoch, iteration, best_acc = restore_foreign(
                    ckpt, args.resume, loop.optimizer, len(loop.train_loader), args.manualSeed, self.ctx, self.say)
            else:
                start_epoch, iteration, best_acc = restore_training(ckpt, args.resume, loop.optimizer, self.ctx)
            best = 'none' if best_acc is None else f'{best_acc:.2f}'
            self.say(f'Resuming from {args.resume}: epoch {start_epoch + 1}, iteration {iteration}, '
                     f'best accuracy {best}')
        if start_epoch >= args.epochs:
            self.say(f'Nothing to do: {start_epoch} of --epochs {args.epochs} already done; '
                     f'pass a larger --epochs to train further')
            return dict(best_acc=best_acc, epoch=start_epoch)
        if self.ctx.is_main:
            make_folder(loop.folder)
            self.remove_stale_temporaries(loop.folder)
        history = saved_log(ckpt)
        with StopRequest() as stop:
            return self.epochs(loop, stop, start_epoch, iteration, best_acc, history, resuming=ckpt is not None)

    def remove_stale_temporaries(self, folder):
        """Delete the temporary files that a killed save of this run's files left in folder, and say so."""
        stale = stale_temporaries(folder, (CHECKPOINT_NAME, BEST_NAME, LOG_NAME, PLOT_NAME))
        for path in stale:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        if stale:
            self.say(f'Removed {len(stale)} temporary file(s) left in {folder} by an interrupted save')

    def epochs(self, loop, stop, start_epoch, iteration, best_acc, history, resuming):
        """Train, evaluate, checkpoint and log each remaining epoch; history holds the earlier epochs' log rows."""
        args, ctx = self.args, self.ctx
        faults = FaultGuard()
        # Opened after the first epoch, so that a run stopped before it leaves no log behind.
        logger = None
        test_top1 = None
        for epoch in range(start_epoch, args.epochs):
            if distributed.any_all([stop.requested], ctx, loop.device)[0]:
                raise Interrupted(stop.signum or signal.SIGTERM)
            started = time.monotonic()
            set_data_epoch(loop.train_loader, loop.train_sampler, args.manualSeed, epoch)
            stats = train_epoch(loop.model, loop.train_loader, loop.criterion, loop.optimizer, loop.device,
                                lr_at=functools.partial(get_lr, args, epoch), iteration=iteration, ctx=ctx,
                                amp=args.amp, stop=stop, faults=faults, title=f'Epoch {epoch + 1}/{args.epochs}')
            if stats['stopped']:
                raise Interrupted(stop.signum or signal.SIGTERM)
            iteration = stats['iteration']
            test_loss, test_top1, _ = evaluate(loop.model, loop.test_loader, loop.criterion, loop.device,
                                               ctx=ctx, amp=args.amp)
            is_best = best_acc is None or test_top1 > best_acc
            best_acc = test_top1 if is_best else best_acc
            row = [float(v) for v in (stats['lr'], stats['loss'], test_loss, stats['top1'], test_top1,
                                      stats['skipped'])]
            history = history + [row]
            # The checkpoint carries the log's rows: a resumed run restores a row that a stop
            # between the checkpoint's save and the log's write lost.
            state = dict(epoch=epoch + 1, arch=self.arch, model_args=loop.model_args, log=history,
                         state_dict=distributed.unwrap(loop.model).state_dict(), acc=test_top1,
                         best_acc=best_acc, optimizer=loop.optimizer.state_dict(), iteration=iteration,
                         seed=args.manualSeed, rng=distributed.gather(rng_state(), ctx), args=dict(vars(args)))
            self.last_checkpoint = save_state(state, is_best, loop.folder, ctx, loop.device)
            if ctx.is_main:
                logger = logger or open_log(loop.folder, f'{self.prog} {self.arch}', resuming)
                logger.catch_up(history)
                logger.plot(os.path.join(loop.folder, PLOT_NAME))
            self.say(f'Epoch {epoch + 1}/{args.epochs}  lr {stats["lr"]:.4g}  train loss {stats["loss"]:.4f} '
                     f'acc {stats["top1"]:.2f}  test loss {test_loss:.4f} acc {test_top1:.2f}  '
                     f'best {best_acc:.2f}  skipped {stats["skipped"]}  ({time.monotonic() - started:.1f}s)')
        self.say(f'Best accuracy: {best_acc:.2f}')
        return dict(acc=test_top1, best_acc=best_acc, epoch=args.epochs)

    def interrupted_message(self):
        """How to continue after a stop by signal."""
        if self.args.evaluate:
            return 'interrupted'
        if self.last_checkpoint:
            return f'interrupted; resume with: python {self.prog} --resume {self.last_checkpoint}'
        return 'interrupted before the first epoch finished; nothing was saved'

    def failure_message(self, exc):
        """The one line for an error a user can act on."""
        text = f'{self.prog}: error: {one_line(exc)}'
        if isinstance(exc, TooManyFaults) and self.last_checkpoint:
            text += f'; the last good checkpoint is {self.last_checkpoint}'
        return text


def one_line(exc):
    """An exception's message on one line."""
    return ' '.join(str(exc).split())


def run(arch, argv=None, description=None):
    """Parse argv as network arch's training script, then train or evaluate it.

    Errors a user can fix (flags, data, checkpoints, a full disk) end in one
    line on stderr and exit code 1 (2 for flags); SIGINT/SIGTERM during
    training exit with 130/143 after saying how to resume.
    """
    prog = NETS[arch].script
    args, explicit = cli.parse_args(arch, argv, description)
    ctx = distributed.init_from_env()
    current = Run(arch, args, explicit, prog, ctx)
    try:
        return current.execute()
    except (Interrupted, KeyboardInterrupt) as exc:
        if ctx.is_main:
            print(current.interrupted_message(), file=sys.stderr)
        sys.exit(128 + getattr(exc, 'signum', signal.SIGINT))
    except (DataError, CheckpointError, RunError) as exc:
        # Every process meets the same error; one line is enough.
        if ctx.is_main:
            print(current.failure_message(exc), file=sys.stderr)
        sys.exit(1)
    finally:
        distributed.shutdown(ctx)
