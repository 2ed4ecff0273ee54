"""N-MNIST: raw `.bin` events, the paper's text `.dat` files, frames, data set.

The paper trained on N-MNIST as preprocessed by TSSL-BP's MATLAB converter
(`NMNIST_Converter.m` + `stabilize.m`, two polarity channels, 3000 µs bins).
This module reads those text files, reads the official release's raw event
files, and reproduces the MATLAB preprocessing exactly, so both formats give
identical frames.

Text format: one line per input channel that has events, channels ascending,
`<channel>\\t<bin>\\t<bin>\\t...\\n`. Channel c in 1..2312 is
`1156·p + 34·x + y + 1` (p = 1 for ON events, x and y 0-based after
stabilisation); bin b = ceil(ts / 3000 µs). Frames are `(2, 34, 34, T)`
with bin b in 1..T at frame index b - 1; bin 0 and bins above T are dropped.

Longer than most modules: both file formats, the MATLAB preprocessing they
must agree on, and the checks of a data folder belong together.
"""

import hashlib
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

SIDE = 34
N_PIXELS = SIDE * SIDE
N_CHANNELS = 2 * N_PIXELS
BIN_US = 3000
SACCADE_US = 105000.0
EVENT_BYTES = 5
EVENT_DTYPE = np.dtype([("x", np.uint8), ("y", np.uint8), ("p", np.uint8), ("ts", np.uint32)])
SPLIT_NAMES = {True: ("Train", "train"), False: ("Test", "test")}
FORMAT_SUFFIX = {"text": ".dat", "raw": ".bin"}
# nmnist_convert keeps this file in OUT_DIR (holding RAW_DIR) until every file is written.
UNFINISHED_MARKER = "nmnist_convert.incomplete"
# Bump when the cache layout or the parsing rules change.
CACHE_VERSION = 1

_TAB, _NEWLINE, _CR, _SPACE = 9, 10, 13, 32
_MAX_DIGITS = 9  # keeps every number exact in int64 and far above any real bin


def read_bin(path):
    """Read a raw N-MNIST event file into a structured array (x, y, p, ts)."""
    data = np.fromfile(path, dtype=np.uint8)
    return decode_events(data, str(path))


def decode_events(data, name="<bytes>"):
    """Decode raw 5-byte events (x, y, polarity bit + 23-bit µs time)."""
    data = np.frombuffer(data, dtype=np.uint8)
    if data.size % EVENT_BYTES:
        raise ValueError(
            f"{name}: length {data.size} bytes is not a multiple of {EVENT_BYTES}"
            " (not an N-MNIST .bin event file)"
        )
    raw = data.reshape(-1, EVENT_BYTES)
    events = np.empty(len(raw), dtype=EVENT_DTYPE)
    events["x"] = raw[:, 0]
    events["y"] = raw[:, 1]
    events["p"] = raw[:, 2] >> 7
    b2, b3, b4 = (raw[:, i].astype(np.uint32) for i in (2, 3, 4))
    events["ts"] = ((b2 & 0x7F) << 16) | (b3 << 8) | b4
    return events


def _round_half_away(v):
    """Round to the nearest integer, halves away from zero (MATLAB's `round`)."""
    whole = np.trunc(v)
    # v - trunc(v) is exact in floating point, so the .5 test is exact too.
    step = np.where(np.abs(v - whole) >= 0.5, np.sign(v), 0.0)
    return (whole + step).astype(np.int64)


def _stabilized_xy(events):
    """1-based pixel coordinates with the three saccades undone (`stabilize.m`)."""
    ts = events["ts"].astype(np.float64)
    x = events["x"].astype(np.float64) + 1
    y = events["y"].astype(np.float64) + 1
    s1 = ts <= SACCADE_US
    s2 = (ts > SACCADE_US) & (ts <= 2 * SACCADE_US)
    s3 = ts > 2 * SACCADE_US
    # Same operation order as the MATLAB source, so .5 ties land identically.
    x[s1] = x[s1] - 3.5 * ts[s1] / SACCADE_US
    y[s1] = y[s1] - 7 * ts[s1] / SACCADE_US
    x[s2] = x[s2] - 3.5 - 3.5 * (ts[s2] - SACCADE_US) / SACCADE_US
    y[s2] = y[s2] - 7 + 7 * (ts[s2] - SACCADE_US) / SACCADE_US
    x[s3] = x[s3] - 7 + 7 * (ts[s3] - 2 * SACCADE_US) / SACCADE_US
    return _round_half_away(x), _round_half_away(y)


