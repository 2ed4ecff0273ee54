"""Tab-separated training log, one line per epoch, and a plot of its curves."""
import math
import os

from utils.files import CheckpointError, append_line, atomic_write_text, figure, write_png

# The log's columns: the paper's, then skipped steps (then utils.training.epoch.DIAGNOSTICS, see resume.log_columns).
PAPER_COLUMNS = ['Learning Rate', 'Train Loss', 'Valid Loss', 'Train Acc.', 'Valid Acc.']
BASE_COLUMNS = PAPER_COLUMNS + ['Skipped']


def _read_text(path):
    """The file's text, or '' when it does not exist."""
    try:
        with open(path, encoding='utf-8') as f:
            return f.read()
    except FileNotFoundError:
        return ''


def as_written(row):
    """A row of numbers as the log writes them (6 decimals; nan compares equal to nan)."""
    return [f'{float(v):.6f}' for v in row]


def _parse_row(line, width):
    """The numbers of one log line, or None for a line cut short by a crash."""
    fields = line.rstrip('\t').split('\t')
    if len(fields) != width:
        return None
    try:
        return [float(field) for field in fields]
    except ValueError:
        return None


class Logger:
    """Tab-separated log with a header line; resume=True reads it back and appends, never truncates."""

    def __init__(self, fpath, title=None, resume=False):
        """Open the log at fpath; an existing non-empty log needs resume=True."""
        self.fpath = os.fspath(fpath)
        self.title = title or ''
        self.names = list(PAPER_COLUMNS)
        self.numbers = {name: [] for name in self.names}
        self._header_written = False
        self._pending_newline = False
        text = _read_text(self.fpath)
        if text.strip():
            if not resume:
                raise FileExistsError(f'{self.fpath} already holds a log: resume the run '
                                      f'or use another checkpoint folder')
            self._read_back(text)

    def _read_back(self, text):
        """Take names and numbers from an existing log's text."""
        lines = [line for line in text.splitlines() if line.strip()]
        self.names = lines[0].rstrip('\t').split('\t')
        self.numbers = {name: [] for name in self.names}
        for line in lines[1:]:
            row = _parse_row(line, len(self.names))
            if row is not None:
                for name, value in zip(self.names, row):
                    self.numbers[name].append(value)
        self._header_written = True
        # A crash mid-write leaves a line without its newline; the next line must not join it.
        self._pending_newline = not text.endswith('\n')

    def _write(self, line):
        """Append one line durably."""
        if self._pending_newline:
            line = '\n' + line
            self._pending_newline = False
        append_line(self.fpath, line)

    def set_names(self, names):
        """Name the columns and write the header; a resumed log keeps its columns or gains new ones at the end."""
        names = list(names)
        if self._header_written:
            if names == self.names:
                return
            if names[:len(self.names)] != self.names:
                raise ValueError(f'{self.fpath} has the columns {self.names}, '
                                 f'this run writes {names}: use another checkpoint folder')
            self._add_columns(names)
            return
        self.names = names
        self.numbers = {name: [] for name in names}
        self._write('\t'.join(names))
        self._header_written = True

    def _add_columns(self, names):
        """Rewrite a log of an earlier version (fewer columns, a prefix of names) with nan in the new columns."""
        rows = self.rows()
        for name in names[len(self.names):]:
            self.numbers[name] = [math.nan] * len(rows)
        self.names = names
        lines = ['\t'.join(names)] + ['\t'.join(as_written(row + [math.nan] * (len(names) - len(row))))
                                     for row in rows]
        atomic_write_text(self.fpath, '\n'.join(lines) + '\n')
        self._pending_newline = False

    def rows(self):
        """The rows read or written so far, as lists of floats."""
        return [list(row) for row in zip(*(self.numbers[name] for name in self.names))]

    def append(self, values):
        """Write one line of numbers (6 decimals), one per column, and fsync it."""
        values = [float(v) for v in values]
        if len(values) != len(self.names):
            raise ValueError(f'{len(values)} values for the {len(self.names)} columns {self.names}')
        if not self._header_written:
            self.set_names(self.names)
        self._write('\t'.join(f'{v:.6f}' for v in values))
        for name, value in zip(self.names, values):
            self.numbers[name].append(value)

    def catch_up(self, history):
        """Append the rows of `history` (the run's rows so far, the newest last) that the log lacks.

        When the log's rows begin the history, every row after them is written:
        a row lost to a stop between the checkpoint's save and the log's write,
        or the earlier epochs of a run continued in a new folder. A log that
        differs (kept from a run resumed from an earlier checkpoint) gets the
        newest row only.
        """
        logged = [as_written(row) for row in self.rows()]
        fresh = len(logged) < len(history) and logged == [as_written(row) for row in history[:len(logged)]]
        for row in history[len(logged) if fresh else len(history) - 1:]:
            self.append(row)

    def plot(self, path_png):
        """Save loss, accuracy and (when logged) residual curves against epoch as a PNG, atomically."""
        plot_curves(self.numbers, self.title, path_png)


