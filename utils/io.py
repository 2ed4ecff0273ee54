"""Atomic file writes, checkpoints (this project's and the paper's release), RNG state."""
import collections
import io
import os
import random
import re
import uuid
import zipfile

import numpy as np
import torch

BEST_NAME = 'model_best.pth.tar'

# Feedback-weight entries of the paper's release -> this project's parametrize keys.
_FEEDBACK = 'snn.feedback.linear.parametrizations.weight.'
_PAPER_FEEDBACK_SUFFIX = {
    'weight_w': 'original',
    'weight_g': '0.g',
    'weight_u': '0.u',
    'weight_v': '0.v',
}

# Types that torch.load(weights_only=True) rebuilds; numpy scalars and
# argparse.Namespace are refused there, so they are refused at save time too.
_PLAIN_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_MAPPING_TYPES = (dict, collections.OrderedDict, collections.Counter)
_SEQUENCE_TYPES = (list, tuple, torch.Size)


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


def _first_unsafe(obj, where):
    """(location, type name) of the first value weights_only loading would refuse, else None."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_TYPES:
        return None
    if type(obj) in _MAPPING_TYPES:
        for key, value in obj.items():
            found = _first_unsafe(key, where) or _first_unsafe(value, f'{where}[{key!r}]')
            if found:
                return found
        return None
    if type(obj) in _SEQUENCE_TYPES:
        for i, value in enumerate(obj):
            found = _first_unsafe(value, f'{where}[{i}]')
            if found:
                return found
        return None
    return where, f'{type(obj).__module__}.{type(obj).__qualname__}'


def _refuse_unsafe(obj, path):
    """Raise CheckpointError if weights_only loading would refuse something in obj."""
    # Refused before writing: such a checkpoint would only fail later, when a run resumes.
    found = _first_unsafe(obj, 'state')
    if found:
        where, type_name = found
        raise CheckpointError(f'cannot write {os.fspath(path)}: {where} is of type {type_name}, '
                              f'which weights_only loading refuses (store plain numbers, lists, '
                              f'dicts or tensors)')


def atomic_save(obj, path):
    """torch.save obj to path atomically; on failure the old file stays, CheckpointError is raised."""
    _refuse_unsafe(obj, path)
    atomic_write(path, lambda f: torch.save(obj, f))


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
    probe = os.path.join(folder, f'.write-test.{os.getpid()}.tmp')
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.remove(probe)
    except OSError as exc:
        raise CheckpointError(f'cannot write in {folder}: {exc.strerror or exc}') from exc


def refuse_existing_files(paths, overwrite, elsewhere=''):
    """CheckpointError naming the first of paths that exists, unless overwrite; elsewhere: how else to proceed."""
    for path in paths:
        if os.path.exists(path) and not overwrite:
            raise CheckpointError(f'{path} exists; pass --overwrite to replace it{elsewhere}')


def save_checkpoint(state, is_best, folder, filename='checkpoint.pth.tar'):
    """Save state atomically as folder/filename, also as model_best.pth.tar if is_best; return the path.

    Both files are written in full before either is replaced, the best one
    first: a failure leaves both old files, and a checkpoint never records a
    best accuracy whose model is not on disk.
    """
    path = os.path.join(folder, filename)
    _refuse_unsafe(state, path)
    data = io.BytesIO()
    try:
        torch.save(state, data)
    except Exception as exc:
        raise _cannot_write(path, exc) from exc

    def write(f):
        f.write(data.getbuffer())

    best = [(os.path.join(folder, BEST_NAME), write)] if is_best else []
    atomic_write_all(best + [(path, write)])
    return path


def _format_problem(path):
    """Why path cannot be a torch file judging by its bytes, or None if it may be one."""
    with open(path, 'rb') as f:
        head = f.read(8)
    if not head:
        return 'the file is empty'
    # torch >= 1.6 writes a zip archive; a cut-off one lacks the closing directory record.
    if head.startswith(b'PK'):
        return None if zipfile.is_zipfile(path) else 'incomplete zip archive'
    # The legacy format is a pickle stream, which starts with the PROTO opcode.
    if head.startswith(b'\x80'):
        return None
    return f'unknown format (starts with {head!r})'


def load_checkpoint(path, map_location='cpu'):
    """Load a checkpoint dict with weights_only=True; CheckpointError (one line) if it is unusable."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f'no checkpoint found at {path}')
    try:
        problem = _format_problem(path)
    except OSError as exc:
        raise CheckpointError(f'cannot read {path}: {_reason(exc)}') from exc
    unreadable = f'{path} is not a readable checkpoint (truncated or not a torch file)'
    if problem:
        raise CheckpointError(f'{unreadable}: {problem}')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        refused = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(exc))
        if refused:
            raise CheckpointError(f'{path} holds an object of type {refused.group(1)}, which '
                                  f'weights_only loading refuses; re-save it with plain types') from exc
        raise CheckpointError(f'{unreadable}: {_reason(exc)}') from exc
    _require_state_dict(ckpt, path)
    return ckpt


