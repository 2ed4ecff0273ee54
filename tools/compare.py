"""IDE against BPTT on the paper's nets: `python -m tools.compare`.

For every net at its paper input size and every T, from the same weights:

- the training-step time (median of `--repeats` after a warm-up) and peak
  memory of IDE and of BPTT (`modules.bptt`, sigmoid surrogate α = 4), measured
  as `tools.bench` measures them (CUDA: peak allocated; CPU: the profiler's
  peak of PyTorch's allocations), and their ratios BPTT/IDE;
- the cosine similarity of the two gradients of one batch (same weights,
  batch and dropout masks): the headline over the SNN's parameters (the
  classifier excluded: its gradient is the same outer product of the rate
  and ∂L/∂logits in both methods whenever the rates agree, and its norm
  dominates), per group (input layer, loop layers, feedback, classifier) and
  per parameter tensor, with the state's mean rate under each method and the
  forward residual ‖f(a) - a‖/‖a‖ of IDE's simulated state beside it; a
  gradient that is zero in both methods reads "0 = 0", zero in one only
  "IDE 0" or "BPTT 0". With `--bptt-bn running` the two forward passes
  compute the same values, so only the gradient differs; with the default
  `batch` BPTT's loop layers normalise by batch statistics (modules.bptt),
  so on the multi-layer nets the two methods differentiate different
  forward passes;
- on CUDA, the largest batch that fits at the largest T for each method
  (doubling, then bisection); on the CPU, the memory model
  peak(B, T) = K + B·(c0 + c1·T) fitted to the T series and a second batch
  size, and the T at which a batch of 128 would pass 80 GiB.

`--no-timing` measures the gradients alone. It writes compare.md, compare.csv
(one row per net and T),
compare_cosine.csv (per parameter tensor) and compare.png (step time and peak
memory against T) to `--out`, and prints the Markdown.
"""
import argparse
import csv
import io
import math
import os
import platform
import statistics
import sys

import numpy as np
import torch
import torch.nn.functional as F

from modules import ARCHITECTURES, BN_MODES, NETS
from tools.bench import (TrainingStep, add_measurement_flags, batch_size, build_training, cpu_peak_mb, cuda_peak_mb,
                         make_batch, release_step_buffers, time_ms)
from utils.files import CheckpointError, atomic_write_all, check_outputs, figure, png_bytes
from utils.flags import DefaultsHelpFormatter

METHODS = ("ide", "bptt")
TIMING_COLUMNS = ("net", "T", "batch", "IDE ms", "BPTT ms", "time BPTT/IDE", "IDE MB", "BPTT MB", "mem BPTT/IDE")
# Parameter groups by name prefix, in the order the input flows through them.
GROUPS = {"input": "snn.input_layer.", "loop": "snn.layers.", "feedback": "snn.feedback.", "classifier": "classifier."}
GRADIENT_COLUMNS = (("net", "T", "batch", "SNN cos") + tuple(f"{group} cos" for group in GROUPS)
                    + ("IDE rate", "BPTT rate", "fwd residual"))
COLUMNS = TIMING_COLUMNS + GRADIENT_COLUMNS[3:]
OUTPUTS = ("compare.md", "compare.csv", "compare_cosine.csv", "compare.png")
LIMIT_MB = 80 * 1024          # 80 GiB, a large accelerator's memory
LIMIT_BATCH = 128             # the paper's batch
IDE_FLAT = 0.10               # IDE's peak within ±10% over T
BPTT_GROWTH = 5.0             # BPTT's peak at least 5× from T = 10 to T = 100 (conv nets)
BYTE_MB = 2 ** -20            # a slope in T below one byte per sample and step is rounding in the fit


