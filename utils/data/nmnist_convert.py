"""Convert the raw N-MNIST release to the paper's text layout, without MATLAB.

    python -m utils.data.nmnist_convert RAW_DIR OUT_DIR [-j N] [--resume]

RAW_DIR holds `Train|Test/<digit>/<nnnnn>.bin` (lowercase split names are
accepted too); OUT_DIR receives `Train|Test/<digit>/<k>.dat`, k = 1, 2, ...
in sorted order of the `.bin` names of each digit folder, exactly as
TSSL-BP's `NMNIST_Converter.m` (2 channels, 3000 µs bins, stabilised).

Existing output files are never overwritten. Each file is written to a
temporary name and renamed when complete, so a file under its final name is
always whole; until the last one is written, OUT_DIR holds the marker
`nmnist_convert.incomplete`, which the data set reader refuses. After Ctrl-C
(exit 130) or SIGTERM (143), `--resume` keeps the complete files and converts
the rest.
"""

import argparse
import multiprocessing
import signal
import sys
from collections import defaultdict
from pathlib import Path

from utils import files, signals
from utils.data import nmnist

class ConvertError(Exception):
    """A problem with the command's input or output folders."""


def plan(raw_dir, out_dir):
    """[(source .bin, target .dat)] for a raw release tree, checked before anything is written."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    if not raw_dir.is_dir():
        raise ConvertError(f"RAW_DIR {raw_dir} does not exist or is not a folder")
    if out_dir.resolve() == raw_dir.resolve():
        raise ConvertError(
            f"OUT_DIR is RAW_DIR ({raw_dir}): the data set reader refuses splits holding both"
            " .bin and .dat files; choose another OUT_DIR"
        )
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
    return pairs


def _check_sizes(pairs):
    """Refuse truncated event files before any output is written."""
    for src, _ in pairs:
        size = src.stat().st_size
        if size % nmnist.EVENT_BYTES:
            raise ConvertError(f"{src}: length {size} bytes is not a multiple of {nmnist.EVENT_BYTES}")


def pending(pairs, raw_dir, out_dir, resume=False):
    """The pairs whose target is still missing; without resume, ConvertError if any target exists."""
    taken = [dst for _, dst in pairs if dst.exists()]
    if resume:
        _check_same_source(raw_dir, out_dir)
        return [(src, dst) for src, dst in pairs if not dst.exists()]
    if taken:
        raise ConvertError(
            f"OUT_DIR already holds {len(taken)} of the {len(pairs)} files to write (first: {taken[0]});"
            f" refusing to overwrite; to finish an interrupted conversion run the same command with"
            f" --resume (complete files are kept, the rest converted)"
        )
    return pairs


def _check_same_source(raw_dir, out_dir):
    """Refuse to resume another RAW_DIR's unfinished conversion (its files are numbered from other names)."""
    marker = Path(out_dir) / nmnist.UNFINISHED_MARKER
    try:
        started = marker.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError) as err:
        raise ConvertError(f"cannot read {marker}: {err}") from err
    if started and Path(started).resolve() != Path(raw_dir).resolve():
        raise ConvertError(f"OUT_DIR {out_dir} holds an unfinished conversion of {started}, not of {raw_dir}")


def convert_file(pair):
    """Convert one .bin file to its .dat file, written atomically (a temporary renamed when complete)."""
    src, dst = pair
    text = nmnist.convert_bin(src)
    files.atomic_write(dst, lambda f: f.write(text.encode("ascii")))


def convert_tree(raw_dir, out_dir, jobs=1, progress=None, resume=False):
    """Convert a whole raw release tree; returns the number of files written (fewer when resuming)."""
    pairs = plan(raw_dir, out_dir)
    todo = pending(pairs, raw_dir, out_dir, resume)
    marker = Path(out_dir) / nmnist.UNFINISHED_MARKER
    folders = _targets_by_folder(pairs)
    try:
        _remove_temporaries(folders)
        if todo:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            files.atomic_write_text(marker, f"{Path(raw_dir).resolve()}\n")
            for folder in sorted({dst.parent for _, dst in todo}):
                folder.mkdir(parents=True, exist_ok=True)
            _convert_all(todo, jobs, progress)
        marker.unlink(missing_ok=True)
    finally:
        # Workers ended mid-write (Ctrl-C, an error) leave their temporaries behind.
        _remove_temporaries(folders)
    return len(todo)


def _convert_all(pairs, jobs, progress):
    """Convert every pair, in worker processes when jobs > 1."""
    if jobs > 1:
        with multiprocessing.Pool(jobs, initializer=_worker_signals) as pool:
            # Leaving the block terminates the workers, so none writes after an interruption.
            _run(pool.imap_unordered(convert_file, pairs, chunksize=64), len(pairs), progress)
    else:
        _run(map(convert_file, pairs), len(pairs), progress)


def _worker_signals():
    """Workers leave Ctrl-C to the parent (which terminates them) and die at once on SIGTERM."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _targets_by_folder(pairs):
    """{output folder: [target file names]}."""
    folders = defaultdict(list)
    for _, dst in pairs:
        folders[dst.parent].append(dst.name)
    return folders


def _remove_temporaries(folders):
    """Delete the temporaries a stopped write of a target file left behind."""
    for folder, names in folders.items():
        for path in files.stale_temporaries(folder, names):
            Path(path).unlink(missing_ok=True)


def count_complete(raw_dir, out_dir):
    """(complete target files, all target files) of a conversion."""
    pairs = plan(raw_dir, out_dir)
    return sum(dst.exists() for _, dst in pairs), len(pairs)


def _run(results, total, progress):
    """Drain the conversions, reporting (done, total) about twenty times."""
    every = max(1, total // 20)
    for done, _ in enumerate(results, 1):
        if progress is not None and (done % every == 0 or done == total):
            progress(done, total)


def _print_progress(done, total):
    """Progress line on stderr."""
    print(f"converted {done}/{total}", file=sys.stderr, flush=True)


def _interrupted_message(args):
    """One line: how far the conversion got and the command that finishes it."""
    try:
        complete, total = count_complete(args.raw_dir, args.out_dir)
        got = f"{complete} of the {total} files are complete in {args.out_dir}"
    except (ConvertError, OSError):
        got = f"the complete files stay in {args.out_dir}"
    jobs = f" -j {args.jobs}" if args.jobs > 1 else ""
    return (
        f"nmnist_convert: interrupted; {got}; continue with:"
        f" python -m utils.data.nmnist_convert {args.raw_dir} {args.out_dir}{jobs} --resume"
    )


def main(argv=None):
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.data.nmnist_convert",
        description="Convert raw N-MNIST .bin files to the paper's text .dat layout"
        " (2312 channels, 3000 us bins, stabilised).",
    )
    parser.add_argument("raw_dir", metavar="RAW_DIR", help="raw release folder: Train|Test/<digit>/*.bin")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder for Train|Test/<digit>/<k>.dat")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted conversion: keep the files already in OUT_DIR, convert the rest",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("-j/--jobs must be at least 1")
    try:
        with signals.interrupting():
            count = convert_tree(args.raw_dir, args.out_dir, args.jobs, _print_progress, args.resume)
    except signals.Interrupted as stop:
        print(_interrupted_message(args), file=sys.stderr)
        return 128 + stop.signum
    except (ConvertError, files.CheckpointError, ValueError, OSError) as err:
        print(f"nmnist_convert: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {count} files to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
