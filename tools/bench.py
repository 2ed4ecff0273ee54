"""Training-step benchmark of the paper's nets: `python -m tools.bench`.

A training step is timed whole (`step`, as the training loop runs it) and,
in a second run, part by part through the net's public timing hook
(FeedbackSNN.timer, entered at each FeedbackSNN.region), each region waiting
for the device's queued work at its start and end (a warm-up step first, then
the median of `--repeats` runs):

- sim:   the region "ide.simulate": a power-iteration step, fresh dropout
         masks and the T-step simulation (no autograd);
- solve: the region "ide.solve": the adjoint solve y = v + y·J. It takes n
         iterations, each evaluating the adjoint map y ↦ v + y·J (one
         vector-Jacobian product of f, the region "ide.vjp") once (the damped
         iteration, started from v, evaluates it once more for its initial
         residual, and Broyden once more when the samples' best iterates come
         from different iterations; the solver reports the count as `nfev`),
         so `ms/iter` is solve ms / nfev and `iter/VJP` compares it with the
         median evaluation of the adjoint map (`ms/VJP`): the excess is the
         solver's own overhead. `syncs` counts the solver's copies to the host
         (each waits for the device's queued work): one per iteration for the
         stop test, plus one;
- optim: the optimizer step (SGD with the paper's momentum and weight decay);
- f:     the rest of the timed step: F(x̄), z = f(a) (and f at the Jacobian
         point of multi-layer nets), the classifier and the loss with autograd,
         and the backward to the parameters outside the solve.

`step/parts` is the untimed step's ms over the timed step's: what the timing
itself costs (near 1 when the parts are timed faithfully).

Peak memory (`peak MB`) is the most tensor memory that a training step has
allocated and not yet freed at any moment: activations, the adjoint solver's
buffers, dropout masks and the new gradients, but not what is held across
steps (parameters, optimizer state, and the input batch, whose own size is the
`input MB` column). On CUDA it is torch.cuda.max_memory_allocated() after
reset_peak_memory_stats(), less the memory allocated before the step; on the
CPU the running sum of the allocation and free events that the PyTorch
profiler records during the step (exact and repeatable, unlike the process's
RSS; memory that oneDNN or BLAS allocate outside PyTorch is not counted).

On a machine shared with other processes, OpenMP threads that spin while
waiting make every parallel kernel wait for a scheduler slice;
`OMP_WAIT_POLICY=PASSIVE` avoids it (the header line shows the setting).
Longer than most modules: the measurement, its flags and its table are one program (tools.compare reuses them).
"""
import argparse
import collections
import contextlib
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from modules import ARCHITECTURES, GRADIENTS, NETS, SOLVERS, VariationalDropout, adjoint_solve, build_model, settings
from utils.flags import DefaultsHelpFormatter
from utils.training.console import warn
from utils.training.epoch import AMP_EMULATED, bf16_emulated

# Small batches keep the whole CPU table within minutes on two cores.
CPU_BATCH = {"mnist_conv": 16, "fashion_mlp": 32, "nmnist_conv": 16, "alexnetf": 8, "cifarnetf": 8}
SPIKE_DENSITY = 0.1
COLUMNS = ("net", "T", "amp", "batch", "sim ms", "f fwd+bwd ms", "solve ms", "n iters", "syncs", "ms/iter",
           "ms/VJP", "iter/VJP", "optim ms", "step ms", "step/parts", "img/s", "peak MB", "input MB")
# The benchmark's targets for a training step (docs/benchmarks.md): the parts add up to the
# step, a conv net's solver iteration costs little more than its VJP, and peak memory does not grow with T.
MAX_STEP_OVER_PARTS = 1.15
MAX_ITER_OVER_VJP = 1.3
MAX_PEAK_GROWTH = 1.10


def make_batch(name, batch, time_step, device, seed=0):
    """A random batch at the net's paper input size: images, or spike frames (B, 2, 34, 34, T)."""
    arch = ARCHITECTURES[name]
    gen = torch.Generator().manual_seed(seed)
    if arch.spike_input:
        x = (torch.rand(batch, *arch.input_shape, time_step, generator=gen) < SPIKE_DENSITY).float()
    else:
        x = torch.randn(batch, *arch.input_shape, generator=gen)
    target = torch.randint(0, 10, (batch,), generator=gen)
    return x.to(device), target.to(device)


def build_training(name, time_step, device, seed=0, **gradient_options):
    """The net with the paper's settings (modules.settings: leak, solver, iterations, dropout) and its SGD optimizer.

    gradient_options: build_model's solver (None: the paper's), grad, solver_memory, phantom_k, phantom_tau.
    """
    torch.manual_seed(seed)
    paper = settings.defaults(name)
    options = dict(gradient_options)
    options["solver"] = options.get("solver") or paper["solver"]
    model = build_model(name, time_step=time_step, leaky=paper["leaky"], dropout=paper["drop"],
                        threshold=paper["threshold"], **options).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=paper["lr"], momentum=paper["momentum"],
                                weight_decay=paper["weight_decay"])
    return model, optimizer


