"""Tiny learnable data sets written in the real on-disk formats (IDX files, CIFAR pickles, N-MNIST events)."""
import os
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np

from utils.data import nmnist_convert

CIFAR10_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
_TEMPLATE_SEED = 12345  # shared by every split, so that train and test classes look alike


def class_images(labels, shape, num_classes, rng):
    """uint8 images of `shape`, one fixed random pattern per class plus per-image noise."""
    templates = np.random.default_rng(_TEMPLATE_SEED).random((num_classes,) + tuple(shape))
    noise = rng.random((len(labels),) + tuple(shape))
    return np.clip(255 * (0.7 * templates[labels] + 0.3 * noise), 0, 255).astype(np.uint8)


def balanced_labels(n, num_classes, rng):
    """n labels covering the classes as evenly as possible, in random order."""
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def write_idx(path, array):
    """Write a uint8 array as an IDX file (magic 0x0000080<ndim>, big-endian sizes)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, 'wb') as f:
        f.write(struct.pack('>I', 0x00000800 + array.ndim))
        f.write(struct.pack(f'>{array.ndim}I', *array.shape))
        f.write(array.tobytes())


def make_mnist(root, n_train=64, n_test=32, kind='MNIST', seed=0):
    """Write train/t10k images and labels IDX files under root/<kind>/raw/; return that folder."""
    if kind not in ('MNIST', 'FashionMNIST'):
        raise ValueError(f"kind must be 'MNIST' or 'FashionMNIST', not {kind!r}")
    raw = os.path.join(root, kind, 'raw')
    os.makedirs(raw, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('t10k', n_test)):
        labels = balanced_labels(n, 10, rng)
        write_idx(os.path.join(raw, f'{split}-images-idx3-ubyte'), class_images(labels, (28, 28), 10, rng))
        write_idx(os.path.join(raw, f'{split}-labels-idx1-ubyte'), labels)
    return raw


class _Py2Pickler(pickle._Pickler):
    """Pickler that stores bytes as Python 2 strings (BINSTRING), as the original CIFAR pickles do."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        """Write bytes with the Python 2 str opcodes; Python 3 reads them back as str under latin1."""
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack('<i', len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_cifar_pickle(path, obj):
    """Pickle `obj` with protocol 2 the way the CIFAR files were written (byte-string keys)."""
    with open(path, 'wb') as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def make_cifar(root, n_train=64, n_test=32, num_classes=10, seed=0):
    """Write CIFAR-10 (5 train batches) or CIFAR-100 pickles in torchvision's layout; return the folder."""
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, not {num_classes}")
    folder = os.path.join(root, 'cifar-10-batches-py' if num_classes == 10 else 'cifar-100-python')
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(n, title):
        labels = balanced_labels(n, num_classes, rng)
        data = class_images(labels, (3072,), num_classes, rng)
        names = [f'fake_{title.replace(" ", "_")}_{i}.png'.encode() for i in range(n)]
        return labels, {b'batch_label': title.encode(), b'data': data, b'filenames': names}

    if num_classes == 10:
        for i, n in enumerate(_split_sizes(n_train, 5), start=1):
            labels, entry = batch(n, f'training batch {i} of 5')
            write_cifar_pickle(os.path.join(folder, f'data_batch_{i}'), {**entry, b'labels': labels.tolist()})
        labels, entry = batch(n_test, 'testing batch 1 of 1')
        write_cifar_pickle(os.path.join(folder, 'test_batch'), {**entry, b'labels': labels.tolist()})
        meta = {b'num_cases_per_batch': 10000, b'label_names': [s.encode() for s in CIFAR10_NAMES],
                b'num_vis': 3072}
        write_cifar_pickle(os.path.join(folder, 'batches.meta'), meta)
        return folder
    for name, n in (('train', n_train), ('test', n_test)):
        labels, entry = batch(n, name)
        entry.update({b'fine_labels': labels.tolist(), b'coarse_labels': (labels // 5).tolist()})
        write_cifar_pickle(os.path.join(folder, name), entry)
    meta = {b'fine_label_names': [f'fine_{i:02d}'.encode() for i in range(100)],
            b'coarse_label_names': [f'coarse_{i:02d}'.encode() for i in range(20)]}
    write_cifar_pickle(os.path.join(folder, 'meta'), meta)
    return folder


def _split_sizes(n, parts):
    """Sizes of `parts` nearly equal consecutive chunks of n items."""
    return [len(chunk) for chunk in np.array_split(np.arange(n), parts)]


# ------------------------------------------------------------------ N-MNIST

MAX_TS = 300000


def encode_event(x, y, p, ts):
    """The 5 bytes of one raw event: x, y, polarity bit 7 + 23-bit µs time."""
    if not (0 <= x < 256 and 0 <= y < 256 and p in (0, 1) and 0 <= ts < 1 << 23):
        raise ValueError(f"event out of range for the raw format: {(x, y, p, ts)}")
    return bytes([x, y, (p << 7) | (ts >> 16), (ts >> 8) & 0xFF, ts & 0xFF])


def write_bin(path, events):
    """Write (x, y, p, ts) tuples as a raw N-MNIST `.bin` file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(encode_event(*e) for e in events))
    return path


def random_events(rng, digit, count):
    """Time-sorted random events; two thirds fall in a digit-specific column band, so classes differ."""
    band = rng.random(count) < 2 / 3
    x = np.where(band, rng.integers(3 * digit, 3 * digit + 7, count), rng.integers(0, 34, count))
    y = rng.integers(0, 34, count)
    p = rng.integers(0, 2, count)
    ts = np.sort(rng.integers(0, MAX_TS, count))
    return list(zip(x.tolist(), y.tolist(), p.tolist(), ts.tolist()))


def write_raw_tree(root, per_class=2, seed=0, events=(20, 200)):
    """Raw release layout `Train|Test/<digit>/<nnnnn>.bin` with random events; returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split in ("Train", "Test"):
        for digit in range(10):
            for i in range(per_class):
                count = int(rng.integers(events[0], events[1] + 1))
                write_bin(root / split / str(digit) / f"{i:05d}.bin", random_events(rng, digit, count))
    return root


def make_nmnist_tree(root, fmt="text", per_class=2, seed=0, events=(20, 200)):
    """A tiny valid N-MNIST tree for both splits and all 10 digits; returns root.

    fmt 'raw' writes `.bin` files; 'text' converts the same random events
    (same seed) to the paper's `.dat` layout with the project's converter.
    """
    if fmt == "raw":
        return write_raw_tree(root, per_class, seed, events)
    if fmt != "text":
        raise ValueError(f"fmt must be 'text' or 'raw', got {fmt!r}")
    with tempfile.TemporaryDirectory() as raw:
        write_raw_tree(raw, per_class, seed, events)
        nmnist_convert.convert_tree(raw, root)
    return Path(root)
