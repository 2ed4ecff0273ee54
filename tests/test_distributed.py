"""torchrun end to end: two CPU processes (Gloo) train fashion_mlp on a tiny Fashion-MNIST in the real format.

Each process runs the unchanged script through a small launcher (LAUNCHER,
written next to the run) that records what the process trained on and saves
its final network; the tests compare the processes with each other, with
what rank 0 wrote, and with single-process runs of the same checkpoints.
"""
import datetime
import gzip
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from tests.conftest import REPO
from modules import build_model
from modules.layers import batch_stats
from tests.conftest import load, log_rows, run_main
from tools import fakedata
from utils.training import distributed
from utils.data.datasets import ShardSampler

pytestmark = [pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason='torch.distributed with Gloo is not available'),
              # In-process runs on one thread too, like each torchrun process (OMP_NUM_THREADS=1).
              pytest.mark.usefixtures('single_thread')]

SCRIPT = 'fashion_mlp'
WORLD = 2
TRAIN_BATCH = 8
N_TRAIN = 64  # 32 per process: 4 steps of TRAIN_BATCH, no padding, so the two shares partition the set
STEPS = N_TRAIN // WORLD // TRAIN_BATCH
# Odd on purpose: the processes get 19 and 18 test images and evaluation must count each image once
# (a padding sampler would count one twice and report another accuracy than a single process does).
N_TEST = 37
FLAGS = ['--dataset', 'fashionmnist', '-j', '0', '--time_step', '2', '--train-batch', TRAIN_BATCH,
         '--test-batch', 16]
# The run folder's lock stays: the operating system releases it when the process ends.
RUN_FILES = {'checkpoint.pth.tar', 'model_best.pth.tar', 'log.txt', 'log.png', 'status.json'}
TIMEOUT_S = 150

LAUNCHER = '''\
"""Run one process of a training script under torchrun and record what it trained on (test helper)."""
import importlib
import os
import sys
import time

repo, script, out = sys.argv[1:4]
rank = int(os.environ['RANK'])
# Each process's stdout and stderr in files of its own.
for fd, name in ((1, 'out'), (2, 'err')):
    os.dup2(os.open(os.path.join(out, f'{name}{rank}.txt'), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
sys.path.insert(0, repo)

import progress
import torch
from torch.utils.data.distributed import DistributedSampler

from utils.training import distributed, run as train

# Draw the progress bars although stderr is a file, so that the test sees which process draws them.
progress.Infinite.check_tty = False
record = {'indices': [], 'data_calls': []}
real_train_epoch, real_get_datasets = train.train_epoch, train.get_datasets


def train_epoch(model, loader, *args, **kwargs):
    """Keep the network and its starting weights; note this epoch's sample indices (the sampler's own RNG)."""
    net = distributed.unwrap(model)
    if 'net' not in record:
        record['net'] = net
        record['start'] = {k: v.detach().clone() for k, v in net.state_dict().items()}
        record['wrapped'] = type(model).__name__
    assert isinstance(loader.sampler, DistributedSampler)
    record['indices'].append(list(loader.sampler))
    return real_train_epoch(model, loader, *args, **kwargs)


def get_datasets(*args, **kwargs):
    """Note when this process read (or prepared) the data set; rank 0 takes a second longer, as a download would."""
    started = time.time()
    if rank == 0:
        time.sleep(1)
    try:
        return real_get_datasets(*args, **kwargs)
    finally:
        record['data_calls'].append((started, time.time()))


train.train_epoch, train.get_datasets = train_epoch, get_datasets
result = importlib.import_module(script).main(sys.argv[4:])
sys.stdout.flush()
torch.save({'state': record['net'].state_dict(), 'start': record['start'], 'wrapped': record['wrapped'],
            'indices': record['indices'], 'data_calls': record['data_calls'], 'result': result},
           os.path.join(out, f'rank{rank}.pt'))
'''


# ---------------------------------------------------------------- helpers

def gzip_only(raw):
    """Replace every file in raw with its .gz copy, as downloaded: the processes must unpack them."""
    for name in os.listdir(raw):
        path = os.path.join(raw, name)
        with open(path, 'rb') as src, gzip.open(path + '.gz', 'wb') as dst:
            shutil.copyfileobj(src, dst)
        os.remove(path)


