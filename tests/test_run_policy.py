"""The run policy of the training scripts: which flags a resumed run uses, who owns a folder, what resumes where
(bit for bit from our own checkpoints; from the paper's release files as far as they allow).

Each test runs a script for real (in this process, or as a process where
another run must live beside it) on the tiny data sets of tests/conftest.py,
and checks what the run printed and what it left on disk.
"""
import json
import math
import os
import shutil
import signal

import pytest
import torch

from tests.conftest import (BEST, CKPT, LOCK, LOG, TINY, copy_run, cpu_bit_exact, digest, fails, finish, launch,
                            load, log_rows, run_main, wait_for)
from tests.test_release_checkpoints import release_checkpoint, save_as_cuda
from modules import build_model
from tools.fakedata import make_mnist
from utils import flags
from utils.training import distributed, epoch as engine, run as train
from utils.training.resume import BASE_COLUMNS
from utils.checkpoint import load_checkpoint
from utils.training.logger import as_written


def spy(monkeypatch, name):
    """Wrap utils.training.run.<name> (train_epoch or evaluate) to record the amp flag of each call; return the list."""
    real, seen = getattr(train, name), []

    def recorded(*args, **kwargs):
        seen.append(kwargs.get('amp'))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, name, recorded)
    return seen


def hyperparameters(path):
    """{lr, momentum, weight_decay} of the first parameter group of a checkpoint's optimizer state."""
    group = load_checkpoint(path)['optimizer']['param_groups'][0]
    return {key: group[key] for key in ('lr', 'momentum', 'weight_decay')}


# ---------------------------------------------------------------- flags on resume

def test_typed_optimizer_flags_win_on_resume_and_are_announced(trained, tmp_path, capsys):
    """--lr/--momentum/--wd typed with --resume drive the optimizer that trains (not the saved param_groups),
    are recorded in the new checkpoint's flags, and one line names each saved value replaced."""
    folder = copy_run(trained, tmp_path / 'run')
    assert hyperparameters(folder / CKPT) == {'lr': 0.05, 'momentum': 0.9, 'weight_decay': 5e-4}
    capsys.readouterr()
    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2',
                             '--wd', '1e-4', '--momentum', '0.5', '--lr', '0.01'])
    out = capsys.readouterr().out
    overridden = [line for line in out.splitlines() if line.startswith('Typed flags override')]
    assert overridden == ["Typed flags override the checkpoint's: --epochs 1 -> 2, --lr 0.05 -> 0.01, "
                          "--momentum 0.9 -> 0.5, "
                          "--weight-decay 0.0005 -> 0.0001"]
    ckpt = load_checkpoint(folder / CKPT)
    assert ckpt['epoch'] == 2
    assert hyperparameters(folder / CKPT) == {'lr': 0.01, 'momentum': 0.5, 'weight_decay': 1e-4}
    assert (ckpt['args']['lr'], ckpt['args']['momentum'], ckpt['args']['weight_decay']) == (0.01, 0.5, 1e-4)


def test_typed_optimizer_flags_win_over_a_release_checkpoint(released, data_root, tmp_path):
    """The paper's release file carries SGD(momentum 0.9, wd 5e-4): its momentum buffers are used, the typed
    hyperparameters too."""
    assert torch.load(released, map_location='cpu', weights_only=True)['optimizer']['param_groups'][0][
        'weight_decay'] == 5e-4
    folder = tmp_path / 'run'
    run_main('fashion_mlp', TINY + ['--path', data_root, '--resume', released, '-c', folder, '--epochs', '2',
                                    '--wd', '1e-4', '--momentum', '0.5'])
    assert hyperparameters(folder / CKPT) == {'lr': 0.05, 'momentum': 0.5, 'weight_decay': 1e-4}
    assert load_checkpoint(folder / CKPT)['args']['weight_decay'] == 1e-4


