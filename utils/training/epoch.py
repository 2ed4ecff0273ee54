"""One training epoch and one evaluation pass, with the learning-rate schedule and the step guards they need.

Every dependency is an argument, so the pieces can be used without the
command-line loop of utils/training/run.py.
"""
import datetime
import functools
import math
import sys
import time

import torch
from progress.bar import Bar

from utils import flags
from utils.training import distributed
from utils.training.console import RunError, warn
from utils.training.meters import AverageMeter, accuracy

MAX_BAD_STEPS = 5
# Diagnostics of the equilibrium averaged over an epoch's steps: log column -> key of model.solver_stats.
# The norms are means over the steps that measured them (--jac-norm-every), Jac Reg over those that applied it.
DIAGNOSTICS = {'Fwd Res.': 'forward_residual', 'Bwd Res.': 'rel_residual', 'Bwd Iters': 'nstep',
               'Bwd Capped': 'capped', 'Fb Norm': 'feedback_norm', 'Jac Norm': 'jacobian_norm',
               'Jac Reg': 'jac_frobenius'}
# The log column counting an epoch's adjoint solves that stopped before their first iteration: they return
# their starting point, so the spiking layers of those steps got no implicit gradient at all.
IDLE_SOLVES = 'Bwd Idle'


class TooManyFaults(RunError):
    """MAX_BAD_STEPS optimizer steps in a row were skipped."""


class FaultGuard:
    """Counts skipped optimizer steps; MAX_BAD_STEPS in a row end the run.

    hint(part, updated) names the likely cause in the stop message, from what
    the guard saw: the part of the last bad step that was not finite ('loss',
    'gradient' or 'solver result') and whether any step was taken before.
    """

    def __init__(self, limit=MAX_BAD_STEPS, hint=None):
        """Allow up to limit - 1 skipped steps in a row."""
        self.limit = limit
        self.in_a_row = 0
        self.updated = False
        self.hint = hint or likely_cause

    def good(self):
        """A step was taken."""
        self.in_a_row = 0
        self.updated = True

    def bad(self, where, part='loss'):
        """A step was skipped at `where` (part: what was not finite); raise TooManyFaults at the limit."""
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise TooManyFaults(f'{self.limit} optimizer steps in a row had a non-finite loss, gradient or '
                                f'solver result (last at {where}); stopped ({self.hint(part, self.updated)})')


def likely_cause(part, updated, method='ide', surrogate='', surrogate_alpha=None):
    """The likely cause of non-finite steps that the run can see, as a phrase for the stop message."""
    if method == 'bptt' and part == 'gradient':
        alpha = 'its default' if surrogate_alpha is None else surrogate_alpha
        return (f'the loss is finite but its gradient is not: the surrogate derivative ({surrogate}, '
                f'--surrogate-alpha {alpha}) overflows; a smaller --surrogate-alpha may help')
    if part == 'solver result':
        return 'the adjoint solve diverged; another --solver or a smaller --threshold may help'
    if not updated:
        return (f'the weights had not changed yet, so not --lr: the first steps\' {part} is not finite; '
                f'check the network and gradient flags')
    return 'a lower --lr may help'


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
    kind = torch.optim.Adam if args.optimizer == 'Adam' else torch.optim.SGD
    return kind(params, lr=args.lr, **flags.hyperparameters(args))


def autocast(device, enabled):
    """bfloat16 autocast on device's type when enabled (a no-op context otherwise)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@functools.lru_cache(maxsize=None)
def native_bf16():
    """True when this CPU computes in bfloat16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            cpu_flags = f.read()
    except OSError:
        cpu_flags = None
    if cpu_flags is not None:
        return any(flag in cpu_flags.split() for flag in ('avx512_bf16', 'amx_bf16'))
    # No /proc (e.g. macOS): time one convolution in both formats; emulation is tens of times slower.
    x, w = torch.randn(8, 16, 32, 32), torch.randn(16, 16, 3, 3)

    def seconds(dtype):
        start = time.perf_counter()
        for _ in range(3):
            torch.nn.functional.conv2d(x.to(dtype), w.to(dtype), padding=1)
        return time.perf_counter() - start

    seconds(torch.bfloat16)  # warm-up
    return seconds(torch.bfloat16) < 4 * seconds(torch.float32)


