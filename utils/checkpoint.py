"""The checkpoint file: its names, saving it whole, loading it safely, fitting it to a network, RNG state."""
import collections
import io
import os
import random
import re
import zipfile

import numpy as np
import torch

from modules.release import from_release, is_release_layout
from utils.files import CheckpointError, _cannot_write, _reason, atomic_write_all

# The files of a run folder.
CHECKPOINT_NAME = 'checkpoint.pth.tar'
BEST_NAME = 'model_best.pth.tar'
LOG_NAME = 'log.txt'
PLOT_NAME = 'log.png'
LOCK_NAME = '.lock'

# Types that torch.load(weights_only=True) rebuilds; numpy scalars and
# argparse.Namespace are refused there, so they are refused at save time too.
_PLAIN_TYPES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)
_MAPPING_TYPES = (dict, collections.OrderedDict, collections.Counter)
_SEQUENCE_TYPES = (list, tuple, torch.Size)


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


def save_checkpoint(state, is_best, folder, filename=CHECKPOINT_NAME):
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




def normalize_state_dict(sd):
    """A new state_dict with this project's keys (from its own or the paper's layout), on the CPU."""
    stripped = {_strip_module(k): v for k, v in sd.items()}
    if is_release_layout(stripped):
        try:
            stripped = from_release(stripped)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
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