def test_no_amp_switches_off_an_inherited_amp(data_root, tmp_path, monkeypatch):
    """A run trained with --amp, resumed or evaluated with --no-amp, trains and evaluates in float32."""
    monkeypatch.setattr(train, 'native_bf16', lambda: True)  # the same on every CPU
    folder = tmp_path / 'run'
    run_main('fashion_mlp', TINY + ['--path', data_root, '--epochs', '1', '-c', folder, '--amp'])
    assert load_checkpoint(folder / CKPT)['args']['amp'] is True

    trained_with_amp = tmp_path / 'amp.pth.tar'
    shutil.copy(folder / CKPT, trained_with_amp)

    epochs, evaluations = spy(monkeypatch, 'train_epoch'), spy(monkeypatch, 'evaluate')
    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2', '--no-amp'])
    assert load_checkpoint(folder / CKPT)['args']['amp'] is False
    assert epochs == [False] and evaluations == [False]
    run_main('fashion_mlp', ['-e', '--resume', trained_with_amp, '--no-amp'])
    assert evaluations[-1] is False
    # Without the flag, the checkpoint's --amp holds.
    run_main('fashion_mlp', ['-e', '--resume', trained_with_amp])
    assert evaluations[-1] is True


def test_tol_none_switches_off_an_inherited_tolerance(data_root, tmp_path, capsys):
    """A run trained with --tol 1e-3, resumed with --tol none, uses the paper's rule (tol None recorded)."""
    folder = tmp_path / 'run'
    run_main('fashion_mlp', TINY + ['--path', data_root, '--epochs', '1', '-c', folder, '--tol', '1e-3'])
    ckpt = load_checkpoint(folder / CKPT)
    assert ckpt['args']['tol'] == 1e-3 and ckpt['model_args']['tol'] == 1e-3
    capsys.readouterr()
    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2', '--tol', 'none'])
    assert '--tol 0.001 -> None' in capsys.readouterr().out
    ckpt = load_checkpoint(folder / CKPT)
    assert ckpt['epoch'] == 2 and ckpt['args']['tol'] is None and ckpt['model_args']['tol'] is None


# ---------------------------------------------------------------- exact resumption

def assert_same_tensors(a, b):
    """Two nested structures hold bit-identical tensors and equal plain values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


# Dropout (all), augmentation in worker processes (CIFAR) and a warm-up that spans the epoch
# boundary all need the restored state.
@pytest.mark.slow
@pytest.mark.parametrize('script, options', [
    ('mnist_conv', ['--train-batch', '16', '--test-batch', '16']),
    ('cifar_alexnetf', ['--train-batch', '4', '--test-batch', '4', '--warmup', '3', '-j', '2']),
])
@cpu_bit_exact
def test_two_epochs_equal_one_plus_resume(script, options, data_root, tmp_path):
    """Two epochs straight and one epoch then --resume end with the same network, optimizer, RNG and log."""
    common = TINY + options + ['--path', data_root, '--manualSeed', '7']
    run_main(script, common + ['--epochs', '2', '-c', tmp_path / 'straight'])
    run_main(script, common + ['--epochs', '1', '-c', tmp_path / 'split'])
    run_main(script, ['--resume', tmp_path / 'split' / CKPT, '--epochs', '2'])
    straight, split = load(tmp_path / 'straight' / CKPT), load(tmp_path / 'split' / CKPT)
    for key in ('state_dict', 'optimizer', 'rng', 'epoch', 'iteration', 'acc', 'best_acc'):
        assert_same_tensors(straight[key], split[key])
    assert (tmp_path / 'straight' / LOG).read_text() == (tmp_path / 'split' / LOG).read_text()


# ---------------------------------------------------------------- the paper's release checkpoints

@pytest.fixture
def released(tmp_path, monkeypatch):
    """A fashion_mlp checkpoint in the release's layout (epoch 1, best 100 %), saved as if from a GPU."""
    torch.manual_seed(0)
    model = build_model('fashion_mlp', time_step=2, leaky=0.95)
    path = tmp_path / 'released' / BEST
    path.parent.mkdir()
    save_as_cuda(release_checkpoint(model, epoch=1, acc=100.0), path, monkeypatch)
    return path