# What a run says when it drops --amp on such a CPU (the training scripts and tools.bench).
AMP_EMULATED = ('warning: --amp: this CPU has no native bfloat16 arithmetic (AVX512-BF16 or AMX), where bf16 '
                'convolutions run tens of times slower than float32; running in float32')


def bf16_emulated(device, native=None):
    """True on a CPU that only emulates bfloat16 (native: the test, native_bf16 by default): --amp is dropped there."""
    return device.type == 'cpu' and not (native or native_bf16)()


def non_finite_part(loss, model):
    """None when the loss, every gradient and the adjoint solver's residual are finite, else the first that is not:
    'loss', 'gradient' or 'solver result'."""
    grads = [torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None]
    finite = torch.stack([torch.isfinite(loss.detach()).all(), torch.stack(grads).all() if grads else
                          torch.tensor(True, device=loss.device)]).tolist()  # one read of the device
    stats = getattr(model, 'solver_stats', None)
    # A diverged solve makes the gradient non-finite too: it is named first, as the cause.
    # No residual: a step without an adjoint solve (the unrolled phantom gradient).
    parts = {'loss': finite[0], 'solver result': stats is None or math.isfinite(float(stats.get('residual', 0.0))),
             'gradient': finite[1]}
    return next((part for part, ok in parts.items() if not ok), None)


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


class EpochMeters:
    """Running sums of an epoch: loss and accuracy over the steps taken, the equilibrium diagnostics."""

    def __init__(self):
        """Start empty."""
        self.loss, self.top1, self.top5, self.batch_time = AverageMeter(), AverageMeter(), AverageMeter(), \
            AverageMeter()
        self.diagnostics = {column: AverageMeter() for column in DIAGNOSTICS}
        self.skipped = self.idle = 0

    def update(self, outputs, targets, loss, stats):
        """Count one step taken on a batch: its loss, accuracy and solver statistics (a dict or None)."""
        n = targets.size(0)
        acc1, acc5 = accuracy(outputs.float(), targets, topk=(1, min(5, outputs.size(1))))
        self.loss.update(loss.item(), n)
        self.top1.update(acc1.item(), n)
        self.top5.update(acc5.item(), n)
        if stats is not None and stats.get('nstep') == 0:
            self.idle += 1
        for column, key in DIAGNOSTICS.items():
            value = None if stats is None else stats.get(key)
            if key == 'capped' and stats is not None and 'stop' in stats:
                value = float(stats['stop'] == 'cap')  # the fraction of solves that hit the iteration cap
            if value is not None and math.isfinite(float(value)):
                self.diagnostics[column].update(float(value))

    def suffix(self, i, total):
        """The progress bar's text after batch i of total."""
        eta = datetime.timedelta(seconds=round(self.batch_time.avg * (total - i - 1)))
        fwd, bwd = self.diagnostics['Fwd Res.'], self.diagnostics['Bwd Res.']
        residuals = (f'Res: fwd {fwd.avg:.1e} bwd {bwd.avg:.1e}' if fwd.count else f'Res: {bwd.avg:.1e}')
        return (f'({i + 1}/{total}) Loss: {self.loss.avg:.4f} | Top1: {self.top1.avg:.2f} | '
                f'{self.batch_time.avg:.3f}s/batch | ETA: {eta} | {residuals} | Skipped: {self.skipped}')

    def means(self):
        """Each diagnostic's mean over the epoch's steps (nan where none was recorded)."""
        return {column: meter.avg if meter.count else math.nan for column, meter in self.diagnostics.items()}


def train_step(model, net, inputs, targets, criterion, optimizer, device, amp):
    """Forward and backward of one batch; returns (outputs, loss) with the gradients in place.

    The loss returned is the criterion's; the gradient also holds the network's
    Jacobian regulariser when it added one this step (net.jacobian_penalty).
    """
    with autocast(device, amp):
        outputs = model(inputs)
        loss = criterion(outputs, targets)
    penalty = getattr(net, 'jacobian_penalty', None)
    optimizer.zero_grad(set_to_none=True)
    (loss if penalty is None else loss + penalty).backward()
    return outputs, loss


