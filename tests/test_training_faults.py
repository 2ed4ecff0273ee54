"""Faults caused for real, at the level of the scripts: one clear message, nothing lost.

Every test causes its fault — a mistyped flag, a process killed inside a
checkpoint save, SIGINT/SIGTERM in the middle of an epoch, a full, read-only
or impossible folder, NaN in a training batch, a non-finite solver result, a
malicious, truncated or foreign checkpoint, a malformed data file, an input of
the wrong shape — and checks both the message and that nothing on disk was
lost or changed.

Faults inside a running script are injected through `launch(..., hooks)` of
tests/conftest.py, which patches the library in that process only.
"""
import errno
import math
import os
import pickle
import pty
import re
import shlex
import shutil
import signal
import subprocess
import threading

import pytest
import torch

from modules import build_model
from tests import nmnist_fakes
from tools import fakedata
from tests.conftest import (BEST, CKPT, LOG, TINY, WAIT_S, copy_run, digest, error_line, fails, finish, launch,
                            log_rows, run_main, wait_for)
from utils.training import run as train
from utils.data.datasets import DataError
from utils.checkpoint import load_checkpoint
from utils.training.status import STATUS_NAME


def all_finite(state_dict):
    """True when every floating-point tensor of a state_dict is finite."""
    return all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point())


def screen_lines(raw):
    """The lines a terminal shows for raw output: escape sequences dropped, each line from its last carriage return."""
    text = re.sub(r'\x1b\[[0-9;?]*[A-Za-z]', '', raw.replace('\r\n', '\n'))
    return [line.rsplit('\r', 1)[-1] for line in text.split('\n')]


# ---------------------------------------------------------------- flags

BAD_FLAGS = [
    (['--time_step', '0'], '--time_step', ["an integer >= 1, got '0'"]),
    (['-t', '2.5'], '--time_step', ["an integer >= 1, got '2.5'"]),
    (['--vth', '0'], '--vth', ["a number > 0, got '0'"]),
    (['--vth', 'inf'], '--vth', ["a number > 0, got 'inf'"]),
    (['--lr', '-0.1'], '--lr', ["a number > 0, got '-0.1'"]),
    (['--lr', 'nan'], '--lr', ["a number > 0, got 'nan'"]),
    (['--train-batch', '0'], '--train-batch', ["an integer >= 1, got '0'"]),
    (['--test-batch', '-3'], '--test-batch', ["an integer >= 1, got '-3'"]),
    (['--threshold', '0'], '--threshold', ["an integer >= 1, got '0'"]),
    (['--leaky', 'abc'], '--leaky', ["a number, got 'abc'"]),
    (['-d', 'cifar10'], '--dataset', ['cifar10', 'mnist', 'digits']),
    (['--solver', 'newton'], '--solver', ['newton', 'broyden', 'iter']),
    (['--schedule', '30', '20'], '--schedule', ['strictly increasing epochs, got 30 20']),
    (['--schedule', '10', '10'], '--schedule', ['strictly increasing epochs, got 10 10']),
    (['--gpu-id', 'x'], '--gpu-id', ["distinct comma-separated GPU indices such as 0 or 0,1, got 'x'"]),
    (['--gpu-id', '0,0'], '--gpu-id', ["distinct comma-separated GPU indices such as 0 or 0,1, got '0,0'"]),
    pytest.param(['--gpu-id', '64'], '--gpu-id', ['expected indices in 0..'],
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='any index is usable without GPUs')),
    (['--lr'], '--lr', ['expected one argument']),
    (['--lr0', '1'], '--lr0 1', ['not a flag of this script']),
    (['--epochs', '0'], '--epochs', ["an integer >= 1, got '0'"]),
    (['--drop', '1'], '--drop', ["a number in [0, 1), got '1'"]),
    (['--drop', '-0.1'], '--drop', ["a number in [0, 1), got '-0.1'"]),
    (['--optimizer', 'RMSprop'], '--optimizer', ['RMSprop', 'SGD', 'Adam']),
    (['--schedule', '0', '10'], '--schedule', ["an integer >= 1, got '0'"]),
    (['-e'], '--evaluate', ['needs --resume FILE']),
    (['--start-epoch', '5', '--epochs', '5'], '--start-epoch', ['an epoch below --epochs (5), got 5']),
]


