"""Files written so that nothing is lost: atomic replacement, appends that reach the disk, writable-folder probes,
and the one way a figure becomes a PNG."""
import io
import os
import re
import uuid


class CheckpointError(Exception):
    """A run's file (checkpoint, log, plot) cannot be written, read or used; one-line message."""


def _one_line(text, limit=200):
    """Collapse text to one line of at most limit characters."""
    text = ' '.join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _reason(exc):
    """A short, one-line reason for exc (the OS's wording for OS errors)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    # torch's messages run to several sentences of advice; the first one says what happened.
    first = str(exc).split('. ')[0]
    return _one_line(first) if first.strip() else type(exc).__name__


def _remove_quietly(path):
    """Remove path if it exists, ignoring errors (cleanup on a failure path)."""
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_folder(folder):
    """Make a completed rename durable; not every platform can open a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cannot_write(path, exc):
    """The CheckpointError for a failed write of path."""
    return CheckpointError(f'cannot write {path}: {_reason(exc)}')


def _temporary_name(name):
    """A fresh temporary's file name for the file `name` (see stale_temporaries)."""
    return f'.{name}.{uuid.uuid4().hex[:12]}.tmp'


def stale_temporaries(folder, names):
    """Paths of the temporaries in folder that a killed write of one of `names` left behind."""
    pattern = re.compile(r'\.(%s)\.[0-9a-f]{12}\.tmp' % '|'.join(map(re.escape, names)))
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return []
    return [os.path.join(folder, entry) for entry in entries if pattern.fullmatch(entry)]


def _write_temporary(path, write):
    """Call write(binary_file) on a new temporary file beside path and fsync it; return the temporary's path."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, _temporary_name(os.path.basename(path)))
    try:
        # os.open (not mkstemp) so the file gets the usual umask-based mode, not 0600.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except Exception as exc:
        _remove_quietly(tmp)
        raise _cannot_write(path, exc) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def atomic_write_all(items):
    """Write every (path, write) pair to a temporary file, then move them over their paths in order.

    Nothing is replaced until every file is written in full, so a failure
    (a full disk) leaves all the old files as they were; CheckpointError names
    the file that failed.
    """
    items = [(os.fspath(path), write) for path, write in items]
    staged = []
    try:
        for path, write in items:
            staged.append((_write_temporary(path, write), path))
        for tmp, path in list(staged):
            try:
                os.replace(tmp, path)
            except Exception as exc:
                raise _cannot_write(path, exc) from exc
            staged.remove((tmp, path))
    finally:
        for tmp, _ in staged:
            _remove_quietly(tmp)
    for folder in {os.path.dirname(os.path.abspath(path)) for path, _ in items}:
        _fsync_folder(folder)


def atomic_write(path, write):
    """Call write(binary_file) on a temporary file beside path, fsync it, then move it over path."""
    atomic_write_all([(path, write)])


def figure(**options):
    """A bare matplotlib Figure (options: Figure's): it renders with Agg and never touches pyplot or a display."""
    from matplotlib.figure import Figure  # imported on first use: most runs draw nothing
    return Figure(**options)


def png_bytes(fig):
    """A matplotlib Figure rendered as PNG bytes (120 dpi, cropped to what is drawn)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=120, bbox_inches='tight')
    return buffer.getvalue()


def write_png(path, fig):
    """Write a matplotlib Figure to path as a PNG, atomically."""
    data = png_bytes(fig)
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text):
    """Write text (UTF-8) to path atomically; on failure the old file stays, CheckpointError is raised."""
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))


def append_line(path, line):
    """Append line plus a newline to path and fsync it (appending never truncates what is there)."""
    try:
        with open(path, 'a', encoding='utf-8') as f:
            f.write(line + '\n')
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise CheckpointError(f'cannot write {os.fspath(path)}: {_reason(exc)}') from exc


# Suffixes dropped from a checkpoint's file name to name the files written about it.
CHECKPOINT_SUFFIXES = ('.tar', '.pth', '.pt', '.ckpt', '.pkl', '.bin')


def checkpoint_stem(path):
    """A checkpoint's file name without its suffixes: 'model_best.pth.tar' -> 'model_best'."""
    name = os.path.basename(os.fspath(path))
    while True:
        root, ext = os.path.splitext(name)
        if ext.lower() not in CHECKPOINT_SUFFIXES or not root:
            return name
        name = root


def make_writable_folder(folder):
    """Create folder (and parents) and make sure files can be written there; CheckpointError if not."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f'cannot create {folder}: {exc.strerror or exc}') from exc
    # Found now rather than after an evaluation or an epoch, which can take hours.
    _probe_writable(folder)


def _probe_writable(folder):
    """CheckpointError unless this process can create a file in the existing folder (the probe is removed)."""
    probe = os.path.join(folder, f'.write-test.{os.getpid()}.tmp')
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.remove(probe)
    except OSError as exc:
        raise CheckpointError(f'cannot write in {folder}: {exc.strerror or exc}') from exc


def refuse_existing_files(paths, overwrite, elsewhere=''):
    """CheckpointError naming the first of paths that exists, unless overwrite; elsewhere: how else to proceed."""
    for path in paths:
        if os.path.isdir(path):
            raise CheckpointError(f'{path} is a folder, not a file that can be replaced')
        if os.path.exists(path) and not overwrite:
            raise CheckpointError(f'{path} exists; pass --overwrite to replace it{elsewhere}')


def check_output_folder(folder):
    """CheckpointError unless files can be written in folder, or in it once it is made; creates nothing.

    The nearest existing folder on the way must be a folder in which this
    process can create a file; the writer makes the rest (make_folder_for) when it writes.
    """
    folder = os.path.abspath(os.fspath(folder))
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise CheckpointError(f'cannot write in {folder}: {existing} is a file, not a folder')
    _probe_writable(existing)


def make_folder_for(paths):
    """Create the folders of paths that do not exist yet (those check_outputs found writable)."""
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(os.fspath(path))) for path in paths):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f'cannot create {folder}: {exc.strerror or exc}') from exc


def check_outputs(paths, overwrite, elsewhere=''):
    """Before any work: CheckpointError if one of the files a program will write exists (unless overwrite)
    or its folder cannot be written; elsewhere: how else to proceed. Creates nothing."""
    paths = [os.fspath(path) for path in paths]
    refuse_existing_files(paths, overwrite, elsewhere)
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(path)) for path in paths):
        check_output_folder(folder)

