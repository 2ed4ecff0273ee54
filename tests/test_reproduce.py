"""reproduce.py: the paper's table as data, each row's command line, the scheduler's skip/resume/retry/stop,
the summary's arithmetic, and its refusals of bad input."""
import csv
import json
import math
import os
import re
import signal
import sys
import threading

import pytest
import torch

import fashion_mlp
import reproduce
from modules import is_leaky, settings
from tests.conftest import REPO, run_main
from utils import flags

ROWS = reproduce.read_rows()
# Flags a run sets for itself rather than taking the script's default.
RUN_FLAGS = {'dataset', 'time_step', 'leaky', 'path', 'manualSeed', 'checkpoint', 'resume'}
TINY = ['-j', '0', '-t', '2', '--threshold', '3', '--train-batch', '256', '--test-batch', '450']


# Two rows of the paper's results, typed here from the paper: the data file must keep them.
PAPER_ROWS = {
    'mnist-conv-if-t30': ('mnist', 'mnist_conv', 'IF', None, 30, 99.49, 0.04, 99.55, '13K', '229K'),
    'fashion-mlp-lif-t5': ('fashionmnist', 'fashion_mlp', 'LIF', 0.95, 5, 90.07, 0.10, 90.25, '1.2K', '478K'),
}


def csv_rows():
    """The repository's paper_results.csv read with the csv module, as dicts."""
    with open(os.path.join(REPO, 'paper_results.csv'), encoding='utf-8', newline='') as f:
        return list(csv.DictReader(f))


def test_paper_numbers_read_back_equal_the_data_file():
    """read_rows types every field of paper_results.csv right, in the file's order, and the file holds the
    paper's numbers."""
    expected = csv_rows()
    assert len(expected) == len(ROWS) == 19
    assert [want['id'] for want in expected] == list(ROWS)
    for want, row in zip(expected, ROWS.values()):
        assert (row.dataset, row.network, row.neuron, row.time_steps) == \
               (want['dataset'], want['network'], want['neuron'], int(want['time_steps']))
        assert row.leaky == (float(want['leaky']) if want['leaky'] else None)
        assert (row.mean, row.std, row.best) == (float(want['mean']), float(want['std']), float(want['best']))
        assert (row.neurons, row.params) == (want['neurons'], want['params'])
    for row_id, fields in PAPER_ROWS.items():
        row = ROWS[row_id]
        assert (row.dataset, row.network, row.neuron, row.leaky, row.time_steps, row.mean, row.std, row.best,
                row.neurons, row.params) == fields


def test_row_ids_are_unique_and_name_the_row():
    for row in ROWS.values():
        net = row.network.replace('_', '-')
        prefix = net if row.dataset in ('mnist', 'fashionmnist', 'nmnist') else f'{row.dataset}-{net}'
        assert row.id == f'{prefix}-{row.neuron.lower()}-t{row.time_steps}'


@pytest.mark.parametrize('row_id', list(ROWS))
def test_command_line_carries_the_row_settings_and_the_script_defaults(row_id, tmp_path):
    row = ROWS[row_id]
    (job,) = reproduce.make_jobs([row], [7], str(tmp_path), 'DATA', [])
    argv = job.argv()
    assert argv[0] == sys.executable and os.path.basename(argv[1]) == row.script
    args = vars(flags.build_parser(row.network).parse_args(argv[2:]))
    assert args['dataset'] == row.dataset
    assert args['time_step'] == row.time_steps
    assert is_leaky(args['leaky']) == (row.neuron == 'LIF')
    if row.neuron == 'LIF':
        assert args['leaky'] == row.leaky
    assert (args['path'], args['manualSeed'], args['checkpoint']) == ('DATA', 7, job.folder)
    assert job.folder == os.path.join(str(tmp_path), row.id, 'seed7')
    defaults = settings.defaults(row.network)
    for key, value in defaults.items():
        if key not in RUN_FLAGS:
            assert args[key] == value, key
    assert job.epochs == defaults['epochs'] == 100
    assert args['resume'] == ''
    resumed = vars(flags.build_parser(row.network).parse_args(job.argv(resume=True)[2:]))
    assert resumed['resume'] == job.checkpoint