def build(name, time_step, method, device, seed=0, bptt_bn="batch"):
    """The net with the paper's settings (leak, solver, dropout 0.2), trained by `method`, and its SGD optimizer.

    The seed gives both methods the same weights; `bptt_bn` is BPTT's loop BN mode.
    """
    options = dict(method=method, bptt_bn=bptt_bn) if method == "bptt" else dict(method=method)
    return build_training(name, time_step, device, seed, **options)


def gradient_of(model, x, target, amp, seed):
    """({parameter name: gradient, zero where none reached it}, the state's mean rate, solver_stats) of one
    training forward and backward (dropout masks from `seed`)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    states = []
    hook = model.snn.register_forward_hook(lambda module, inputs, output: states.append(output.detach()))
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = F.cross_entropy(model(x), target)
    hook.remove()
    loss.backward()
    grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad).detach().double().clone()
             for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads, float(states[0].float().mean()), model.solver_stats


def cosine(ide, bptt):
    """Cosine similarity of two gradients as vectors: a float, or "0 = 0" when both are zero and
    "IDE 0" / "BPTT 0" when one is (the cosine is undefined there, never nan)."""
    ide, bptt = ide.flatten().double(), bptt.flatten().double()
    ide_zero, bptt_zero = not bool(ide.any()), not bool(bptt.any())
    if ide_zero or bptt_zero:
        return "0 = 0" if ide_zero and bptt_zero else ("IDE 0" if ide_zero else "BPTT 0")
    return float(ide @ bptt) / float(ide.norm() * bptt.norm())


def group_of(parameter):
    """The GROUPS entry a parameter name belongs to."""
    return next(group for group, prefix in GROUPS.items() if parameter.startswith(prefix))


def compare_gradients(ide, bptt):
    """({"SNN cos": over every parameter but the classifier's, "<group> cos": per group ("—" for a group the
    net lacks)}, {parameter name: (shape, cosine)}) of two {name: gradient} dicts."""
    def joined(grads, names):
        return torch.cat([grads[n].flatten() for n in names])

    snn = [n for n in ide if group_of(n) != "classifier"]
    summary = {"SNN cos": cosine(joined(ide, snn), joined(bptt, snn))}
    for group in GROUPS:
        names = [n for n in ide if group_of(n) == group]
        summary[f"{group} cos"] = cosine(joined(ide, names), joined(bptt, names)) if names else "—"
    per_tensor = {n: (tuple(ide[n].shape), cosine(ide[n], bptt[n])) for n in ide}
    return summary, per_tensor


def gradient_cosines(name, time_step, x, target, device, amp=False, seed=0, bptt_bn="batch"):
    """(the GRADIENT_COLUMNS of a row but net/T/batch, {parameter name: (shape, cosine)}): IDE's and BPTT's
    gradients of one batch compared, with each method's mean state rate and IDE's forward residual."""
    grads, rates, stats = {}, {}, {}
    for method in METHODS:
        model, _ = build(name, time_step, method, device, seed, bptt_bn)
        grads[method], rates[method], stats[method] = gradient_of(model, x, target, amp, seed + 1)
    summary, per_tensor = compare_gradients(grads["ide"], grads["bptt"])
    summary.update({"IDE rate": rates["ide"], "BPTT rate": rates["bptt"],
                    "fwd residual": stats["ide"].get("forward_residual", math.nan)})
    return summary, per_tensor


def step_peak_mb(step, device):
    """Peak memory of one training step, its gradients and dropout masks counted anew."""
    release_step_buffers(step.model, step.optimizer)
    return cuda_peak_mb(step.full, device) if device.type == "cuda" else cpu_peak_mb(step.full)


def time_and_peak(name, time_step, method, x, target, device, repeats, amp=False, seed=0, bptt_bn="batch"):
    """(median step ms, peak MB) of `method`'s training step on (x, target)."""
    model, optimizer = build(name, time_step, method, device, seed, bptt_bn)
    step = TrainingStep(model, optimizer, x, target, amp)
    step.full()  # warm-up: kernels chosen, optimizer state allocated
    ms = statistics.median(time_ms(step.full, device) for _ in range(repeats))
    return ms, step_peak_mb(step, device)