def train_epoch(model, loader, criterion, optimizer, device, *, lr_at, iteration, ctx=distributed.Context(),
                amp=False, stop=None, faults=None, title='Train', step_log=None, norm_every=0):
    """Train one epoch from global `iteration`; lr_at(iteration) gives each step's learning rate.

    Steps with a non-finite loss, gradient or solver result are skipped, and
    the buffers they moved put back (counted; `faults` raises after too many
    in a row). A requested stop ends the epoch after the current batch.
    step_log(iteration, stats), if given, receives each step's solver statistics.
    norm_every N > 0 has the network measure its spectral norms on every
    iteration divisible by N (net.request_norms).
    Returns a dict: loss, top1, top5 (over the steps taken, all processes),
    skipped, idle (steps whose adjoint solve did no iteration, all processes;
    warned about), iteration (the next one), lr (the last used), diagnostics
    (the means of DIAGNOSTICS on this process), stopped.
    """
    model.train()
    net = distributed.unwrap(model)
    faults = faults or FaultGuard()
    meters, stopped, lr = EpochMeters(), False, float('nan')
    bar = make_bar(title, len(loader), ctx)
    end = time.monotonic()
    for i, (inputs, targets) in enumerate(loader):
        lr = lr_at(iteration)
        set_lr(optimizer, lr)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        # The forward moves BN statistics: a NaN batch would leave them NaN for good.
        buffers = snapshot_buffers(net)
        if norm_every and iteration % norm_every == 0:
            net.request_norms()
        outputs, loss = train_step(model, net, inputs, targets, criterion, optimizer, device, amp)
        # Every process must take the same decision, or the next collective hangs.
        part = non_finite_part(loss, net)
        bad, stopped = distributed.any_all([part is not None, stop is not None and stop.requested], ctx, device)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            restore_buffers(net, buffers)
            meters.skipped += 1
            if ctx.is_main:
                warn(f'warning: {title}, batch {i + 1}: non-finite loss, gradient or solver result; '
                     f'optimizer step skipped', bar)
            faults.bad(f'{title}, batch {i + 1}', part or 'loss')
        else:
            optimizer.step()
            faults.good()
            meters.update(outputs, targets, loss, net.solver_stats)
            if step_log is not None:
                step_log(iteration, net.solver_stats)
        iteration += 1
        meters.batch_time.update(time.monotonic() - end)
        end = time.monotonic()
        if bar is not None:
            bar.suffix = meters.suffix(i, len(loader))
            bar.next()
        if stopped:
            break
    if bar is not None:
        bar.finish()
    loss_sum, count, top1_sum, top5_sum, skipped_all, idle_all = distributed.sum_all(
        [meters.loss.sum, meters.loss.count, meters.top1.sum, meters.top5.sum, meters.skipped, meters.idle],
        ctx, device)
    if idle_all and ctx.is_main:
        warn(f'warning: {title}: the adjoint solve of {int(idle_all)} training step(s) stopped before its first '
             f'iteration, so their spiking layers got no gradient (counted in the log column {IDLE_SOLVES})')
    mean = (lambda total: total / count) if count else (lambda total: float('nan'))
    return dict(loss=mean(loss_sum), top1=mean(top1_sum), top5=mean(top5_sum), skipped=int(skipped_all),
                idle=int(idle_all), iteration=iteration, lr=lr, diagnostics=meters.means(), stopped=stopped)


@torch.no_grad()
def evaluate(model, loader, criterion, device, *, ctx=distributed.Context(), amp=False, title='Test'):
    """(loss, top-1 %, top-5 %) on the whole loader, summed over all processes."""
    # The bare network: evaluation needs no gradient synchronisation.
    net = distributed.unwrap(model)
    # Each process's last training step moved its own BN statistics; evaluate rank 0's network everywhere.
    distributed.broadcast_buffers(net, ctx)
    net.eval()
    meters = EpochMeters()
    bar = make_bar(title, len(loader), ctx)
    for i, (inputs, targets) in enumerate(loader):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            outputs = net(inputs)
            loss = criterion(outputs, targets)
        meters.update(outputs, targets, loss, None)
        if bar is not None:
            bar.suffix = f'({i + 1}/{len(loader)}) Loss: {meters.loss.avg:.4f} | Top1: {meters.top1.avg:.2f}'
            bar.next()
    if bar is not None:
        bar.finish()
    loss_sum, count, top1_sum, top5_sum = distributed.sum_all(
        [meters.loss.sum, meters.loss.count, meters.top1.sum, meters.top5.sum], ctx, device)
    return loss_sum / count, top1_sum / count, top5_sum / count
