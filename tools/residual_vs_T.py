"""How far the simulated rate is from an equilibrium, as a function of T: `python -m tools.residual_vs_T`.

For every paper net, IF neurons and the LIF leaks λ = 0.95 and 0.99, prints
the forward residual ‖f(a) - a‖/‖a‖ of the simulated rate a (the `Fwd Res.`
diagnostic of training) at each T, and its log-log slope over the T given:
about -1 for IF (the rate approaches a* as O(1/T)), about 0 for LIF (the
λ-weighted rate stops at a distance of order 1 - λ). Weights at
initialisation (seeded), BN statistics calibrated on the batch (as after a
few steps), a small batch of Gaussian images (sparse spike frames for
N-MNIST), CPU, no dropout.
"""
import argparse
import math

import numpy as np
import torch

from modules import ARCHITECTURES, build_model
from tools.smoke import calibrate_bn

NEURONS = {"IF": 1.0, "LIF 0.95": 0.95, "LIF 0.99": 0.99}


@torch.no_grad()
def forward_residual(snn, x, time_step):
    """‖f(a) - a‖/‖a‖ of the rate a that a training-mode simulation of T = time_step steps gives for input x."""
    snn.time_step = time_step
    rate, _ = snn.simulate(x)
    return float((snn.equilibrium_function(x)(rate) - rate).norm() / rate.norm())


def net_input(name, batch, time_step, seed=0):
    """A small batch for net `name`: Gaussian images, or spike frames at rate 0.2 with time_step frames."""
    arch = ARCHITECTURES[name]
    gen = torch.Generator().manual_seed(seed)
    if arch.spike_input:
        return (torch.rand(batch, *arch.input_shape, time_step, generator=gen) < 0.2).float()
    return torch.randn(batch, *arch.input_shape, generator=gen)


def residual_rows(names, steps, batch=4, seed=0):
    """[(net, neuron, [residual at each T], log-log slope)] for every net and neuron of NEURONS."""
    rows = []
    for name in names:
        x = net_input(name, batch, max(steps), seed)
        for neuron, leak in NEURONS.items():
            torch.manual_seed(seed)
            model = build_model(name, time_step=min(steps), leaky=leak).train()
            calibrate_bn(model, x)
            residuals = [forward_residual(model.snn, x, t) for t in steps]
            finite = all(math.isfinite(r) and r > 0 for r in residuals)
            slope = float(np.polyfit(np.log(steps), np.log(residuals), 1)[0]) if finite else math.nan
            rows.append((name, neuron, residuals, slope))
    return rows


def markdown_table(rows, steps):
    """The rows of `residual_rows` as a Markdown table (one string)."""
    lines = ["| net | neuron | " + " | ".join(f"T={t}" for t in steps) + " | slope |",
             "|---|---|" + "---|" * (len(steps) + 1)]
    lines += [f"| {name} | {neuron} | " + " | ".join(f"{r:.4f}" for r in residuals) + f" | {slope:+.2f} |"
              for name, neuron, residuals, slope in rows]
    return "\n".join(lines)


def main(argv=None):
    """Parse the flags and print the table."""
    parser = argparse.ArgumentParser(prog="python -m tools.residual_vs_T", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--nets", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--steps", nargs="+", type=int, default=[8, 16, 32, 64, 128], metavar="T")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.steps) < 1 or args.batch < 2:
        parser.error("--steps: expected T >= 1; --batch: expected at least 2 (BN over the batch)")
    steps = sorted(set(args.steps))
    print(markdown_table(residual_rows(args.nets, steps, args.batch, args.seed), steps))


if __name__ == "__main__":
    main()