def peak_only(name, time_step, method, batch, device, amp=False, seed=0, bptt_bn="batch"):
    """Peak MB of `method`'s training step at another batch size (after one warm-up step)."""
    x, target = make_batch(name, batch, time_step, device, seed)
    model, optimizer = build(name, time_step, method, device, seed, bptt_bn)
    step = TrainingStep(model, optimizer, x, target, amp)
    step.full()
    return step_peak_mb(step, device)


def measure(name, time_step, batch, device, repeats, amp=False, seed=0, bptt_bn="batch", timing=True):
    """One table row (dict keyed by COLUMNS; the timing columns only if `timing`) and the per-parameter
    cosines for net `name` at T = time_step."""
    x, target = make_batch(name, batch, time_step, device, seed)
    summary, per_tensor = gradient_cosines(name, time_step, x, target, device, amp, seed, bptt_bn)
    row = {"net": name, "T": time_step, "batch": batch, **summary}
    if timing:
        (ide_ms, ide_mb), (bptt_ms, bptt_mb) = (time_and_peak(name, time_step, method, x, target, device,
                                                              repeats, amp, seed, bptt_bn) for method in METHODS)
        row.update({"IDE ms": ide_ms, "BPTT ms": bptt_ms, "time BPTT/IDE": bptt_ms / ide_ms, "IDE MB": ide_mb,
                    "BPTT MB": bptt_mb, "mem BPTT/IDE": bptt_mb / ide_mb})
    return row, per_tensor


# ------------------------------------------------------------------------- memory in T and B
def memory_model(rows, extra_peaks, method):
    """Fit peak(B, T) = K + B·(c0 + c1·T) for one net and method; returns (K, c0, c1) in MB.

    `rows` hold one net's T series at one batch b; `extra_peaks` is (batch, T, peak MB)
    at a second batch size. The slope in T at batch b gives c1 = slope / b, and the
    second batch separates the per-sample intercept c0 from the fixed part K.
    """
    key = "IDE MB" if method == "ide" else "BPTT MB"
    b = rows[0]["batch"]
    ts = np.array([r["T"] for r in rows], dtype=float)
    peaks = np.array([r[key] for r in rows], dtype=float)
    slope, intercept = np.polyfit(ts, peaks, 1) if len(ts) > 1 else (0.0, peaks[0])
    c1 = slope / b if abs(slope / b) >= BYTE_MB else 0.0
    batch2, t2, peak2 = extra_peaks
    per_sample_at_t2 = (peak2 - (intercept + slope * t2)) / (batch2 - b)  # c0 + c1·t2
    c0 = per_sample_at_t2 - c1 * t2
    return intercept - b * c0, c0, c1


def steps_to_limit(k, c0, c1, batch=LIMIT_BATCH, limit_mb=LIMIT_MB):
    """The T at which K + batch·(c0 + c1·T) reaches limit_mb (inf when memory does not grow with T)."""
    if c1 <= 0:
        return math.inf
    return max((limit_mb - k - batch * c0) / (batch * c1), 0.0)


def largest_batch(fits, cap):
    """(largest b ≤ cap with fits(b), capped) by doubling from 1, then bisection; b = 0 when 1 does not fit."""
    good, bad, b = 0, None, 1
    while bad is None:
        if fits(b):
            good = b
            if b >= cap:
                return good, True
            b = min(2 * b, cap)
        else:
            bad = b
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, False


def cuda_fits(name, time_step, method, device, amp=False, bptt_bn="batch"):
    """fits(batch): whether one training step of `method` at that batch runs without running out of CUDA memory."""
    model, optimizer = build(name, time_step, method, device, bptt_bn=bptt_bn)

    def fits(batch):
        ok = True
        try:
            x, target = make_batch(name, batch, time_step, device)
            TrainingStep(model, optimizer, x, target, amp).full()
        except torch.cuda.OutOfMemoryError:
            ok = False
        x = target = None
        release_step_buffers(model, optimizer)
        torch.cuda.empty_cache()
        return ok

    return fits