@pytest.mark.parametrize('flags, flag, accepted', BAD_FLAGS)
def test_bad_flag_is_one_line_before_any_work(flags, flag, accepted, tmp_path, monkeypatch, capsys):
    """A bad flag exits with code 2 and one line naming the flag and what it accepts; nothing is created."""
    monkeypatch.chdir(tmp_path)  # the default -c and --path are relative
    code, line = fails('mnist_conv', flags, capsys)
    assert code == 2
    assert line.startswith(f'mnist_conv.py: error: {flag}: ')
    for text in accepted:
        assert text in line
    assert os.listdir(tmp_path) == []


def test_bad_flags_in_real_processes(tmp_path):
    """Run as processes, a bad value and a bad flag combination each give exit code 2, one line, no traceback."""
    cases = {'time_step': ['--time_step', '0'], 'schedule': ['--schedule', '30', '20']}
    procs = {}
    for name, flags in cases.items():
        (tmp_path / name).mkdir()
        procs[name] = launch('fashion_mlp', flags, cwd=tmp_path / name)
    for name, proc in procs.items():
        code, out, err = finish(proc)
        assert code == 2 and out == ''
        assert error_line(err).startswith(f'fashion_mlp.py: error: --{name}: expected ')
        assert os.listdir(tmp_path / name) == []


@pytest.mark.parametrize('leaky, line, leak', [
    (None, 'Neuron: LIF (leaky=0.95)', 0.95), ('0.5', 'Neuron: LIF (leaky=0.5)', 0.5),
    ('1', 'Neuron: IF', 1.0), ('0', 'Neuron: IF', 1.0), ('-1', 'Neuron: IF', 1.0), ('1.5', 'Neuron: IF', 1.0),
])
def test_leaky_outside_the_unit_interval_is_if_and_the_choice_is_printed(leaky, line, leak, tmp_path, monkeypatch,
                                                                         capsys):
    """--leaky in (0, 1) gives LIF, any other value IF; start-up prints which, and the net is built that way."""
    def stop(*args, **kwargs):
        raise DataError('stopped after start-up')

    monkeypatch.setattr(train, 'get_datasets', stop)
    flags = TINY + ['-c', tmp_path / 'run'] + ([] if leaky is None else ['--leaky', leaky])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_main('mnist_conv', flags)
    assert [text for text in capsys.readouterr().out.splitlines() if text.startswith('Neuron')] == [line]
    assert build_model('mnist_conv', leaky=0.95 if leaky is None else float(leaky)).snn.leak == leak


# ---------------------------------------------------------------- nothing lost

@pytest.mark.slow
def test_kill_during_a_save_leaves_the_previous_checkpoint(trained, tmp_path, single_thread):
    """kill -9 while the next checkpoint is half written: every file of the previous epoch (checkpoint, best
    model, log) is byte-identical, and the run resumes from it."""
    folder = copy_run(trained, tmp_path / 'run')
    before = digest(folder)
    marks = tmp_path / 'marks'
    marks.mkdir()
    proc = launch('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2'], {'stall_write': CKPT}, marks)
    wait_for(marks / 'writing', proc)
    temporary = [name for name in os.listdir(folder) if name not in before and name not in ('.lock', STATUS_NAME)]
    assert f'.{CKPT}.' in ''.join(temporary) and all(name.endswith('.tmp') for name in temporary)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc)[0] == -signal.SIGKILL

    after = digest(folder)
    assert {name: after[name] for name in before} == before
    assert load_checkpoint(folder / CKPT)['epoch'] == 1
    # The leftover temporary files neither block nor confuse the next run, which removes them.
    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2'])
    assert load_checkpoint(folder / CKPT)['epoch'] == 2 and len(log_rows(folder)) == 2
    assert not [name for name in os.listdir(folder) if name.endswith('.tmp')]


