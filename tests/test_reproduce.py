"""reproduce.py: the paper's rows and their command lines, the checks before anything starts, what a run folder
holds, the summary's arithmetic, and (slow) real digits runs through submitit's local, debug and Slurm executors
(Slurm faked by executables on PATH), with a run killed or preempted and resumed."""
import argparse
import csv
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import reproduce
from modules import is_leaky, settings
from tests import slurm_fakes
from tests.conftest import cpu_bit_exact
from utils import flags
from utils.checkpoint import BEST_NAME, CHECKPOINT_NAME, LOG_NAME
from utils.reproduction import engine, folders, paper
from utils.training.status import STATUS_NAME, RunStatus, read_status, recorded

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = paper.read_rows()
# Flags a run sets for itself rather than taking the script's default.
RUN_FLAGS = {'dataset', 'time_step', 'leaky', 'path', 'manualSeed', 'checkpoint', 'resume'}
TINY = ['--threshold', '3', '--train-batch', '256', '--test-batch', '450']
TWO_ROWS = ['fashion-mlp-if-t5', 'fashion-mlp-lif-t5']


def options(out='OUT', **changes):
    """reproduce.py's parsed flags with changes."""
    args = reproduce.build_parser().parse_args(['--out', str(out)])
    return argparse.Namespace(**{**vars(args), **changes})


def run_main(argv, capsys):
    """(exit code, stdout, stderr) of reproduce.main(argv)."""
    code = reproduce.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- the rows and their command lines

def test_paper_rows_are_consistent_and_ids_name_them():
    assert len(ROWS) == 19
    for row in ROWS.values():
        net = row.network.replace('_', '-')
        prefix = net if row.dataset in ('mnist', 'fashionmnist', 'nmnist') else f'{row.dataset}-{net}'
        assert row.id == f'{prefix}-{row.neuron.lower()}-t{row.time_steps}'
        assert row.mean - row.std <= row.best + 1e-9


@pytest.mark.parametrize('row_id', list(ROWS))
def test_command_line_carries_the_row_settings_and_the_script_defaults(row_id):
    row = ROWS[row_id]
    (run,) = reproduce.make_runs([row], [7], options(path='DATA'), [])
    argv = run.argv
    assert argv[0] == sys.executable and os.path.basename(argv[1]) == row.script
    args = vars(flags.build_parser(row.network).parse_args(argv[2:]))
    assert (args['dataset'], args['time_step']) == (row.dataset, row.time_steps)
    assert is_leaky(args['leaky']) == (row.neuron == 'LIF') and (row.neuron == 'IF' or args['leaky'] == row.leaky)
    assert (args['path'], args['manualSeed'], args['checkpoint']) == ('DATA', 7, os.path.join('OUT', row_id, 'seed7'))
    for key, value in settings.defaults(row.network).items():
        if key not in RUN_FLAGS:
            assert args[key] == value, key


def test_quick_digits_pass_through_and_torchrun():
    runs = reproduce.make_runs([ROWS['mnist-conv-if-t30'], ROWS['fashion-mlp-lif-t5']], [0],
                               options(dataset='digits', quick=True, gpus_per_run=2), ['--lr', '0.2'])
    conv, mlp = (vars(flags.build_parser(r.row.network).parse_args(r.argv[6:])) for r in runs)
    assert (conv['dataset'], conv['time_step'], mlp['dataset'], mlp['time_step']) == ('digits', 8, 'digits', 5)
    assert conv['epochs'] == 3 and conv['lr'] == 0.2 and conv['workers'] == 0 and mlp['leaky'] == 0.95
    assert reproduce.show(runs[0].argv).startswith('torchrun --standalone --nproc_per_node=2 mnist_conv.py ')


# ---------------------------------------------------------------- refused before anything starts