# --------------------------------------------------------------------------------- output
def format_cell(column, value):
    """A table cell."""
    if isinstance(value, (int, str)):
        return str(value)
    if column in ("time BPTT/IDE", "mem BPTT/IDE"):
        return f"{value:.2f}"
    if column.endswith(" cos") or column.endswith(" rate"):
        return f"{value:.3f}"
    if column == "fwd residual":
        return f"{value:.2e}"
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def markdown_table(columns, rows, fmt=format_cell):
    """Rows (dicts keyed by columns) as a Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(c, row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def cosine_rows(cosines, time_step):
    """Per-parameter cosine rows of every net at T = time_step."""
    return [{"net": name, "parameter": p, "shape": "×".join(map(str, shape)) or "scalar", "cos": cos}
            for (name, t), per_tensor in cosines.items() if t == time_step
            for p, (shape, cos) in per_tensor.items()]


def memory_rows(rows, extra, device_type, batches):
    """The memory table: CPU fit (K, c0, c1, T to pass 80 GiB at batch 128) or CUDA largest batches."""
    out = []
    for name in dict.fromkeys(r["net"] for r in rows):
        for method in METHODS:
            entry = {"net": name, "method": method.upper()}
            if device_type == "cuda":
                entry["largest batch"], capped = batches[(name, method)]
                entry["largest batch"] = f"≥ {entry['largest batch']}" if capped else entry["largest batch"]
            else:
                k, c0, c1 = memory_model([r for r in rows if r["net"] == name], extra[(name, method)], method)
                t_limit = steps_to_limit(k, c0, c1)
                entry.update({"fixed MB": k, "MB/sample": c0, "MB/sample/step": c1,
                              f"T past 80 GiB at B={LIMIT_BATCH}": "never" if math.isinf(t_limit)
                              else f"{t_limit:.0f}"})
            out.append(entry)
    return out


def memory_cell(column, value):
    """A cell of the memory table."""
    if isinstance(value, (int, str)):
        return str(value)
    return f"{value:.4g}"


def expectation_lines(rows):
    """Whether the measurements show what the method predicts, naming the rows that do not."""
    lines = []
    by = {(r["net"], r["T"]): r for r in rows}
    nets = list(dict.fromkeys(r["net"] for r in rows))
    ts = sorted({r["T"] for r in rows})
    if len(ts) > 1:
        lo, hi = ts[0], ts[-1]
        ratios = {n: by[(n, hi)]["IDE MB"] / by[(n, lo)]["IDE MB"] for n in nets if (n, lo) in by and (n, hi) in by}
        off = [f"{n} {v:.2f}" for n, v in ratios.items() if abs(v - 1) > IDE_FLAT]
        lines.append(f"IDE peak memory flat within ±{IDE_FLAT:.0%} from T={lo} to T={hi}: "
                     + ("not for " + ", ".join(off) if off else "holds")
                     + " (" + ", ".join(f"{n} {v:.2f}" for n, v in ratios.items()) + ")")
    if 10 in ts and 100 in ts:
        growth = {n: by[(n, 100)]["BPTT MB"] / by[(n, 10)]["BPTT MB"] for n in nets
                  if ARCHITECTURES[n].kind == "conv" and (n, 10) in by and (n, 100) in by}
        low = [f"{n} {v:.1f}×" for n, v in growth.items() if v < BPTT_GROWTH]
        lines.append(f"BPTT peak memory ≥ {BPTT_GROWTH:.0f}× from T=10 to T=100 (conv nets): "
                     + ("not for " + ", ".join(low) if low else "holds")
                     + " (" + ", ".join(f"{n} {v:.1f}×" for n, v in growth.items()) + ")")
    if 100 in ts:
        slower = [n for n in nets if (n, 100) in by and by[(n, 100)]["time BPTT/IDE"] <= 1.0]
        lines.append("IDE faster than BPTT at T=100: " + ("not for " + ", ".join(slower) if slower else "holds"))
    return lines


def csv_text(columns, rows):
    """Rows as CSV text with a header line."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_png(rows):
    """PNG bytes of two panels against T, log scales: step time, peak memory; IDE solid, BPTT dashed."""
    from matplotlib.ticker import NullLocator
    fig = figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for i, name in enumerate(dict.fromkeys(r["net"] for r in rows)):
        net_rows = sorted((r for r in rows if r["net"] == name), key=lambda r: r["T"])
        ts = [r["T"] for r in net_rows]
        for ax, (ide_key, bptt_key) in zip(axes, (("IDE ms", "BPTT ms"), ("IDE MB", "BPTT MB"))):
            ax.plot(ts, [r[ide_key] for r in net_rows], "o-", color=f"C{i}", label=f"{name} IDE")
            ax.plot(ts, [r[bptt_key] for r in net_rows], "s--", color=f"C{i}", label=f"{name} BPTT")
    ts = sorted({r["T"] for r in rows})
    for ax, label in zip(axes, ("training step (ms)", "peak memory (MB)")):
        ax.set(xscale="log", yscale="log", xlabel="T (time steps)", ylabel=label)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return png_bytes(fig)