def test_a_log_row_lost_after_its_checkpoint_is_restored_on_resume(trained, tmp_path, single_thread):
    """A stop after epoch 2's checkpoint was saved but before its log row was written: resuming writes that
    row (the checkpoint carries the log's rows) before epoch 3's, so the log has one row per epoch again."""
    folder = copy_run(trained, tmp_path / 'run')
    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2'])
    complete = log_rows(folder)
    with open(folder / LOG, encoding='utf-8') as f:
        lines = f.read().splitlines(keepends=True)
    with open(folder / LOG, 'w', encoding='utf-8') as f:
        f.writelines(lines[:-1])  # the state such a stop leaves: epoch 2 saved, its row not
    assert len(log_rows(folder)) == 1 and load_checkpoint(folder / CKPT)['epoch'] == 2

    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '3'])
    rows = log_rows(folder)
    assert len(rows) == 3 and rows[:2] == complete
    logged = [math.nan if v is None else v for v in rows[2].values()]
    assert load_checkpoint(folder / CKPT)['log'][2] == pytest.approx(logged, abs=5e-7, nan_ok=True)


def test_new_run_refuses_a_folder_holding_a_run(trained, tmp_path, data_root):
    """A new run in a used -c folder stops in one line naming the folder and both ways out; files untouched."""
    folder = copy_run(trained, tmp_path / 'run')
    before = digest(folder)
    code, out, err = finish(launch('fashion_mlp', TINY + ['--path', data_root, '-c', folder]))
    assert code == 1
    assert error_line(err) == (f'fashion_mlp.py: error: {folder} already holds a run ({LOG}, {CKPT}, {BEST}): '
                               f'continue it with --resume {folder / CKPT}, or choose another folder with -c')
    assert digest(folder) == before


@pytest.mark.parametrize('name', [LOG, CKPT, BEST])
def test_any_file_of_a_run_makes_a_folder_used(name, trained, tmp_path, data_root, capsys):
    """The log alone, or either checkpoint alone, is enough for a new run to refuse the folder."""
    folder = tmp_path / 'run'
    folder.mkdir()
    shutil.copy(trained / name, folder / name)
    code, line = fails('fashion_mlp', TINY + ['--path', data_root, '-c', folder], capsys)
    assert code == 1 and f'{folder} already holds a run ({name})' in line and '--resume' in line
    assert os.listdir(folder) == [name] and (folder / name).read_bytes() == (trained / name).read_bytes()


def test_resuming_into_another_runs_folder_is_refused(trained, tmp_path, capsys, single_thread):
    """--resume A -c B never writes over a run in B; a B without a run starts there, its log holding A's
    epochs (from the checkpoint) and the new one."""
    first, second = copy_run(trained, tmp_path / 'a'), copy_run(trained, tmp_path / 'b')
    before = digest(first), digest(second)
    code, line = fails('fashion_mlp', ['--resume', first / CKPT, '-c', second, '--epochs', '2'], capsys)
    assert code == 1 and line.startswith(f'fashion_mlp.py: error: {second} already holds a run')
    assert (digest(first), digest(second)) == before

    run_main('fashion_mlp', ['--resume', first / CKPT, '-c', tmp_path / 'c', '--epochs', '2'])
    assert load_checkpoint(tmp_path / 'c' / CKPT)['epoch'] == 2
    assert log_rows(tmp_path / 'c')[:1] == log_rows(first) and len(log_rows(tmp_path / 'c')) == 2
    assert digest(first) == before[0]


