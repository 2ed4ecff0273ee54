"""The run's text log (utils/training/logger.py): header, six decimals, resume, extra columns, the plot."""


import pytest
import torch

from tests.conftest import leftovers
from utils.training.logger import Logger


HEADER = 'Learning Rate\tTrain Loss\tValid Loss\tTrain Acc.\tValid Acc.\n'


def test_logger_writes_header_and_six_decimals(tmp_path):
    path = tmp_path / 'log.txt'
    logger = Logger(path, title='mnist')
    logger.set_names(['Learning Rate', 'Train Loss', 'Valid Loss', 'Train Acc.', 'Valid Acc.'])
    logger.append([0.05, torch.tensor(1.5), 2, 50.125, 60])
    assert path.read_text() == HEADER + '0.050000\t1.500000\t2.000000\t50.125000\t60.000000\n'
    with pytest.raises(ValueError, match='4 values for the 5 columns'):
        logger.append([1, 2, 3, 4])


def test_logger_default_names_written_on_first_append(tmp_path):
    logger = Logger(tmp_path / 'log.txt')
    logger.append([0.1, 1, 1, 1, 1])
    assert (tmp_path / 'log.txt').read_text().startswith(HEADER)


def test_logger_resume_appends_and_reads_back(tmp_path):
    path = tmp_path / 'log.txt'
    logger = Logger(path)
    logger.append([0.05, 2.0, 2.1, 30.0, 31.0])
    logger.append([0.05, 1.0, 1.1, 60.0, 61.0])
    first = path.read_bytes()
    resumed = Logger(path, resume=True)
    assert resumed.numbers['Valid Acc.'] == [31.0, 61.0]
    resumed.set_names(resumed.names)
    resumed.append([0.005, 0.5, 0.6, 80.0, 81.0])
    assert path.read_bytes().startswith(first)
    assert Logger(path, resume=True).numbers['Train Loss'] == [2.0, 1.0, 0.5]


def test_logger_refuses_to_start_over_an_existing_log(tmp_path):
    path = tmp_path / 'log.txt'
    Logger(path).append([0.05, 2.0, 2.1, 30.0, 31.0])
    content = path.read_bytes()
    with pytest.raises(FileExistsError):
        Logger(path)
    assert path.read_bytes() == content


def test_logger_extra_column_and_mismatch_on_resume(tmp_path):
    path = tmp_path / 'log.txt'
    names = ['Learning Rate', 'Train Loss', 'Valid Loss', 'Train Acc.', 'Valid Acc.', 'Skipped Steps']
    logger = Logger(path)
    logger.set_names(names)
    logger.append([0.05, 2.0, 2.1, 30.0, 31.0, 3])
    resumed = Logger(path, resume=True)
    assert resumed.numbers['Skipped Steps'] == [3.0]
    with pytest.raises(ValueError, match='has the columns'):
        resumed.set_names(names[:5])


def test_logger_resume_after_a_cut_line(tmp_path):
    path = tmp_path / 'log.txt'
    path.write_text(HEADER + '0.050000\t2.000000\t2.100000\t30.000000\t31.000000\n0.05\t1.9')
    logger = Logger(path, resume=True)
    assert logger.numbers['Train Loss'] == [2.0]
    logger.append([0.05, 1.0, 1.1, 60.0, 61.0])
    lines = path.read_text().splitlines()
    assert lines[-2:] == ['0.05\t1.9', '0.050000\t1.000000\t1.100000\t60.000000\t61.000000']
    assert Logger(path, resume=True).numbers['Train Loss'] == [2.0, 1.0]


def test_logger_plot_writes_png(tmp_path):
    logger = Logger(tmp_path / 'log.txt', title='run')
    for epoch in range(3):
        logger.append([0.05, 2.0 - epoch, 2.1 - epoch, 30.0 + epoch, 31.0 + epoch])
    logger.plot(tmp_path / 'log.png')
    logger.plot(tmp_path / 'log.png')
    assert (tmp_path / 'log.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert leftovers(tmp_path) == []