def test_quick_digits_and_pass_through_flags(tmp_path):
    jobs = reproduce.make_jobs([ROWS['mnist-conv-if-t30'], ROWS['fashion-mlp-lif-t5']], [0], str(tmp_path), 'D',
                               ['--lr', '0.2'], dataset='digits', quick=True)
    conv, mlp = (vars(flags.build_parser(j.row.network).parse_args(j.argv()[2:])) for j in jobs)
    assert (conv['dataset'], conv['time_step'], mlp['dataset'], mlp['time_step']) == ('digits', 8, 'digits', 5)
    assert conv['epochs'] == mlp['epochs'] == jobs[0].epochs == 3
    assert conv['lr'] == 0.2 and conv['workers'] == 0 and conv['schedule'] == [2]
    assert mlp['leaky'] == 0.95


def test_torchrun_launcher(tmp_path):
    (job,) = reproduce.make_jobs([ROWS['cifar10-cifarnetf-if-t30']], [0], str(tmp_path), 'D', [], nproc=4)
    assert reproduce.show(job.argv()).startswith('torchrun --standalone --nproc_per_node=4 ')


def test_epoch_line_of_the_training_loop_is_parsed():
    line = ('Epoch 3/100  lr 0.05  train loss 0.1234 acc 97.10  test loss 0.0456 acc 98.76  '
            'best 98.80  skipped 0  (12.3s)')
    assert reproduce.parse_epoch_lines(f'noise\n{line}\nmore') == [(3, 100, 98.8, 12.3)]


# ---------------------------------------------------------------- bad input