def _require_state_dict(ckpt, source):
    """Raise CheckpointError unless ckpt is a dict with a 'state_dict' entry."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{source} is not a checkpoint: it holds a {type(ckpt).__name__}, '
                              f"not a dict with 'state_dict'")
    if 'state_dict' not in ckpt:
        keys = ', '.join(str(k) for k in list(ckpt)[:5])
        raise CheckpointError(f"{source} has no 'state_dict' entry (it has: {keys or 'nothing'})")


def rng_state():
    """The state of python's random, numpy's global RNG, torch's CPU RNG and each CUDA device's."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        'python': {'version': version, 'state': list(internal), 'gauss_next': gauss},
        # numpy's state is a tuple holding an ndarray, which weights_only loading refuses.
        'numpy': {'name': str(name), 'keys': torch.from_numpy(keys.astype(np.int64)),
                  'pos': int(pos), 'has_gauss': int(has_gauss), 'cached_gaussian': float(cached)},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned; CUDA states are restored only where CUDA is available."""
    py = state['python']
    random.setstate((py['version'], tuple(py['state']), py['gauss_next']))
    npy = state['numpy']
    np.random.set_state((npy['name'], npy['keys'].cpu().numpy().astype(np.uint32), npy['pos'],
                         npy['has_gauss'], npy['cached_gaussian']))
    # .cpu(): a checkpoint loaded with map_location='cuda' carries these as CUDA tensors.
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        for device, device_state in enumerate(state['cuda'][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state.cpu(), device)


def _strip_module(key):
    """Drop the 'module.' prefix that DataParallel / DistributedDataParallel add."""
    return key[len('module.'):] if key.startswith('module.') else key


def _paper_alias_target(key):
    """The canonical key a paper-release alias stands for; '' for a stale copy, None for no alias."""
    for outer in ('snn_ide_conv.', 'snn_ide_fc.'):
        if key.startswith(outer):
            key = key[len(outer):]
    if key.startswith('snn_func_copy.'):
        return ''
    if not key.startswith('snn_func.'):
        return None
    key = key[len('snn_func.'):]
    listed = re.match(r'network_s_list\.(\d+)\.(.*)', key)
    if listed:
        return f'network_s{int(listed.group(1)) + 1}.{listed.group(2)}'
    return key


def _paper_to_project_key(key, last_layer):
    """Map one canonical key of the paper's release to this project's key."""
    if key.startswith('classifier.'):
        return key
    match = re.match(r'network_x\.(conv|fc|bn)\.(.*)', key)
    if match:
        part = 'bn' if match.group(1) == 'bn' else 'linear'
        return f'snn.input_layer.{part}.{match.group(2)}'
    match = re.match(r'network_s(\d*)\.(conv|fc|convT|bn)\.(.*)', key)
    if match:
        index, op, name = match.groups()
        is_feedback = index == '' or int(index) == last_layer
        if is_feedback and op != 'bn' and name in _PAPER_FEEDBACK_SUFFIX:
            return _FEEDBACK + _PAPER_FEEDBACK_SUFFIX[name]
        if not is_feedback and op in ('conv', 'fc', 'bn'):
            part = 'bn' if op == 'bn' else 'linear'
            return f'snn.layers.{int(index) - 1}.{part}.{name}'
    raise CheckpointError(f"the paper's checkpoint entry {key} has no counterpart in this project")


def _from_paper_layout(sd):
    """A paper-release state_dict's canonical entries (aliases fill gaps, stale copies go), mapped."""
    canonical = {}
    aliases = {}
    for key, value in sd.items():
        target = _paper_alias_target(key)
        if target is None:
            canonical[key] = value
        elif target:
            aliases[target] = value
    # Aliases are the same modules registered again: they matter only if a canonical entry is absent.
    for key, value in aliases.items():
        canonical.setdefault(key, value)
    indices = [int(m.group(1)) for m in (re.match(r'network_s(\d+)\.', k) for k in canonical) if m]
    last_layer = max(indices, default=None)
    return {_paper_to_project_key(k, last_layer): v for k, v in canonical.items()}