@pytest.mark.parametrize('argv, extra, message', [
    (['--rows', 'mnist-conv-if-30'], [], 'did you mean mnist-conv-if-t30'),
    (['--rows', 'cifar100-cifarnetf-if-t30', '--dataset', 'digits'], [], 'not for cifar100-cifarnetf-if-t30'),
    (['--rows', 'fashion-mlp-if-t5'], ['-c', 'X', '--manualSeed', '7'], 'sets checkpoint, manualSeed'),
    (['--rows', 'fashion-mlp-if-t5'], ['--schedule', '3', '2'],
     'fashion-mlp-if-t5: fashion_mlp.py: error: --schedule: expected strictly increasing epochs'),
    (['--rows', 'fashion-mlp-if-t5'], ['--no-such-flag'], '--no-such-flag: not a flag'),
    (['--rows', 'fashion-mlp-if-t5', '--gpus', '99'], [], '--gpus: expected distinct indices'),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, extra, message, tmp_path, capsys):
    code, _, err = run_main(argv + ['--out', tmp_path / 'o', '--'] + extra, capsys)
    assert code == 2 and err.count('\n') == 1 and message in err, err
    assert not (tmp_path / 'o').exists()


def test_out_that_is_a_file_or_under_one(tmp_path, capsys):
    (tmp_path / 'f').write_text('x')
    for out in (tmp_path / 'f', tmp_path / 'f' / 'sub'):
        code, _, err = run_main(['--rows', 'fashion-mlp-if-t5', '--dataset', 'digits', '--out', out], capsys)
        assert code == 2 and err.count('\n') == 1 and 'reproduce.py: error:' in err, err
    code, _, err = run_main(['--status', '--out', tmp_path / 'nowhere'], capsys)
    assert code == 2 and err.count('\n') == 1


def write_record(out, row_id, seed, extra, **option):
    """The command.json reproduce.py writes for a run (made by hand, no training)."""
    (run,) = reproduce.make_runs([ROWS[row_id]], [seed], options(out, dataset='digits', **option), extra)
    os.makedirs(run.folder, exist_ok=True)
    with open(os.path.join(run.folder, folders.COMMAND_NAME), 'w') as f:
        json.dump({'row': row_id, 'seed': seed, 'processes': 1, 'flags': run.flags, 'epochs': 3,
                   'dataset': 'digits', 'time_step': ROWS[row_id].time_steps}, f)
    return run.folder


def test_a_new_seed_with_other_flags_is_refused(tmp_path, capsys):
    out = tmp_path / 'o'
    write_record(out, 'fashion-mlp-if-t5', 0, ['--epochs', '3'])
    argv = ['--rows', 'fashion-mlp-if-t5', '--dataset', 'digits', '--out', out, '--seed-list', '1', '--dry-run']
    code, _, err = run_main(argv + ['--', '--epochs', '2'], capsys)
    assert code == 2 and 'epochs was 3, now 2' in err and 'seed0' in err and err.count('\n') == 1
    code, text, _ = run_main(argv + ['--', '--epochs', '3'], capsys)
    assert code == 0 and '--manualSeed 1' in text and not (out / 'fashion-mlp-if-t5' / 'seed1').exists()


def test_a_damaged_record_or_a_foreign_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / 'o'
    folder = write_record(out, 'fashion-mlp-if-t5', 0, [])
    argv = ['--rows', 'fashion-mlp-if-t5', '--dataset', 'digits', '--out', out]
    with open(os.path.join(folder, folders.COMMAND_NAME), 'w') as f:
        f.write('{"row": ')
    code, _, err = run_main(argv, capsys)
    assert code == 2 and err.count('\n') == 1 and 'damaged run record' in err
    os.remove(os.path.join(folder, folders.COMMAND_NAME))
    open(os.path.join(folder, LOG_NAME), 'w').close()
    code, _, err = run_main(argv, capsys)
    assert code == 2 and err.count('\n') == 1 and 'not a run of reproduce.py' in err


def fake_checkpoint(folder, epoch, epochs, best):
    """A checkpoint file holding the numbers reproduce.py reads."""
    os.makedirs(folder, exist_ok=True)
    torch.save({'epoch': epoch, 'args': {'epochs': epochs}, 'best_acc': best, 'state_dict': {}},
               os.path.join(folder, CHECKPOINT_NAME))


def fake_status(folder, state, epoch, epochs, best, seconds=(), rss=100.0, pid=None):
    """A status.json as the training run writes it."""
    with open(os.path.join(folder, STATUS_NAME), 'w') as f:
        json.dump({'state': state, 'epoch': epoch, 'epochs': epochs, 'best_acc': best, 'epoch_seconds': list(seconds),
                   'peak_rss_mb': rss, 'host': os.uname().nodename if pid else 'elsewhere', 'pid': pid}, f)


def test_a_finished_run_without_its_checkpoint_is_reported_never_retrained(tmp_path, capsys):
    out = tmp_path / 'o'
    folder = write_record(out, 'fashion-mlp-if-t5', 0, [])
    fake_status(folder, 'finished', 3, 3, 91.5, [1.0, 1.0, 1.0])
    for name in (LOG_NAME, BEST_NAME):
        open(os.path.join(folder, name), 'w').close()
    code, _, err = run_main(['--rows', 'fashion-mlp-if-t5', '--dataset', 'digits', '--out', out], capsys)
    assert code == 2 and err.count('\n') == 1
    assert 'checkpoint.pth.tar is missing, but log.txt and model_best.pth.tar are there' in err
    assert 'says finished after epoch 3/3, best 91.5' in err
    assert not (out / 'submitit').exists() and not (out / engine.JOBS_NAME).exists()
    code, text, err = run_main(['--summarize', out], capsys)
    assert code == 0 and 'checkpoint.pth.tar is missing' in err and 'Left out' in text


def test_summarize_reports_a_truncated_checkpoint(tmp_path, capsys):
    out = tmp_path / 'o'
    folder = write_record(out, 'fashion-mlp-if-t5', 0, [])
    fake_checkpoint(folder, 3, 3, 90.0)
    path = os.path.join(folder, CHECKPOINT_NAME)
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    code, text, err = run_main(['--summarize', out], capsys)
    assert code == 0 and f'{path} cannot be read' in err and f'{path} cannot be read' in text
    assert '| `fashion-mlp-if-t5` | digits (paper: fashionmnist) | 5 | 0 (+1 unfinished)' in text
    code, _, err = run_main(['--rows', 'fashion-mlp-if-t5', '--dataset', 'digits', '--out', out], capsys)
    assert code == 2 and 'cannot be read' in err


def test_a_second_runner_on_one_out_is_refused(tmp_path, capsys):
    out = tmp_path / 'o'
    argv = ['--rows', 'fashion-mlp-if-t5', '--dataset', 'digits', '--out', out, '--cluster', 'debug']
    os.makedirs(out)
    with engine.runner_lock(str(out)):
        code, _, err = run_main(argv, capsys)
    assert code == 2 and err.count('\n') == 1 and f'in use by another reproduce.py (PID {os.getpid()})' in err
    # A runner killed outright leaves its local jobs running: they are found and named.
    engine.record_jobs(str(out), 'local', [(argparse.Namespace(job_id=os.getpid()), ['fashion-mlp-if-t5 seed 0'])])
    code, _, err = run_main(argv, capsys)
    assert code == 2 and err.count('\n') == 1 and f'local {os.getpid()}' in err and 'not ended' in err
    dead = subprocess.Popen([sys.executable, '-c', '']).pid
    os.waitpid(dead, 0)
    os.remove(out / engine.JOBS_NAME)
    engine.record_jobs(str(out), 'local', [(argparse.Namespace(job_id=dead), ['fashion-mlp-if-t5 seed 0'])])
    assert engine.live_jobs(str(out)) == []


def test_status_reads_states_from_the_files(tmp_path, capsys):
    out = tmp_path / 'o'
    finished = write_record(out, 'fashion-mlp-if-t5', 0, [])
    fake_checkpoint(finished, 3, 3, 91.0)
    fake_status(finished, 'finished', 3, 3, 91.0, [2.0, 2.0, 2.0])
    running = write_record(out, 'fashion-mlp-if-t5', 1, [])
    fake_checkpoint(running, 1, 3, 80.0)
    fake_status(running, 'running', 1, 3, 80.0, [30.0], pid=os.getpid())
    killed = write_record(out, 'fashion-mlp-if-t5', 2, [])
    fake_checkpoint(killed, 2, 3, 85.0)
    dead = subprocess.Popen([sys.executable, '-c', '']).pid
    os.waitpid(dead, 0)
    fake_status(killed, 'running', 2, 3, 85.0, [10.0, 20.0], pid=dead)
    write_record(out, 'fashion-mlp-if-t5', 3, [])
    code, text, _ = run_main(['--status', '--out', out], capsys)
    lines = [line.split() for line in text.splitlines()[1:]]
    assert code == 0 and [line[:6] for line in lines] == [
        ['fashion-mlp-if-t5', '0', 'finished', '3/3', '91.00', '0:00:00'],
        ['fashion-mlp-if-t5', '1', 'running', '1/3', '80.00', '0:01:00'],
        ['fashion-mlp-if-t5', '2', 'interrupted', '2/3', '85.00', '0:00:15'],
        ['fashion-mlp-if-t5', '3', 'new', '0/3', '—', '?']]


def test_dry_run_prints_every_command_and_starts_nothing(tmp_path, capsys):
    out = tmp_path / 'o'
    argv = ['--rows', *TWO_ROWS, '--dataset', 'digits', '--quick', '--seeds', '2', '--out', out, '--dry-run']
    code, text, _ = run_main(argv + ['--', *TINY], capsys)
    runs = reproduce.make_runs([ROWS[r] for r in TWO_ROWS], [0, 1], options(out, dataset='digits', quick=True), TINY)
    assert code == 0 and text.splitlines() == [reproduce.show(run.argv) for run in runs]
    code, text, _ = run_main(argv + ['--cluster', 'slurm', '--partition', 'gpu', '--time', '90', '--mem', '16G',
                                     '--cpus-per-run', '6', '--slurm-extra', 'account=abc', '--', *TINY], capsys)
    for line in ['#SBATCH --array=0-3%4', '#SBATCH --requeue', '#SBATCH --partition=gpu', '#SBATCH --time=90',
                 '#SBATCH --mem=16G', '#SBATCH --cpus-per-task=6', '#SBATCH --gpus-per-node=1',
                 '#SBATCH --account=abc', '#SBATCH --signal=USR2@180']:
        assert line in text.splitlines()
    assert code == 0 and not out.exists()


def test_status_file_is_rewritten_each_epoch_and_ends_with_the_run(tmp_path):
    with pytest.raises(KeyboardInterrupt), recorded(str(tmp_path), 3, 0, None):
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []  # a new run stopped before its first epoch leaves nothing, as its log
    status = RunStatus(str(tmp_path), epochs=3, epoch=0, best_acc=None)
    status.epoch_done(1, 50.0, 2.5)
    assert read_status(str(tmp_path))['epoch'] == 1 and read_status(str(tmp_path))['epoch_seconds'] == [2.5]
    with pytest.raises(KeyboardInterrupt), recorded(str(tmp_path), 3, 1, 50.0) as resumed:
        resumed.epoch_done(2, 60.0, 3.0)
        raise KeyboardInterrupt
    saved = read_status(str(tmp_path))
    assert (saved['state'], saved['epoch'], saved['epoch_seconds'], saved['best_acc']) == ('stopped', 2, [2.5, 3.0], 60)
    with pytest.raises(RuntimeError), recorded(str(tmp_path), 3, 1, 50.0):
        raise RuntimeError('boom')
    assert read_status(str(tmp_path))['state'] == 'failed'
    assert read_status(str(tmp_path))['epoch_seconds'] == [2.5]  # resumed from epoch 1: its later epoch is gone
    with recorded(str(tmp_path), 3, 1, 50.0) as last:
        last.epoch_done(2, 60.0, 4.0)
        last.epoch_done(3, 61.0, 1.0)
    saved = read_status(str(tmp_path))
    assert (saved['state'], saved['epoch'], saved['epoch_seconds'], saved['best_acc']) == ('finished', 3,
                                                                                          [2.5, 4.0, 1.0], 61)
    assert sorted(os.listdir(tmp_path)) == [STATUS_NAME]  # written atomically: no temporary left behind


# ---------------------------------------------------------------- summary

def fake_run(out, row_id, seed, epoch, epochs, best, epoch_seconds, rss_mb):
    """A run folder with a checkpoint, its command.json and its status.json."""
    folder = write_record(out, row_id, seed, ['--epochs', str(epochs)])
    fake_checkpoint(folder, epoch, epochs, best)
    fake_status(folder, 'finished' if epoch == epochs else 'stopped', epoch, epochs, best, epoch_seconds, rss_mb)


def test_summary_arithmetic(tmp_path, capsys):
    out = tmp_path / 'o'
    fake_run(out, 'mnist-conv-if-t30', 0, 3, 3, 99.0, [10.0, 12.0, 14.0], 300.0)
    fake_run(out, 'mnist-conv-if-t30', 1, 3, 3, 99.2, [11.0, 13.0, 15.0], 350.0)
    fake_run(out, 'mnist-conv-if-t30', 2, 3, 3, 99.7, [12.0], 320.0)
    fake_run(out, 'mnist-conv-if-t30', 3, 1, 3, 50.0, [20.0], 900.0)       # unfinished: not in the statistics
    fake_run(out, 'fashion-mlp-if-t5', 0, 2, 2, 88.5, [1.0, 3.0], 100.0)
    results = paper.collect(str(out), ROWS)
    conv = paper.row_summary(ROWS['mnist-conv-if-t30'], [r for r in results if r.row == 'mnist-conv-if-t30'])
    assert conv['runs_finished'] == 3 and conv['runs_unfinished'] == 1
    assert conv['mean'] == pytest.approx(99.3)
    assert conv['std'] == pytest.approx(math.sqrt((0.3 ** 2 + 0.1 ** 2 + 0.4 ** 2) / 2))   # ddof = 1
    assert conv['best'] == 99.7 and conv['diff'] == pytest.approx(99.3 - 99.49)
    assert conv['epoch_s'] == pytest.approx(sum([10, 12, 14, 11, 13, 15, 12, 20]) / 8)
    assert conv['peak_rss_mb'] == 900.0
    mlp = paper.row_summary(ROWS['fashion-mlp-if-t5'], [r for r in results if r.row == 'fashion-mlp-if-t5'])
    assert mlp['std'] is None and mlp['mean'] == 88.5 and mlp['diff'] == pytest.approx(88.5 - 90.04)

    code, text, _ = run_main(['--summarize', out], capsys)
    line = next(line for line in text.splitlines() if line.startswith('| `mnist-conv-if-t30`'))
    assert code == 0 and '99.30 ± 0.36' in line and '99.49 ± 0.04 (99.55)' in line and '-0.19' in line
    assert 'digits (paper: mnist)' in line and '3 (+1 unfinished)' in line and '88.50 ± —' in text
    with open(out / 'summary.csv', newline='') as f:
        csv_rows = {r['row']: r for r in csv.DictReader(f)}
    assert float(csv_rows['mnist-conv-if-t30']['std']) == pytest.approx(conv['std'])
    assert csv_rows['fashion-mlp-if-t5']['std'] == ''
    assert (out / 'summary.png').stat().st_size > 1000


# ---------------------------------------------------------------- real runs (slow)

def reproduce_cli(args, env=None, **kwargs):
    """Start python reproduce.py args from the repository (as a user would)."""
    return subprocess.Popen([sys.executable, 'reproduce.py', *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def wait_for_epoch(folder, epoch, process=None, timeout=900):
    """The status.json of the run in folder once it records `epoch` epochs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = None
        try:
            status = read_status(folder)
        except ValueError:
            pass
        if status and status['epoch'] >= epoch:
            return status
        assert process is None or process.poll() is None, process.stdout.read()
        time.sleep(0.1)
    raise AssertionError(f'{folder}: no epoch {epoch} within {timeout}s')


def accuracy_columns(out):
    """summary.csv without the measured times and memory."""
    with open(os.path.join(out, 'summary.csv'), newline='') as f:
        return [{k: v for k, v in r.items() if k not in ('epoch_s', 'peak_rss_mb')} for r in csv.DictReader(f)]


@pytest.mark.slow
@cpu_bit_exact
def test_local_runs_killed_mid_epoch_resume_and_match_a_clean_run(tmp_path):
    common = ['--rows', *TWO_ROWS, '--dataset', 'digits', '--quick', '--seeds', '2']
    tiny = ['--', *TINY, '--epochs', '2']
    clean = reproduce_cli(common + ['--out', tmp_path / 'clean', '--cluster', 'debug'] + tiny)
    out = tmp_path / 'out'
    first = reproduce_cli(common + ['--out', out, '--jobs', '2'] + tiny)
    victim = out / TWO_ROWS[0] / 'seed0'
    status = wait_for_epoch(victim, 1, first)
    os.kill(status['pid'], signal.SIGKILL)      # the training run of one run, in its second epoch
    assert first.wait() == 1
    text = first.stdout.read()
    assert any(line.split()[:4] == [TWO_ROWS[0], '0', 'interrupted', '1/2'] for line in text.splitlines()), text
    assert clean.wait() == 0, clean.stdout.read()
    finished = [out / row / f'seed{s}' for row in TWO_ROWS for s in (0, 1) if out / row / f'seed{s}' != victim]
    outputs = {f: (f / 'output.txt').read_bytes() for f in finished}

    again = reproduce_cli(common + ['--out', out, '--jobs', '2'] + tiny)
    assert again.wait() == 0
    text = again.stdout.read()
    assert sum('finished (2 epochs' in line and 'skipped' in line for line in text.splitlines()) == 3, text
    assert {f: (f / 'output.txt').read_bytes() for f in finished} == outputs   # not run again
    assert f'Resuming from {victim / CHECKPOINT_NAME}' in (victim / 'output.txt').read_text()
    assert read_status(victim)['epoch_seconds'][0] == status['epoch_seconds'][0]
    assert accuracy_columns(out) == accuracy_columns(tmp_path / 'clean')


@pytest.mark.slow
def test_slurm_array_submitted_preempted_requeued_and_read_back(tmp_path):
    bin_dir, record = slurm_fakes.install(str(tmp_path))
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ['PATH'], FAKE_SLURM=record)
    out = tmp_path / 'out'
    argv = ['--rows', TWO_ROWS[0], '--dataset', 'digits', '--quick', '--seeds', '2', '--out', out, '--cluster',
            'slurm', '--partition', 'gpu', '--time', '90', '--mem', '8G', '--slurm-extra', 'qos=high']
    tiny = ['--', *TINY, '--epochs', '3']
    dry = reproduce_cli(argv + ['--dry-run'] + tiny, env)
    assert dry.wait() == 0 and not out.exists()
    dry_text = dry.stdout.read()
    submitted = reproduce_cli(argv + tiny, env)
    assert submitted.wait() == 0, submitted.stdout.read()
    assert slurm_fakes.calls(record)[0].startswith('sbatch ')
    script = open(os.path.join(record, 'sbatch_0.sh')).read()
    assert script in dry_text and '#SBATCH --array=0-1%2' in script and '#SBATCH --requeue' in script
    assert '#SBATCH --qos=high' in script and '#SBATCH --mem=8G' in script and '#SBATCH --time=90' in script
    commands = dry_text.splitlines()[:2]
    for task, command in enumerate(commands):
        assert f'#   {task}: {command}' in script
        job = slurm_fakes.submitit_job(out / 'submitit', f'{slurm_fakes.JOB_ID}_{task}')
        ((name, folder, run_argv),) = job.runs
        assert reproduce.show(run_argv) == command and name == f'{TWO_ROWS[0]} seed {task}'

    # Task 0 runs; Slurm's warning (preemption) reaches every process of the task after its first epoch.
    task = subprocess.Popen(['bash', os.path.join(record, 'sbatch_0.sh')], cwd=REPO,
                            env=slurm_fakes.task_environment(bin_dir, record, 0))
    folder = out / TWO_ROWS[0] / 'seed0'
    status = wait_for_epoch(folder, 1, task)
    for pid in slurm_fakes.task_pids(record) + [status['pid']]:
        os.kill(pid, signal.SIGUSR2)
    assert task.wait() != 0
    assert f'scontrol requeue {slurm_fakes.JOB_ID}_0' in slurm_fakes.calls(record)
    stopped = read_status(folder)
    assert stopped['state'] == 'stopped' and stopped['epoch'] < 3
    assert torch.load(folder / CHECKPOINT_NAME, weights_only=True)['epoch'] == stopped['epoch']

    slurm_fakes.set_states(record, {f'{slurm_fakes.JOB_ID}_0': 'REQUEUED', f'{slurm_fakes.JOB_ID}_1': 'PENDING'})
    again = reproduce_cli(argv + tiny, env)
    assert again.wait() == 2 and 'not ended' in again.stdout.read()
    requeued = subprocess.run(['bash', os.path.join(record, 'sbatch_0.sh')], cwd=REPO,
                              env=slurm_fakes.task_environment(bin_dir, record, 0))
    assert requeued.returncode == 0
    assert f'Resuming from {folder / CHECKPOINT_NAME}' in (folder / 'output.txt').read_text()
    slurm_fakes.set_states(record, {f'{slurm_fakes.JOB_ID}_0': 'COMPLETED', f'{slurm_fakes.JOB_ID}_1': 'PENDING'})
    table = reproduce_cli(['--status', '--out', out], env)
    assert table.wait() == 0
    lines = [line.split() for line in table.stdout.read().splitlines()[1:]]
    assert lines[0][:4] == [TWO_ROWS[0], '0', 'finished', '3/3'] and lines[0][-3:] == [
        'slurm', f'{slurm_fakes.JOB_ID}_0', 'COMPLETED']
    assert lines[1][:4] == [TWO_ROWS[0], '1', 'new', '0/3'] and lines[1][-1] == 'PENDING'
