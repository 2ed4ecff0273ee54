"""Image data sets (torchvision's on-disk layouts, scikit-learn digits, N-MNIST) and their loaders.

Longer than most modules: each data set's checks of its files (one clear line for what is missing) stand here.
"""
import contextlib
import gzip
import os
import pickle
import shutil
import socket
import struct
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler
from torchvision import datasets, transforms
from torchvision.datasets.utils import extract_archive

DATASETS = ('mnist', 'fashionmnist', 'cifar10', 'cifar100', 'digits', 'nmnist')

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

DIGITS_TEST_SIZE = 450  # of 1,797: 1,347 train / 450 test
DOWNLOAD_TIMEOUT_S = 5

_IDX_IMAGES = (0x00000803, 3)  # (magic number, dimensions) of uint8 IDX files
_IDX_LABELS = (0x00000801, 1)


class DataError(Exception):
    """A data set is missing or unreadable; the message is one line meant for the user."""


def get_datasets(name, path, time_step=30, download=True):
    """Return (train_set, test_set, num_classes) for a data set name under folder `path` (unused by digits)."""
    key = name.lower()
    if key in ('mnist', 'fashionmnist'):
        cls = datasets.MNIST if key == 'mnist' else datasets.FashionMNIST
        return _mnist_sets(cls, path, download) + (10,)
    if key in ('cifar10', 'cifar100'):
        cls, num_classes = (_CIFAR10, 10) if key == 'cifar10' else (_CIFAR100, 100)
        return _cifar_sets(cls, path, num_classes, download) + (num_classes,)
    if key == 'digits':
        return digits_sets() + (10,)
    if key == 'nmnist':
        return _nmnist_sets(path, time_step) + (10,)
    raise DataError(f"unknown data set {name!r} (choose from {', '.join(DATASETS)})")


def mnist_transform():
    """ToTensor + the MNIST normalisation, as in the paper (images stay 1x28x28)."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(MNIST_MEAN, MNIST_STD)])


def cifar_transforms():
    """(train, test) transforms of the paper: crop + flip augmentation for training only."""
    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    train = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor(), normalize])
    return train, transforms.Compose([transforms.ToTensor(), normalize])


# ---------------------------------------------------------------- MNIST / Fashion-MNIST

def _mnist_sets(cls, path, download):
    """Train and test sets of torchvision's MNIST or FashionMNIST, with the files checked first."""
    raw = os.path.join(path, cls.__name__, 'raw')
    files = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    _unpack_gz(raw, files)
    _ensure_files(cls.__name__, raw, files, ', '.join(f + '[.gz]' for f in files),
                  lambda: cls(path, train=True, download=True), download)
    for split in ('train', 't10k'):
        images, labels = (os.path.join(raw, f'{split}-{kind}') for kind in ('images-idx3-ubyte', 'labels-idx1-ubyte'))
        _check_mnist_pair(images, labels)
    return tuple(_construct(cls.__name__, raw, cls, path, train=train, transform=mnist_transform())
                 for train in (True, False))


def _unpack_gz(folder, files):
    """Decompress `file.gz` where only the archive is there, so .gz copies work offline."""
    for name in files:
        target = os.path.join(folder, name)
        if os.path.isfile(target) or not os.path.isfile(target + '.gz'):
            continue
        # Written under a temporary name so that a truncated archive leaves no half file behind.
        try:
            with gzip.open(target + '.gz', 'rb') as src, open(target + '.part', 'wb') as dst:
                shutil.copyfileobj(src, dst)
        except (OSError, EOFError) as exc:
            with contextlib.suppress(OSError):
                os.remove(target + '.part')
            raise DataError(f"cannot decompress {target}.gz: {_short(exc)}") from exc
        os.replace(target + '.part', target)


def _check_mnist_pair(images_path, labels_path):
    """Check an images/labels IDX pair: headers, sizes, 28x28 images, matching counts, labels 0..9."""
    n, rows, cols = _read_idx_header(images_path, *_IDX_IMAGES)
    (n_labels,) = _read_idx_header(labels_path, *_IDX_LABELS)
    if (rows, cols) != (28, 28):
        raise DataError(f"{images_path}: images are {rows}x{cols}, expected 28x28")
    if n != n_labels:
        raise DataError(f"{labels_path}: {n_labels} labels for {n} images in {images_path}")
    labels = np.fromfile(labels_path, dtype=np.uint8, offset=8)
    if n and labels.max() > 9:
        raise DataError(f"{labels_path}: label {labels.max()} out of range 0..9")


