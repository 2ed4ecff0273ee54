"""From initialisation, SGD on one fixed random batch by IDE and by BPTT: `python -m tools.bptt_check`.

For every net and method (IDE; BPTT with the loop layers' BN by batch statistics,
`--bptt-bn batch`; BPTT with running statistics, `--bptt-bn running`), from the
same initial weights: the training loss of each of `--steps` SGD steps on one
fixed random batch (the paper's leak, dropout 0.2, SGD lr 0.05, momentum 0.9,
as tools.bench builds it), and the firing rate of every spiking layer in the
simulation the method trains (IDE: its simulation; BPTT: the unrolled one)
before the first step and after the last. It prints a Markdown report and
writes bptt_check.md and bptt_check.csv (the loss curves) to `--out`.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

from tools.bench import build_training, make_batch
from tools.compare import cpu_name, csv_text, markdown_table
from utils.files import atomic_write_all

RUNS = {"IDE": dict(method="ide"), "BPTT batch": dict(method="bptt", bptt_bn="batch"),
        "BPTT running": dict(method="bptt", bptt_bn="running")}


def layer_rates(model, x):
    """Mean firing rate of every spiking layer in the training simulation of the model's method."""
    snn = model.snn
    rates = snn.bptt.layer_rates(snn, x) if snn.bptt is not None else model.get_all_rate(x)
    return [float(r.mean()) for r in rates]


def train_curve(name, run, time_step, batch, steps, seed=0):
    """(losses of the `steps` training steps, layer rates before, layer rates after) on one fixed batch."""
    model, optimizer = build_training(name, time_step, "cpu", seed, **RUNS[run])
    x, target = make_batch(name, batch, time_step, "cpu", seed)
    losses, before = [], None
    for step in range(steps):
        torch.manual_seed(seed + 1 + step)  # dropout masks: the same for every method at a step
        loss = F.cross_entropy(model(x), target)
        if before is None:
            before = layer_rates(model, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    torch.manual_seed(seed + 1 + steps)
    model(x)  # one more forward: fresh masks and the moved statistics, as the next step would see them
    return losses, before, layer_rates(model, x)


def rates_cell(rates):
    """Layer rates as 'r1 / r2 / ...'."""
    return " / ".join(f"{r:.3f}" for r in rates)


def report(args, results):
    """The Markdown report: one row per net and method, and the loss curves every few steps."""
    marks = sorted({0, 4, 9, 19, args.steps - 1} & set(range(args.steps)))
    columns = ["net", "method"] + [f"loss {m + 1}" for m in marks] + ["layer rates before", "layer rates after"]
    rows = []
    for (name, run), (losses, before, after) in results.items():
        row = {"net": name, "method": run, "layer rates before": rates_cell(before),
               "layer rates after": rates_cell(after)}
        row.update({f"loss {m + 1}": f"{losses[m]:.3f}" for m in marks})
        rows.append(row)
    head = (f"torch {torch.__version__}, {cpu_name()}, {torch.get_num_threads()} threads; T={args.time_step}, "
            f"batch {args.batch}, {args.steps} SGD steps (lr 0.05, momentum 0.9) on one fixed random batch, "
            f"seed {args.seed}, dropout 0.2, the paper's leak; loss k: the loss of the k-th step's forward")
    return "\n".join([head, "", markdown_table(columns, rows, lambda c, v: str(v)), ""])


def parse_args(argv=None):
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="python -m tools.bptt_check", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nets", nargs="+", default=["alexnetf", "cifarnetf"], choices=["alexnetf", "cifarnetf"])
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--time-step", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="checkpoints/bptt_check")
    args = p.parse_args(argv)
    if min(args.time_step, args.batch, args.steps) < 1:
        p.error("--time-step, --batch and --steps must be >= 1")
    return args


def main(argv=None):
    """Train, print the report and write bptt_check.md and bptt_check.csv."""
    args = parse_args(argv)
    results = {}
    for name in args.nets:
        for run in args.runs:
            print(f"{name} {run}", file=sys.stderr, flush=True)
            results[(name, run)] = train_curve(name, run, args.time_step, args.batch, args.steps, args.seed)
    text = report(args, results)
    print(text)
    curves = [{"net": name, "method": run, "step": k + 1, "loss": loss}
              for (name, run), (losses, _, _) in results.items() for k, loss in enumerate(losses)]
    os.makedirs(args.out, exist_ok=True)
    atomic_write_all([(os.path.join(args.out, "bptt_check.md"), lambda f: f.write(text.encode())),
                      (os.path.join(args.out, "bptt_check.csv"),
                       lambda f: f.write(csv_text(("net", "method", "step", "loss"), curves).encode()))])


if __name__ == "__main__":
    main()
