"""Flags that cannot mean anything are refused in one line, and a step that did nothing is never silent.

- `--tol` is a fraction in (0, 1) of the first residual: a value >= 1 stopped every solve before its first
  iteration, leaving the spiking layers without gradient; a solve that still does no iteration is warned
  about and counted in the log (column `Bwd Idle`).
- A typed flag that has no effect in the mode the other flags choose (`utils.flags.FLAG_MODES`) is refused,
  whether the mode was typed or comes from a resumed checkpoint; defaults and flags taken from a checkpoint
  never are.
- A number the networks' float32 cannot hold is refused; the stop after non-finite steps names the cause
  it can see.
"""
import functools

import pytest
import torch

from modules import adjoint_solve, solvers
from tests.conftest import CKPT, TINY, copy_run, fails, log_rows, run_main
from tests.test_training_epoch import Toy, toy_epoch
from utils import flags
from utils.training.epoch import IDLE_SOLVES, FaultGuard, TooManyFaults, likely_cause

# TINY without the solver's flags, for runs whose mode has no adjoint solve.
BPTT_TINY = [a for a in TINY if a not in ('--threshold', '3')] + ['--method', 'bptt']


def parse_error(argv, capsys):
    """(exit code, stderr) of parsing fashion_mlp's flags argv, which must fail."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        flags.parse_args('fashion_mlp', argv)
    return exc.value.code, capsys.readouterr().err.strip()


# ---------------------------------------------------------------- --tol

@pytest.mark.parametrize('value', ['10', '1', '0', '-0.5', 'inf'])
def test_a_tolerance_outside_zero_one_is_refused(value, capsys):
    code, err = parse_error(['--tol', value], capsys)
    assert code == 2 and err == f"fashion_mlp.py: error: --tol: expected a fraction in (0, 1), got '{value}'"


def test_a_tolerance_in_zero_one_or_none_is_taken():
    assert flags.parse_args('fashion_mlp', ['--tol', '1e-3'])[0].tol == 1e-3
    assert flags.parse_args('fashion_mlp', ['--tol', 'none'])[0].tol is None


@pytest.mark.parametrize('tol', [1.0, 10.0, 0.0])
def test_the_library_refuses_a_tolerance_that_stops_before_any_iteration(tol):
    with pytest.raises(ValueError, match='tol must be a fraction in'):
        adjoint_solve('ide', 'broyden', 30, tol)


def test_a_solve_without_iterations_is_warned_about_and_counted(data_root, tmp_path, monkeypatch, capsys):
    """Every solve stopping at once (as --tol 10 did): one warning line per epoch, the count in the log."""
    monkeypatch.setattr(solvers, '_stop_level', lambda init_residual, numel, tol: float('inf'))
    capsys.readouterr()
    run_main('fashion_mlp', TINY + ['--path', data_root, '--epochs', '1', '-c', tmp_path / 'run'])
    warnings = [line for line in capsys.readouterr().err.splitlines() if 'warning' in line]
    assert warnings == ['warning: Epoch 1/1: the adjoint solve of 2 training step(s) stopped before its first '
                        f'iteration, so their spiking layers got no gradient (counted in the log column {IDLE_SOLVES})']
    (row,) = log_rows(tmp_path / 'run')
    assert row[IDLE_SOLVES] == 2 and row['Bwd Iters'] == 0


def test_solves_that_iterate_count_no_idle_step(trained):
    assert [row[IDLE_SOLVES] for row in log_rows(trained)] == [0]


# ---------------------------------------------------------------- flags without effect

@pytest.mark.parametrize('argv, flag', [
    (['--method', 'bptt', '--solver', 'anderson'], '--solver'),
    (['--method', 'bptt', '--grad', 'jfb'], '--grad'),
    (['--method', 'bptt', '--tol', '1e-3'], '--tol'),
    (['--method', 'bptt', '--threshold', '10'], '--threshold'),
    (['--method', 'bptt', '--phantom-k', '3'], '--phantom-k'),
    (['--method', 'bptt', '--solver-memory', '3'], '--solver-memory'),
    (['--method', 'bptt', '--no-forward-residual'], '--forward-residual'),
    (['--grad', 'jfb', '--solver', 'anderson'], '--solver'),
    (['--grad', 'jfb', '--threshold', '10'], '--threshold'),
    (['--grad', 'jfb', '--solver-memory', '3'], '--solver-memory'),
    (['--grad', 'phantom', '--tol', '1e-3'], '--tol'),
    (['--phantom-tau', '0.3'], '--phantom-tau'),
    (['--solver', 'iter', '--solver-memory', '4'], '--solver-memory'),
    (['--surrogate', 'atan'], '--surrogate'),
    (['--surrogate-alpha', '2'], '--surrogate-alpha'),
    (['--detach-reset'], '--detach-reset'),
    (['--overwrite'], '--overwrite'),
])
def test_a_typed_flag_without_effect_is_refused_in_one_line(argv, flag, capsys):
    code, err = parse_error(argv, capsys)
    mode = flags.FLAG_MODES[flag[2:].replace('-', '_')].when
    assert code == 2 and err == f'fashion_mlp.py: error: {flag}: has no effect unless {mode}; leave it out'


@pytest.mark.parametrize('argv', [
    [], ['--method', 'bptt'], ['--method', 'bptt', '--surrogate', 'atan', '--surrogate-alpha', '3', '--detach-reset'],
    ['--grad', 'phantom', '--phantom-k', '3', '--phantom-tau', '0.3'], ['--grad', 'jfb', '--no-forward-residual'],
    ['--solver', 'anderson', '--solver-memory', '4', '--tol', '1e-3', '--threshold', '10'],
    ['-e', '--resume', 'x', '--sweep-T', '2', '--out-dir', 'y', '--overwrite'],
])
def test_flags_in_their_mode_and_defaults_are_taken(argv):
    flags.parse_args('fashion_mlp', argv)


def test_every_rule_names_a_flag_of_the_scripts():
    assert set(flags.FLAG_MODES) <= set(vars(flags.parse_args('fashion_mlp', [])[0]))


@pytest.fixture(scope='module')
def bptt_run(tmp_path_factory, data_root, single_thread):
    """A fashion_mlp run folder trained one epoch by BPTT."""
    folder = tmp_path_factory.mktemp('bptt') / 'run'
    run_main('fashion_mlp', BPTT_TINY + ['--path', data_root, '--epochs', '1', '-c', folder])
    return folder


def test_a_resumed_run_is_checked_against_the_mode_of_its_checkpoint(bptt_run, tmp_path, capsys):
    """Resuming a BPTT checkpoint, a typed solver flag is refused (nothing written), a surrogate flag is not."""
    folder = copy_run(bptt_run, tmp_path / 'run')
    before = sorted(p.name for p in folder.iterdir())
    code, line = fails('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2', '--tol', '1e-3'], capsys)
    assert code == 1 and line == ('fashion_mlp.py: error: --tol: has no effect unless --method ide --grad ide; '
                                  'leave it out')
    assert sorted(p.name for p in folder.iterdir()) == before
    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2', '--surrogate', 'atan'])
    assert torch.load(folder / CKPT, weights_only=True)['args']['surrogate'] == 'atan'


def test_flags_a_resumed_run_takes_from_its_checkpoint_are_never_refused(trained, tmp_path):
    """An IDE run saved with --threshold 3 continues by BPTT: the saved --threshold is not a typed flag."""
    folder = copy_run(trained, tmp_path / 'run')
    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2', '--method', 'bptt'])
    assert torch.load(folder / CKPT, weights_only=True)['epoch'] == 2


# ---------------------------------------------------------------- numbers float32 cannot hold

@pytest.mark.parametrize('argv, flag, why', [
    (['--method', 'bptt', '--surrogate-alpha', '1e39'], '--surrogate-alpha', 'beyond float32'),
    (['--vth', '1e39'], '--vth', 'beyond float32'),
    (['--leaky=-1e39'], '--leaky', 'beyond float32'),
    (['--lr', '1e-50'], '--lr', ''),  # 0 in float32
])
def test_a_number_float32_cannot_hold_is_refused(argv, flag, why, capsys):
    code, err = parse_error(argv, capsys)
    assert code == 2 and err.startswith(f'fashion_mlp.py: error: {flag}: expected ') and why in err
    assert err.count('\n') == 0


def stop_message(hint, part, updated=True):
    """The TooManyFaults message after five bad steps of `part`, with one good step first when updated."""
    guard = FaultGuard(hint=hint)
    if updated:
        guard.good()
    with pytest.raises(TooManyFaults) as exc:
        for _ in range(5):
            guard.bad('Epoch 1/1, batch 5', part)
    return str(exc.value)


def test_the_stop_after_non_finite_steps_names_the_cause_it_can_see():
    bptt = functools.partial(likely_cause, method='bptt', surrogate='sigmoid', surrogate_alpha=1e38)
    text = stop_message(bptt, 'gradient')
    assert '--surrogate-alpha 1e+38' in text and '--lr' not in text
    assert '--lr' not in stop_message(likely_cause, 'solver result')
    assert 'not --lr' in stop_message(likely_cause, 'loss', updated=False)
    assert stop_message(likely_cause, 'loss').endswith('stopped (a lower --lr may help)')


def test_a_run_stopped_before_any_update_does_not_blame_the_learning_rate():
    with pytest.raises(TooManyFaults, match='not --lr'):
        toy_epoch(Toy(poison=set(range(1, 9))))
