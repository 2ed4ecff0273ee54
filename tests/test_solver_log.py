"""--solver-log writes only a solver-log CSV of its own run, and a resumed run continues it.

A path that is another run's file, a checkpoint, the run's own log, or any
file that is not a solver-log CSV with the same header is refused in one line
before anything is written; a CSV holding another run's rows is refused for a
new run. A resumed run inherits the flag and drops the rows of an epoch that
was interrupted before its checkpoint.
"""
import pytest

from tests.conftest import CKPT, LOG, TINY, digest, fails, run_main
from utils.training.logger import StepLog


def new_run(data_root, folder, *extra):
    """fashion_mlp's flags for a new one-epoch run in folder."""
    return TINY + ['--path', data_root, '--epochs', '1', '-c', folder, *extra]


@pytest.mark.parametrize('target, why', [(LOG, 'is not a solver-log CSV'), (CKPT, 'is not a solver-log CSV')])
def test_another_runs_file_is_refused_and_kept(trained, data_root, tmp_path, target, why, capsys):
    before = digest(trained)
    code, line = fails('fashion_mlp', new_run(data_root, tmp_path / 'run', '--solver-log', trained / target), capsys)
    assert code == 1 and line.startswith(f'fashion_mlp.py: error: --solver-log: {trained / target} ') and why in line
    assert digest(trained) == before and not (tmp_path / 'run').exists()


def test_the_runs_own_log_is_refused_before_it_exists(data_root, tmp_path, capsys):
    folder = tmp_path / 'run'
    code, line = fails('fashion_mlp', new_run(data_root, folder, '--solver-log', folder / LOG), capsys)
    assert code == 1 and line == (f'fashion_mlp.py: error: --solver-log: {folder / LOG} is a file of the run '
                                  f'itself; choose another file')
    assert not folder.exists()


def test_a_file_of_another_program_is_refused_and_kept(data_root, tmp_path, capsys):
    other = tmp_path / 'notes.csv'
    other.write_text('a,b\n1,2\n')
    code, line = fails('fashion_mlp', new_run(data_root, tmp_path / 'run', '--solver-log', other), capsys)
    assert code == 1 and 'is not a solver-log CSV' in line and other.read_text() == 'a,b\n1,2\n'


def test_a_new_run_refuses_a_solver_log_with_rows(data_root, tmp_path, capsys):
    steps = tmp_path / 'steps.csv'
    steps.write_text(StepLog.HEADER + '\n1,0,3,cap,0.1,0.2,0.5,4\n')
    code, line = fails('fashion_mlp', new_run(data_root, tmp_path / 'run', '--solver-log', steps), capsys)
    assert code == 1 and line == (f'fashion_mlp.py: error: --solver-log: {steps} holds the rows of another run; '
                                  f'give this run a file of its own')


def rows(path):
    """The solver log's data lines, split at commas."""
    header, *lines = path.read_text().splitlines()
    assert header == StepLog.HEADER
    return [line.split(',') for line in lines]


def test_a_resumed_run_inherits_the_log_without_the_interrupted_epochs_rows(data_root, tmp_path, capsys):
    """Epoch 1 logs iterations 0-1; rows of an interrupted epoch 2 (marked 'aborted') are in the file; the run
    resumed without the flag writes epoch 2 into the same file, and the aborted rows are gone."""
    folder, steps = tmp_path / 'run', tmp_path / 'steps.csv'
    run_main('fashion_mlp', new_run(data_root, folder, '--solver-log', steps))
    with open(steps, 'a', encoding='utf-8') as f:
        f.write('2,2,3,aborted,0.1,0.2,0.5,4\n2,3,3,aborted,0.1,0.2,0.5,4\n2,4,3,abo')  # the last cut short
    capsys.readouterr()
    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2'])
    assert f'Removed from {steps} the 3 row(s) of the interrupted epoch' in capsys.readouterr().out
    assert [(row[0], row[1], row[3]) for row in rows(steps)] == [
        ('1', '0', 'cap'), ('1', '1', 'cap'), ('2', '2', 'cap'), ('2', '3', 'cap')]


def test_a_continuation_in_another_folder_needs_a_log_of_its_own(data_root, tmp_path, capsys):
    folder, steps = tmp_path / 'run', tmp_path / 'steps.csv'
    run_main('fashion_mlp', new_run(data_root, folder, '--solver-log', steps))
    before = steps.read_text()
    code, line = fails('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2', '-c', tmp_path / 'other'],
                       capsys)
    assert code == 1 and 'holds the rows of another run' in line and steps.read_text() == before
    run_main('fashion_mlp', ['--resume', folder / CKPT, '--epochs', '2', '-c', tmp_path / 'other',
                             '--solver-log', tmp_path / 'other.csv'])
    assert [row[1] for row in rows(tmp_path / 'other.csv')] == ['2', '3']
