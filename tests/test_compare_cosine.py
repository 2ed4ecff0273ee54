"""The gradient comparison of tools.compare: cosines against an exact computation, the headline without the
classifier, groups, and "0 = 0" (never nan) for a gradient that is zero in both methods."""
import math

import numpy as np
import pytest
import torch

from tools.compare import GROUPS, compare_gradients, cosine, format_cell, gradient_cosines, make_batch

pytestmark = pytest.mark.usefixtures("single_thread")


def exact_cosine(a, b):
    """cos(a, b) of two vectors in numpy's float64."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_cosine_is_exact_and_names_zero_gradients():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    assert cosine(a, b) == pytest.approx(exact_cosine(a, b), rel=1e-12)
    assert cosine(a, -2 * a) == pytest.approx(-1.0, rel=1e-12)
    zero = torch.zeros(3, 4)
    assert (cosine(zero, zero), cosine(zero, b), cosine(a, zero)) == ("0 = 0", "IDE 0", "BPTT 0")
    assert format_cell("SNN cos", "0 = 0") == "0 = 0"


def test_headline_leaves_the_classifier_out_and_groups_are_exact():
    """A classifier gradient that is equal in both and dominates the norm moves the overall cosine to ~1,
    the headline not; each group's cosine is that of its concatenated tensors; a missing group reads '—'."""
    gen = torch.Generator().manual_seed(1)
    names = ["snn.input_layer.linear.weight", "snn.input_layer.bn.weight", "snn.feedback.linear.g",
             "classifier.weight"]
    ide = {n: torch.randn(5, generator=gen).double() for n in names}
    bptt = {n: torch.randn(5, generator=gen).double() for n in names}
    bptt["classifier.weight"] = ide["classifier.weight"] = 1e3 * torch.randn(5, generator=gen).double()
    ide["snn.feedback.linear.g"] = bptt["snn.feedback.linear.g"] = torch.zeros(5, dtype=torch.float64)
    summary, per_tensor = compare_gradients(ide, bptt)
    snn = names[:3]
    headline = exact_cosine(np.concatenate([ide[n] for n in snn]), np.concatenate([bptt[n] for n in snn]))
    overall = exact_cosine(np.concatenate([ide[n] for n in names]), np.concatenate([bptt[n] for n in names]))
    assert summary["SNN cos"] == pytest.approx(headline, rel=1e-12) and overall > 0.999 > abs(headline)
    assert summary["input cos"] == pytest.approx(
        exact_cosine(np.concatenate([ide[n] for n in names[:2]]), np.concatenate([bptt[n] for n in names[:2]])))
    assert summary["feedback cos"] == "0 = 0" and summary["loop cos"] == "—"
    assert summary["classifier cos"] == pytest.approx(1.0, rel=1e-12)
    assert per_tensor["snn.feedback.linear.g"] == ((5,), "0 = 0")
    assert set(summary) == {"SNN cos"} | {f"{g} cos" for g in GROUPS}


def test_single_layer_net_row_with_running_statistics():
    """fashion_mlp: the feedback scale g sits above its clamp bound, so its gradient is zero in both ('0 = 0');
    both methods simulate the same state (same mean rate); the forward residual is IDE's, finite."""
    x, target = make_batch("fashion_mlp", 4, 3, "cpu")
    summary, per_tensor = gradient_cosines("fashion_mlp", 3, x, target, torch.device("cpu"), bptt_bn="running")
    assert per_tensor["snn.feedback.linear.parametrizations.weight.0.g"][1] == "0 = 0"
    assert summary["IDE rate"] == summary["BPTT rate"] > 0
    assert math.isfinite(summary["fwd residual"]) and summary["fwd residual"] > 0
    assert isinstance(summary["SNN cos"], float) and -1 <= summary["SNN cos"] <= 1
    assert summary["loop cos"] == "—"