def test_release_checkpoint_resumes_training(released, data_root, tmp_path, capsys, single_thread):
    """--resume with a release file trains on from its epoch (iteration = epoch x batches), warns in one line
    that it has no RNG state, creates the log in its own folder, and refuses that folder once it holds a run."""
    common = TINY + ['--path', data_root]
    original = released.read_bytes()
    assert math.isfinite(run_main('fashion_mlp', common + ['-e', '--resume', released])['acc'])

    capsys.readouterr()
    run_main('fashion_mlp', common + ['--resume', released, '--epochs', '3'])
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [f'warning: {released} holds no random-number state (not saved by this '
                                        f'project); fresh streams from --manualSeed 0']
    assert f'Resuming from {released}: epoch 2, iteration 2, best accuracy 100.00' in out
    folder = released.parent
    ckpt = load_checkpoint(folder / CKPT)
    assert (ckpt['epoch'], ckpt['iteration'], ckpt['arch']) == (3, 6, 'fashion_mlp')
    assert len(log_rows(folder)) == 2
    assert released.read_bytes() == original  # 100 % was not beaten, so the release file stays

    # The folder now holds a run: starting again from the release file there is refused.
    before = digest(folder)
    code, line = fails('fashion_mlp', common + ['--resume', released, '--epochs', '3'], capsys)
    assert code == 1 and line == (f'fashion_mlp.py: error: {folder} already holds a run ({LOG}, {CKPT}): '
                                  f'continue it with --resume {folder / CKPT}, or choose another folder with -c')
    assert digest(folder) == before


@pytest.mark.slow
@cpu_bit_exact
def test_release_checkpoint_in_a_new_folder_is_repeatable(released, data_root, tmp_path, single_thread):
    """From a release file, -c new folders train the same for the same --manualSeed: the RNG starts from it."""
    results = []
    for name in ('a', 'b'):
        run_main('fashion_mlp', TINY + ['--path', data_root, '--resume', released, '-c', tmp_path / name,
                                        '--epochs', '2'])
        results.append(load_checkpoint(tmp_path / name / CKPT))
        assert len(log_rows(tmp_path / name)) == 1
    assert results[0]['iteration'] == 4
    assert all(torch.equal(results[0]['state_dict'][k], results[1]['state_dict'][k]) for k in results[0]['state_dict'])
    assert sorted(os.listdir(released.parent)) == [BEST]


def test_release_optimizer_state_is_used_when_it_fits(capsys):
    """The release's SGD momentum is loaded (this run's hyperparameters kept); an Adam run starts afresh, warned."""
    torch.manual_seed(0)
    model = build_model('fashion_mlp', time_step=2)
    ckpt = release_checkpoint(model, epoch=7, acc=88.0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, weight_decay=0.0)
    say = print
    assert train.restore_foreign(ckpt, 'rel', sgd, 11, 3, distributed.Context(), say) == (7, 77, 88.0)
    drawn = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(4))  # fresh streams from the seed
    saved = ckpt['optimizer']['state']
    for index, param in enumerate(model.parameters()):
        assert torch.equal(sgd.state[param]['momentum_buffer'], saved[index]['momentum_buffer'])
    assert (sgd.param_groups[0]['momentum'], sgd.param_groups[0]['weight_decay']) == (0.5, 0.0)
    assert 'optimizer state not used' not in capsys.readouterr().err

    adam = torch.optim.Adam(model.parameters())
    train.restore_foreign(ckpt, 'rel', adam, 11, 3, distributed.Context(), say)
    assert not adam.state
    assert ('warning: rel: optimizer state not used (it holds momentum_buffer, not Adam state); '
            'starting from a fresh one') in capsys.readouterr().err.splitlines()


# ---------------------------------------------------------------- devices

@pytest.fixture
def gpus(monkeypatch):
    """gpus(n): pretend n CUDA GPUs are visible (without initialising CUDA); no outer mask, no torchrun."""
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    monkeypatch.delenv('WORLD_SIZE', raising=False)

    def set_count(n):
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: n)
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: n > 0)

    return set_count