def torchrun(tmp, name, argv):
    """Run SCRIPT's main(argv) in WORLD processes; return {'out', 'err', 'saved'} per rank, by rank."""
    out = tmp / name
    out.mkdir()
    launcher = tmp / 'launch.py'
    launcher.write_text(LAUNCHER)
    # No GPUs: CPU processes with Gloo, as documented above, on any machine (one GPU cannot host two
    # NCCL processes).
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'CUDA_VISIBLE_DEVICES': ''}
    env.pop('WORLD_SIZE', None)
    # A session of its own, so that a run past the timeout ends with all its processes.
    proc = subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node',
                             str(WORLD), str(launcher), REPO, SCRIPT, str(out), *map(str, argv)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f'torchrun took more than {TIMEOUT_S}s')
    ranks = []
    for rank in range(WORLD):
        texts = {kind: read_text(out / f'{kind}{rank}.txt') for kind in ('out', 'err')}
        saved = out / f'rank{rank}.pt'
        assert proc.returncode == 0 and saved.is_file(), \
            f'rank {rank} failed (torchrun exit {proc.returncode}):\n{texts["err"]}\n{log[-3000:]}'
        ranks.append(dict(texts, saved=torch.load(saved, weights_only=False)))
    return ranks


def read_text(path):
    """A file's text, '' if it is not there."""
    return path.read_text() if path.is_file() else ''


def fakedata_labels(root, split):
    """The labels of a split of the fake Fashion-MNIST under root."""
    path = root / 'FashionMNIST' / 'raw' / f'{split}-labels-idx1-ubyte'
    return list(path.read_bytes()[8:])


def epoch_lines(text):
    """(test accuracy, best accuracy) of each epoch summary printed in text."""
    return [(float(a), float(b)) for a, b in re.findall(r'test loss \S+ acc (\S+)\s+best (\S+)', text)]


def assert_same_state(a, b):
    """Two state_dicts hold the same names and bit-identical tensors."""
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f'differ between the processes: {different}'


def assert_only_rank0_spoke(ranks):
    """Rank 0 printed the run and drew the progress bars; every other rank printed nothing at all."""
    assert 'Epoch ' in ranks[0]['out'] and 'Best accuracy' in ranks[0]['out']
    assert re.search(rf'Epoch \d+/\d+ .*\({STEPS}/{STEPS}\)', ranks[0]['err']) and 'Test ' in ranks[0]['err']
    for number, rank in enumerate(ranks[1:], 1):
        assert rank['out'] == '' and rank['err'] == '', f'rank {number} printed:\n{rank["out"]}{rank["err"]}'


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope='module')
def gzipped_data(tmp_path_factory):
    """Fake Fashion-MNIST, N_TRAIN / N_TEST images (sized for WORLD processes), only as .gz archives: the
    processes unpack them, so this cannot be the shared data_root."""
    root = tmp_path_factory.mktemp('data')
    gzip_only(fakedata.make_mnist(str(root), n_train=N_TRAIN, n_test=N_TEST, kind='FashionMNIST'))
    return root


@pytest.fixture(scope='module')
def ddp_run(gzipped_data, tmp_path_factory):
    """One epoch under torchrun, without --manualSeed (the processes must agree on the random one)."""
    tmp = tmp_path_factory.mktemp('ddp')
    folder = tmp / 'run'
    ranks = torchrun(tmp, 'ranks', FLAGS + ['--path', gzipped_data, '-c', folder, '--epochs', 1])
    return folder, ranks


# ---------------------------------------------------------------- tests