@pytest.mark.slow
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_epoch_stops_with_a_resumable_checkpoint(signum, data_root, tmp_path, single_thread):
    """SIGINT/SIGTERM in epoch 2: exit 128+signal after the batch, epoch 1's checkpoint kept, and the printed
    command (shell-quoted: the folder's path holds spaces) resumes and completes the run."""
    folder, marks = tmp_path / 'my runs' / 'run 2', tmp_path / 'marks'
    marks.mkdir()
    # Batch 3 is the first of epoch 2; it waits there until the signal is sent.
    proc = launch('fashion_mlp', TINY + ['--path', data_root, '--epochs', '3', '-c', folder],
                  {'hold_batch': 3}, marks)
    wait_for(marks / 'held', proc)
    saved = digest(folder)
    proc.send_signal(signum)
    (marks / 'release').touch()
    code, out, err = finish(proc)

    assert code == 128 + signum, err
    last = err.strip().splitlines()[-1]
    assert last.startswith('interrupted; resume with: ')
    command = shlex.split(last[len('interrupted; resume with: '):])
    assert command == ['python', 'fashion_mlp.py', '--resume', str(folder / CKPT)]
    assert 'Epoch 2/3 ' not in out and 'Traceback' not in err
    assert digest(folder) == saved
    assert load_checkpoint(folder / CKPT)['epoch'] == 1 and len(log_rows(folder)) == 1
    run_main('fashion_mlp', command[2:])
    assert load_checkpoint(folder / CKPT)['epoch'] == 3 and len(log_rows(folder)) == 3


@pytest.mark.slow
def test_full_disk_during_a_save_and_an_impossible_folder(trained, tmp_path, data_root):
    """ENOSPC half way through the checkpoint or the best model, or -c under a regular file: one line, exit 1,
    and every file as it was (neither file replaced, no temporary left, no log line)."""
    procs = {}
    for name in (CKPT, BEST):
        folder = copy_run(trained, tmp_path / name)
        marks = tmp_path / f'{name}.marks'
        marks.mkdir()
        # Epoch 2 beats epoch 1, so both files are written.
        procs[name] = folder, digest(folder), launch('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2'],
                                                      {'fail_write': name}, marks)
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder\n')
    impossible = launch('fashion_mlp', TINY + ['--path', data_root, '-c', blocker / 'run'])

    for name, (folder, before, proc) in procs.items():
        code, _, err = finish(proc)
        assert code == 1
        assert error_line(err) == f'fashion_mlp.py: error: cannot write {folder / name}: No space left on device'
        assert digest(folder) == before
        assert load_checkpoint(folder / BEST)['acc'] == load_checkpoint(folder / CKPT)['best_acc']
    code, _, err = finish(impossible)
    assert code == 1
    assert error_line(err) == f'fashion_mlp.py: error: cannot create {blocker / "run"}: Not a directory'
    assert blocker.read_text() == 'not a folder\n'


@pytest.fixture
def tmpfs(tmp_path):
    """A fresh 16 MiB tmpfs mounted at tmp_path/disk (needs root and CAP_SYS_ADMIN; skipped elsewhere)."""
    point = tmp_path / 'disk'
    point.mkdir()
    mount, umount = shutil.which('mount'), shutil.which('umount')
    if not (mount and umount) or subprocess.run([mount, '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', str(point)],
                                                capture_output=True).returncode != 0:
        pytest.skip('cannot mount a tmpfs here')
    yield point
    subprocess.run([umount, '-l', str(point)], capture_output=True)


def fill(folder):
    """Write a file in folder until its file system is full."""
    chunk = b'\0' * (1 << 16)
    with open(os.path.join(folder, 'filler'), 'wb', buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return


def test_real_full_disk_keeps_the_previous_checkpoint(trained, tmpfs, capsys, single_thread):
    """On a file system that really is full, the failed write is one line and the previous checkpoint is intact.

    A resumed run rewrites its status file first, so it stops there, before training an epoch it could not save."""
    folder = copy_run(trained, tmpfs / 'run')
    before = digest(folder)
    fill(tmpfs)
    code, line = fails('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2'], capsys)
    assert code == 1 and line in {f'fashion_mlp.py: error: cannot write {folder / name}: No space left on device'
                                  for name in (CKPT, BEST, STATUS_NAME)}
    assert digest(folder) == before
    assert load_checkpoint(folder / CKPT)['epoch'] == 1


def test_read_only_folder_is_refused_before_training(trained, tmpfs, data_root, capsys, single_thread):
    """A folder on a read-only file system is reported in one line at start-up, not after an epoch."""
    folder = copy_run(trained, tmpfs / 'run')
    before = digest(folder)
    subprocess.run(['mount', '-o', 'remount,ro', str(tmpfs)], check=True)
    code, line = fails('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2'], capsys)
    assert code == 1 and line == f'fashion_mlp.py: error: cannot write in {folder}: Read-only file system'
    code, line = fails('fashion_mlp', TINY + ['--path', data_root, '-c', tmpfs / 'new'], capsys)
    assert code == 1 and line == f'fashion_mlp.py: error: cannot create {tmpfs / "new"}: Read-only file system'
    assert digest(folder) == before