def test_two_gpu_ids_without_torchrun_point_to_torchrun(gpus, monkeypatch):
    """--gpu-id 0,1 in one process: one warning line naming torchrun; the mask keeps both GPUs, in order of
    an outer CUDA_VISIBLE_DEVICES."""
    gpus(2)
    parser = flags.build_parser('fashion_mlp')
    assert flags.select_gpus(parser, '0,1') == [
        'warning: --gpu-id 0,1: one process trains on one GPU, the first of them; '
        'launch torchrun --nproc_per_node=2 to train on all 2']
    assert os.environ['CUDA_VISIBLE_DEVICES'] == '0,1'
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '5,7')
    assert flags.select_gpus(parser, '1') == [] and os.environ['CUDA_VISIBLE_DEVICES'] == '7'
    # Under torchrun each process is given its GPUs this way: nothing to warn about.
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '5,7')
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert flags.select_gpus(parser, '1,0') == [] and os.environ['CUDA_VISIBLE_DEVICES'] == '7,5'


def test_gpu_id_without_a_gpu_runs_on_the_cpu_and_says_so(gpus, data_root, tmp_path, capsys):
    """--gpu-id 3 where no GPU is: one warning line saying the run is on the CPU, and it trains there."""
    gpus(0)
    assert flags.select_gpus(flags.build_parser('fashion_mlp'), '3') == [
        'warning: --gpu-id 3: no CUDA GPU is available here; running on the CPU']
    assert 'CUDA_VISIBLE_DEVICES' not in os.environ
    capsys.readouterr()
    run_main('fashion_mlp', TINY + ['--path', data_root, '--epochs', '1', '-c', tmp_path / 'run', '--gpu-id', '3'])
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == ['warning: --gpu-id 3: no CUDA GPU is available here; running on the CPU']
    assert 'Device: cpu' in out and load_checkpoint(tmp_path / 'run' / CKPT)['epoch'] == 1


def test_amp_without_native_bf16_runs_in_float32(gpus, data_root, tmp_path, monkeypatch, capsys):
    """--amp on a CPU that only emulates bfloat16: one warning line, the run trains in float32, amp False kept."""
    gpus(0)
    monkeypatch.setattr(train, 'native_bf16', lambda: False)
    epochs = spy(monkeypatch, 'train_epoch')
    capsys.readouterr()
    run_main('fashion_mlp', TINY + ['--path', data_root, '--epochs', '1', '-c', tmp_path / 'run', '--amp'])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('warning: --amp: this CPU has no native bfloat16 arithmetic')
    assert lines[0].endswith('running in float32')
    assert epochs == [False] and load_checkpoint(tmp_path / 'run' / CKPT)['args']['amp'] is False


@pytest.mark.parametrize('flags, native', [
    ('fpu sse2 avx2 avx512f avx512bw', False), ('fpu avx512f avx512_bf16 avx512_vnni', True),
    ('fpu amx_tile amx_bf16 amx_int8', True), ('fpu avx512_bf16x xamx_bf16', False), ('', False),
])
def test_native_bf16_reads_the_cpu_flags(flags, native, monkeypatch, tmp_path):
    """native_bf16 looks for the avx512_bf16 or amx_bf16 flag, whole words, in /proc/cpuinfo."""
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text(f'processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n')
    real_open = open
    # A name in utils.training.epoch shadows the builtin there alone; the cache is bypassed through __wrapped__.
    monkeypatch.setattr(engine, 'open', lambda path, *a, **k: real_open(
        cpuinfo if path == '/proc/cpuinfo' else path, *a, **k), raising=False)
    assert engine.native_bf16.__wrapped__() is native


# ---------------------------------------------------------------- one run per folder