def normalize_state_dict(sd):
    """A new state_dict with this project's keys (from its own or the paper's layout), on the CPU."""
    stripped = {_strip_module(k): v for k, v in sd.items()}
    if any(k.startswith('network_x.') for k in stripped):
        stripped = _from_paper_layout(stripped)
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in stripped.items()}


def _spiking_layers(keys):
    """Number of spiking layers a state_dict describes: one plus the hidden layers snn.layers.{i}."""
    hidden = {m.group(1) for m in (re.match(r'snn\.layers\.(\d+)\.', k) for k in keys) if m}
    return 1 + len(hidden)


def _shape(value):
    """A tensor's shape written as a tuple, e.g. (10, 16384)."""
    return str(tuple(getattr(value, 'shape', ())))


def _shape_hint(key, ckpt_shape, model_shape):
    """A guess at why key's shape differs, for the one-line message."""
    if key != 'classifier.weight' or len(ckpt_shape) != 2 or len(model_shape) != 2:
        return ''
    if ckpt_shape[0] != model_shape[0]:
        return ' (another class count?)'
    return ' (another input size or padding?)'


def _name_some(keys, count=3):
    """The first count keys, comma-separated, plus how many more there are."""
    keys = sorted(keys)
    more = f' (+{len(keys) - count} more)' if len(keys) > count else ''
    return ', '.join(keys[:count]) + more


def check_compatible(model_sd, ckpt_sd):
    """Raise CheckpointError (one line) unless ckpt_sd has exactly model_sd's keys and shapes."""
    prefix = 'checkpoint does not fit this network: '
    missing = set(model_sd) - set(ckpt_sd)
    unexpected = set(ckpt_sd) - set(model_sd)
    if missing or unexpected:
        ckpt_layers, model_layers = _spiking_layers(ckpt_sd), _spiking_layers(model_sd)
        if ckpt_layers != model_layers:
            raise CheckpointError(f"{prefix}checkpoint has {ckpt_layers} spiking layers' keys, "
                                  f'this network {model_layers} — another architecture?')
        parts = []
        if missing:
            parts.append(f'missing {_name_some(missing)}')
        if unexpected:
            parts.append(f'unexpected {_name_some(unexpected)}')
        raise CheckpointError(prefix + '; '.join(parts))
    for key, value in model_sd.items():
        ckpt_shape = tuple(getattr(ckpt_sd[key], 'shape', ()))
        model_shape = tuple(getattr(value, 'shape', ()))
        if ckpt_shape != model_shape:
            hint = _shape_hint(key, ckpt_shape, model_shape)
            raise CheckpointError(f'{prefix}{key} is {_shape(ckpt_sd[key])} in the checkpoint, '
                                  f'{_shape(value)} here{hint}')


def _comparable(value):
    """value with tuples turned into lists, so a saved (a, b) equals an argparse [a, b]."""
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return value


def _describe(arch, args):
    """'arch (k=v, ...)' for the mismatch message."""
    listed = ', '.join(f'{k}={v}' for k, v in args.items())
    return f'{arch} ({listed})' if listed else str(arch)


def _check_arch(ckpt, expected_arch, expected_args):
    """Raise CheckpointError if the checkpoint's arch/model_args differ from the expected ones."""
    saved_arch = ckpt.get('arch')
    saved_args = ckpt.get('model_args') or {}
    expected_args = expected_args or {}
    # Only what both sides state: the paper's checkpoints carry neither, and an argument
    # added later must not make older checkpoints unusable.
    arch_differs = None not in (saved_arch, expected_arch) and saved_arch != expected_arch
    differing = [k for k in expected_args if k in saved_args
                 and _comparable(saved_args[k]) != _comparable(expected_args[k])]
    if not arch_differs and not differing:
        return
    name = saved_arch or expected_arch or 'a network'
    saved = _describe(saved_arch or name, {k: saved_args[k] for k in differing})
    expected = _describe(expected_arch or name, {k: expected_args[k] for k in differing})
    raise CheckpointError(f'checkpoint is for {saved}, this run builds {expected}')


def load_into_model(model, path_or_dict, map_location='cpu', expected_arch=None,
                    expected_args=None):
    """Load a checkpoint (path or dict) into model (DDP-wrapped or not) if it fits; return it."""
    if isinstance(path_or_dict, dict):
        ckpt = path_or_dict
        _require_state_dict(ckpt, 'the checkpoint')
    else:
        ckpt = load_checkpoint(path_or_dict, map_location=map_location)
    _check_arch(ckpt, expected_arch, expected_args)
    state_dict = normalize_state_dict(ckpt['state_dict'])
    target = getattr(model, 'module', model)
    check_compatible(target.state_dict(), state_dict)
    target.load_state_dict(state_dict)
    return ckpt