# ---------------------------------------------------------------- numerical faults

@pytest.fixture(scope='module')
def faulty_runs(tmp_path_factory, data_root):
    """Two runs started together: 'skips' (one NaN batch, one NaN solver residual, stderr on a terminal)
    and 'stops' (five NaN batches in a row). Each gives (folder, exit code, stdout, stderr)."""
    root = tmp_path_factory.mktemp('faulty')
    master, slave = pty.openpty()
    skips = launch('fashion_mlp', TINY + ['--path', data_root, '--epochs', '3', '-c', root / 'skips'],
                   {'nan_batches': [3], 'bad_solves': [6]}, root, stderr=slave)
    os.close(slave)
    stops = launch('fashion_mlp', TINY + ['--path', data_root, '--epochs', '5', '-c', root / 'stops'],
                   {'nan_batches': [3, 4, 5, 6, 7]}, root)
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    code, out, _ = finish(skips)
    reader.join(WAIT_S)
    os.close(master)
    terminal = b''.join(chunks).decode(errors='replace')
    return {'skips': (root / 'skips', code, out, terminal), 'stops': (root / 'stops', *finish(stops))}


@pytest.mark.slow
def test_non_finite_steps_are_skipped_counted_and_leave_no_trace(faulty_runs):
    """A NaN batch and a NaN solver residual each skip one step with a warning, counted in the log and the
    bar; the run completes, and the NaN batch leaves no NaN in the BN statistics or the results."""
    folder, code, out, terminal = faulty_runs['skips']
    assert code == 0, terminal
    # On the terminal each warning has a line of its own, between the progress bar's lines.
    warnings = [line for line in screen_lines(terminal) if 'warning' in line]
    assert warnings == ['warning: Epoch 2/3, batch 1: non-finite loss, gradient or solver result; '
                        'optimizer step skipped',
                        'warning: Epoch 3/3, batch 2: non-finite loss, gradient or solver result; '
                        'optimizer step skipped']
    assert 'Skipped: 1' in terminal and 'Traceback' not in terminal
    rows = log_rows(folder)
    assert [row['Skipped'] for row in rows] == [0, 1, 1]
    assert all(value is None or math.isfinite(value) for row in rows for value in row.values())
    ckpt = load_checkpoint(folder / CKPT)
    assert ckpt['epoch'] == 3 and all_finite(ckpt['state_dict'])
    assert 'skipped 1' in out.splitlines()[-2]


@pytest.mark.slow
def test_five_non_finite_steps_in_a_row_stop_at_the_last_good_checkpoint(faulty_runs):
    """Five skipped steps in a row end the run with one clear line naming the last good checkpoint, intact."""
    folder, code, out, err = faulty_runs['stops']
    assert code == 1
    *warnings, line = err.strip().splitlines()
    assert len(warnings) == 5 and all('optimizer step skipped' in w for w in warnings)
    assert line == ('fashion_mlp.py: error: 5 optimizer steps in a row had a non-finite loss, gradient or solver '
                    'result (last at Epoch 4/5, batch 1); stopped (a lower --lr may help); '
                    f'the last good checkpoint is {folder / CKPT}')
    ckpt = load_checkpoint(folder / CKPT)
    assert ckpt['epoch'] == 3 and all_finite(ckpt['state_dict'])
    assert [row['Skipped'] for row in log_rows(folder)] == [0, 2, 2]


# ---------------------------------------------------------------- untrusted files

class Payload:
    """Pickles as a call of open(target, 'w'): loading it unrestricted would create target."""

    def __init__(self, target):
        """Remember the file that loading would create."""
        self.target = str(target)

    def __reduce__(self):
        """The call that pickle replays on load."""
        return open, (self.target, 'w')