def outcome(argv, capsys):
    """(exit code, stdout, stderr) of reproduce.main(argv)."""
    code = run_main('reproduce', argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_unknown_row_lists_close_matches(capsys, tmp_path):
    code, _, err = outcome(['--rows', 'mnist-conv-if-30', '--out', str(tmp_path / 'o')], capsys)
    assert code == 2
    assert err.count('\n') == 1 and 'mnist-conv-if-t30' in err and 'unknown row' in err
    assert not (tmp_path / 'o').exists()


def test_missing_data_one_line_per_row_before_anything_starts(capsys, tmp_path):
    rows = ['cifar10-alexnetf-if-t30', 'mnist-conv-lif-t30', 'nmnist-conv-if-t30']
    code, _, err = outcome(['--rows', *rows, '--path', str(tmp_path), '--out', str(tmp_path / 'o')], capsys)
    assert code == 2
    for row in rows:
        assert sum(line.startswith(f'{row}:') for line in err.splitlines()) == 1
    assert not (tmp_path / 'o').exists()


def test_digits_only_stands_in_for_mnist_rows(capsys, tmp_path):
    code, _, err = outcome(['--rows', 'cifar100-cifarnetf-if-t30', '--dataset', 'digits'], capsys)
    assert code == 2 and 'cifar100-cifarnetf-if-t30' in err


def test_absent_gpu_is_refused(capsys, tmp_path):
    gpu = torch.cuda.device_count() + 3
    code, _, err = outcome(['--rows', 'mnist-conv-if-t30', '--dataset', 'digits', '--gpus', f'{gpu}',
                             '--out', str(tmp_path / 'o')], capsys)
    assert code == 2 and f'GPU {gpu} does not exist' in err and err.count('\n') == 1


def test_folder_with_a_run_of_other_flags_is_refused(capsys, tmp_path):
    out = tmp_path / 'o'
    (old,) = reproduce.make_jobs([ROWS['fashion-mlp-if-t5']], [0], str(out), 'D', ['--epochs', '3'],
                                 dataset='digits')
    os.makedirs(old.folder)
    reproduce.write_json(os.path.join(old.folder, reproduce.COMMAND_NAME), old.record())
    before = sorted(os.listdir(old.folder))
    code, _, err = outcome(['--rows', 'fashion-mlp-if-t5', '--dataset', 'digits', '--out', str(out),
                             '--', '--epochs', '2'], capsys)
    assert code == 2 and 'epochs was 3, now 2' in err and old.folder in err
    assert sorted(os.listdir(old.folder)) == before
    code, out_text, _ = outcome(['--rows', 'fashion-mlp-if-t5', '--dataset', 'digits', '--out', str(out),
                                  '--dry-run', '--', '--epochs', '3'], capsys)
    assert code == 0 and '--epochs 3' in out_text


# ---------------------------------------------------------------- scheduler

def fake_checkpoint(folder, epoch, epochs, best):
    """A checkpoint file holding what reproduce.py reads."""
    os.makedirs(folder, exist_ok=True)
    torch.save({'epoch': epoch, 'args': {'epochs': epochs}, 'best_acc': best, 'state_dict': {}},
               os.path.join(folder, reproduce.CHECKPOINT_NAME))


def job_for(tmp_path, row_id, seed, flags):
    """One digits job of row_id with flags."""
    (job,) = reproduce.make_jobs([ROWS[row_id]], [seed], str(tmp_path), 'D', flags, dataset='digits')
    return job


def test_what_a_run_folder_and_an_exited_run_call_for():
    states = ['new', 'leftovers', 'interrupted', 'finished', 'unreadable']
    assert [reproduce.folder_action(s) for s in states] == ['start', 'start', 'resume', 'skip', 'refuse']
    assert reproduce.run_outcome('finished', [signal.SIGINT], 9, 0) == 'finished'
    assert reproduce.run_outcome('interrupted', [signal.SIGINT], 1, 1) == 'stopped'
    assert reproduce.run_outcome('interrupted', [], 1, 1) == 'retry'
    assert reproduce.run_outcome('new', [], 2, 1) == 'failed'


def test_scheduler_skips_finished_resumes_interrupted_and_retries_failed(tmp_path):
    finished = job_for(tmp_path, 'mnist-conv-if-t30', 0, TINY + ['--epochs', '2'])
    fake_checkpoint(finished.folder, 2, 2, 91.0)

    # A real run of 2 epochs stopped after the first: its checkpoint says epoch 1 of 2.
    interrupted = job_for(tmp_path, 'fashion-mlp-if-t5', 0, TINY + ['--epochs', '2'])
    first = [a if a != '2' or prev != '--epochs' else '1'
             for prev, a in zip([''] + interrupted.flags, interrupted.flags)]
    fashion_mlp.main(['--path', 'D'] + first + ['-c', interrupted.folder])
    ckpt = torch.load(interrupted.checkpoint, weights_only=True)
    ckpt['args']['epochs'] = 2
    torch.save(ckpt, interrupted.checkpoint)
    assert reproduce.folder_state(interrupted.folder)[0] == 'interrupted'

    failing = job_for(tmp_path, 'fashion-mlp-lif-t5', 0, TINY)
    failing.argv = lambda resume=False: [sys.executable, '-c', 'import sys; print("boom"); sys.exit(3)']
    os.makedirs(failing.folder)
    with open(os.path.join(failing.folder, 'log.txt'), 'w') as f:
        f.write('a log without checkpoint\n')

    lines = []
    ended = []
    scheduler = reproduce.Scheduler([failing, finished, interrupted], [None], retries=1,
                                    on_finish=lambda job, ok: ended.append((job.row.id, ok)), say=lines.append)
    assert scheduler.run() is False
    text = '\n'.join(lines)

    assert scheduler.skipped == [finished]
    assert not os.path.exists(os.path.join(finished.folder, reproduce.OUTPUT_NAME))

    assert scheduler.finished == [interrupted]
    assert reproduce.read_checkpoint(interrupted.checkpoint)[:2] == (2, 2)
    output = reproduce.read_text(os.path.join(interrupted.folder, reproduce.OUTPUT_NAME))
    assert f'--resume {interrupted.checkpoint}' in output and 'Epoch 2/2' in output
    assert re.search(r'fashion-mlp-if-t5 seed 0: epoch 2/2 .*ETA', text)
    usage = json.load(open(os.path.join(interrupted.folder, reproduce.USAGE_NAME)))
    assert usage[0]['exit'] == 0 and usage[0]['max_rss_mb'] > 10

    assert scheduler.failed == [failing]
    failed_output = reproduce.read_text(os.path.join(failing.folder, reproduce.OUTPUT_NAME)).splitlines()
    assert failed_output.count('boom') == 2  # one retry
    assert 'FAILED' in text and '    boom' in text
    (aside,) = [d for d in os.listdir(failing.folder) if d.startswith('leftovers-')]
    with open(os.path.join(failing.folder, aside, 'log.txt')) as f:
        assert f.read() == 'a log without checkpoint\n'
    assert ('fashion-mlp-lif-t5', False) in ended and ('fashion-mlp-if-t5', True) in ended


def test_a_signal_stops_the_runs_cleanly(tmp_path):
    job = job_for(tmp_path, 'fashion-mlp-if-t5', 0, TINY)
    code = ('import signal, sys, time\n'
            'signal.signal(signal.SIGTERM, lambda *a: (print("stopping after this batch"), sys.exit(143)))\n'
            'print("started", flush=True)\n'
            'time.sleep(60)\n')
    job.argv = lambda resume=False: [sys.executable, '-c', code]
    lines = []
    scheduler = reproduce.Scheduler([job, job_for(tmp_path, 'mnist-conv-if-t30', 0, TINY)], [None], retries=1,
                                    say=lines.append)

    def interrupt_once_started():
        """Ctrl-C as soon as the child has started."""
        path = os.path.join(job.folder, reproduce.OUTPUT_NAME)
        while 'started' not in reproduce.read_text(path):
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_started, daemon=True).start()
    assert scheduler.run() is False
    assert scheduler.stopped == [job] and not scheduler.failed and not scheduler.finished
    assert len(scheduler.queue) == 1  # the second run never started
    assert 'stopping after this batch' in reproduce.read_text(os.path.join(job.folder, reproduce.OUTPUT_NAME))