def test_shards_cover_the_test_set_once():
    """The evaluation sampler gives every sample to exactly one process, without the repeats that
    DistributedSampler pads an uneven set with, and in order."""
    data = list(range(N_TEST))
    shards = [list(ShardSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(ShardSampler(data, num_replicas=3, rank=r)) for r in range(3)] == [13, 12, 12]
    assert sorted(sum(shards, [])) == data and all(s == sorted(s) for s in shards)
    assert isinstance(ShardSampler(data, num_replicas=3, rank=0), DistributedSampler)


@pytest.mark.slow
def test_processes_end_with_identical_networks(ddp_run):
    """After the training steps every process holds the same weights and buffers, and they moved.

    The processes trained on different halves of the data (checked in
    test_processes_split_each_epochs_data), so equality means DDP averaged
    their gradients; a missing wrapper or reduction would let them drift apart.
    """
    _, ranks = ddp_run
    saved = [rank['saved'] for rank in ranks]
    assert all(s['wrapped'] == 'DistributedDataParallel' for s in saved)
    assert_same_state(saved[0]['start'], saved[1]['start'])
    assert_same_state(saved[0]['state'], saved[1]['state'])
    start, end = saved[0]['start'], saved[0]['state']
    assert any(v.is_floating_point() and not torch.equal(v, start[k]) for k, v in end.items()), \
        'training changed no weight'


@pytest.mark.slow
def test_processes_split_each_epochs_data(ddp_run, gzipped_data):
    """The two processes see disjoint halves of the training set (so their first batches differ), which
    also shows that they drew the same data order from the same (random, not typed) seed."""
    folder, ranks = ddp_run
    (first,), (second,) = (rank['saved']['indices'] for rank in ranks)
    assert len(first) == len(second) == N_TRAIN // WORLD
    assert sorted(first + second) == list(range(N_TRAIN))
    targets = torch.tensor(fakedata_labels(gzipped_data, 'train'))
    assert not torch.equal(targets[first[:TRAIN_BATCH]], targets[second[:TRAIN_BATCH]])
    ckpt = load(folder / 'checkpoint.pth.tar')
    printed = re.search(r'Seed: (\d+)', ranks[0]['out']).group(1)
    assert ckpt['seed'] == ckpt['args']['manualSeed'] == int(printed)
    assert len(ckpt['rng']) == WORLD


@pytest.mark.slow
def test_only_rank0_writes_and_prints(ddp_run, gzipped_data):
    """The checkpoint folder holds exactly one run's files; the data folder only the unpacked archives, with
    the second process reading them after the first had unpacked them; only rank 0 printed anything."""
    folder, ranks = ddp_run
    assert set(os.listdir(folder)) == RUN_FILES
    assert len(log_rows(folder)) == 1
    raw = gzipped_data / 'FashionMNIST' / 'raw'
    names = {'train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'}
    assert set(os.listdir(raw)) == names | {name + '.gz' for name in names}
    (calls0,), (calls1,) = (rank['saved']['data_calls'] for rank in ranks)
    assert calls1[0] >= calls0[1], 'rank 1 read the data set while rank 0 was still preparing it'
    assert_only_rank0_spoke(ranks)


@pytest.mark.slow
def test_checkpoint_evaluates_alone_to_the_reported_accuracy(ddp_run, gzipped_data, capsys):
    """The accuracy rank 0 printed, logged and stored (over 19 + 18 test images) is what a single process
    evaluating the checkpoint gets over all 37."""
    folder, ranks = ddp_run
    ckpt = load(folder / 'checkpoint.pth.tar')
    (printed, best), = epoch_lines(ranks[0]['out'])
    logged = log_rows(folder)[0]['Valid Acc.']
    assert ckpt['best_acc'] == ckpt['acc']
    capsys.readouterr()
    result = run_main(SCRIPT, ['-e', '--resume', folder / 'checkpoint.pth.tar', '--path', gzipped_data, '-j', '0'])
    alone = float(re.search(r'Test Acc: (\S+)', capsys.readouterr().out).group(1))
    assert result['acc'] == pytest.approx(ckpt['acc'], abs=1e-9)
    assert round(ckpt['acc'], 2) == printed == best == alone
    assert logged == pytest.approx(ckpt['acc'], abs=1e-6)
    # A whole number of images out of N_TEST: nothing was counted twice.
    assert round(ckpt['acc'] * N_TEST / 100, 6).is_integer()


@pytest.mark.slow
def test_ddp_checkpoint_resumes_in_one_process(ddp_run, tmp_path):
    """A checkpoint written under torchrun continues in a plain single process, appending one log row."""
    folder, _ = ddp_run
    copy = tmp_path / 'run'
    shutil.copytree(folder, copy)
    run_main(SCRIPT, ['--resume', copy / 'checkpoint.pth.tar', '--epochs', 2, '-j', '0'])
    assert set(os.listdir(copy)) == RUN_FILES
    assert len(log_rows(copy)) == 2
    ckpt = load(copy / 'checkpoint.pth.tar')
    assert ckpt['epoch'] == 2 and ckpt['args']['time_step'] == 2 and len(ckpt['rng']) == 1


@pytest.mark.slow
def test_single_process_checkpoint_resumes_under_torchrun(gzipped_data, tmp_path):
    """A single-process checkpoint continues under torchrun: one more log row from rank 0 alone, the
    processes identical at the end, and the new checkpoint holds both processes' random states."""
    folder = tmp_path / 'run'
    run_main(SCRIPT, FLAGS + ['--path', gzipped_data, '-c', folder, '--epochs', 1, '--manualSeed', 0])
    ranks = torchrun(tmp_path, 'ranks', ['--resume', folder / 'checkpoint.pth.tar', '--epochs', 2])
    assert set(os.listdir(folder)) == RUN_FILES
    assert len(log_rows(folder)) == 2
    ckpt = load(folder / 'checkpoint.pth.tar')
    assert ckpt['epoch'] == 2 and ckpt['seed'] == 0 and len(ckpt['rng']) == WORLD
    assert_same_state(ranks[0]['saved']['state'], ranks[1]['saved']['state'])
    assert_same_state(ranks[0]['saved']['state'], ckpt['state_dict'])
    # Both started from the single-process weights and took the resumed epoch's half of the data.
    (first,), (second,) = (rank['saved']['indices'] for rank in ranks)
    assert sorted(first + second) == list(range(N_TRAIN))
    assert 'Resuming from' in ranks[0]['out'] and epoch_lines(ranks[0]['out'])[0][0] == round(ckpt['acc'], 2)
    assert_only_rank0_spoke(ranks)


def _input_stats_process(rank, world, rendezvous, out):
    """One process of test_sync_bn_input_stats_cover_every_process: its share's input statistics under SyncBatchNorm."""
    dist.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_model('fashion_mlp', time_step=2)).train()
        x = sync_bn_batch()
        share = x[:4] if rank == 0 else x[4:]  # unequal shares, 4 and 2 images
        torch.save(model.snn.input_stats(share), os.path.join(out, f'stats{rank}.pt'))
    finally:
        dist.destroy_process_group()


