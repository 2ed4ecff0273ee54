"""N-MNIST data layer: raw reader, MATLAB-exact conversion, text reader, frames, data set, converter CLI.

Expected text outputs are worked out by hand from the paper's preprocessing (its MATLAB
conversion): x = x0 + 1, y = y0 + 1, saccade shift, round half away from
zero, channel (x-1)·34 + y (+1156 for ON), bin ceil(ts / 3000).
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import REPO
from tests.nmnist_fakes import make_nmnist_tree, random_events, write_bin, write_raw_tree
from utils.data import nmnist
from utils.data.datasets import DataError, get_datasets
from utils.data.nmnist_convert import convert_tree, main as convert_main

# A real recording in the official raw format (e.g. one file of the N-MNIST release, or the sample the tonic
# library ships for its tests), named by the NMNIST_SAMPLE environment variable; its tests skip without one.
SAMPLE = Path(os.environ.get("NMNIST_SAMPLE", ""))
needs_sample = pytest.mark.skipif(not SAMPLE.is_file(), reason="set NMNIST_SAMPLE to a real N-MNIST .bin recording")

ON, OFF = 1, 0


def converted(tmp_path, events, name="s.bin"):
    """Text content the converter produces for a hand-made event list."""
    return nmnist.convert_bin(write_bin(tmp_path / name, events))


# --- raw reader -------------------------------------------------------------


def test_read_bin_decodes_all_fields(tmp_path):
    events = [(0, 33, ON, 0), (33, 0, OFF, (1 << 23) - 1), (7, 9, ON, 0x12345)]
    ev = nmnist.read_bin(write_bin(tmp_path / "a.bin", events))
    assert ev["x"].tolist() == [0, 33, 7]
    assert ev["y"].tolist() == [33, 0, 9]
    assert ev["p"].tolist() == [1, 0, 1]
    assert ev["ts"].tolist() == [0, 8388607, 0x12345]


@needs_sample
def test_real_sample_reads_as_documented():
    """A real recording decodes to 5-byte events over three saccades (~300 ms), in time order, on the 34x34 sensor."""
    ev = nmnist.read_bin(SAMPLE)
    assert len(ev) == SAMPLE.stat().st_size // 5 > 1000
    assert 250000 < ev["ts"].max() < 350000
    assert np.all(np.diff(ev["ts"].astype(np.int64)) >= 0)
    assert ev["x"].max() <= 33 and ev["y"].max() <= 33


@needs_sample
def test_stabilisation_holds_the_real_digit_still():
    """Per-saccade centroids drift by pixels on the raw sample and agree within one after stabilisation."""
    ev = nmnist.read_bin(SAMPLE)
    x, y = nmnist._stabilized_xy(ev)
    saccade = np.minimum((ev["ts"].astype(np.int64) - 1) // 105000, 2)
    raw = np.array([[ev["x"][saccade == s].mean(), ev["y"][saccade == s].mean()] for s in range(3)])
    still = np.array([[x[saccade == s].mean(), y[saccade == s].mean()] for s in range(3)])
    assert np.ptp(raw, axis=0).max() > 3
    assert np.ptp(still, axis=0).max() < 1


# --- conversion, checked against hand-worked output --------------------------


def test_time_bins_ceil_and_repeats_kept(tmp_path):
    # (10, 20) -> x 11, y 21 -> channel 10·34 + 21 = 361; shifts of ≤ 0.27 px round back.
    # ts 0 -> bin 0, 3000 -> 1, 3001 -> 2, 4000 -> 2 (repeat kept).
    events = [(10, 20, OFF, 0), (10, 20, OFF, 3000), (10, 20, OFF, 3001), (10, 20, OFF, 4000)]
    assert converted(tmp_path, events) == "361\t0\t1\t2\t2\t\n"


def test_saccade_boundaries_and_midpoints(tmp_path):
    events = [
        (10, 20, ON, 105000),  # x 11-3.5 = 7.5 -> 8, y 21-7 = 14: 7·34+14+1156 = 1408, bin 35
        (10, 20, ON, 157500),  # x 7.5-1.75 = 5.75 -> 6, y 14+3.5 = 17.5 -> 18: 188+1156 = 1344, bin 53
        (10, 20, OFF, 210000),  # x 7.5-3.5 = 4, y 14+7 = 21: 3·34+21 = 123, bin 70
        (10, 20, OFF, 262500),  # x 4+3.5 = 7.5 -> 8, y 21: 7·34+21 = 259, bin 88
        (10, 20, ON, 315000),  # x 4+7 = 11, y 21: 361+1156 = 1517, bin 105
    ]
    assert converted(tmp_path, events) == "123\t70\t\n259\t88\t\n1344\t53\t\n1408\t35\t\n1517\t105\t\n"


def test_events_pushed_outside_the_frame_are_dropped(tmp_path):
    events = [
        (0, 0, ON, 105000),  # x 1-3.5 = -2.5, y 1-7 = -6: dropped
        (5, 3, OFF, 105000),  # x 2.5 -> 3 but y 4-7 = -3: dropped
        (33, 33, OFF, 300000),  # x 34-7+6 = 33, y 34: 32·34+34 = 1122, bin 100: kept
        (33, 5, OFF, 330000),  # x 34-7+8 = 35 > 34: dropped
    ]
    assert converted(tmp_path, events) == "1122\t100\t\n"


def test_halves_round_away_from_zero(tmp_path):
    # ts 15000: x shift exactly -0.5, y shift exactly -1; ts 7500: x -0.25, y exactly -0.5.
    events = [
        (0, 10, OFF, 15000),  # x 0.5 -> 1 (banker's rounding would drop it), y 10: channel 10, bin 5
        (2, 10, OFF, 15000),  # x 2.5 -> 3 (banker's: 2), y 10: 2·34+10 = 78, bin 5
        (2, 2, ON, 7500),  # x 2.75 -> 3, y 2.5 -> 3: 71+1156 = 1227, bin 3
    ]
    assert converted(tmp_path, events) == "10\t5\t\n78\t5\t\n1227\t3\t\n"


def test_channels_ascending_with_event_order_kept(tmp_path):
    """A whole file: lines by channel, each channel's bins in file order, both polarities."""
    events = [
        (10, 20, ON, 0),
        (10, 20, OFF, 3000),
        (10, 20, OFF, 3001),
        (10, 20, OFF, 4000),
        (2, 2, ON, 7500),
        (0, 10, OFF, 15000),
        (2, 10, OFF, 15000),
        (0, 0, ON, 105000),
        (5, 3, OFF, 105000),
        (10, 20, ON, 105000),
        (10, 20, ON, 157500),
        (10, 20, OFF, 210000),
        (10, 20, OFF, 262500),
        (10, 20, ON, 315000),
        (33, 5, OFF, 330000),
    ]
    expected = (
        "10\t5\t\n"
        "78\t5\t\n"
        "123\t70\t\n"
        "259\t88\t\n"
        "361\t1\t2\t2\t\n"
        "1227\t3\t\n"
        "1344\t53\t\n"
        "1408\t35\t\n"
        "1517\t0\t105\t\n"
    )
    assert converted(tmp_path, events) == expected


