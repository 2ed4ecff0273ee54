"""A training run's folder and how a run continues from a checkpoint: who owns a folder, what resumes where.

Rules (docs/nothing-lost.md):
- A run owns its folder for its lifetime through an exclusive lock on
  `.lock` (released by the operating system when the process dies, so a
  stale lock file never blocks a resume).
- A new run needs a folder without a run. A resumed run continues in its
  checkpoint's folder only when the checkpoint's history (the log rows it
  carries) matches the folder's log; a checkpoint from an earlier epoch than
  the folder's last (model_best) continues there only with --rewind, which
  keeps the abandoned epochs aside; anything else continues with -c elsewhere.
- A checkpoint of the paper's release continues in its own folder only if no
  log or other checkpoint is there.
- The flags not typed are taken from the checkpoint; a flag typed wins, the
  optimizer's saved hyperparameters included.

A little longer than most modules: these rules are one policy, kept in one place.
"""
import fcntl
import math
import os
import random
import sys

import numpy as np
import torch

from utils import flags
from utils.training import distributed
from utils.training.console import RunError
from utils.checkpoint import (BEST_NAME, CHECKPOINT_NAME, LOCK_NAME, LOG_NAME, PLOT_NAME, rng_state, save_checkpoint,
                              set_rng_state)
from utils.files import CheckpointError, make_writable_folder, stale_temporaries
from utils.training.logger import BASE_COLUMNS, Logger, as_written

# What each optimizer keeps per parameter: a saved state with anything else was made by another optimizer.
OPTIMIZER_STATE = {'SGD': {'momentum_buffer'}, 'Adam': {'step', 'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'}}


def log_columns(diagnostics):
    """The log's columns: the paper's, skipped steps, then the equilibrium diagnostics."""
    return BASE_COLUMNS + list(diagnostics)


# ------------------------------------------------------------------ the folder

class FolderLock:
    """An exclusive lock on folder/.lock for as long as the run lives; a second run there is refused.

    The file holds the owner's PID and is removed on release; a process killed
    outright leaves it behind, unlocked, and the next run simply takes it.
    """

    def __init__(self, folder):
        """Take the lock (creating the folder), or raise RunError naming the process that holds it."""
        self.created = not os.path.isdir(folder)
        make_writable_folder(folder)
        self.folder, self.path = folder, os.path.join(folder, LOCK_NAME)
        while True:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:  # a folder, or a file this user may not open, in the lock's place
                raise RunError(f'cannot take the lock {self.path}: {exc.strerror or exc}; it must be a file this '
                               f'user can write (remove it if no run is using the folder)') from None
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(self.fd, 64).decode(errors='replace').strip() or 'unknown'
                os.close(self.fd)
                raise RunError(f'{folder} is in use by another run (PID {holder}); wait for it to end, '
                               f'or choose another folder with -c') from None
            # The previous owner may have removed the file between our open and our lock: take a fresh one.
            if self._still_linked():
                break
            os.close(self.fd)
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f'{os.getpid()}\n'.encode())
        except OSError:
            pass  # a full disk: the lock holds all the same, only the holder's PID goes unnamed

    def _still_linked(self):
        """True when the locked descriptor is still the file at self.path."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def release(self):
        """Let another run have the folder; remove it again if this run created it and wrote nothing there."""
        if self.fd is None:
            return
        os.remove(self.path)  # while still locked, so that no one else holds this file
        if self.created and not os.listdir(self.folder):
            os.rmdir(self.folder)
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None


def remove_stale_temporaries(folder, say):
    """Delete the temporary files that a killed save of this run's files left in folder, and say so."""
    stale = stale_temporaries(folder, (CHECKPOINT_NAME, BEST_NAME, LOG_NAME, PLOT_NAME))
    for path in stale:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    if stale:
        say(f'Removed {len(stale)} temporary file(s) left in {folder} by an interrupted save')


def run_files(folder):
    """The paths of the files a run keeps in its folder."""
    return [os.path.join(folder, name) for name in (LOG_NAME, CHECKPOINT_NAME, BEST_NAME, PLOT_NAME, LOCK_NAME)]