@pytest.mark.slow
def test_a_folder_in_use_is_refused_and_a_stale_lock_is_not(data_root, tmp_path, capsys):
    """While run A trains in R, a second run there exits 1 in one line naming A's PID and writes nothing.
    A killed outright leaves R/.lock behind, which blocks no one; two resumes of one checkpoint at once:
    the second is refused, the first finishes."""
    folder, marks = tmp_path / 'R', tmp_path / 'marks'
    marks.mkdir()
    first = launch('fashion_mlp', TINY + ['--path', data_root, '--epochs', '2', '-c', folder],
                   {'hold_batch': 1}, marks)
    wait_for(marks / 'held', first)
    assert (folder / LOCK).read_text().strip() == str(first.pid)
    in_use = (f'fashion_mlp.py: error: {folder} is in use by another run (PID {first.pid}); wait for it to end, '
              f'or choose another folder with -c')
    code, line = fails('fashion_mlp', TINY + ['--path', data_root, '--epochs', '1', '-c', folder,
                                              '--manualSeed', '1', '--lr', '0.01'], capsys)
    assert (code, line) == (1, in_use)
    assert os.listdir(folder) == [LOCK] and (folder / LOCK).read_text().strip() == str(first.pid)

    first.send_signal(signal.SIGKILL)
    assert finish(first)[0] == -signal.SIGKILL
    assert os.listdir(folder) == [LOCK]  # stale: no process holds it
    run_main('fashion_mlp', TINY + ['--path', data_root, '--epochs', '1', '-c', folder])
    assert load_checkpoint(folder / CKPT)['epoch'] == 1 and not (folder / LOCK).exists()

    (marks / 'held').unlink()
    resumed = launch('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2'], {'hold_batch': 1}, marks)
    wait_for(marks / 'held', resumed)
    before = digest(folder)
    code, line = fails('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '3'], capsys)
    assert (code, line) == (1, in_use.replace(str(first.pid), str(resumed.pid)))
    assert digest(folder) == before
    (marks / 'release').touch()
    code, _, err = finish(resumed)
    assert code == 0, err
    assert load_checkpoint(folder / CKPT)['epoch'] == 2 and len(log_rows(folder)) == 2
    assert not (folder / LOCK).exists()


def test_a_checkpoint_copied_from_another_run_is_refused_in_that_folder(trained, data_root, tmp_path, capsys):
    """A's checkpoint copied into B's folder and resumed there: exit 1, one line (histories differ, use -c);
    B's files unchanged."""
    a = copy_run(trained, tmp_path / 'A')
    b = tmp_path / 'B'
    run_main('fashion_mlp', TINY + ['--path', data_root, '--epochs', '1', '-c', b, '--manualSeed', '1'])
    shutil.copy(a / CKPT, b / 'friend.pth.tar')
    before = digest(b)
    code, line = fails('fashion_mlp', ['--resume', b / 'friend.pth.tar', '--epochs', '2'], capsys)
    assert code == 1
    assert line == (f'fashion_mlp.py: error: {b / "friend.pth.tar"} is not the run logged in {b} (their epochs '
                    f'differ): it was copied from another run; continue it in a folder of its own with -c')
    assert digest(b) == before


def test_an_earlier_checkpoint_resumes_in_its_folder_only_with_rewind(trained, tmp_path, capsys):
    """model_best of epoch 1 in a folder whose run went on to epoch 3: refused without --rewind (one line);
    with it the log is the true history (epoch 1, then the new epoch 2) and epochs 2-3 are kept aside."""
    folder = copy_run(trained, tmp_path / 'run')
    first_row = log_rows(folder)
    epoch_one = (folder / CKPT).read_bytes()
    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '3'])
    (folder / BEST).write_bytes(epoch_one)  # the best of the run was its first epoch
    abandoned_log, abandoned_ckpt = (folder / LOG).read_bytes(), (folder / CKPT).read_bytes()
    before = digest(folder)

    code, line = fails('fashion_mlp', ['--resume', folder / BEST, '--epochs', '3'], capsys)
    assert code == 1 and '--rewind' in line and 'epoch 1' in line and 'epoch 3' in line
    assert digest(folder) == before

    capsys.readouterr()
    run_main('fashion_mlp', ['--resume', folder / BEST, '--epochs', '2', '--rewind'])
    out = capsys.readouterr().out
    assert [text for text in out.splitlines() if text.startswith('Rewound')] == [
        'Rewound to epoch 1: epochs 2-3 are kept aside in log.abandoned-epoch3.txt, '
        'checkpoint.abandoned-epoch3.pth.tar']
    assert (folder / 'log.abandoned-epoch3.txt').read_bytes() == abandoned_log
    assert (folder / 'checkpoint.abandoned-epoch3.pth.tar').read_bytes() == abandoned_ckpt
    rows, ckpt = log_rows(folder), load_checkpoint(folder / CKPT)
    assert ckpt['epoch'] == 2 and len(rows) == 2 and rows[:1] == first_row
    logged = [as_written([math.nan if v is None else v for v in row.values()]) for row in rows]
    assert [as_written(row) for row in ckpt['log']] == logged