def cpu_name():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def header(args):
    """One line saying where the comparison was measured."""
    if args.device == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"{cpu_name()}, {os.cpu_count()} cores, {args.threads or torch.get_num_threads()} threads"
    return (f"torch {torch.__version__}, {where}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
            f"{'bf16 autocast' if args.amp else 'float32'}, median of {args.repeats}; "
            f"BPTT: sigmoid surrogate, alpha 4, reset gradient kept, loop BN by {args.bptt_bn} statistics")


def report(args, rows, cosines, memory):
    """The Markdown report."""
    t_cos = max(args.time_steps)
    parts = [header(args), ""]
    if args.timing:
        parts += [markdown_table(TIMING_COLUMNS, rows), ""]
    parts += ["Gradients of one batch, IDE against BPTT (SNN cos: every parameter but the classifier's; rates: "
              "the state's mean; fwd residual: |f(a) - a|/|a| of IDE's simulated state):", "",
              markdown_table(GRADIENT_COLUMNS, rows), "",
              f"Cosine of IDE's and BPTT's gradient per parameter tensor at T={t_cos}:", "",
              markdown_table(("net", "parameter", "shape", "cos"), cosine_rows(cosines, t_cos),
                             lambda c, v: f"{v:.3f}" if isinstance(v, float) else str(v)), ""]
    if args.timing:
        parts += [("Largest batch of a training step at T=" + str(t_cos) if args.device == "cuda" else
                   "Peak memory model peak(B, T) = fixed + B·(MB/sample + MB/sample/step·T), fitted to the T "
                   "series at the table's batch and one step at twice that batch"), "",
                  markdown_table(list(memory[0]) if memory else [], memory, memory_cell), ""]
        parts += expectation_lines(rows)
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------- command
def parse_args(argv=None):
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="python -m tools.compare", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--nets", nargs="+", choices=list(NETS), default=list(NETS))
    p.add_argument("--time-steps", nargs="+", type=int, default=[5, 10, 30, 100])
    add_measurement_flags(p)
    p.add_argument("--max-batch", type=int, default=16384, help="CUDA: the largest batch the search tries")
    p.add_argument("--bptt-bn", choices=BN_MODES, default="batch",
                   help="BPTT's loop BN: batch statistics per step, or running statistics (IDE's forward exactly)")
    p.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True,
                   help="measure step time and memory too (--no-timing: the gradients alone)")
    p.add_argument("--out", default="checkpoints/compare", help="folder for compare.md/.csv/.png")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier comparison in --out")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if min(args.time_steps) < 1 or args.repeats < 1 or (args.batch is not None and args.batch < 1):
        p.error("--time-steps, --repeats and --batch must be >= 1")
    args.time_steps = sorted(set(args.time_steps))
    existing = [f for f in OUTPUTS if os.path.exists(os.path.join(args.out, f))]
    if existing and not args.overwrite:
        p.error(f"{args.out} already holds {', '.join(existing)}; choose another --out or pass --overwrite")
    try:  # before minutes of measuring
        check_outputs([os.path.join(args.out, f) for f in OUTPUTS], overwrite=True)
    except CheckpointError as exc:
        p.error(f"--out: {exc}")
    return args