def same_file(a, b):
    """True when paths a and b name one existing file or folder."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def refuse_existing_run(folder, names=(LOG_NAME, CHECKPOINT_NAME, BEST_NAME), keep=None):
    """Raise RunError if a run would write over the log or checkpoints of another run in folder.

    Only the files in names count, and never the file keep (the checkpoint being resumed).
    """
    found = [name for name in names if os.path.exists(os.path.join(folder, name))
             and not (keep and same_file(os.path.join(folder, name), keep))]
    if found:
        raise RunError(f'{folder} already holds a run ({", ".join(found)}): continue it with '
                       f'--resume {os.path.join(folder, CHECKPOINT_NAME)}, or choose another folder with -c')


def read_log(folder, columns):
    """The rows of folder's log ([] when there is none); RunError if it is not a log of this project."""
    path = os.path.join(folder, LOG_NAME)
    if not os.path.exists(path):
        return []
    try:
        logger = Logger(path, resume=True)
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f'cannot read {path}: {exc}') from exc
    if logger.names != columns[:len(logger.names)] or len(logger.names) < len(BASE_COLUMNS):
        raise RunError(f'{path} does not start with the header line of this project\'s log '
                       f'({", ".join(columns[:3])}, ...): move it aside or continue with -c in another folder')
    # A log of an earlier version lacks the later columns: nan there, as saved_log pads a checkpoint's rows.
    return [row + [math.nan] * (len(columns) - len(row)) for row in logger.rows()]


def check_folder(folder, resume, ckpt, columns, rewind=False):
    """Refuse a training run's folder if writing there would overwrite or mix up another run's files.

    Returns the number of the folder's log rows that --rewind abandons (0 otherwise).
    """
    logged = read_log(folder, columns)
    if not resume or not same_file(folder, os.path.dirname(os.path.abspath(resume))):
        refuse_existing_run(folder)
        return 0
    if is_foreign(ckpt):
        refuse_existing_run(folder, keep=resume)
        return 0
    history = saved_log(ckpt, len(columns))
    if not history:
        return 0  # a checkpoint written before checkpoints carried their history: nothing to compare
    common = min(len(logged), len(history))
    if [as_written(r) for r in logged[:common]] != [as_written(r) for r in history[:common]]:
        raise RunError(f'{resume} is not the run logged in {folder} (their epochs differ): it was copied from '
                       f'another run; continue it in a folder of its own with -c')
    if len(logged) > len(history):
        if not rewind:
            raise RunError(f'{resume} is epoch {len(history)}, but the run in {folder} went on to epoch '
                           f'{len(logged)}: resume {os.path.join(folder, CHECKPOINT_NAME)}, continue in another '
                           f'folder with -c, or pass --rewind to continue here from epoch {len(history)} '
                           f'(the later epochs are kept aside)')
        return len(logged) - len(history)
    return 0


def set_aside_abandoned(folder, last_epoch):
    """Rename the log and checkpoint of epochs abandoned by --rewind so that nothing is lost; return the names."""
    kept = []
    for name in (LOG_NAME, CHECKPOINT_NAME):
        stem, suffix = name.split('.', 1)
        aside = f'{stem}.abandoned-epoch{last_epoch}.{suffix}'
        source, target = os.path.join(folder, name), os.path.join(folder, aside)
        if os.path.exists(source):
            if os.path.exists(target):
                raise RunError(f'{target} exists already (an earlier --rewind); move it aside first')
            os.replace(source, target)
            kept.append(aside)
    return kept


# -------------------------------------------------------------- checkpoints

def is_foreign(ckpt):
    """True for a checkpoint with an epoch but without this project's iteration and RNG state (the paper's release)."""
    return 'epoch' in ckpt and 'iteration' not in ckpt and 'rng' not in ckpt


def check_resumable(ckpt, path):
    """Raise CheckpointError unless ckpt holds this project's training state, or is a foreign one with an epoch."""
    missing = [key for key in ('epoch', 'optimizer', 'iteration', 'rng') if key not in ckpt]
    if missing and not is_foreign(ckpt):
        raise CheckpointError(f'{path} has no training state of this project ({", ".join(missing)} missing); '
                              f'it can only be evaluated with -e')


def saved_log(ckpt, width):
    """The log rows a checkpoint carries, padded with nan to width columns ([] for none or an unusable entry)."""
    rows = ckpt.get('log') if ckpt is not None else None
    if not isinstance(rows, list) or not all(
            isinstance(row, list) and len(BASE_COLUMNS) <= len(row) <= width
            and all(isinstance(v, (int, float)) for v in row) for row in rows):
        return []
    return [[float(v) for v in row] + [math.nan] * (width - len(row)) for row in rows]


def apply_flags(optimizer, args):
    """Give every parameter group the hyperparameters of the flags (a typed flag wins over a saved state)."""
    for group in optimizer.param_groups:
        group.update(flags.hyperparameters(args))