# Panels drawn only when some column holds a finite value: (key in the column's name, y label, log scale).
OPTIONAL_PANELS = (('res.', 'relative residual', True), ('norm', 'spectral norm', False))


def plot_curves(numbers, title, path_png):
    """Plot a log's columns ({name: values per epoch}) against epoch: loss, accuracy, and (when logged)
    residuals (log scale) and spectral norms."""
    def measured(name, key):
        return key in name.lower() and any(math.isfinite(v) and v > 0 for v in numbers[name])

    panels = [('loss', 'loss', False), ('acc', 'accuracy (%)', False)]
    panels += [panel for panel in OPTIONAL_PANELS if any(measured(name, panel[0]) for name in numbers)]
    fig = figure(figsize=(5 * len(panels), 4))
    for ax, (key, ylabel, log) in zip(fig.subplots(1, len(panels)), panels):
        for name, values in numbers.items():
            if key in name.lower() and (key in ('loss', 'acc') or measured(name, key)):
                ax.plot(range(1, len(values) + 1), values, label=name)
        if log:
            ax.set_yscale('log')
        ax.set_xlabel('epoch')
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    write_png(path_png, fig)


class StepLog:
    """A CSV file with one row of solver statistics per training step, appended to (never truncated)."""

    FIELDS = ('epoch', 'iteration', 'nstep', 'stop', 'rel_residual', 'forward_residual', 'feedback_norm',
              'jacobian_norm', 'jac_frobenius', 'syncs')
    HEADER = ','.join(FIELDS)

    def __init__(self, path, resumed_at=None):
        """Open path for appending (writing the header if it is new); OSError if it cannot be written.

        A file that is there must be such a CSV (CheckpointError otherwise: a
        log, a checkpoint, another program's file). A new run (resumed_at None)
        needs it without rows: rows are another run's. A run resumed at global
        iteration resumed_at continues its own file: the rows from that
        iteration on, of an epoch interrupted before its checkpoint, are
        removed (`removed` counts them), since the resumed run trains those steps again.
        """
        self.path = os.fspath(path)
        self.removed = 0
        rows = self._rows()
        if rows and resumed_at is None:
            raise CheckpointError(f'--solver-log: {self.path} holds the rows of another run; give this run a file '
                                  f'of its own')
        kept = [row for row in rows if _iteration(row) is not None and _iteration(row) < resumed_at] if rows else []
        if len(kept) < len(rows):
            atomic_write_text(self.path, ''.join(line + '\n' for line in [self.HEADER, *kept]))
            self.removed = len(rows) - len(kept)
        self.file = open(self.path, 'a', encoding='utf-8')
        if self.file.tell() == 0:
            self.file.write(self.HEADER + '\n')
        self.epoch = 0

    def _rows(self):
        """The data lines of the file at path ([] when it is missing or empty); CheckpointError if it is not a
        solver-log CSV."""
        try:
            with open(self.path, 'rb') as f:
                head = f.read(len(self.HEADER) + 1)
                rest = f.read() if head == (self.HEADER + '\n').encode() else None
        except FileNotFoundError:
            return []
        if not head:
            return []
        if rest is None:
            raise CheckpointError(f'--solver-log: {self.path} is not a solver-log CSV (its first line is not '
                                  f'{self.HEADER}); choose a new file')
        return rest.decode('utf-8', errors='replace').splitlines()

    def __call__(self, iteration, stats):
        """Append the row of one step (stats: the model's solver_stats, or None for a step without a solve)."""
        stats = stats or {}
        values = {'epoch': self.epoch, 'iteration': iteration, **stats}
        self.file.write(','.join(str(values.get(field, '')) for field in self.FIELDS) + '\n')

    def flush(self):
        """Make the rows written so far durable."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        """Flush and close the file."""
        self.flush()
        self.file.close()


def _iteration(line):
    """The iteration of a solver-log row, or None for a line cut short by a crash."""
    fields = line.split(',')
    return int(fields[1]) if len(fields) == len(StepLog.FIELDS) and fields[1].isdigit() else None