def test_single_event_channel_and_frame(tmp_path):
    # x0 3, y0 5, ON, ts 1000: x 4-0.033 -> 4, y 6-0.067 -> 6: 3·34+6+1156 = 1264, bin 1.
    # Reading back: pos 1263 >= 1156 -> p 1, pos 107 -> x 3, y 5; bin 1 -> frame 0.
    path = write_bin(tmp_path / "one.bin", [(3, 5, ON, 1000)])
    assert nmnist.convert_bin(path) == "1264\t1\t\n"
    frames = nmnist.frames_from_bins(*nmnist.read_sample(path), 4)
    assert frames.shape == (2, 34, 34, 4) and frames.dtype == torch.float32
    assert frames.sum() == 1 and frames[1, 3, 5, 0] == 1


def test_all_events_dropped_gives_empty_file_and_empty_frames(tmp_path):
    path = write_bin(tmp_path / "gone.bin", [(0, 0, ON, 105000)])
    assert nmnist.convert_bin(path) == ""
    dat = tmp_path / "gone.dat"
    dat.write_text("")
    assert nmnist.frames_from_bins(*nmnist.read_sample(dat), 3).sum() == 0


# --- text reader and frames --------------------------------------------------


def test_parse_dat_keeps_file_order_and_tolerates_crlf():
    channels, bins = nmnist.parse_dat(b"12\t3\t4\t\r\n7\t1\t\r\n2312\t0\t\r\n")
    assert channels.tolist() == [12, 12, 7, 2312]
    assert bins.tolist() == [3, 4, 1, 0]