def test_a_log_without_its_header_is_found_before_training(trained, tmp_path, monkeypatch, capsys):
    """log.txt with its first line gone: --resume stops at once in one line; the checkpoint is not advanced."""
    folder = copy_run(trained, tmp_path / 'run')
    with open(folder / LOG, encoding='utf-8') as f:
        lines = f.read().splitlines(keepends=True)
    (folder / LOG).write_text(''.join(lines[1:]), encoding='utf-8')
    before = digest(folder)
    epochs = spy(monkeypatch, 'train_epoch')
    code, line = fails('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2'], capsys)
    assert code == 1 and str(folder / LOG) in line and 'header' in line
    assert epochs == [] and digest(folder) == before


def test_a_log_of_the_six_paper_columns_gains_the_diagnostics(trained, tmp_path):
    """A log (and checkpoint history) written before the diagnostic columns still resumes: the log gains the
    new columns, nan in the old rows and values in the new one, and the plot is drawn."""
    folder = copy_run(trained, tmp_path / 'run')
    width = len(BASE_COLUMNS)
    with open(folder / LOG, encoding='utf-8') as f:
        old = ['\t'.join(line.rstrip('\t').split('\t')[:width]) + '\n' for line in f.read().splitlines()]
    (folder / LOG).write_text(''.join(old), encoding='utf-8')
    ckpt = torch.load(folder / CKPT, map_location='cpu', weights_only=True)
    ckpt['log'] = [row[:width] for row in ckpt['log']]
    torch.save(ckpt, folder / CKPT)
    (folder / 'log.png').unlink()

    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2'])
    with open(folder / LOG, encoding='utf-8') as f:
        header = f.readline().rstrip('\n').split('\t')
    assert header == BASE_COLUMNS + list(engine.DIAGNOSTICS) + [engine.IDLE_SOLVES]
    first, second = log_rows(folder)
    assert [first[name] for name in BASE_COLUMNS] == [float(v) for v in old[1].split('\t')]
    assert all(first[name] is None for name in engine.DIAGNOSTICS)
    assert all(second[name] is not None for name in BASE_COLUMNS)
    assert second['Bwd Res.'] is not None and second['Bwd Iters'] == 3
    assert (folder / 'log.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert load_checkpoint(folder / CKPT)['epoch'] == 2


# ---------------------------------------------------------------- flags

def test_train_batch_one_is_a_flag_error_for_the_fc_net_only(data_root, tmp_path, capsys):
    """fashion_mlp normalises units over the batch: --train-batch 1 is a one-line flag error before any work;
    the conv net (BN over batch and pixels) trains with it."""
    code, line = fails('fashion_mlp', TINY + ['--path', data_root, '-c', tmp_path / 'fc', '--train-batch', '1'],
                       capsys)
    assert code == 2 and line.startswith('fashion_mlp.py: error: --train-batch: ') and 'at least 2' in line
    assert not (tmp_path / 'fc').exists()
    make_mnist(str(tmp_path / 'data'), n_train=4, n_test=4)
    run_main('mnist_conv', TINY + ['--path', tmp_path / 'data', '-c', tmp_path / 'conv', '--train-batch', '1',
                                   '--epochs', '1'])
    ckpt = load_checkpoint(tmp_path / 'conv' / CKPT)
    assert ckpt['iteration'] == 4 and log_rows(tmp_path / 'conv')[0]['Skipped'] == 0


def test_sweep_T_writes_one_accuracy_per_T_beside_the_checkpoint(trained, tmp_path, capsys):
    """-e --resume CKPT --sweep-T 4 2: acc_checkpoint_sweepT2-4.{json,csv,png} beside it, one accuracy per T;
    a second sweep is refused (one line) unless --overwrite; --sweep-T without -e is a flag error."""
    folder = copy_run(trained, tmp_path / 'run')
    run_main('fashion_mlp', ['-e', '--resume', folder / CKPT, '--sweep-T', '4', '2'])
    prefix = folder / 'acc_checkpoint_sweepT2-4'
    with open(f'{prefix}.json', encoding='utf-8') as f:
        rows = json.load(f)['rows']
    assert [row['time_step'] for row in rows] == [2, 4]
    assert rows[0]['acc'] == pytest.approx(load_checkpoint(folder / CKPT)['acc'], abs=1e-9)  # trained at T=2
    with open(f'{prefix}.csv', encoding='utf-8') as f:
        assert len(f.read().splitlines()) == 1 + 2
    assert open(f'{prefix}.png', 'rb').read(8) == b'\x89PNG\r\n\x1a\n'

    before, inode = digest(folder), os.stat(f'{prefix}.json').st_ino
    code, line = fails('fashion_mlp', ['-e', '--resume', folder / CKPT, '--sweep-T', '2', '4'], capsys)
    assert code == 1 and line == (f'fashion_mlp.py: error: {prefix}.json exists; pass --overwrite to replace it '
                                  'or --out-dir to write elsewhere')
    assert digest(folder) == before
    run_main('fashion_mlp', ['-e', '--resume', folder / CKPT, '--sweep-T', '2', '4', '--overwrite'])
    assert os.stat(f'{prefix}.json').st_ino != inode  # written anew

    code, line = fails('fashion_mlp', ['--resume', folder / CKPT, '--sweep-T', '2'], capsys)
    assert (code, line) == (2, 'fashion_mlp.py: error: --sweep-T: has no effect unless -e --resume FILE; leave it out')
    # Typed in any order, with repeats: one set of T (as get_rate.py takes it).
    args, _, _ = flags.parse_args('fashion_mlp', ['-e', '--resume', 'x', '--sweep-T', '4', '2', '4'])
    assert args.sweep_T == [2, 4]


# ---------------------------------------------------------------- diagnostics

def test_diagnostics_reach_the_log_and_the_step_csv(trained, tmp_path):
    """Each epoch's row carries the equilibrium diagnostics of its steps, and --solver-log appends one CSV row per
    step (never truncating the file on resume). At --threshold 3 with the paper's rule every solve hits the cap."""
    folder = copy_run(trained, tmp_path / 'run')
    steps = tmp_path / 'steps.csv'
    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2', '--solver-log', steps])
    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '3', '--solver-log', steps])
    rows = log_rows(folder)
    for row in rows[1:]:
        assert row['Bwd Iters'] == 3 and row['Bwd Capped'] == 1.0
        assert 0 < row['Bwd Res.'] < 1 and 0 < row['Fwd Res.'] < 10
        assert row['Fb Norm'] is None and row['Jac Norm'] is None  # not asked for (--jac-norm-every 0)
    with open(steps, encoding='utf-8') as f:
        header, *lines = [line.split(',') for line in f.read().splitlines()]
    assert header[:4] == ['epoch', 'iteration', 'nstep', 'stop']
    # 32 training samples in batches of 16: two steps an epoch, epochs 2 and 3.
    assert [(int(l[0]), int(l[1]), int(l[2]), l[3]) for l in lines] == [
        (2, 2, 3, 'cap'), (2, 3, 3, 'cap'), (3, 4, 3, 'cap'), (3, 5, 3, 'cap')]