def progress(text):
    """One progress line on stderr (the table goes to stdout)."""
    print(text, file=sys.stderr, flush=True)


def run(args):
    """Measure everything; returns (rows, cosines, memory rows)."""
    device = torch.device(args.device)
    rows, cosines, extra, batches = [], {}, {}, {}
    for name in args.nets:
        batch = batch_size(args, name)
        for time_step in args.time_steps:
            progress(f"{name} T={time_step} batch {batch}")
            row, cosines[(name, time_step)] = measure(name, time_step, batch, device, args.repeats, args.amp,
                                                      bptt_bn=args.bptt_bn, timing=args.timing)
            rows.append(row)
            progress("  " + ", ".join(f"{c} {format_cell(c, row[c])}" for c in COLUMNS[3:] if c in row))
        for method in METHODS if args.timing else ():
            if args.device == "cuda":
                progress(f"{name} {method}: largest batch at T={args.time_steps[-1]}")
                fits = cuda_fits(name, args.time_steps[-1], method, device, args.amp, args.bptt_bn)
                batches[(name, method)] = largest_batch(fits, args.max_batch)
                progress(f"  largest batch {batches[(name, method)]}")
            else:
                t = args.time_steps[0]
                progress(f"{name} {method}: peak at batch {2 * batch}, T={t}")
                extra[(name, method)] = (2 * batch, t, peak_only(name, t, method, 2 * batch, device, args.amp,
                                                                 bptt_bn=args.bptt_bn))
                progress(f"  peak MB {extra[(name, method)][2]:.1f}")
    return rows, cosines, memory_rows(rows, extra, args.device, batches) if args.timing else []


def write_outputs(folder, text, rows, cosines, timing=True):
    """compare.md, compare.csv, compare_cosine.csv and (with timing) compare.png, written atomically together."""
    os.makedirs(folder, exist_ok=True)
    per_tensor = [{"net": name, "T": t, "parameter": p, "shape": "x".join(map(str, shape)), "cos": cos}
                  for (name, t), tensors in cosines.items() for p, (shape, cos) in tensors.items()]
    texts = {"compare.md": text, "compare.csv": csv_text(COLUMNS if timing else GRADIENT_COLUMNS, rows),
             "compare_cosine.csv": csv_text(("net", "T", "parameter", "shape", "cos"), per_tensor)}
    items = [(os.path.join(folder, f), lambda fh, s=s: fh.write(s.encode("utf-8"))) for f, s in texts.items()]
    if timing:
        png = plot_png(rows)
        items.append((os.path.join(folder, "compare.png"), lambda fh: fh.write(png)))
    atomic_write_all(items)


def main(argv=None):
    """Measure, print the Markdown report and write the files."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, cosines, memory = run(args)
    text = report(args, rows, cosines, memory)
    print(text)
    write_outputs(args.out, text, rows, cosines, args.timing)
    written = OUTPUTS if args.timing else OUTPUTS[:-1]
    print(f"written: {', '.join(os.path.join(args.out, f) for f in written)}")


if __name__ == "__main__":
    main()
