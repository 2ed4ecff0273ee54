"""Atomic writes (utils/files.py, and the checkpoint save built on it): a failed or interrupted write keeps the
previous file, leaves no temporary file, and is reported in one line."""
import argparse
import os

import numpy as np
import pytest
import torch

from utils.checkpoint import save_checkpoint
from utils.files import CheckpointError, atomic_write, atomic_write_text
from tests.conftest import leftovers, load_checkpoint_raw, one_line_error  # noqa: F401


def atomic_save(obj, path):
    """torch.save obj to path through utils.files.atomic_write, as save_checkpoint writes."""
    atomic_write(path, lambda f: torch.save(obj, f))


def test_atomic_save_failure_midway_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pth.tar'
    atomic_save({'epoch': 1}, path)

    def broken_save(obj, f):
        f.write(b'half a checkpoint')
        raise RuntimeError('simulated failure. More details here.')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(CheckpointError) as excinfo:
        atomic_save({'epoch': 2}, path)
    assert one_line_error(excinfo) == f'cannot write {path}: simulated failure'
    monkeypatch.undo()
    assert load_checkpoint_raw(path) == {'epoch': 1}
    assert leftovers(tmp_path) == []


def test_atomic_save_interrupt_removes_temp_and_propagates(tmp_path, monkeypatch):
    def interrupted(obj, f):
        f.write(b'x')
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, 'save', interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({'epoch': 1}, tmp_path / 'c.pth.tar')
    assert os.listdir(tmp_path) == []


def test_atomic_save_into_unwritable_folder(tmp_path):
    path = tmp_path / 'checkpoint.pth.tar'
    atomic_save({'epoch': 1}, path)
    os.chmod(tmp_path, 0o555)
    try:
        if os.access(tmp_path, os.W_OK):
            pytest.skip('permissions are not enforced for this user (root)')
        with pytest.raises(CheckpointError) as excinfo:
            atomic_save({'epoch': 2}, path)
        assert one_line_error(excinfo) == f'cannot write {path}: Permission denied'
    finally:
        os.chmod(tmp_path, 0o755)
    assert load_checkpoint_raw(path) == {'epoch': 1}


def test_atomic_save_over_a_directory(tmp_path):
    target = tmp_path / 'checkpoint.pth.tar'
    target.mkdir()
    (target / 'keep').write_text('x')
    with pytest.raises(CheckpointError) as excinfo:
        atomic_save({'epoch': 1}, target)
    assert one_line_error(excinfo).startswith(f'cannot write {target}: ')
    assert (target / 'keep').read_text() == 'x'
    assert leftovers(tmp_path) == []


def test_atomic_save_into_missing_folder(tmp_path):
    path = tmp_path / 'missing' / 'checkpoint.pth.tar'
    with pytest.raises(CheckpointError) as excinfo:
        atomic_save({'epoch': 1}, path)
    assert one_line_error(excinfo) == f'cannot write {path}: No such file or directory'
    assert os.listdir(tmp_path) == []


def test_atomic_save_file_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_save({'epoch': 1}, tmp_path / 'c.pth.tar')
    finally:
        os.umask(old)
    assert os.stat(tmp_path / 'c.pth.tar').st_mode & 0o777 == 0o644


def test_atomic_write_text_replaces_and_cleans_up(tmp_path):
    path = tmp_path / 'notes.txt'
    atomic_write_text(path, 'first\n')
    atomic_write_text(path, 'second ü\n')
    assert path.read_text(encoding='utf-8') == 'second ü\n'
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize('value, type_name', [
    (argparse.Namespace(lr=0.1), 'argparse.Namespace'),
    (np.float64(91.5), 'numpy.float64'),
])
def test_save_refuses_what_weights_only_cannot_load(tmp_path, value, type_name):
    with pytest.raises(CheckpointError) as excinfo:
        save_checkpoint({'state_dict': {}, 'extra': [1, {'x': value}]}, False, tmp_path)
    message = one_line_error(excinfo)
    assert f"state['extra'][1]['x'] is of type {type_name}" in message
    assert os.listdir(tmp_path) == []