def test_bins_one_to_t_map_to_frames_zero_to_t_minus_one():
    t = 5
    # Channel 5: OFF, x 0, y 4. Bins 0 and t+1 fall outside the window.
    frames = nmnist.frames_from_bins([5, 5, 5, 5, 5], [0, 1, 3, t, t + 1], t)
    assert torch.nonzero(frames).tolist() == [[0, 0, 4, 0], [0, 0, 4, 2], [0, 0, 4, t - 1]]


def test_text_and_raw_frames_identical_on_random_events(tmp_path):
    rng = np.random.default_rng(1)
    raw = write_bin(tmp_path / "r.bin", random_events(rng, 4, 3000))
    dat = tmp_path / "r.dat"
    dat.write_text(nmnist.convert_bin(raw))
    assert [a.tolist() for a in nmnist.read_sample(dat)] == [a.tolist() for a in nmnist.read_sample(raw)]
    assert torch.equal(nmnist.frames_from_bins(*nmnist.read_sample(dat), 30),
                       nmnist.frames_from_bins(*nmnist.read_sample(raw), 30))


@needs_sample
def test_text_and_raw_frames_identical_on_real_sample(tmp_path):
    dat = tmp_path / "1.dat"
    dat.write_text(nmnist.convert_bin(SAMPLE))
    text_frames = nmnist.frames_from_bins(*nmnist.read_sample(dat), 120)
    assert torch.equal(text_frames, nmnist.frames_from_bins(*nmnist.read_sample(SAMPLE), 120))
    assert text_frames.sum() > 3000


# --- malformed input ---------------------------------------------------------


@pytest.mark.parametrize(
    "content, problem",
    [
        ("12\t3\t\n7\tabc\t\n", "line 2 is not a list of integers"),
        ("12\t3.5\t\n", "line 1 is not a list of integers"),
        ("5\t-1\t\n", "line 1 is not a list of integers"),
        ("5\t1\t\n0\t2\t\n", "line 2: channel 0 is outside 1..2312"),
        ("2313\t1\t\n", "line 1: channel 2313 is outside 1..2312"),
        ("5\t12345678901\t\n", "more than 9 digits"),
    ],
)
def test_malformed_text_names_file_and_problem(tmp_path, content, problem):
    path = tmp_path / "bad.dat"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(problem)):
        nmnist.read_dat(path)


def test_truncated_bin_names_file(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(7))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*7 bytes is not a multiple of 5"):
        nmnist.read_bin(path)


def test_dataset_reports_malformed_file(tmp_path):
    make_nmnist_tree(tmp_path, "text", per_class=1)
    bad = tmp_path / "Train" / "6" / "1.dat"
    bad.write_text("40\tx\t\n")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        nmnist.NMNIST(tmp_path, train=True, time_step=30)


# --- data set ----------------------------------------------------------------


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    """The same random events as a text tree and as a raw tree."""
    base = tmp_path_factory.mktemp("trees")
    return make_nmnist_tree(base / "text", "text"), make_nmnist_tree(base / "raw", "raw")


@pytest.mark.parametrize("train", [True, False])
def test_text_and_raw_data_sets_agree(trees, train):
    text = nmnist.NMNIST(trees[0], train=train, time_step=30, cache=False)
    raw = nmnist.NMNIST(trees[1], train=train, time_step=30, cache=False)
    assert (text.format, raw.format) == ("text", "raw")
    assert len(text) == len(raw) == 20
    assert sorted(text.labels.tolist()) == sorted(list(range(10)) * 2)
    for i in range(len(text)):
        (ft, lt), (fr, lr) = text[i], raw[i]
        assert ft.shape == (2, 34, 34, 30) and ft.dtype == torch.float32
        assert lt == lr and isinstance(lt, int)
        assert torch.equal(ft, fr)
    assert text[0][0].sum() > 0


