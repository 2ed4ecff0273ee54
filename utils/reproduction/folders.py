"""What a reproduction's run folders hold, read from the files written for machines: the checkpoint, the
training run's status.json and reproduce.py's command.json. Never from printed text."""
import dataclasses
import datetime
import json
import os
import socket
import statistics

from utils.checkpoint import BEST_NAME, CHECKPOINT_NAME, LOG_NAME
from utils.training.status import STATUS_NAME, read_status

COMMAND_NAME = 'command.json'   # a run's command line and what it trains, recorded before it is submitted


class RecordError(Exception):
    """A damaged record file; one line."""


@dataclasses.dataclass
class Found:
    """What a run folder holds: its state, the checkpoint's numbers, its status file, and a note for a person."""
    state: str              # new, running, interrupted, failed, finished, missing (checkpoint), damaged
    epoch: int = 0          # epochs in the checkpoint
    epochs: int = None      # epochs the run trains in all
    best: float = None
    status: dict = None
    note: str = ''          # set for 'missing' and 'damaged': what is there and what to do


def read_json(path, what):
    """The JSON in path (None if absent); RecordError naming a damaged file."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RecordError(f'{path}: damaged {what} ({" ".join(str(exc).split())}); move it aside') from None


def read_record(folder):
    """The run's command.json (None if absent); RecordError if damaged."""
    record = read_json(os.path.join(folder, COMMAND_NAME), 'run record')
    if record is not None and not (isinstance(record, dict) and isinstance(record.get('flags'), list)):
        raise RecordError(f'{os.path.join(folder, COMMAND_NAME)}: damaged run record; move it aside')
    return record


def alive(host, pid):
    """Whether process pid on host still runs (True on another machine: unknowable from here)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        pass
    return True


def inspect(folder):
    """Found: what folder holds, from its checkpoint (its few numbers, read with weights_only) and status.json."""
    try:
        status = read_status(folder)
    except ValueError as exc:
        return Found('damaged', note=f'{exc}; move it aside')
    state = 'new'
    if status:
        running = status['state'] == 'running' and alive(status.get('host'), status.get('pid'))
        state = 'running' if running else 'failed' if status['state'] == 'failed' else 'interrupted'
    path = os.path.join(folder, CHECKPOINT_NAME)
    if os.path.exists(path):
        import torch

        try:  # mmap: only the few numbers are read, never the weights of a large net
            ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            epoch, epochs, best = int(ckpt['epoch']), int(ckpt['args']['epochs']), ckpt.get('best_acc')
        except Exception as exc:  # torch raises many kinds for a damaged file
            reason = ' '.join(str(exc).split('. ')[0].split())[:160]
            return Found('damaged', status=status, note=f'{path} cannot be read ({reason}); move it aside to '
                                                        f'train the run afresh')
        return Found('finished' if epoch >= epochs else state, epoch, epochs, best, status)
    there = [name for name in (LOG_NAME, BEST_NAME) if os.path.exists(os.path.join(folder, name))]
    if there or (status and status['epoch']):
        said = (f'; {STATUS_NAME} says {status["state"]} after epoch {status["epoch"]}/{status["epochs"]}, '
                f'best {status.get("best_acc")}') if status else ''
        return Found('missing', status=status, note=f'{path} is missing, but {" and ".join(there) or STATUS_NAME} '
                                                    f'{"are" if len(there) > 1 else "is"} there{said}: restore it, '
                                                    f'or move the folder aside to train the run afresh')
    record = read_record(folder) or {}
    return Found(state, 0, status['epochs'] if status else record.get('epochs'), None, status)


def run_folders(out, rows):
    """[(row, seed, folder)] of every run folder OUT/<row>/seed<k>, in the table's order."""
    found = []
    for row in rows.values():
        row_dir = os.path.join(out, row.id)
        names = os.listdir(row_dir) if os.path.isdir(row_dir) else []
        seeds = sorted(int(n[4:]) for n in names if n.startswith('seed') and n[4:].isdigit())
        found += [(row, seed, os.path.join(row_dir, f'seed{seed}')) for seed in seeds]
    return found


def time_left(found):
    """Seconds the run still needs at its mean epoch time so far (0 if finished, None if unknown)."""
    times = (found.status or {}).get('epoch_seconds') or []
    if found.state == 'finished':
        return 0
    return statistics.fmean(times) * (found.epochs - found.epoch) if times and found.epochs else None


def duration(seconds):
    """'1:02:03', or '?' when unknown."""
    return '?' if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


def status_table(out, rows, jobs):
    """The table of OUT's runs: row, seed, state, epoch/epochs, best, time left, and jobs[name], its job."""
    lines = [('row', 'seed', 'state', 'epoch', 'best', 'left', 'job')]
    for row, seed, folder in run_folders(out, rows):
        found = inspect(folder)
        lines.append((row.id, str(seed), found.state, f'{found.epoch}/{found.epochs or "?"}',
                      '—' if found.best is None else f'{found.best:.2f}', duration(time_left(found)),
                      jobs.get(f'{row.id} seed {seed}', '')))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return '\n'.join('  '.join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