def restore_training(ckpt, path, optimizer, args, ctx):
    """Load the optimizer and this process's RNG state; return (next epoch, global iteration, best accuracy)."""
    try:
        optimizer.load_state_dict(ckpt['optimizer'])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f'{path}: optimizer state does not fit this run ({exc}); '
                              f'was it saved with another --optimizer?') from exc
    apply_flags(optimizer, args)
    states = ckpt['rng']
    if ctx.rank < len(states):
        set_rng_state(states[ctx.rank])
    else:
        # More processes than when it was saved: the newcomers get fresh, distinct streams.
        seed_everything(ckpt['seed'] + ctx.rank + ckpt['epoch'] * ctx.world_size)
    return ckpt['epoch'], ckpt['iteration'], ckpt['best_acc']


def optimizer_mismatch(optimizer, saved):
    """Why the optimizer state `saved` does not fit `optimizer`, or None if it does.

    It fits when it has the same groups and parameter counts, and each
    parameter's state holds only what this optimizer keeps, shaped like the parameter.
    """
    kept = OPTIMIZER_STATE[type(optimizer).__name__]
    try:
        groups, states = saved['param_groups'], saved['state']
        if [len(g['params']) for g in groups] != [len(g['params']) for g in optimizer.param_groups]:
            return 'other parameter groups'
        for group, own in zip(groups, optimizer.param_groups):
            for index, param in zip(group['params'], own['params']):
                state = states.get(index, {})
                if not set(state) <= kept:
                    return f'it holds {", ".join(sorted(set(state) - kept))}, not {type(optimizer).__name__} state'
                if any(torch.is_tensor(v) and v.dim() and v.shape != param.shape for v in state.values()):
                    return 'other parameter shapes'
    except (KeyError, TypeError, AttributeError):
        return 'not an optimizer state'
    return None


def restore_foreign(ckpt, path, optimizer, batches, seed, ctx, say):
    """Load what a checkpoint of the paper's release holds; return (next epoch, global iteration, best accuracy).

    The optimizer state is taken if it fits (this run's flags keep their
    hyperparameters); the iteration is epoch × batches per epoch; the random
    generators start afresh from seed, since the file has no RNG state.
    """
    epoch = int(ckpt['epoch'])
    saved = ckpt.get('optimizer')
    why = 'none in the file' if saved is None else optimizer_mismatch(optimizer, saved)
    if why is None:
        own_settings = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
        optimizer.load_state_dict(saved)
        for group, own in zip(optimizer.param_groups, own_settings):
            group.update(own)
    else:
        say(f'warning: {path}: optimizer state not used ({why}); starting from a fresh one', file=sys.stderr)
    say(f'warning: {path} holds no random-number state (not saved by this project); '
        f'fresh streams from --manualSeed {seed}', file=sys.stderr)
    seed_everything(seed + ctx.rank)
    best = ckpt.get('best_acc', ckpt.get('acc'))
    return epoch, epoch * batches, None if best is None else float(best)


def seed_everything(seed):
    """Seed python's, numpy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_state(state, is_best, folder, ctx, device):
    """Rank 0 saves; every process learns whether it worked and raises the same error if not."""
    distributed.first_then_all(lambda: save_checkpoint(state, is_best, folder, CHECKPOINT_NAME), ctx, device,
                               (CheckpointError,), RunError('rank 0 could not write the checkpoint'))
    return os.path.join(folder, CHECKPOINT_NAME)


def training_state(arch, model, optimizer, model_args, args, ctx, *, epoch, iteration, acc, best_acc, history):
    """What a checkpoint of this project holds after `epoch` epochs (loadable with weights_only=True)."""
    # The checkpoint carries the log's rows: a resumed run restores a row that a stop
    # between the checkpoint's save and the log's write lost.
    return dict(epoch=epoch, arch=arch, model_args=model_args, log=history,
                state_dict=distributed.unwrap(model).state_dict(), acc=acc, best_acc=best_acc,
                optimizer=optimizer.state_dict(), iteration=iteration, seed=args.manualSeed,
                rng=distributed.gather(rng_state(), ctx), args=dict(vars(args)))


def open_log(folder, title, columns):
    """The run's Logger in folder with the given columns (appending to a log already there)."""
    try:
        logger = Logger(os.path.join(folder, LOG_NAME), title=title, resume=True)
        logger.set_names(columns)
    except (ValueError, FileExistsError) as exc:
        raise RunError(str(exc)) from exc
    return logger
