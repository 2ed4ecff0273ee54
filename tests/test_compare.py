"""`python -m tools.compare` (IDE against BPTT: memory and time over T): its batch search, memory model and
expectation lines on made-up numbers, and a tiny run's table and files."""
import math

import pytest

from tools.compare import (COLUMNS, GRADIENT_COLUMNS, OUTPUTS, TIMING_COLUMNS, expectation_lines, largest_batch, main,
                           memory_model, steps_to_limit)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_largest_batch_doubles_then_bisects():
    """The search finds the exact largest batch that fits, with O(log b) trials, and reports a cap."""
    for limit in (1, 2, 3, 37, 64, 1000):
        tried = []
        found, capped = largest_batch(lambda b: tried.append(b) or b <= limit, cap=4096)
        assert (found, capped) == (limit, False)
        assert len(tried) <= 2 * math.ceil(math.log2(limit + 1)) + 2
    assert largest_batch(lambda b: False, cap=64) == (0, False)
    assert largest_batch(lambda b: True, cap=100) == (100, True)


def test_memory_model_recovers_a_linear_peak():
    """peak(B, T) = K + B·(c0 + c1·T) is recovered from a T series and one second batch size."""
    k, c0, c1, b = 40.0, 3.0, 0.5, 8

    def peak(batch, t):
        return k + batch * (c0 + c1 * t)

    rows = [{"T": t, "batch": b, "BPTT MB": peak(b, t)} for t in (5, 10, 30, 100)]
    fit = memory_model(rows, (2 * b, 5, peak(2 * b, 5)), "bptt")
    assert fit == pytest.approx((k, c0, c1))
    assert peak(128, steps_to_limit(*fit, batch=128, limit_mb=1e4)) == pytest.approx(1e4)
    assert math.isinf(steps_to_limit(k, c0, 0.0))


def test_expectation_lines_name_what_breaks():
    """IDE flat, BPTT growing ≥ 5× on conv nets and IDE faster at T = 100: each line names the exceptions."""
    rows = [{"net": "mnist_conv", "T": t, "IDE MB": mb, "BPTT MB": 10.0 * t, "time BPTT/IDE": r}
            for t, mb, r in ((10, 30.0, 1.5), (100, 30.5, 2.0))]
    rows += [{"net": "alexnetf", "T": t, "IDE MB": mb, "BPTT MB": bm, "time BPTT/IDE": r}
             for t, mb, bm, r in ((10, 60.0, 100.0, 1.0), (100, 70.0, 300.0, 0.9))]
    lines = expectation_lines(rows)
    assert lines[0].startswith("IDE peak memory flat") and "not for alexnetf 1.17" in lines[0]
    assert "not for alexnetf 3.0×" in lines[1] and "mnist_conv" not in lines[1].split("(")[0]
    assert lines[2] == "IDE faster than BPTT at T=100: not for alexnetf"


@pytest.mark.slow
def test_compare_command_writes_its_files_and_keeps_them(tmp_path, capsys):
    """A tiny run prints the table, writes the four files, and a second run refuses to replace them."""
    out = tmp_path / "cmp"
    main(["--nets", "fashion_mlp", "--time-steps", "2", "3", "--batch", "2", "--repeats", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| " + " | ".join(TIMING_COLUMNS) + " |" in printed
    assert "| " + " | ".join(GRADIENT_COLUMNS) + " |" in printed
    assert "nan" not in printed.split("Peak memory model")[0]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    lines = (out / "compare.csv").read_text().splitlines()
    assert lines[0] == ",".join(COLUMNS) and len(lines) == 3 and lines[1].startswith("fashion_mlp,2,2,")
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    cos = float(lines[1].split(",")[COLUMNS.index("SNN cos")])
    assert 0.5 < cos <= 1.0
    before = (out / "compare.md").read_text()
    with pytest.raises(SystemExit):
        main(["--nets", "fashion_mlp", "--time-steps", "2", "--out", str(out)])
    assert "already holds" in capsys.readouterr().err
    assert (out / "compare.md").read_text() == before