# ---------------------------------------------------------------- summary

def fake_run(out, row_id, seed, epoch, epochs, best, epoch_seconds, rss_mb, dataset='digits'):
    """A run folder with a checkpoint, its command.json, epoch lines in output.txt and usage.json."""
    (job,) = reproduce.make_jobs([ROWS[row_id]], [seed], str(out), 'D', ['--epochs', str(epochs)],
                                 dataset=dataset)
    fake_checkpoint(job.folder, epoch, epochs, best)
    reproduce.write_json(os.path.join(job.folder, reproduce.COMMAND_NAME), job.record())
    lines = [f'Epoch {e + 1}/{epochs}  lr 0.1  train loss 1.0 acc 50.00  test loss 1.0 acc 50.00  '
             f'best {best:.2f}  skipped 0  ({s:.1f}s)' for e, s in enumerate(epoch_seconds)]
    with open(os.path.join(job.folder, reproduce.OUTPUT_NAME), 'w') as f:
        f.write('\n'.join(['Neuron: IF'] + lines) + '\n')
    reproduce.write_json(os.path.join(job.folder, reproduce.USAGE_NAME),
                         [{'attempt': 1, 'exit': 0, 'wall_s': 1.0, 'max_rss_mb': rss_mb}])


def test_summary_arithmetic(tmp_path, capsys):
    out = tmp_path / 'o'
    fake_run(out, 'mnist-conv-if-t30', 0, 3, 3, 99.0, [10.0, 12.0, 14.0], 300.0)
    fake_run(out, 'mnist-conv-if-t30', 1, 3, 3, 99.2, [11.0, 13.0, 15.0], 350.0)
    fake_run(out, 'mnist-conv-if-t30', 2, 3, 3, 99.7, [12.0], 320.0)
    fake_run(out, 'mnist-conv-if-t30', 3, 1, 3, 50.0, [20.0], 900.0)       # unfinished: not in the statistics
    fake_run(out, 'fashion-mlp-if-t5', 0, 2, 2, 88.5, [1.0, 3.0], 100.0)
    results = reproduce.collect(str(out), ROWS)
    conv = reproduce.row_summary(ROWS['mnist-conv-if-t30'], [r for r in results if r.row == 'mnist-conv-if-t30'])
    assert conv['runs_finished'] == 3 and conv['runs_unfinished'] == 1
    assert conv['mean'] == pytest.approx(99.3)
    assert conv['std'] == pytest.approx(math.sqrt((0.3 ** 2 + 0.1 ** 2 + 0.4 ** 2) / 2))   # ddof = 1
    assert conv['best'] == 99.7
    assert conv['diff'] == pytest.approx(99.3 - 99.49)
    assert conv['epoch_s'] == pytest.approx(sum([10, 12, 14, 11, 13, 15, 12, 20]) / 8)
    assert conv['peak_rss_mb'] == 900.0
    mlp = reproduce.row_summary(ROWS['fashion-mlp-if-t5'], [r for r in results if r.row == 'fashion-mlp-if-t5'])
    assert mlp['std'] is None and mlp['mean'] == 88.5 and mlp['diff'] == pytest.approx(88.5 - 90.04)

    code, text, _ = outcome(['--summarize', str(out)], capsys)
    assert code == 0
    line = next(line for line in text.splitlines() if line.startswith('| `mnist-conv-if-t30`'))
    assert '99.30 ± 0.36' in line and '99.49 ± 0.04 (99.55)' in line and '-0.19' in line
    assert 'digits (paper: mnist)' in line and '3 (+1 unfinished)' in line
    assert '88.50 ± —' in text
    with open(out / 'summary.csv', newline='') as f:
        csv_rows = {r['row']: r for r in csv.DictReader(f)}
    assert float(csv_rows['mnist-conv-if-t30']['std']) == pytest.approx(conv['std'])
    assert csv_rows['fashion-mlp-if-t5']['std'] == ''
    assert (out / 'summary.png').stat().st_size > 1000