def test_malicious_checkpoint_is_refused_unexecuted(tmp_path):
    """A checkpoint whose pickle would create a file is refused by weights_only loading; the file never appears."""
    # The payload works: loaded without weights_only, it creates its file.
    control = tmp_path / 'control.pth.tar'
    torch.save({'state_dict': {}, 'epoch': 1, 'x': Payload(tmp_path / 'control_created')}, control)
    torch.load(control, weights_only=False)['x'].close()
    assert (tmp_path / 'control_created').exists()

    evil = tmp_path / 'evil'
    evil.mkdir()
    target = tmp_path / 'pwned'
    torch.save({'state_dict': {}, 'epoch': 1, 'x': Payload(target)}, evil / 'checkpoint.pth.tar')
    (evil / 'raw.pkl').write_bytes(pickle.dumps({'state_dict': {}, 'x': Payload(target)}, protocol=2))
    before = digest(evil)
    procs = [launch('fashion_mlp', ['--resume', evil / 'checkpoint.pth.tar']),
             launch('fashion_mlp', ['-e', '--resume', evil / 'raw.pkl'])]
    for proc, name in zip(procs, ('checkpoint.pth.tar', 'raw.pkl')):
        code, _, err = finish(proc)
        assert code == 1
        assert error_line(err) == (f'fashion_mlp.py: error: {evil / name} holds an object of type io.open, which '
                                   f'weights_only loading refuses; re-save it with plain types')
    assert not target.exists() and digest(evil) == before


