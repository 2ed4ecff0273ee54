"""Process-group helpers for torchrun: one process per GPU, DistributedDataParallel, reductions.

A plain `python script.py` is a group of one: every helper then does nothing
but return its input, so the training loop has a single code path.

Launching. torchrun starts one process per GPU (NCCL) or, without CUDA, per
`--nproc_per_node` CPU process (Gloo); the scripts take the same flags as alone:

    # one machine, 4 GPUs
    torchrun --standalone --nproc_per_node=4 cifar_cifarnetf.py --dataset cifar100 --path DATA --train-batch 32 -c CKPT
    # two machines, 8 GPUs each (global batch 2 x 8 x 8 = 128): on HOST, and with --node_rank=1 on the other
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        cifar_alexnetf.py --path DATA --train-batch 8 -c CKPT

Semantics. `--train-batch` is per process: one optimizer step averages the
gradients of world_size x train_batch samples (the global batch), and an
epoch takes about len(train set) / global batch steps. The learning rate is not
scaled: to keep the paper's global batch of 128 on 4 processes, pass
`--train-batch 32`. The processes split each epoch's shuffled training set
(same seed, rank 0's when none is given) and the test set, each test sample
counted once; losses and accuracies are summed over all processes. Rank 0
alone prints and writes the checkpoint folder, so with several machines -c
should be on storage every machine can read back for `--resume`; missing
data files are fetched or unpacked by one process per machine (local rank 0)
before the others read them, while the others wait up to the process group's
timeout (init_from_env; the scripts' --dist-timeout, 60 minutes by default).
Each process needs a GPU of its own: more processes on a machine than visible
GPUs stop at start-up with DistributedError.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# Ranks other than local rank 0 wait in a collective while it downloads or converts the data set
# (NCCL gives up after 10 minutes by default); the scripts' --dist-timeout overrides it.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, number of processes, GPU index on its machine."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        """True when launched by torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self):
        """Only rank 0 prints, logs and writes files."""
        return self.rank == 0


class DistributedError(RuntimeError):
    """The processes cannot be set up as launched (more processes than GPUs); one-line message."""


def init_from_env(timeout=DEFAULT_TIMEOUT):
    """Join the process group torchrun describes (WORLD_SIZE > 1), NCCL on CUDA, Gloo otherwise.

    timeout (a datetime.timedelta) bounds every collective: long enough for
    local rank 0 to download or convert the data while the others wait.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return Context()
    ctx = Context(int(os.environ['RANK']), world_size, int(os.environ.get('LOCAL_RANK', '0')))
    if torch.cuda.is_available():
        check_gpu_count(ctx)
        torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group('nccl', timeout=timeout)
    else:
        dist.init_process_group('gloo', timeout=timeout)
    return ctx


def check_gpu_count(ctx):
    """Raise DistributedError unless every process on this machine has a visible GPU of its own."""
    # Every process of the machine checks the whole count, so all of them stop, not only those
    # whose GPU index is missing (the others would wait for them until the timeout).
    processes = max(int(os.environ.get('LOCAL_WORLD_SIZE', '0')), ctx.local_rank + 1)
    visible = torch.cuda.device_count()
    if processes <= visible:
        return
    mask = os.environ.get('CUDA_VISIBLE_DEVICES')
    shown = f' (CUDA_VISIBLE_DEVICES={mask})' if mask is not None else ''
    raise DistributedError(
        f'{processes} processes on this machine but {visible} visible GPU{"s" if visible != 1 else ""}{shown}: '
        f'each process needs a GPU of its own; start at most {visible} per machine '
        f'(torchrun --nproc_per_node={visible}), make more GPUs visible (--gpu-id, CUDA_VISIBLE_DEVICES), '
        f'or run on CPUs with CUDA_VISIBLE_DEVICES=')


def shutdown(ctx):
    """Leave the process group, if this process joined one."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def device_for(ctx):
    """This process's device: its own GPU under torchrun, the first visible GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device('cuda', ctx.local_rank)
    return torch.device('cpu')


def wrap(model, ctx, device, sync_bn=False):
    """DistributedDataParallel around model (BN made SyncBatchNorm first if asked); model itself when alone."""
    if not ctx.enabled:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == 'cuda' else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model):
    """The network inside a DistributedDataParallel wrapper (or model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sum_all(values, ctx, device):
    """Element-wise sums of a list of numbers over all processes."""
    if not ctx.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def any_all(flags, ctx, device):
    """Element-wise 'any process raised this flag' for a list of booleans."""
    if not ctx.enabled:
        return [bool(f) for f in flags]
    tensor = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def first_then_all(work, ctx, device, errors, failed_elsewhere, per_machine=False):
    """Run work() on rank 0 alone (on local rank 0 of each machine with per_machine), then let all agree on it.

    Returns work()'s result where it ran (None elsewhere). If it raised one of
    `errors` (a tuple of exception classes), every process raises: that error
    where it was raised, `failed_elsewhere` (an exception) on the others.
    """
    result, error = None, None
    if (ctx.local_rank if per_machine else ctx.rank) == 0:
        try:
            result = work()
        except errors as exc:
            error = exc
    (failed,) = any_all([error is not None], ctx, device)
    if failed:
        raise error or failed_elsewhere
    return result


def gather(obj, ctx):
    """A list with every process's obj, by rank (picklable objects)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, ctx):
    """Rank 0's obj, on every process (a picklable object)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(model, ctx):
    """Copy rank 0's buffers (BN running statistics, power-iteration vectors) to every process."""
    if ctx.enabled:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)

