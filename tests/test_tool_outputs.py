"""Programs check where they write before they work, and the tools check healthy nets as healthy.

- compare's --out, the accuracy sweep's folder (-e --sweep-T, with --out-dir) and get_rate's checkpoint and
  folder are checked before any measurement or data preparation (utils.files.check_outputs), and a refused
  run leaves no folder behind; a .lock that is a folder is one line.
- tools' --help shows each default once; bench --amp on a CPU that only emulates bfloat16 warns and runs
  in float32 as the training scripts do.
- tools.smoke gives every net of the ddp check its own data set, prints a failed child's last lines, and
  refuses a batch below the smallest at which its tolerances were measured.
"""
import re
import subprocess

import pytest

import get_rate
from modules import NETS
from tests.conftest import CKPT, TINY, digest, fails, run_main
from tools import bench, compare, smoke
from utils.data.datasets import get_datasets
from utils.training import epoch as engine, run as train


def must_not_run(name):
    """A stand-in for work that a refused command must never reach."""
    def fail(*args, **kwargs):
        pytest.fail(f'{name} ran before the output was checked')
    return fail


# ---------------------------------------------------------------- outputs checked first

def test_compare_refuses_an_out_that_is_a_file_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, 'run', must_not_run('the comparison'))
    out = tmp_path / 'results'
    out.write_text('kept')
    with pytest.raises(SystemExit) as exc:
        compare.main(['--out', str(out), '--nets', 'fashion_mlp', '--time-steps', '2'])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.endswith(f'--out: cannot write in {out}: {out} is a file, not a folder')
    assert out.read_text() == 'kept'


def test_compare_refuses_an_output_name_taken_by_a_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, 'run', must_not_run('the comparison'))
    (tmp_path / 'compare.png').mkdir()
    with pytest.raises(SystemExit):
        compare.main(['--out', str(tmp_path), '--overwrite', '--nets', 'fashion_mlp', '--time-steps', '2'])
    assert 'compare.png is a folder' in capsys.readouterr().err


def test_a_sweep_checks_its_out_dir_before_the_data(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, 'load_data', must_not_run('the data preparation'))
    blocked = tmp_path / 'file'
    blocked.write_text('')
    code, line = fails('fashion_mlp', ['-e', '--resume', trained / CKPT, '--sweep-T', '2', '--out-dir',
                                       blocked / 'sweep'], capsys)
    assert code == 1 and line == (f'fashion_mlp.py: error: cannot write in {blocked / "sweep"}: {blocked} is a '
                                  f'file, not a folder')


def test_a_sweep_writes_into_its_out_dir(trained, tmp_path):
    before = digest(trained)
    out = tmp_path / 'new' / 'sweeps'
    run_main('fashion_mlp', ['-e', '--resume', trained / CKPT, '--sweep-T', '2', '--out-dir', out])
    assert sorted(p.name for p in out.iterdir()) == [f'acc_checkpoint_sweepT2.{s}' for s in ('csv', 'json', 'png')]
    assert digest(trained) == before


def test_get_rate_checks_the_checkpoint_before_the_data_and_leaves_no_folder(trained, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setattr(get_rate, 'LoadersByT', must_not_run('the data preparation'))
    out = tmp_path / 'rates'
    code = get_rate.main(['--arch', 'mnist_conv', '--resume', str(trained / CKPT), '-j', '0',
                          '--out-dir', str(out)], prog='get_rate.py')
    err = capsys.readouterr().err
    assert code == 1 and err.count('\n') == 1
    assert err.startswith('get_rate.py: error: checkpoint is for fashion_mlp, this run builds mnist_conv')
    assert not out.exists()


def test_a_lock_that_is_a_folder_is_one_line(data_root, tmp_path, capsys):
    folder = tmp_path / 'run'
    (folder / '.lock').mkdir(parents=True)
    code, line = fails('fashion_mlp', TINY + ['--path', data_root, '--epochs', '1', '-c', folder], capsys)
    assert code == 1 and line.startswith(f'fashion_mlp.py: error: cannot take the lock {folder / ".lock"}: ')
    assert sorted(p.name for p in folder.iterdir()) == ['.lock']


# ---------------------------------------------------------------- tools' flags

@pytest.mark.parametrize('tool', [bench, compare, smoke])
def test_help_shows_each_default_once(tool, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(['--help'])
    text = capsys.readouterr().out
    flags = re.split(r'\n  -', text.split('options:', 1)[1])
    assert len(flags) > 5
    assert all(' '.join(entry.split()).count('(default:') <= 1 for entry in flags), text
    assert '(default: None)' not in ' '.join(text.split())


class Measured(Exception):
    """Raised by the stand-in of bench.measure once it has seen its arguments."""


def test_bench_amp_on_a_cpu_without_native_bf16_warns_and_runs_in_float32(monkeypatch, capsys):
    monkeypatch.setattr(engine, 'native_bf16', lambda: False)
    seen = []

    def measure(name, time_step, batch, device, amp, *args, **kwargs):
        seen.append(amp)
        raise Measured

    monkeypatch.setattr(bench, 'measure', measure)
    with pytest.raises(Measured):
        bench.main(['--amp', '--nets', 'fashion_mlp', '--time-steps', '2', '--repeats', '1'])
    assert seen == [False] and capsys.readouterr().err.strip() == engine.AMP_EMULATED


# ---------------------------------------------------------------- tools.smoke

@pytest.mark.parametrize('name', list(NETS))
def test_the_ddp_check_gives_every_net_its_own_data_set(name, tmp_path):
    dataset, root = smoke.fake_data(name, str(tmp_path / 'data'), 12, 4)
    assert dataset == NETS[name].dataset
    train_set, test_set, classes = get_datasets(dataset, root, time_step=2, download=False)
    assert len(train_set) >= 12 and len(test_set) >= 4 and classes == 10


def test_a_failed_child_shows_its_last_lines(tmp_path, monkeypatch, capsys):
    output = '\n'.join(f'line {i}' for i in range(40)) + '\nValueError: what went wrong\n'
    monkeypatch.setattr(smoke.subprocess, 'run', lambda command, **kwargs: subprocess.CompletedProcess(
        command, 1, stdout='', stderr=output))
    report = smoke.Report()
    smoke.attempt(report, 'ddp', 'fashion_mlp', lambda: smoke.ddp_check(
        'fashion_mlp', 'cpu', 2, 2, 3, 1, str(tmp_path)))
    fail, *tail = capsys.readouterr().out.strip().splitlines()
    assert fail.startswith('FAIL') and fail.endswith('torchrun exit 1; last line: ValueError: what went wrong')
    assert tail == [f'      | line {i}' for i in range(26, 40)] + ['      | ValueError: what went wrong']


@pytest.mark.slow
def test_the_ddp_check_passes_for_the_fc_net(tmp_path):
    ok, detail = smoke.ddp_check('fashion_mlp', 'cpu', 2, 4, 3, 2, str(tmp_path))
    assert ok, detail


@pytest.mark.parametrize('batch', ['1', '2', '3'])
def test_smoke_refuses_a_batch_below_its_measured_tolerances(batch, capsys):
    with pytest.raises(SystemExit) as exc:
        smoke.parse_args(['--batch', batch])
    assert exc.value.code == 2 and f'--batch: expected at least {smoke.MIN_BATCH}' in capsys.readouterr().err


def test_smoke_takes_the_smallest_measured_batch():
    assert smoke.parse_args(['--batch', str(smoke.MIN_BATCH)]).batch == smoke.MIN_BATCH
