"""Data sets from the real on-disk formats, their error messages, and the loaders."""
import os
import pickle
import socket
import sys
import types
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision

from tools import fakedata
from utils.data import datasets as data
from utils.data.datasets import DataError, build_loaders, get_datasets

MNIST_KINDS = {'mnist': 'MNIST', 'fashionmnist': 'FashionMNIST'}


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    """A data folder holding every fake data set."""
    path = str(tmp_path_factory.mktemp('data'))
    for kind in MNIST_KINDS.values():
        fakedata.make_mnist(path, kind=kind)
    fakedata.make_cifar(path, num_classes=10)
    fakedata.make_cifar(path, num_classes=100)
    return path


def read_idx(path, header_bytes):
    """Raw uint8 payload of an IDX file."""
    return np.fromfile(path, dtype=np.uint8, offset=header_bytes)


def read_pickle(path, encoding='latin1'):
    """Load a CIFAR pickle the way torchvision does."""
    with open(path, 'rb') as f:
        return pickle.load(f, encoding=encoding)


@pytest.mark.parametrize('name', sorted(MNIST_KINDS))
def test_mnist_like_loads_normalised_images(root, name):
    train, test, num_classes = get_datasets(name, root)
    raw = os.path.join(root, MNIST_KINDS[name], 'raw')
    assert (len(train), len(test), num_classes) == (64, 32, 10)
    pixels = read_idx(os.path.join(raw, 't10k-images-idx3-ubyte'), 16).reshape(-1, 28, 28)
    labels = read_idx(os.path.join(raw, 't10k-labels-idx1-ubyte'), 8)
    for i in (0, 31):
        image, label = test[i]
        assert image.shape == (1, 28, 28) and image.dtype == torch.float32
        expected = (torch.from_numpy(pixels[i]).float() / 255 - 0.1307) / 0.3081
        torch.testing.assert_close(image[0], expected)
        assert label == labels[i]
    assert sorted({train[i][1] for i in range(len(train))}) == list(range(10))


