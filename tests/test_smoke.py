"""`python -m tools.smoke` at a reduced size (tiny T and batch, one net per check), so that it keeps working."""
import pytest
import torch.distributed as dist

from tools import smoke

REDUCED = ["--device", "cpu", "--nets", "mnist_conv", "--time-step", "2", "--batch", str(smoke.MIN_BATCH),
           "--resume-net", "fashion_mlp", "--resume-batch", "256", "--ddp-nets", "mnist_conv",
           "--bench-nets", "mnist_conv", "--bench-time-steps", "2", "3", "--bench-batch", "2"]


@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs Gloo for torchrun")
def test_smoke_passes_on_the_cpu(capsys, monkeypatch):
    """Every check of the reduced smoke run passes: one PASS line per check (step fp32 and amp, resume, ddp,
    bench), the summary table, exit code 0."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code = smoke.main(REDUCED)
    out = capsys.readouterr().out
    passes = [line for line in out.splitlines() if line.startswith("PASS")]
    assert code == 0, out
    assert len(passes) == 5 and "FAIL" not in out
    assert "| check | what | result | detail |" in out


@pytest.mark.slow
def test_smoke_fails_when_a_check_fails(capsys, monkeypatch):
    """A check that breaks (here the gradient tolerance set to an impossible 0) prints FAIL and the exit code is 1."""
    monkeypatch.setitem(smoke.TOLERANCE, "fp32", 0.0)
    code = smoke.main(["--device", "cpu", "--checks", "step", "--nets", "mnist_conv", "--modes", "fp32",
                       "--time-step", "2", "--batch", str(smoke.MIN_BATCH), "--threshold", "3"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL  step" in out
