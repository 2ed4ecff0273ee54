"""A training run's status file for machines: where the run stands, rewritten atomically after every epoch.

`status.json` in the run's folder holds its state ('running', 'finished',
'stopped' by a signal, 'failed'), the epochs done of the epochs to train, the
best test accuracy so far, every epoch's wall time (kept across resumes), the
peak resident memory of the process, its host and PID, and when it started and
was last updated. Programs (reproduce.py --status) read it instead of the
printed epoch lines, whose wording may change.
"""
import contextlib
import datetime
import json
import os
import resource
import socket

from utils.files import atomic_write_text

STATUS_NAME = 'status.json'


def read_status(folder):
    """The status a run in folder last wrote, or None if there is none; ValueError if the file is damaged."""
    try:
        with open(os.path.join(folder, STATUS_NAME), encoding='utf-8') as f:
            status = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f'{os.path.join(folder, STATUS_NAME)} is damaged: {exc}') from exc
    if not isinstance(status, dict) or not {'state', 'epoch', 'epochs'} <= set(status):
        raise ValueError(f'{os.path.join(folder, STATUS_NAME)} is damaged: not a run status')
    return status


def _now():
    """The time as ISO 8601 with the UTC offset, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


class RunStatus:
    """The status file of one training run, rewritten whole (atomically) on every change."""

    def __init__(self, folder, epochs, epoch, best_acc):
        """A run in folder that trains `epochs` epochs in all and starts after `epoch` (a resume keeps the
        earlier epochs' times). A new run writes its first status with its first epoch, as its log: a run
        stopped before then leaves nothing behind; a resumed one says at once that it runs again."""
        try:
            previous = read_status(folder)
        except ValueError:
            previous = None
        self.path, self.written = os.path.join(folder, STATUS_NAME), previous is not None
        self.record = dict(state='running', epoch=epoch, epochs=epochs, best_acc=best_acc,
                           epoch_seconds=list((previous or {}).get('epoch_seconds') or [])[:epoch],
                           peak_rss_mb=None, host=socket.gethostname(), pid=os.getpid(),
                           started=(previous or {}).get('started') or _now(), updated=None)
        if self.written:
            self.write()

    def write(self, **changes):
        """Apply changes and write the file."""
        # ru_maxrss: the largest resident size of this process so far, in KiB on Linux.
        rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        self.record.update(changes, updated=_now(), peak_rss_mb=rss_mb)
        atomic_write_text(self.path, json.dumps(self.record, indent=1) + '\n')
        self.written = True

    def end(self, state):
        """Record how the run ended ('finished', 'stopped', 'failed'), if it has written a status before."""
        if self.written:
            self.write(state=state)

    def epoch_done(self, epoch, best_acc, seconds):
        """Record that `epoch` epochs are done (saved in the checkpoint), the last in `seconds`."""
        self.write(epoch=epoch, best_acc=best_acc,
                   epoch_seconds=self.record['epoch_seconds'][:epoch - 1] + [round(seconds, 3)])


@contextlib.contextmanager
def recorded(folder, epochs, epoch, best_acc, enabled=True):
    """A RunStatus for the block (None unless enabled), ending 'finished', 'stopped' or 'failed' with it."""
    status = RunStatus(folder, epochs, epoch, best_acc) if enabled else None
    try:
        yield status
    except BaseException as exc:
        if status is not None:
            # A stop by signal (the run's Interrupted carries its signum) can be resumed; anything else failed.
            stopped = isinstance(exc, KeyboardInterrupt) or getattr(exc, 'signum', None) is not None
            # The error that ends the run is what the user must see: a status that cannot be written (a full
            # disk) must not replace it. A reader tells a dead 'running' run by its PID.
            with contextlib.suppress(Exception):
                status.end('stopped' if stopped else 'failed')
        raise
    if status is not None:
        status.end('finished')