def _truncated(source, path):
    """The real checkpoint cut in half."""
    data = source.read_bytes()
    path.write_bytes(data[:len(data) // 2])


UNUSABLE = [
    ('truncated', _truncated, 'fashion_mlp',
     'is not a readable checkpoint (truncated or not a torch file): incomplete zip archive'),
    ('text', lambda source, path: path.write_text('epoch 3 acc 91.2\n'), 'fashion_mlp',
     "is not a readable checkpoint (truncated or not a torch file): unknown format (starts with b'epoch 3 ')"),
    ('empty', lambda source, path: path.write_bytes(b''), 'fashion_mlp',
     'is not a readable checkpoint (truncated or not a torch file): the file is empty'),
    ('tensor', lambda source, path: torch.save(torch.zeros(3), path), 'fashion_mlp',
     "is not a checkpoint: it holds a Tensor, not a dict with 'state_dict'"),
    ('weights only', lambda source, path: torch.save({'state_dict': load_checkpoint(source)['state_dict']}, path),
     'fashion_mlp', 'has no training state of this project (epoch, optimizer, iteration, rng missing); '
                    'it can only be evaluated with -e'),
    ('another network', lambda source, path: shutil.copy(source, path), 'mnist_conv',
     'holds a fashion_mlp network, mnist_conv.py builds mnist_conv'),
]


@pytest.mark.parametrize('kind, make, script, problem', UNUSABLE, ids=[case[0] for case in UNUSABLE])
def test_unusable_checkpoint_is_refused_in_one_line(kind, make, script, problem, trained, tmp_path, capsys):
    """--resume with a truncated, text, empty, non-checkpoint, weights-only or foreign-network file: one line
    naming the file and what is wrong, exit 1, the file and its folder unchanged."""
    folder = tmp_path / 'files'
    folder.mkdir()
    path = folder / CKPT
    make(trained / CKPT, path)
    before = digest(folder)
    code, line = fails(script, ['--resume', path, '--epochs', '5'], capsys)
    assert code == 1 and line == f'{script}.py: error: {path} {problem}'
    assert digest(folder) == before


def test_missing_checkpoint_or_data_set_is_one_line(tmp_path, capsys):
    """--resume of a file that is not there, or N-MNIST (which cannot be downloaded) absent from --path:
    one line naming what is missing, exit 1, no run folder created."""
    missing = tmp_path / 'missing.pth.tar'
    assert fails('mnist_conv', ['--resume', missing], capsys) == (
        1, f'mnist_conv.py: error: no checkpoint found at {missing}')
    code, line = fails('nmnist_conv', ['--path', tmp_path / 'empty', '-j', '0', '-c', tmp_path / 'run'], capsys)
    assert code == 1 and line.startswith(f'nmnist_conv.py: error: N-MNIST: no N-MNIST data found in {tmp_path / "empty"}')
    assert not (tmp_path / 'run').exists()


def _bad_idx_magic(root):
    """Fake MNIST whose test images file starts with a wrong magic number; returns (--path, file)."""
    raw = fakedata.make_mnist(str(root), n_train=16, n_test=16)
    path = os.path.join(raw, 't10k-images-idx3-ubyte')
    with open(path, 'r+b') as f:
        f.write(b'\0\0\x08\x01')
    return root, path, 'bad IDX magic number 0x00000801 (expected 0x00000803)'


def _cifar_without_data(root):
    """Fake CIFAR-10 whose second training batch has no 'data' entry."""
    folder = fakedata.make_cifar(str(root), n_train=10, n_test=4)
    path = os.path.join(folder, 'data_batch_2')
    fakedata.write_cifar_pickle(path, {b'batch_label': b'training batch 2 of 5', b'labels': [1, 2]})
    return root, path, "no 'data' entry"


def _nmnist_letters(root):
    """A tiny N-MNIST text tree with one line of letters in a training file."""
    nmnist_fakes.make_nmnist_tree(root, fmt='text', per_class=1)
    path = os.path.join(root, 'Train', '3', sorted(os.listdir(os.path.join(root, 'Train', '3')))[0])
    with open(path, 'w') as f:
        f.write('17 3 9\nseventeen 4\n')
    return root, path, "line 2 is not a list of integers: 'seventeen 4'"


@pytest.mark.parametrize('script, make', [('mnist_conv', _bad_idx_magic), ('cifar_alexnetf', _cifar_without_data),
                                          ('nmnist_conv', _nmnist_letters)])
def test_malformed_data_file_is_named_and_stops(script, make, tmp_path, capsys):
    """A bad IDX header, a CIFAR pickle without data, an N-MNIST line of letters: one line naming the file,
    exit 1, no run folder created."""
    root, path, problem = make(tmp_path / 'data')
    code, line = fails(script, ['-j', '0', '--path', root, '-c', tmp_path / 'run'], capsys)
    assert code == 1 and line.startswith(f'{script}.py: error: ')
    assert f'{path}: {problem}' in line
    assert not (tmp_path / 'run').exists()


# ---------------------------------------------------------------- model inputs

@pytest.mark.parametrize('name, x, error, message', [
    ('mnist_conv', torch.zeros(2, 1, 28, 27), ValueError, 'expected input of shape (B, 1, 28, 28), got (2, 1, 28, 27)'),
    ('mnist_conv', torch.zeros(1, 28, 28), ValueError, 'expected input of shape (B, 1, 28, 28), got (1, 28, 28)'),
    ('mnist_conv', torch.zeros(0, 1, 28, 28), ValueError, 'expected input of shape (B, 1, 28, 28), got (0, 1, 28, 28)'),
    ('mnist_conv', torch.zeros(2, 1, 28, 28, dtype=torch.uint8), TypeError,
     'expected a floating-point input tensor of shape (B, 1, 28, 28), got dtype torch.uint8'),
    ('mnist_conv', [[0.0] * 28] * 28, TypeError,
     'expected a floating-point input tensor of shape (B, 1, 28, 28), got list'),
    ('fashion_mlp', torch.zeros(2, 783), ValueError, 'expected input of shape (B, 1, 28, 28), got (2, 783)'),
    ('nmnist_conv', torch.zeros(2, 2, 34, 34), ValueError,
     'expected input of shape (B, 2, 34, 34, T), got (2, 2, 34, 34)'),
])
def test_wrong_model_input_names_the_expected_shape(name, x, error, message, single_thread):
    """An input of the wrong shape or dtype raises one clear error naming the expected shape, in training,
    evaluation and the rate statistics alike."""
    model = build_model(name, time_step=2)
    for mode in (model.train, model.eval):
        mode()
        with pytest.raises(error) as excinfo:
            model(x)
        assert str(excinfo.value) == message
    with pytest.raises(error):
        model.get_all_rate(x)
