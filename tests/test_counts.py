"""Neuron and parameter counts of the paper's nets against the paper's table."""
import os
import re
import subprocess
import sys
from decimal import Decimal

import pytest

from tests.conftest import REPO
from modules import build_model

pytestmark = pytest.mark.usefixtures("single_thread")


# (net, classes, neurons, params) as printed in the paper's table.
PAPER_TABLE = [
    ("mnist_conv", 10, "13K", "229K"),
    ("fashion_mlp", 10, "1.2K", "478K"),
    ("nmnist_conv", 10, "21K", "291K"),
    ("alexnetf", 10, "159K", "3.7M"),
    ("alexnetf", 100, "159K", "5.2M"),
    ("cifarnetf", 10, "232K", "11.8M"),
    ("cifarnetf", 100, "232K", "14.8M"),
]
SUFFIX = {"K": Decimal(10) ** 3, "M": Decimal(10) ** 6}


def parse_figure(text):
    """A table figure as (value, one unit of its last printed digit): '3.7M' -> (3.7e6, 1e5)."""
    number, suffix = text[:-1], text[-1]
    scale = SUFFIX[suffix]
    decimals = len(number.split(".")[1]) if "." in number else 0
    return float(Decimal(number) * scale), float(scale * Decimal(10) ** -decimals)


@pytest.mark.parametrize("text, value, unit", [
    ("13K", 13000, 1000), ("1.2K", 1200, 100), ("3.7M", 3.7e6, 1e5), ("14.8M", 14.8e6, 1e5)])
def test_parse_figure(text, value, unit):
    """The table parser reads the value and the precision of a figure."""
    assert parse_figure(text) == pytest.approx((value, unit))


def matches_figure(count, text):
    """True when the table figure is `count` to the precision the table prints it.

    The paper mostly rounds (20,808 -> "21K") but sometimes truncates (478,811 -> "478K"),
    so the count must lie within one unit of the figure's last digit.
    """
    value, unit = parse_figure(text)
    return abs(count - value) < unit


def parse_markdown_rows(text):
    """{(net, classes): (neurons, params)} from the table `python -m tools.counts` prints."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"\d+", cells[1]):
            rows[cells[0], int(cells[1])] = (int(cells[2].replace(",", "")), int(cells[3].replace(",", "")))
    return rows


@pytest.fixture(scope="module")
def built_counts(single_thread):
    """{(net, classes): (neurons, params)} for every table row, each net built once."""
    built = {}
    for name, classes, _, _ in PAPER_TABLE:
        model = build_model(name, num_classes=classes)
        built[name, classes] = (model.count_neurons(), model.count_parameters())
    return built


@pytest.mark.parametrize("name, classes, neurons, params", PAPER_TABLE,
                         ids=[f"{row[0]}-C{row[1]}" for row in PAPER_TABLE])
def test_counts_match_paper_table(built_counts, name, classes, neurons, params):
    """Every row of the paper's table: the built net's counts are the printed figures.

    Counts agree with a figure to its printed precision (13,328 neurons -> "13K"; 3,709,515
    params -> "3.7M"); parameter counts are also within 0.5% of the figure. (Neuron figures
    like "13K" carry only two digits, so 0.5% would be finer than the table itself.)
    """
    n_neurons, n_params = built_counts[name, classes]
    assert matches_figure(n_neurons, neurons), (n_neurons, neurons)
    assert matches_figure(n_params, params), (n_params, params)
    assert abs(n_params - parse_figure(params)[0]) <= 0.005 * parse_figure(params)[0]


def test_counts_are_exact_for_the_small_nets(built_counts):
    """Exact counts worked out by hand from the architectures (docs/method.md; input + spiking neurons; all parameters).

    mnist_conv: 784 + 64·14·14 neurons; conv 1→64 k5 (+bias) + BN + conv 64→64 k5 (no bias) + g
    + classifier 12544→10. fashion_mlp: 784 + 400; fc 784→400 + BN + fc 400→400 + g + 400→10.
    nmnist_conv: 2·34·34 + 64·17·17; conv 2→64 k5 + BN + conv 64→64 k5 + g + 18496→10.
    """
    feedback_conv = 64 * 64 * 25 + 1
    expected = {
        "mnist_conv": (784 + 64 * 14 * 14,
                       64 * 25 + 64 + 2 * 64 + feedback_conv + 64 * 14 * 14 * 10 + 10),
        "fashion_mlp": (784 + 400, 784 * 400 + 400 + 2 * 400 + 400 * 400 + 1 + 400 * 10 + 10),
        "nmnist_conv": (2 * 34 * 34 + 64 * 17 * 17,
                        2 * 64 * 25 + 64 + 2 * 64 + feedback_conv + 64 * 17 * 17 * 10 + 10),
    }
    for name, exact in expected.items():
        assert built_counts[name, 10] == exact, name


@pytest.mark.slow
def test_counts_script_prints_the_table(built_counts):
    """`python -m tools.counts` prints a Markdown table whose rows agree with the built nets."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "tools.counts"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| mnist_conv | 10 | 13,328 | 229,643 | 13K | 229K |" in result.stdout
    assert parse_markdown_rows(result.stdout) == built_counts