class TrainingStep:
    """One training step of an SNNClassifier as the training loop runs it (`full`), optionally timed part by part."""

    def __init__(self, model, optimizer, x, target, amp=False):
        self.model, self.optimizer, self.x, self.target, self.amp = model, optimizer, x, target, amp

    def autocast(self):
        """bf16 autocast on the input's device when amp is on."""
        return torch.autocast(self.x.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def full(self, timer=None):
        """The step as the training loop runs it; returns the loss.

        timer (a RegionTimer) times the whole step as "step", the optimizer step as "optim" and, through
        FeedbackSNN.timer, the net's own regions (FeedbackSNN.region).
        """
        region = timer or (lambda name: contextlib.nullcontext())
        self.model.snn.timer = timer
        try:
            with region("step"):
                self.optimizer.zero_grad(set_to_none=True)
                with self.autocast():
                    loss = F.cross_entropy(self.model(self.x), self.target)
                loss.backward()
                with region("optim"):
                    self.optimizer.step()
        finally:
            self.model.snn.timer = None
        return loss.detach()


class RegionTimer:
    """A FeedbackSNN.timer: the wall time of every region entered, device work included, in ms per region name."""

    def __init__(self, device):
        self.device = device
        self.ms = collections.defaultdict(list)

    @contextlib.contextmanager
    def __call__(self, name):
        """Time the block as one run of region `name`."""
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.ms[name].append(1e3 * (time.perf_counter() - start))


def synchronize(device):
    """Wait for queued work on a CUDA device (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device):
    """Wall time of fn() in milliseconds, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return 1e3 * (time.perf_counter() - start)


@contextlib.contextmanager
def native_stderr_silenced():
    """Send file descriptor 2 to /dev/null for the block (the profiler's native status lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_mb(fn):
    """Peak MB of CPU tensor memory allocated by fn() and alive at once, from the profiler's allocation events."""
    # The profiler logs its stages on stderr; fn already ran several times, so nothing else is hidden.
    with native_stderr_silenced(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda event: event[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2 ** 20


def cuda_peak_mb(fn, device):
    """Peak CUDA memory of fn() above what was allocated before, in MB."""
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def time_parts(step, repeats, device):
    """Median ms of every part and of the whole step, and (iterations, host syncs) of the median solve."""
    runs = {part: [] for part in ("sim", "f", "solve", "iter", "vjp", "optim", "step")}
    iterations = []
    for _ in range(repeats):
        runs["step"].append(time_ms(step.full, device))
        timer = RegionTimer(device)
        step.full(timer)
        ms = {name: sum(values) for name, values in timer.ms.items()}
        info = step.model.solver_stats
        iterations.append((info["nstep"], info["syncs"]))
        runs["sim"].append(ms["ide.simulate"])
        runs["solve"].append(ms["ide.solve"])
        runs["optim"].append(ms["optim"])
        runs["f"].append(ms["step"] - ms["ide.simulate"] - ms["ide.solve"] - ms["optim"])
        runs["iter"].append(ms["ide.solve"] / max(info["nfev"], 1))
        runs["vjp"].append(statistics.median(timer.ms["ide.vjp"]) if timer.ms["ide.vjp"] else math.nan)
    ms = {part: statistics.median(values) for part, values in runs.items()}
    return ms, statistics.median_low(iterations)


def release_step_buffers(model, optimizer):
    """Free the gradients and dropout masks, as a training step does first, so that its peak counts them anew."""
    optimizer.zero_grad(set_to_none=True)
    for module in model.modules():
        if isinstance(module, VariationalDropout):
            module.reset()


def measure(name, time_step, batch, device="cpu", amp=False, repeats=3, seed=0, **gradient_options):
    """One table row (a dict keyed by COLUMNS) for net `name` at T = time_step (options: see build_training)."""
    device = torch.device(device)
    model, optimizer = build_training(name, time_step, device, seed, **gradient_options)
    x, target = make_batch(name, batch, time_step, device, seed)
    step = TrainingStep(model, optimizer, x, target, amp)
    step.full()  # warm-up: kernels chosen, optimizer state allocated
    ms, (n, syncs) = time_parts(step, repeats, device)
    release_step_buffers(model, optimizer)
    peak = cuda_peak_mb(step.full, device) if device.type == "cuda" else cpu_peak_mb(step.full)
    parts_sum = ms["sim"] + ms["f"] + ms["solve"] + ms["optim"]
    return {"net": name, "T": time_step, "amp": amp, "batch": batch,
            "sim ms": ms["sim"], "f fwd+bwd ms": ms["f"], "solve ms": ms["solve"], "n iters": n, "syncs": syncs,
            "ms/iter": ms["iter"], "ms/VJP": ms["vjp"], "iter/VJP": ms["iter"] / ms["vjp"],
            "optim ms": ms["optim"], "step ms": ms["step"], "step/parts": ms["step"] / parts_sum,
            "img/s": 1e3 * batch / ms["step"], "peak MB": peak,
            "input MB": x.element_size() * x.numel() / 2 ** 20}


def format_cell(column, value):
    """A table cell."""
    if isinstance(value, bool):
        return "bf16" if value else "fp32"
    if isinstance(value, (int, str)):
        return str(value)
    if column in ("iter/VJP", "step/parts", "input MB"):
        return f"{value:.2f}"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def markdown_table(rows):
    """The rows as one Markdown table with COLUMNS."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(format_cell(c, row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def constraint_lines(rows):
    """One line per target of the benchmark, naming the rows that miss it."""
    over = [f"{r['net']} T={r['T']}" for r in rows if r["step/parts"] > MAX_STEP_OVER_PARTS]
    slow = [f"{r['net']} T={r['T']}" for r in rows
            if ARCHITECTURES[r["net"]].kind == "conv" and r["iter/VJP"] > MAX_ITER_OVER_VJP]
    growth = []
    for r in rows:
        for q in rows:
            if (q["net"], q["amp"], q["batch"]) == (r["net"], r["amp"], r["batch"]) and q["T"] > r["T"]:
                ratio = q["peak MB"] / r["peak MB"]
                growth.append((f"{r['net']} T={q['T']}/T={r['T']}: {ratio:.2f}", ratio))
    bad_growth = [text for text, ratio in growth if not ratio <= MAX_PEAK_GROWTH]
    return [f"step/parts <= {MAX_STEP_OVER_PARTS}: " + ("exceeded by " + ", ".join(over) if over else "all rows hold"),
            f"iter/VJP <= {MAX_ITER_OVER_VJP} (conv nets): "
            + ("exceeded by " + ", ".join(slow) if slow else "all rows hold"),
            f"peak MB growth with T <= {MAX_PEAK_GROWTH}: "
            + ("exceeded by " + "; ".join(bad_growth) if bad_growth else "all hold")
            + (" (" + "; ".join(text for text, _ in growth) + ")" if growth else "")]


def add_measurement_flags(p):
    """The flags of how a training step is measured, shared with tools.compare."""
    p.add_argument("--batch", type=int, default=None,
                   help="batch size of every net (default: 32 on CUDA; per net on the CPU: "
                        + ", ".join(f"{k} {v}" for k, v in CPU_BATCH.items()) + ")")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast, as the training scripts' --amp")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")


def parse_args(argv=None):
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--nets", nargs="+", choices=tuple(NETS), default=list(NETS))
    p.add_argument("--time-steps", nargs="+", type=int, default=[30, 100])
    add_measurement_flags(p)
    p.add_argument("--solver", choices=sorted(SOLVERS), default=None, help="adjoint solver (default: the net's)")
    p.add_argument("--solver-memory", type=int, default=None, help="memory of broyden/anderson (default: theirs)")
    p.add_argument("--grad", choices=sorted(GRADIENTS), default="ide", help="gradient mode (modules.implicit)")
    p.add_argument("--phantom-k", type=int, default=5, help="phantom gradient steps")
    p.add_argument("--phantom-tau", type=float, default=0.5, help="phantom gradient step size")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if min(args.time_steps) < 1 or args.repeats < 1 or (args.batch is not None and args.batch < 1):
        p.error("--time-steps, --repeats and --batch must be >= 1")
    try:
        adjoint_solve(args.grad, args.solver or "broyden", 30, None, args.solver_memory, args.phantom_k,
                      args.phantom_tau)
    except ValueError as error:
        p.error(str(error))
    return args


def batch_size(args, name):
    """The batch size for net `name`."""
    if args.batch is not None:
        return args.batch
    return 32 if args.device == "cuda" else CPU_BATCH[name]


def header(args):
    """One line saying where the table was measured."""
    threads = args.threads or torch.get_num_threads()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {threads} threads"
    gradient = f"grad={args.grad}" + (f" (K={args.phantom_k}, tau={args.phantom_tau})" if args.grad == "phantom" else "")
    if args.grad == "ide":
        gradient += f", solver={args.solver or 'the paper net default'}" + (
            f", memory {args.solver_memory}" if args.solver_memory else "")
    return (f"torch {torch.__version__}, {where}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
            f"median of {args.repeats}, {gradient}")


def main(argv=None):
    """Measure every (net, T) and print the table."""
    args = parse_args(argv)
    if args.amp and bf16_emulated(torch.device(args.device)):  # as the training scripts do
        warn(AMP_EMULATED)
        args.amp = False
    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(solver=args.solver, grad=args.grad, solver_memory=args.solver_memory, phantom_k=args.phantom_k,
                   phantom_tau=args.phantom_tau)
    rows = [measure(name, time_step, batch_size(args, name), args.device, args.amp, args.repeats, **options)
            for name in args.nets for time_step in args.time_steps]
    print(header(args))
    print()
    print(markdown_table(rows))
    print()
    for line in constraint_lines(rows):
        print(line)


if __name__ == "__main__":
    main()