def events_to_channel_bins(events):
    """Apply the paper's preprocessing to raw events; return (channels, bins) in text-file order.

    Channels are 1..2312 ascending, each channel's bins in event order with
    repeats kept: exactly the numbers of the `.dat` file, read line by line.
    """
    x, y = _stabilized_xy(events)
    keep = (x >= 1) & (y >= 1) & (x <= SIDE) & (y <= SIDE)
    p = events["p"][keep].astype(np.int64)
    channels = (x[keep] - 1) * SIDE + y[keep] + N_PIXELS * p
    ts = events["ts"][keep].astype(np.int64)
    bins = -(-ts // BIN_US)
    order = np.argsort(channels, kind="stable")
    return channels[order], bins[order]


def format_dat(channels, bins):
    """Text-file content for channel-grouped (channels, bins): a line per channel, a tab after each number."""
    channels = np.asarray(channels)
    if channels.size == 0:
        return ""
    starts = np.flatnonzero(np.r_[True, channels[1:] != channels[:-1]])
    bounds = np.r_[starts, channels.size].tolist()
    heads = channels[starts].tolist()
    values = np.asarray(bins).tolist()
    lines = [
        f"{channel}\t" + "\t".join(map(str, values[lo:hi])) + "\t\n"
        for channel, lo, hi in zip(heads, bounds[:-1], bounds[1:])
    ]
    return "".join(lines)


def convert_bin(path):
    """Text-file content the paper's MATLAB preprocessing writes for one raw `.bin` file."""
    return format_dat(*events_to_channel_bins(read_bin(path)))


def _line_of(buf, pos):
    """1-based line number of byte position pos."""
    return int(np.count_nonzero(buf[:pos] == _NEWLINE)) + 1


def _line_text(buf, line):
    """Text of a 1-based line, shortened for error messages."""
    text = bytes(buf).split(b"\n")[line - 1].decode("latin-1").rstrip("\r")
    return text if len(text) <= 60 else text[:57] + "..."


def parse_dat(data, name="<text>"):
    """Parse text-format content into (channels, bins) int64 arrays in file order.

    Vectorised over the bytes: the data set has 70,000 files of ~1,500 lines.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    digit = (buf >= ord("0")) & (buf <= ord("9"))
    blank = (buf == _TAB) | (buf == _NEWLINE) | (buf == _CR) | (buf == _SPACE)
    bad = ~(digit | blank)
    if bad.any():
        line = _line_of(buf, int(np.argmax(bad)))
        raise ValueError(f"{name}: line {line} is not a list of integers: {_line_text(buf, line)!r}")
    empty = np.empty(0, dtype=np.int64)
    if not digit.any():
        return empty, empty
    before = np.r_[False, digit[:-1]]
    after = np.r_[digit[1:], False]
    starts = np.flatnonzero(digit & ~before)
    lengths = np.flatnonzero(digit & ~after) + 1 - starts
    if lengths.max() > _MAX_DIGITS:
        line = _line_of(buf, int(starts[np.argmax(lengths)]))
        raise ValueError(f"{name}: line {line} holds a number with more than {_MAX_DIGITS} digits")
    digits = buf[digit].astype(np.int64) - ord("0")
    token_ends = np.cumsum(lengths)
    power = np.repeat(token_ends, lengths) - 1 - np.arange(digits.size)
    values = np.add.reduceat(digits * 10**power, token_ends - lengths)
    line_of_token = np.cumsum(buf == _NEWLINE)[starts]
    first = np.r_[True, line_of_token[1:] != line_of_token[:-1]]
    heads = values[first]
    wrong = (heads < 1) | (heads > N_CHANNELS)
    if wrong.any():
        at = int(np.argmax(wrong))
        line = int(line_of_token[first][at]) + 1
        raise ValueError(f"{name}: line {line}: channel {heads[at]} is outside 1..{N_CHANNELS}")
    owner = np.maximum.accumulate(np.where(first, np.arange(values.size), 0))
    return values[owner][~first], values[~first]


def read_dat(path):
    """Read one text-format `.dat` file into (channels, bins)."""
    with open(path, "rb") as f:
        return parse_dat(f.read(), str(path))


def read_sample(path):
    """(channels, bins) of a `.dat` text file or of a raw `.bin` file converted in memory."""
    suffix = Path(path).suffix
    if suffix == ".dat":
        return read_dat(path)
    if suffix == ".bin":
        return events_to_channel_bins(read_bin(path))
    raise ValueError(f"{path}: unknown N-MNIST file type {suffix!r} (expected .dat or .bin)")


def frames_from_bins(channels, bins, time_step):
    """Dense float32 frames (2, 34, 34, T): bin b in 1..T sets frame b - 1 of its channel."""
    channels = np.asarray(channels, dtype=np.int64)
    bins = np.asarray(bins, dtype=np.int64)
    if channels.size and (channels.min() < 1 or channels.max() > N_CHANNELS):
        raise ValueError(f"channel numbers must lie in 1..{N_CHANNELS}")
    keep = (bins >= 1) & (bins <= time_step)
    # Channel - 1 is the C-order index into (2, 34, 34), so one flat scatter does it.
    flat = (channels[keep] - 1) * time_step + (bins[keep] - 1)
    frames = np.zeros(N_CHANNELS * time_step, dtype=np.float32)
    frames[flat] = 1.0
    return torch.from_numpy(frames).view(2, SIDE, SIDE, time_step)


def find_split_dir(root, train):
    """The `Train`/`train` (or `Test`/`test`) folder under root, or None; ValueError if both exist."""
    found = [Path(root) / name for name in SPLIT_NAMES[bool(train)] if (Path(root) / name).is_dir()]
    # On a case-insensitive file system both names find the same folder.
    if len(found) == 2 and not os.path.samefile(*found):
        raise ValueError(
            f"{root} holds both {found[0].name}/ and {found[1].name}/: reading one would drop the"
            f" other's files; merge them into {found[0].name}/"
        )
    return found[0] if found else None


def _digit_files(split_dir, suffix):
    """[(path, label, size, mtime_ns)] of split_dir/<digit>/*suffix, in natural name order."""
    found = []
    for label in range(10):
        folder = split_dir / str(label)
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            files = [e for e in entries if e.name.endswith(suffix) and e.is_file()]
        files.sort(key=lambda e: _natural_key(e.name))
        for e in files:
            st = e.stat()
            found.append((Path(e.path), label, st.st_size, st.st_mtime_ns))
    return found


def _natural_key(name):
    """Sort key putting `2.dat` before `10.dat`."""
    stem = name.rsplit(".", 1)[0]
    return (0, int(stem), name) if stem.isdigit() else (1, 0, name)


def _split_files(split_dir):
    """(format, files) of one split; ValueError if it holds both formats, files [] if neither."""
    found = {fmt: _digit_files(split_dir, suffix) for fmt, suffix in FORMAT_SUFFIX.items()}
    if all(found.values()):
        # Reading either format alone would silently drop the other's samples.
        counts = " and ".join(f"{len(found[fmt])} {suffix}" for fmt, suffix in FORMAT_SUFFIX.items())
        raise ValueError(
            f"{split_dir} holds both {counts} files (a conversion in place?); keep one format per split:"
            " convert with `python -m utils.data.nmnist_convert RAW_DIR OUT_DIR` into another folder and read that"
        )
    for fmt, files in found.items():
        if files:
            return fmt, files
    return None, []


def _refuse_unfinished_conversion(root):
    """ValueError if nmnist_convert's marker says the conversion into root did not finish."""
    marker = Path(root) / UNFINISHED_MARKER
    if not marker.is_file():
        return
    try:
        raw_dir = marker.read_text(encoding="utf-8").strip() or "RAW_DIR"
    except (OSError, UnicodeDecodeError):
        raw_dir = "RAW_DIR"
    raise ValueError(
        f"the conversion into {root} did not finish ({UNFINISHED_MARKER} is there), so some files are missing;"
        f" complete it with `python -m utils.data.nmnist_convert {raw_dir} {root} --resume`"
    )


def _layout_error(root):
    """The error for a root that holds neither N-MNIST layout."""
    return FileNotFoundError(
        f"no N-MNIST data found in {root}: expected the text layout "
        "Train/0..9/*.dat and Test/0..9/*.dat (the paper's preprocessed files) "
        "or the raw layout Train/0..9/*.bin and Test/0..9/*.bin (official release)"
    )


def _cache_key(root, fmt, files):
    """Hash of the format, sorted file list, sizes and mtimes: changes when any source changes."""
    h = hashlib.sha256(f"nmnist-cache-v{CACHE_VERSION}\n{fmt}\n".encode())
    for path, _, size, mtime in files:
        h.update(f"{path.relative_to(root)}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()


def _smallest_uint(values):
    """Values in the smallest unsigned dtype that holds them (keeps the cache compact)."""
    top = int(values.max()) if values.size else 0
    for dtype in (np.uint8, np.uint16):
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    # Bins have at most 9 digits (parse_dat) or 23 bits of µs / 3000 (raw files).
    return values.astype(np.uint32)


def _parse_all(files):
    """Parse every file into packed arrays: channels, bins, offsets, labels."""
    parts = [read_sample(path) for path, *_ in files]
    lengths = np.array([len(c) for c, _ in parts], dtype=np.int64)
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    empty = np.empty(0, dtype=np.int64)
    return {
        "channels": np.concatenate([c for c, _ in parts] + [empty]).astype(np.uint16),
        "bins": _smallest_uint(np.concatenate([b for _, b in parts] + [empty])),
        "offsets": offsets,
        "labels": np.array([label for _, label, *_ in files], dtype=np.int64),
    }


def _load_cache(path, key):
    """Cached arrays when path holds a readable cache for key, else None."""
    try:
        with np.load(path) as z:
            if str(z["key"]) != key:
                return None
            return {name: z[name] for name in ("channels", "bins", "offsets", "labels")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write_cache(path, key, arrays):
    """Write the cache atomically, so a crash or a concurrent reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NMNIST(Dataset):
    """N-MNIST from the paper's text files or the raw release: (frames (2, 34, 34, T) float32, label).

    The format is detected from the files under root. Parsed samples are
    cached once per split as packed (channel, bin) arrays in
    `root/nmnist_<split>.cache.npz`, independent of T and rebuilt whenever
    the source files' names, sizes or mtimes change; an unwritable root just
    means no cache, and `cache=False` skips it.
    """

    def __init__(self, root, train=True, time_step=30, cache=True):
        if not isinstance(time_step, int) or time_step < 1:
            raise ValueError(f"time_step must be a positive integer, got {time_step!r}")
        self.root = Path(root)
        self.train = train
        self.time_step = time_step
        _refuse_unfinished_conversion(self.root)
        split_dir = find_split_dir(self.root, train)
        if split_dir is None:
            raise _layout_error(self.root)
        fmt, files = _split_files(split_dir)
        if not files:
            raise _layout_error(self.root)
        self.format = fmt
        self.files = [path for path, *_ in files]
        split = "train" if train else "test"
        self.cache_path = self.root / f"nmnist_{split}.cache.npz" if cache else None
        self._data = self._load(files)
        self.labels = self._data["labels"]

    def _load(self, files):
        """Packed arrays from the cache, or parsed from the files (then cached)."""
        if self.cache_path is None:
            return _parse_all(files)
        key = _cache_key(self.root, self.format, files)
        data = _load_cache(self.cache_path, key)
        if data is None:
            data = _parse_all(files)
            try:
                _write_cache(self.cache_path, key, data)
            except OSError as err:
                warnings.warn(f"N-MNIST cache not written ({err}); samples are parsed again next time")
                self.cache_path = None
        return data

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        lo, hi = self._data["offsets"][index : index + 2]
        frames = frames_from_bins(self._data["channels"][lo:hi], self._data["bins"][lo:hi], self.time_step)
        return frames, int(self.labels[index])