def test_data_loader_batches(trees):
    data = nmnist.NMNIST(trees[0], train=False, time_step=8, cache=False)
    frames, labels = next(iter(DataLoader(data, batch_size=4)))
    assert frames.shape == (4, 2, 34, 34, 8) and labels.dtype == torch.int64
    with pytest.raises(IndexError):
        data[len(data)]


def test_lowercase_split_folders(tmp_path):
    make_nmnist_tree(tmp_path, "raw", per_class=1)
    (tmp_path / "Test").rename(tmp_path / "test")
    assert len(nmnist.NMNIST(tmp_path, train=False, time_step=5, cache=False)) == 10


def count_parses(monkeypatch):
    """Patch the per-file parser to count calls; returns the counter list."""
    calls = []
    real = nmnist.read_sample

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(nmnist, "read_sample", counting)
    return calls


def test_cache_created_reused_and_invalidated(tmp_path, monkeypatch):
    make_nmnist_tree(tmp_path, "text", per_class=1)
    calls = count_parses(monkeypatch)
    first = nmnist.NMNIST(tmp_path, train=True, time_step=30)
    assert len(calls) == 10 and first.cache_path.is_file()

    # T-independent: another T reuses the cache, and its frames are a prefix of T = 30's.
    again = nmnist.NMNIST(tmp_path, train=True, time_step=10)
    assert len(calls) == 10
    assert torch.equal(again[3][0], first[3][0][..., :10])

    # Same size, so only the mtime tells the change apart.
    changed = again.files[3]
    size = changed.stat().st_size
    changed.write_text("1\t1\t\n".ljust(size))
    assert changed.stat().st_size == size
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = nmnist.NMNIST(tmp_path, train=True, time_step=10)
    assert len(calls) == 20
    assert torch.nonzero(rebuilt[3][0]).tolist() == [[0, 0, 0, 0]]


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    make_nmnist_tree(tmp_path, "raw", per_class=1)
    cache = nmnist.NMNIST(tmp_path, train=False, time_step=5).cache_path
    cache.write_bytes(b"not a zip file")
    calls = count_parses(monkeypatch)
    assert len(nmnist.NMNIST(tmp_path, train=False, time_step=5)) == 10
    assert len(calls) == 10
    nmnist.NMNIST(tmp_path, train=False, time_step=5)
    assert len(calls) == 10


def test_unwritable_cache_folder_works_without_cache(tmp_path, monkeypatch):
    make_nmnist_tree(tmp_path, "raw", per_class=1)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(nmnist.tempfile, "mkstemp", refuse)
    with pytest.warns(UserWarning, match="cache not written"):
        data = nmnist.NMNIST(tmp_path, train=True, time_step=5)
    assert data.cache_path is None and len(data) == 10
    assert not list(tmp_path.glob("*.npz")) and not list(tmp_path.glob(".*.tmp"))
    assert data[0][0].shape == (2, 34, 34, 5)


