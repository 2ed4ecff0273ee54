"""Convert the raw N-MNIST release to the paper's text layout, without MATLAB.

    python -m utils.nmnist_convert RAW_DIR OUT_DIR [-j N]

RAW_DIR holds `Train|Test/<digit>/<nnnnn>.bin` (lowercase split names are
accepted too); OUT_DIR receives `Train|Test/<digit>/<k>.dat`, k = 1, 2, ...
in sorted order of the `.bin` names of each digit folder, exactly as
TSSL-BP's `NMNIST_Converter.m` (2 channels, 3000 µs bins, stabilised).
Existing output files are never overwritten.
"""

import argparse
import multiprocessing
import sys
from pathlib import Path

from utils import nmnist


class ConvertError(Exception):
    """A problem with the command's input or output folders."""


def plan(raw_dir, out_dir):
    """[(source .bin, target .dat)] for a raw release tree, checked before anything is written."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise ConvertError(f"RAW_DIR {raw_dir} does not exist or is not a folder")
    pairs = []
    for train in (True, False):
        split_dir = nmnist.find_split_dir(raw_dir, train)
        if split_dir is None:
            continue
        out_split = out_dir / nmnist.SPLIT_NAMES[train][0]
        for digit in range(10):
            folder = split_dir / str(digit)
            if not folder.is_dir():
                continue
            names = sorted(p.name for p in folder.iterdir() if p.suffix == ".bin" and p.is_file())
            pairs += [(folder / name, out_split / str(digit) / f"{k}.dat") for k, name in enumerate(names, 1)]
    if not pairs:
        raise ConvertError(f"no .bin files in {raw_dir}: expected Train/0..9/*.bin and/or Test/0..9/*.bin")
    _check_sizes(pairs)
    _check_free(pairs)
    return pairs


def _check_sizes(pairs):
    """Refuse truncated event files before any output is written."""
    for src, _ in pairs:
        size = src.stat().st_size
        if size % nmnist.EVENT_BYTES:
            raise ConvertError(f"{src}: length {size} bytes is not a multiple of {nmnist.EVENT_BYTES}")


def _check_free(pairs):
    """Refuse to run when any target file already exists."""
    taken = [dst for _, dst in pairs if dst.exists()]
    if taken:
        raise ConvertError(
            f"OUT_DIR already holds {len(taken)} of the {len(pairs)} files to write"
            f" (first: {taken[0]}); refusing to overwrite"
        )


def convert_file(pair):
    """Convert one .bin file to its .dat file; 'x' mode so an existing file is never replaced."""
    src, dst = pair
    text = nmnist.convert_bin(src)
    with open(dst, "x", newline="\n") as f:
        f.write(text)


def convert_tree(raw_dir, out_dir, jobs=1, progress=None):
    """Convert a whole raw release tree; returns the number of files written."""
    pairs = plan(raw_dir, out_dir)
    for folder in sorted({dst.parent for _, dst in pairs}):
        folder.mkdir(parents=True, exist_ok=True)
    if jobs > 1:
        with multiprocessing.Pool(jobs) as pool:
            _run(pool.imap_unordered(convert_file, pairs, chunksize=64), len(pairs), progress)
    else:
        _run(map(convert_file, pairs), len(pairs), progress)
    return len(pairs)


def _run(results, total, progress):
    """Drain the conversions, reporting (done, total) about twenty times."""
    every = max(1, total // 20)
    for done, _ in enumerate(results, 1):
        if progress is not None and (done % every == 0 or done == total):
            progress(done, total)


def _print_progress(done, total):
    """Progress line on stderr."""
    print(f"converted {done}/{total}", file=sys.stderr, flush=True)


def main(argv=None):
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.nmnist_convert",
        description="Convert raw N-MNIST .bin files to the paper's text .dat layout"
        " (2312 channels, 3000 us bins, stabilised).",
    )
    parser.add_argument("raw_dir", metavar="RAW_DIR", help="raw release folder: Train|Test/<digit>/*.bin")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder for Train|Test/<digit>/<k>.dat")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="worker processes (default 1)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("-j/--jobs must be at least 1")
    try:
        count = convert_tree(args.raw_dir, args.out_dir, args.jobs, _print_progress)
    except (ConvertError, ValueError, OSError) as err:
        print(f"nmnist_convert: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {count} files to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