def _read_idx_header(path, magic, ndim):
    """Return the sizes in an IDX file's header after checking its magic number and file size."""
    with open(path, 'rb') as f:
        header = f.read(4 * (ndim + 1))
    if len(header) < 4 * (ndim + 1):
        raise DataError(f"{path}: not an IDX file (only {len(header)} bytes)")
    found = int.from_bytes(header[:4], 'big')
    if found != magic:
        raise DataError(f"{path}: bad IDX magic number 0x{found:08x} (expected 0x{magic:08x})")
    sizes = struct.unpack(f'>{ndim}I', header[4:])
    expected = len(header) + int(np.prod(sizes))
    actual = os.path.getsize(path)
    if actual != expected:
        raise DataError(f"{path}: {actual} bytes, but its header {sizes} implies {expected}")
    return sizes


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100

def _without_checksums(cls):
    """A torchvision CIFAR class that requires its files to exist but not to match the md5 sums."""
    # torchvision rejects any file whose md5 differs from the original archive's, e.g. a re-pickled
    # but identical copy. The content is checked here instead (see _check_cifar_file); the archive
    # fetched by download=True keeps its checksum.
    return type(cls.__name__, (cls,), {
        'train_list': [[name, None] for name, _ in cls.train_list],
        'test_list': [[name, None] for name, _ in cls.test_list],
        'meta': {**cls.meta, 'md5': None},
    })


_CIFAR10 = _without_checksums(datasets.CIFAR10)
_CIFAR100 = _without_checksums(datasets.CIFAR100)


def _cifar_sets(cls, path, num_classes, download):
    """Train and test sets of CIFAR-10/100 with the paper's transforms."""
    title = 'CIFAR-10' if num_classes == 10 else 'CIFAR-100'
    folder = os.path.join(path, cls.base_folder)
    files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta['filename']]
    archive = os.path.join(path, cls.filename)
    if not all(os.path.isfile(os.path.join(folder, f)) for f in files) and os.path.isfile(archive):
        try:
            extract_archive(archive, path)
        except Exception as exc:
            raise DataError(f"cannot extract {archive}: {_short(exc)}") from exc
    _ensure_files(title, folder, files, f"{', '.join(files)}; or {cls.filename} in {path}",
                  lambda: cls(path, train=True, download=True), download)
    train_tf, test_tf = cifar_transforms()
    sets = []
    for train, transform in ((True, train_tf), (False, test_tf)):
        try:
            ds = cls(path, train=train, transform=transform)
            _check_cifar_arrays(ds, num_classes)
        except Exception as exc:
            # torchvision fails deep inside (KeyError 'data', reshape errors, ...): find the culprit.
            for name in files:
                _check_cifar_file(os.path.join(folder, name), cls, num_classes)
            raise DataError(f"cannot read {title} from {folder}: {_short(exc)}") from exc
        sets.append(ds)
    return tuple(sets)


def _check_cifar_arrays(ds, num_classes):
    """Raise ValueError unless a loaded CIFAR set has uint8 32x32x3 images, one valid label each."""
    if ds.data.dtype != np.uint8 or ds.data.shape[1:] != (32, 32, 3):
        raise ValueError(f"images are {ds.data.dtype} {ds.data.shape[1:]}, expected uint8 (32, 32, 3)")
    if len(ds.targets) != len(ds.data):
        raise ValueError(f"{len(ds.targets)} labels for {len(ds.data)} images")
    if ds.targets and not all(0 <= t < num_classes for t in ds.targets):
        raise ValueError(f"labels out of range 0..{num_classes - 1}")


def _check_cifar_file(path, cls, num_classes):
    """Raise DataError naming `path` if it is not a CIFAR pickle torchvision can read."""
    try:
        with open(path, 'rb') as f:
            entry = pickle.load(f, encoding='latin1')
    except Exception as exc:
        raise DataError(f"{path}: not a readable pickle ({_short(exc)})") from exc
    if not isinstance(entry, dict):
        raise DataError(f"{path}: holds a {type(entry).__name__}, expected a dict")
    if os.path.basename(path) == cls.meta['filename']:
        if cls.meta['key'] not in entry:
            raise DataError(f"{path}: no '{cls.meta['key']}' entry")
        return
    if 'data' not in entry:
        raise DataError(f"{path}: no 'data' entry")
    # torchvision falls back from 'labels' to 'fine_labels', so either one is readable.
    labels = entry.get('labels', entry.get('fine_labels'))
    if labels is None:
        raise DataError(f"{path}: no '{'labels' if num_classes == 10 else 'fine_labels'}' entry")
    data = entry['data']
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, 'shape', type(data).__name__)
        raise DataError(f"{path}: 'data' is {getattr(data, 'dtype', '')} {shape}, expected uint8 (N, 3072)")
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} labels for {len(data)} images")
    if any(not 0 <= int(t) < num_classes for t in labels):
        raise DataError(f"{path}: labels out of range 0..{num_classes - 1}")