def test_root_without_either_layout(tmp_path):
    (tmp_path / "Train" / "3").mkdir(parents=True)
    (tmp_path / "Train" / "3" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as err:
        nmnist.NMNIST(tmp_path, train=True, time_step=30)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "Train/0..9/*.dat" in message and "Train/0..9/*.bin" in message and "Test/0..9" in message
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        nmnist.NMNIST(tmp_path, train=False, time_step=30)


def test_split_holding_both_formats_is_refused(tmp_path):
    """A split with .dat and .bin files (a conversion in place) would be read only in part: refused, with counts."""
    make_nmnist_tree(tmp_path, "raw", per_class=2)
    for digit in (0, 1):
        (tmp_path / "Train" / str(digit) / "1.dat").write_text("1\t1\t\n")
    with pytest.raises(ValueError) as err:
        nmnist.NMNIST(tmp_path, train=True, time_step=5, cache=False)
    message = str(err.value)
    assert str(tmp_path / "Train") in message and "2 .dat" in message and "20 .bin" in message
    assert "\n" not in message
    assert len(nmnist.NMNIST(tmp_path, train=False, time_step=5, cache=False)) == 20


def test_mixed_split_is_one_line_data_error(tmp_path):
    """What the scripts print: one DataError line naming both counts."""
    make_nmnist_tree(tmp_path, "raw", per_class=1)
    (tmp_path / "Test" / "9" / "1.dat").write_text("1\t1\t\n")
    with pytest.raises(DataError, match=r"1 \.dat and 10 \.bin"):
        get_datasets("nmnist", str(tmp_path), time_step=5)


@pytest.mark.skipif(os.path.normcase("A") == "a", reason="case-insensitive file names")
def test_both_split_name_spellings_are_refused(tmp_path):
    """`Train` and `train` side by side: reading one would drop the other's files."""
    make_nmnist_tree(tmp_path, "raw", per_class=1)
    write_bin(tmp_path / "train" / "3" / "00001.bin", [(3, 5, ON, 1000)])
    with pytest.raises(ValueError, match="both .*Train.* and .*train"):
        nmnist.NMNIST(tmp_path, train=True, time_step=5, cache=False)
    assert len(nmnist.NMNIST(tmp_path, train=False, time_step=5, cache=False)) == 10


# --- converter CLI -------------------------------------------------------------


def test_cli_numbers_files_in_sorted_name_order(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    # One event each; (d, 0, OFF, 0) is channel d·34 + 1, bin 0.
    for name, x in (("00010.bin", 3), ("00002.bin", 1), ("00007.bin", 2)):
        write_bin(raw / "Train" / "4" / name, [(x, 0, OFF, 0)])
    write_bin(raw / "test" / "0" / "00001.bin", [(0, 0, ON, 0)])
    assert convert_main([str(raw), str(out)]) == 0
    assert (out / "Train" / "4" / "1.dat").read_text() == "35\t0\t\n"
    assert (out / "Train" / "4" / "2.dat").read_text() == "69\t0\t\n"
    assert (out / "Train" / "4" / "3.dat").read_text() == "103\t0\t\n"
    assert (out / "Test" / "0" / "1.dat").read_text() == "1157\t0\t\n"
    assert "converted 4/4" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_parallel_output_matches_serial(tmp_path):
    raw = make_nmnist_tree(tmp_path / "raw", "raw", per_class=1)
    assert convert_main([str(raw), str(tmp_path / "a")]) == 0
    assert convert_main([str(raw), str(tmp_path / "b"), "-j", "2"]) == 0
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.dat"))
    assert len(names) == 20
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_bin(raw / "Train" / "1" / "00001.bin", [(3, 5, ON, 1000)])
    write_bin(raw / "Train" / "1" / "00002.bin", [(3, 5, ON, 1000)])
    existing = out / "Train" / "1" / "2.dat"
    existing.parent.mkdir(parents=True)
    existing.write_text("keep me")
    capsys.readouterr()
    assert convert_main([str(raw), str(out)]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "refusing to overwrite" in err
    assert existing.read_text() == "keep me"
    assert not (out / "Train" / "1" / "1.dat").exists()


@pytest.mark.parametrize("case", ["missing", "empty", "truncated"])
def test_cli_input_errors_are_one_line(tmp_path, capsys, case):
    raw = tmp_path / "raw"
    if case == "empty":
        (raw / "Train" / "0").mkdir(parents=True)
    if case == "truncated":
        (raw / "Test" / "2").mkdir(parents=True)
        (raw / "Test" / "2" / "00001.bin").write_bytes(bytes(6))
    assert convert_main([str(raw), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(raw) in err
    assert not (tmp_path / "out").exists()


# The real command line on a slow disk: flushing a file takes 30 ms, so that a signal reliably lands
# while a file is being written (its data there, its final name not yet).
SLOW_CONVERTER = """
import os, stat, sys, time
from utils.data import nmnist_convert
real_fsync = os.fsync
def slow_fsync(fd):
    if stat.S_ISREG(os.fstat(fd).st_mode):
        time.sleep(0.03)
    real_fsync(fd)
os.fsync = slow_fsync
sys.exit(nmnist_convert.main(sys.argv[1:]))
"""


def tree_files(root):
    """{relative path: bytes} of every file under root, hidden ones included."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def interrupt_converter(raw, out, jobs, signum):
    """Start the converter, send signum once its first file is complete; return (exit code, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERTER, str(raw), str(out), "-j", str(jobs)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(out.rglob("*.dat")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        # Ctrl-C reaches the whole foreground group (workers too); SIGTERM only the command itself.
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("jobs, signum", [(1, signal.SIGINT), (2, signal.SIGINT), (2, signal.SIGTERM)])
def test_cli_interrupted_then_resumed(tmp_path, capsys, jobs, signum):
    """Ctrl-C (or SIGTERM) mid-way: one line and 128 + signal; only whole files and the unfinished-marker
    stay; the data set reader and a plain re-run refuse; --resume completes to the uninterrupted output."""
    raw, out, reference = tmp_path / "raw", tmp_path / "out", tmp_path / "reference"
    write_raw_tree(raw, per_class=5, events=(5, 20))
    convert_tree(raw, reference)
    expected = tree_files(reference)
    assert len(expected) == 100

    code, err = interrupt_converter(raw, out, jobs, signum)
    assert code == 128 + signum, err
    lines = [line for line in err.splitlines() if not re.fullmatch(r"converted \d+/100", line)]
    assert len(lines) == 1 and lines[0].startswith("nmnist_convert: interrupted"), err
    assert lines[0].endswith(f"{raw} {out}{' -j 2' if jobs > 1 else ''} --resume")
    left = tree_files(out)
    marker = left.pop(nmnist.UNFINISHED_MARKER)
    assert marker.decode().strip() == str(raw.resolve())
    # Only complete files under their final names, each identical to the uninterrupted conversion's.
    assert 0 < len(left) < len(expected), "the signal did not land mid-way"
    assert all(expected.get(name) == data for name, data in left.items()), sorted(set(left) - set(expected))
    assert f"{len(left)} of the 100 files are complete" in lines[0]
    with pytest.raises(ValueError, match="did not finish.*--resume"):
        nmnist.NMNIST(out, train=True, time_step=5, cache=False)

    capsys.readouterr()
    assert convert_main([str(raw), str(out)]) == 1
    refused = capsys.readouterr().err
    assert len(refused.strip().splitlines()) == 1 and "refusing to overwrite" in refused and "--resume" in refused

    assert convert_main([str(raw), str(out), "--resume", "-j", str(jobs)]) == 0
    assert f"wrote {100 - len(left)} files" in capsys.readouterr().out
    assert tree_files(out) == expected
    assert len(nmnist.NMNIST(out, train=True, time_step=5)) == 50


def test_cli_resume_removes_a_killed_writes_temporary(tmp_path):
    """A temporary left by a killed process is removed; complete files are kept, not rewritten."""
    raw, out = write_raw_tree(tmp_path / "raw", per_class=1), tmp_path / "out"
    convert_tree(raw, out)
    kept = out / "Train" / "3" / "1.dat"
    kept.write_text("kept as it is")
    (out / "Test" / "4" / "1.dat").unlink()
    stale = out / "Test" / "4" / ".1.dat.0123456789ab.tmp"
    stale.write_text("half a fi")
    assert convert_main([str(raw), str(out), "--resume"]) == 0
    assert kept.read_text() == "kept as it is" and not stale.exists()
    assert (out / "Test" / "4" / "1.dat").read_text() == nmnist.convert_bin(raw / "Test" / "4" / "00000.bin")


def test_cli_resume_refuses_another_raw_dirs_conversion(tmp_path, capsys):
    raw, other, out = tmp_path / "raw", tmp_path / "other", tmp_path / "out"
    write_raw_tree(raw, per_class=1)
    write_raw_tree(other, per_class=1, seed=1)
    out.mkdir()
    (out / nmnist.UNFINISHED_MARKER).write_text(f"{other}\n")
    capsys.readouterr()
    assert convert_main([str(raw), str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"unfinished conversion of {other}" in err
    assert not (out / "Train").exists()


def test_cli_refuses_converting_in_place(tmp_path, capsys):
    raw = write_raw_tree(tmp_path / "raw", per_class=1)
    capsys.readouterr()
    assert convert_main([str(raw), str(raw / "." )]) == 1
    assert "OUT_DIR is RAW_DIR" in capsys.readouterr().err
    assert not list(raw.rglob("*.dat"))
