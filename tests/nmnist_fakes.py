"""Tiny N-MNIST data sets in both on-disk formats, for tests that must not download anything."""

import tempfile
from pathlib import Path

import numpy as np

from utils.data import nmnist_convert

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