# ---------------------------------------------------------------- digits / N-MNIST

def digits_sets():
    """scikit-learn's 8x8 digits as 1x28x28 MNIST-normalised tensors, split 1,347/450 (stratified, fixed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, random_state=0, stratify=y)
    return _digits_tensors(x_train, y_train), _digits_tensors(x_test, y_test)


def _digits_tensors(x, y):
    """TensorDataset of 8x8 digit rows (values 0..16) resized to 28x28 and normalised like MNIST."""
    images = torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    images = F.interpolate(images, size=(28, 28), mode='bilinear', align_corners=False)
    images = (images - MNIST_MEAN[0]) / MNIST_STD[0]
    return TensorDataset(images.contiguous(), torch.as_tensor(y, dtype=torch.int64))


def _nmnist_sets(path, time_step):
    """N-MNIST train and test sets of `time_step` frames each."""
    from utils.data.nmnist import NMNIST

    try:
        return NMNIST(path, True, time_step), NMNIST(path, False, time_step)
    except (OSError, ValueError) as exc:
        raise DataError(f"N-MNIST: {_short(exc)}") from exc


# ---------------------------------------------------------------- shared helpers

def _ensure_files(title, folder, files, expected, fetch, download):
    """Make sure `files` exist in `folder`, trying `fetch` (a download) once if allowed."""
    if _missing(folder, files) and download:
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                fetch()
        except Exception as exc:
            if _missing(folder, files):
                raise DataError(f"{title} not found under {folder} (expected {expected}); "
                                f"download failed: {_short(exc)}") from exc
    if _missing(folder, files):
        how = 'download gave no such files' if download else 'download disabled'
        raise DataError(f"{title} not found under {folder} (expected {expected}); {how}")


def _missing(folder, files):
    """Names in `files` that are not regular files in `folder`."""
    return [f for f in files if not os.path.isfile(os.path.join(folder, f))]


@contextlib.contextmanager
def _socket_timeout(seconds):
    """Temporarily cap socket waits, so that an offline download attempt fails quickly."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _construct(title, folder, cls, *args, **kwargs):
    """Instantiate a torchvision data set, turning any failure into a one-line DataError."""
    try:
        return cls(*args, **kwargs)
    except Exception as exc:
        raise DataError(f"cannot read {title} from {folder}: {_short(exc)}") from exc


def _short(exc):
    """The most specific line of an exception's message (torchvision's download errors span lines)."""
    if isinstance(exc, URLError):
        return str(exc.reason)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    if text.startswith('<urlopen error ') and text.endswith('>'):
        text = text[len('<urlopen error '):-1]
    return text if len(text) <= 400 else text[:397] + '...'


# ---------------------------------------------------------------- loaders

class ShardSampler(DistributedSampler):
    """In order, each sample exactly once over all processes: rank r takes r, r + world_size, ...

    DistributedSampler pads an uneven set with repeats, which evaluation would
    count twice; here the shards differ in size by at most one.
    """

    def __init__(self, dataset, num_replicas=None, rank=None):
        """Shard dataset among num_replicas processes (default: those of the default group)."""
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(self._indices())

    def _indices(self):
        """This process's share of the indices."""
        return range(self.rank, len(self.dataset), self.num_replicas)

    def __iter__(self):
        """Iterate over this process's indices."""
        return iter(self._indices())


def build_loaders(train_set, test_set, train_batch, test_batch, workers, distributed=False, seed=0):
    """Return (train_loader, test_loader, train_sampler); train_sampler is None unless distributed."""
    common = dict(num_workers=workers, pin_memory=torch.cuda.is_available())
    if distributed:
        train_sampler = DistributedSampler(train_set, shuffle=True, seed=seed)
        test_sampler = ShardSampler(test_set)
        per_replica = len(train_sampler)
        train_args = dict(sampler=train_sampler)
    else:
        train_sampler = test_sampler = None
        per_replica = len(train_set)
        generator = torch.Generator()
        generator.manual_seed(seed)
        train_args = dict(shuffle=True, generator=generator)
    # A last training batch of one sample would make BatchNorm1d fail (one value per channel).
    drop_last = per_replica > train_batch and per_replica % train_batch == 1
    # Workers are not persistent: fresh ones each epoch draw their seeds from the loader's generator (or
    # torch's RNG) at every pass, so that a resumed run sees the same augmentation and random numbers.
    train_loader = DataLoader(train_set, batch_size=train_batch, drop_last=drop_last, **train_args, **common)
    test_loader = DataLoader(test_set, batch_size=test_batch, shuffle=False, sampler=test_sampler, **common)
    return train_loader, test_loader, train_sampler