def test_cifar10_loads_with_paper_transforms(root):
    train, test, num_classes = get_datasets('cifar10', root)
    assert (len(train), len(test), num_classes) == (64, 32, 10)
    batch = read_pickle(os.path.join(root, 'cifar-10-batches-py', 'test_batch'))
    image, label = test[5]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    chw = torch.from_numpy(batch['data'][5].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(3, 1, 1)
    torch.testing.assert_close(image, (chw - mean) / std)
    assert label == batch['labels'][5]
    # Training labels come from the five batches in order.
    labels = sum((read_pickle(os.path.join(root, 'cifar-10-batches-py', f'data_batch_{i}'))['labels']
                  for i in range(1, 6)), [])
    assert train.targets == labels


def test_cifar_training_images_are_augmented_test_images_not(root):
    train, test, _ = get_datasets('cifar10', root)
    torch.manual_seed(0)
    train_views = torch.stack([train[0][0] for _ in range(8)])
    assert train_views.shape == (8, 3, 32, 32)
    assert len(torch.unique(train_views.flatten(1), dim=0)) > 1
    torch.testing.assert_close(test[0][0], test[0][0])


def test_cifar100_has_100_classes_and_fine_labels(root):
    train, test, num_classes = get_datasets('cifar100', root)
    assert num_classes == 100
    assert (len(train), len(test)) == (64, 32)
    fine = read_pickle(os.path.join(root, 'cifar-100-python', 'train'))['fine_labels']
    assert [train[i][1] for i in range(len(train))] == fine
    assert max(fine) >= 20  # fine, not coarse, labels


def test_fake_cifar_pickles_read_like_the_originals(root):
    path = os.path.join(root, 'cifar-10-batches-py', 'data_batch_1')
    assert set(read_pickle(path, encoding='bytes')) == {b'batch_label', b'data', b'filenames', b'labels'}
    entry = read_pickle(path)
    assert entry['data'].dtype == np.uint8 and entry['data'].shape[1] == 3072
    # torchvision itself refuses files whose md5 differs from the original archive's.
    with pytest.raises(RuntimeError):
        torchvision.datasets.CIFAR10(root)


def test_fake_mnist_is_learnable(root):
    train, test, _ = get_datasets('mnist', root)
    x_train = torch.stack([x for x, _ in train]).flatten(1)
    y_train = torch.tensor([y for _, y in train])
    centroids = torch.stack([x_train[y_train == c].mean(0) for c in range(10)])
    hits = [int(torch.cdist(x.flatten()[None], centroids).argmin()) == y for x, y in test]
    assert np.mean(hits) > 0.8


def test_digits_split_is_stratified_deterministic_and_normalised():
    train, test, num_classes = get_datasets('digits', 'unused')
    assert (len(train), len(test), num_classes) == (1347, 450, 10)
    images, labels = train.tensors
    assert images.shape == (1347, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    assert images.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert images.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-5)
    counts_train = torch.bincount(labels, minlength=10).float()
    counts_test = torch.bincount(test.tensors[1], minlength=10).float()
    share = (counts_train + counts_test) / 1797
    assert torch.all((counts_test - 450 * share).abs() <= 1)
    again, again_test, _ = get_datasets('digits', 'unused')
    assert torch.equal(again.tensors[0], images) and torch.equal(again_test.tensors[1], test.tensors[1])


@pytest.mark.parametrize('name, folder', [('mnist', 'MNIST/raw'), ('fashionmnist', 'FashionMNIST/raw'),
                                          ('cifar10', 'cifar-10-batches-py'), ('cifar100', 'cifar-100-python')])
def test_missing_data_names_the_folder(tmp_path, name, folder):
    with pytest.raises(DataError) as info:
        get_datasets(name, str(tmp_path), download=False)
    message = str(info.value)
    assert os.path.join(str(tmp_path), folder) in message and '\n' not in message


def test_failed_download_gives_one_line_with_the_reason(tmp_path, monkeypatch):
    seen = []

    def offline(self):
        seen.append(socket.getdefaulttimeout())
        raise RuntimeError('Error downloading x.gz:\nTried http://mirror/, got:\n<urlopen error no route>\n')

    monkeypatch.setattr(torchvision.datasets.MNIST, 'download', offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(DataError) as info:
        get_datasets('mnist', str(tmp_path))
    message = str(info.value)
    assert message.endswith('download failed: no route') and '\n' not in message
    assert 'train-images-idx3-ubyte[.gz]' in message
    assert seen == [data.DOWNLOAD_TIMEOUT_S] and socket.getdefaulttimeout() == before


def test_cifar_download_failure_is_reported(tmp_path, monkeypatch):
    def offline(self):
        raise URLError(OSError('name resolution failed'))

    monkeypatch.setattr(torchvision.datasets.CIFAR10, 'download', offline)
    with pytest.raises(DataError, match='download failed: name resolution failed$'):
        get_datasets('cifar10', str(tmp_path))


def test_download_that_provides_the_files_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.MNIST, 'download', lambda self: fakedata.make_mnist(self.root))
    train, test, _ = get_datasets('mnist', str(tmp_path))
    assert (len(train), len(test)) == (64, 32)


def test_gzipped_idx_files_are_unpacked(tmp_path):
    import gzip

    raw = fakedata.make_mnist(str(tmp_path), n_train=20, n_test=10)
    for name in os.listdir(raw):
        with open(os.path.join(raw, name), 'rb') as src, gzip.open(os.path.join(raw, name + '.gz'), 'wb') as dst:
            dst.write(src.read())
        os.remove(os.path.join(raw, name))
    train, test, _ = get_datasets('mnist', str(tmp_path), download=False)
    assert (len(train), len(test)) == (20, 10)


def overwrite_start(path, data):
    """Write data over the first bytes of a file."""
    with open(path, 'r+b') as f:
        f.write(data)


def append_bytes(path, data):
    """Add bytes at the end of a file."""
    with open(path, 'ab') as f:
        f.write(data)


def drop_key(path, key):
    """Re-pickle a CIFAR file without one of its entries."""
    entry = {k.encode(): v for k, v in read_pickle(path).items() if k != key}
    fakedata.write_cifar_pickle(path, entry)


def replace_with(path, data):
    """Replace a file's contents."""
    with open(path, 'wb') as f:
        f.write(data)


MNIST_RAW = ('MNIST', 'raw')
CIFAR10_DIR = ('cifar-10-batches-py',)
CIFAR100_DIR = ('cifar-100-python',)
# (data set, folder under the root, file, how it is damaged, what the message says)
MALFORMED = [
    ('mnist', MNIST_RAW, 'train-images-idx3-ubyte', lambda p: overwrite_start(p, b'\x00\x00\x08\x02'),
     'bad IDX magic number 0x00000802'),
    ('mnist', MNIST_RAW, 't10k-images-idx3-ubyte', lambda p: append_bytes(p, b'\x00' * 7), 'implies'),
    ('mnist', MNIST_RAW, 'train-labels-idx1-ubyte',
     lambda p: fakedata.write_idx(p, np.zeros(63, dtype=np.uint8)), '63 labels for 64 images'),
    ('cifar10', CIFAR10_DIR, 'data_batch_3',
     lambda p: fakedata.write_cifar_pickle(p, {b'batch_label': b'x', b'labels': [1, 2]}), "no 'data' entry"),
    ('cifar100', CIFAR100_DIR, 'test', lambda p: drop_key(p, 'fine_labels'), "no 'fine_labels' entry"),
    ('cifar10', CIFAR10_DIR, 'test_batch', lambda p: replace_with(p, b'not a pickle'), 'not a readable pickle'),
]


@pytest.mark.parametrize('name, folder, filename, damage, message', MALFORMED,
                         ids=[f'{case[0]}-{case[2]}-{case[4][:12]}' for case in MALFORMED])
def test_malformed_file_is_named_in_one_data_error(tmp_path, name, folder, filename, damage, message):
    """A damaged IDX or CIFAR file stops loading with a DataError that names the file and the problem."""
    if name == 'mnist':
        fakedata.make_mnist(str(tmp_path))
    else:
        fakedata.make_cifar(str(tmp_path), num_classes=100 if name == 'cifar100' else 10)
    path = os.path.join(str(tmp_path), *folder, filename)
    damage(path)
    with pytest.raises(DataError, match=message) as info:
        get_datasets(name, str(tmp_path), download=False)
    assert path in str(info.value) and '\n' not in str(info.value)

def test_unknown_name_is_a_data_error():
    with pytest.raises(DataError, match='unknown data set'):
        get_datasets('imagenet', 'unused')


def test_nmnist_is_delegated_and_its_errors_become_data_errors(monkeypatch):
    calls = []

    class FakeNMNIST:
        def __init__(self, root, train, time_step):
            calls.append((root, train, time_step))
            if root == 'missing':
                raise FileNotFoundError(f'no Train/ or Test/ under {root}')

    module = types.ModuleType('utils.data.nmnist')
    module.NMNIST = FakeNMNIST
    monkeypatch.setitem(sys.modules, 'utils.data.nmnist', module)
    train, test, num_classes = get_datasets('nmnist', 'there', time_step=7)
    assert isinstance(train, FakeNMNIST) and isinstance(test, FakeNMNIST) and num_classes == 10
    assert calls == [('there', True, 7), ('there', False, 7)]
    with pytest.raises(DataError, match='no Train/ or Test/ under missing'):
        get_datasets('nmnist', 'missing')


def labels_in_order(loader):
    """All labels of one pass over a loader."""
    return torch.cat([y for _, y in loader]).tolist()


def test_loaders_repeat_their_order_for_a_seed():
    train, test, _ = get_datasets('digits', 'unused')
    first = labels_in_order(build_loaders(train, test, 128, 200, 0, seed=3)[0])
    second = labels_in_order(build_loaders(train, test, 128, 200, 0, seed=3)[0])
    other = labels_in_order(build_loaders(train, test, 128, 200, 0, seed=4)[0])
    assert first == second != other
    assert sorted(first) == sorted(train.tensors[1].tolist())
    train_loader, test_loader, sampler = build_loaders(train, test, 128, 200, 0, seed=3)
    assert sampler is None and not train_loader.persistent_workers
    assert train_loader.pin_memory == torch.cuda.is_available()
    assert labels_in_order(test_loader) == test.tensors[1].tolist()


def test_loaders_never_end_with_a_single_sample_batch():
    train, test, _ = get_datasets('digits', 'unused')
    loader = build_loaders(train, test, 673, 200, 0)[0]  # 1347 = 2 * 673 + 1
    assert [len(y) for _, y in loader] == [673, 673]
    assert [len(y) for _, y in build_loaders(train, test, 674, 200, 0)[0]] == [674, 673]


def test_distributed_loaders_use_distributed_samplers(tmp_path):
    from torch import distributed as dist
    from torch.utils.data.distributed import DistributedSampler

    train, test, _ = get_datasets('digits', 'unused')
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        train_loader, test_loader, sampler = build_loaders(train, test, 128, 200, 0, distributed=True, seed=1)
        assert isinstance(sampler, DistributedSampler) and train_loader.sampler is sampler
        assert isinstance(test_loader.sampler, DistributedSampler)
        assert labels_in_order(test_loader) == test.tensors[1].tolist()
        assert sorted(labels_in_order(train_loader)) == sorted(train.tensors[1].tolist())
    finally:
        dist.destroy_process_group()