def sync_bn_batch():
    """Six images with a mean far from zero (where a one-pass variance would lose digits)."""
    return 3.0 * torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(1)) + 5.0


@pytest.mark.slow
def test_sync_bn_input_stats_cover_every_process(tmp_path):
    """Under --sync-bn the simulation normalises the input current with the whole batch's statistics, as f's
    SyncBatchNorm does, so the time-averaged simulated current is still F(x̄): two Gloo processes holding
    4 and 2 images each get the statistics of all 6, not those of their own share."""
    torch.multiprocessing.spawn(_input_stats_process, args=(WORLD, str(tmp_path / 'rendezvous'), str(tmp_path)),
                                nprocs=WORLD)
    torch.manual_seed(0)
    model = build_model('fashion_mlp', time_step=2).train()
    x = sync_bn_batch()
    whole = model.snn.input_stats(x)
    for rank in range(WORLD):
        mean, var = torch.load(tmp_path / f'stats{rank}.pt')
        torch.testing.assert_close(mean, whole[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var, whole[1], rtol=1e-5, atol=1e-6)
    own = model.snn.input_stats(x[:4])
    assert not torch.allclose(own[1], whole[1], rtol=1e-3)


def _stats_gradient_process(rank, world, rendezvous, out):
    """One process of test_synced_batch_stats_values_and_gradient: statistics and their gradient on its share."""
    dist.init_process_group('gloo', init_method=f'file://{rendezvous}', rank=rank, world_size=world)
    try:
        h, weights = stats_problem()
        share = (h[:4] if rank == 0 else h[4:]).clone().requires_grad_()
        mean, var = batch_stats(share, dist.group.WORLD)
        ((mean * weights[0]).sum() + (var * weights[1]).sum()).backward()
        torch.save((mean.detach(), var.detach(), share.grad), os.path.join(out, f'grad{rank}.pt'))
    finally:
        dist.destroy_process_group()


def stats_problem():
    """A (6, 3, 4, 4) activation with an offset mean, and weights for a scalar of its per-channel statistics."""
    gen = torch.Generator().manual_seed(2)
    h = 2.0 * torch.randn(6, 3, 4, 4, generator=gen, dtype=torch.float64) + 4.0
    return h, torch.randn(2, 3, generator=gen, dtype=torch.float64)


@pytest.mark.slow
def test_synced_batch_stats_values_and_gradient(tmp_path):
    """Synced batch statistics (the Jacobian point of a multi-layer net under --sync-bn) have the whole batch's
    values, and their gradient with respect to each process's share equals the whole-batch gradient's rows."""
    torch.multiprocessing.spawn(_stats_gradient_process, args=(WORLD, str(tmp_path / 'rendezvous'), str(tmp_path)),
                                nprocs=WORLD)
    h, weights = stats_problem()
    h.requires_grad_()
    mean, var = batch_stats(h)
    ((mean * weights[0]).sum() + (var * weights[1]).sum()).backward()
    for rank, rows in enumerate((slice(0, 4), slice(4, 6))):
        share_mean, share_var, grad = torch.load(tmp_path / f'grad{rank}.pt')
        torch.testing.assert_close(share_mean, mean.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(share_var, var.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, h.grad[rows], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- start-up checks and the timeout

def torchrun_env(monkeypatch, rank, local_rank, local_world, world, gpus, mask=None):
    """The variables torchrun sets for one process, on a machine that shows `gpus` GPUs; returns the calls made."""
    for name, value in (('RANK', rank), ('LOCAL_RANK', local_rank), ('LOCAL_WORLD_SIZE', local_world),
                        ('WORLD_SIZE', world)):
        monkeypatch.setenv(name, str(value))
    if mask is None:
        monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    else:
        monkeypatch.setenv('CUDA_VISIBLE_DEVICES', mask)
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: gpus)
    monkeypatch.setattr(torch.cuda, 'set_device', lambda device: calls.append(('set_device', device)))
    monkeypatch.setattr(dist, 'init_process_group',
                        lambda backend, **kwargs: calls.append(('init', backend, kwargs.get('timeout'))))
    return calls


@pytest.mark.parametrize('rank', [0, 2])
def test_more_processes_than_gpus_stop_at_start_up(monkeypatch, rank):
    """torchrun --nproc_per_node=3 on a 2-GPU machine: every process (also those whose GPU exists) stops
    before touching a GPU, with one line naming both counts and what to do."""
    calls = torchrun_env(monkeypatch, rank=rank, local_rank=rank, local_world=3, world=3, gpus=2)
    with pytest.raises(distributed.DistributedError) as err:
        distributed.init_from_env()
    message = str(err.value)
    assert '3 processes on this machine but 2 visible GPUs' in message and '\n' not in message
    assert '--nproc_per_node=2' in message and 'CUDA_VISIBLE_DEVICES=' in message
    assert calls == []


def test_gpu_id_narrower_than_the_processes_stops_at_start_up(monkeypatch):
    """--gpu-id 0 with two processes on the second machine of two: the visible GPU is named."""
    calls = torchrun_env(monkeypatch, rank=3, local_rank=1, local_world=2, world=4, gpus=1, mask='0')
    with pytest.raises(distributed.DistributedError, match=r'2 processes on this machine but 1 visible GPU '
                                                           r'\(CUDA_VISIBLE_DEVICES=0\)'):
        distributed.init_from_env()
    assert calls == []


def test_one_gpu_per_process_joins_with_the_timeout(monkeypatch):
    """Enough GPUs: each process takes its own and joins NCCL with the given timeout (60 minutes if none)."""
    calls = torchrun_env(monkeypatch, rank=5, local_rank=1, local_world=2, world=6, gpus=2)
    ctx = distributed.init_from_env(timeout=datetime.timedelta(minutes=7))
    assert ctx == distributed.Context(rank=5, world_size=6, local_rank=1)
    assert calls == [('set_device', 1), ('init', 'nccl', datetime.timedelta(minutes=7))]
    calls.clear()
    distributed.init_from_env()
    assert calls == [('set_device', 1), ('init', 'nccl', datetime.timedelta(minutes=60))]


def test_cpu_processes_join_gloo_with_the_timeout(monkeypatch):
    calls = torchrun_env(monkeypatch, rank=1, local_rank=1, local_world=4, world=4, gpus=0)
    distributed.init_from_env(timeout=datetime.timedelta(seconds=90))
    assert calls == [('init', 'gloo', datetime.timedelta(seconds=90))]


RANK0_DELAY_S = 4

# One torchrun-like process (a small program, so that start-up stays short): it joins through
# init_from_env with timeout_s; rank 0 prepares the data for RANK0_DELAY_S s, then both meet in the
# data barrier; it writes how long its barrier took and 'ok' or the error.
SLOW_RANK0 = f"""
import datetime, os, sys, time
import torch
from utils.training import distributed
out, timeout_s = sys.argv[1], float(sys.argv[2])
rank = int(os.environ['RANK'])
open(os.path.join(out, f'ready{{rank}}'), 'w').close()
# Start together, so that slow imports do not eat into the short timeout.
while not os.path.exists(os.path.join(out, f'ready{{1 - rank}}')):
    time.sleep(0.01)
ctx = distributed.init_from_env(timeout=datetime.timedelta(seconds=timeout_s))
started = time.monotonic()
try:
    if rank == 0:
        time.sleep({RANK0_DELAY_S})
    distributed.any_all([False], ctx, torch.device('cpu'))
    result = 'ok'
except Exception as exc:
    result = f'{{type(exc).__name__}}: {{exc}}'
with open(os.path.join(out, f'result{{rank}}'), 'w') as f:
    f.write(f'{{time.monotonic() - started:.2f}}\\n{{result}}')
# No teardown: after a timed-out collective the group is unusable anyway.
os._exit(0)
"""


def free_port():
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_pair(timeout_s, out):
    """Both processes of SLOW_RANK0 with timeout_s, on CPUs (Gloo), started now."""
    out.mkdir()
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, 'RANK': str(rank), 'LOCAL_RANK': str(rank), 'WORLD_SIZE': str(WORLD),
               'LOCAL_WORLD_SIZE': str(WORLD), 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port),
               'CUDA_VISIBLE_DEVICES': '', 'OMP_NUM_THREADS': '1'}
        procs.append(subprocess.Popen([sys.executable, '-c', SLOW_RANK0, str(out), str(timeout_s)], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def results(procs, out):
    """(seconds, outcome) of each rank once both processes ended."""
    found = []
    for rank, proc in enumerate(procs):
        try:
            log, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
        path = out / f'result{rank}'
        assert path.is_file(), f'rank {rank} ended without a result (exit {proc.returncode}):\n{log[-2000:]}'
        seconds, outcome = path.read_text().split('\n', 1)
        found.append((float(seconds), outcome))
    return found


@pytest.mark.slow
def test_data_barrier_waits_as_long_as_the_configured_timeout(tmp_path):
    """Rank 0 prepares the data for 4 s while rank 1 waits in the barrier: with timeout=2 s rank 1 gives up
    after about 2 s (so the timeout given to init_from_env is the one in force, not Gloo's 30 minutes);
    with timeout=30 s both pass. The two pairs run side by side."""
    short = start_pair(2, tmp_path / 'short')
    long = start_pair(30, tmp_path / 'long')
    (_, long0_outcome), (long1, long1_outcome) = results(long, tmp_path / 'long')
    assert long0_outcome == long1_outcome == 'ok'
    assert long1 >= RANK0_DELAY_S - 0.5, 'rank 1 did not wait for rank 0'
    _, (short1, short1_outcome) = results(short, tmp_path / 'short')
    assert short1_outcome != 'ok' and re.search(r'timed? ?out', short1_outcome, re.IGNORECASE), short1_outcome
    assert 1.5 <= short1 < RANK0_DELAY_S, f'rank 1 gave up after {short1} s'
