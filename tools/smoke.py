"""Check that training works on this machine's device: `python -m tools.smoke [--device cuda|cpu]`.

Four kinds of check, each printing one PASS/FAIL line, then a summary table;
the exit code is 1 if any check failed:

- step: every paper net takes one training step in float32 and under --amp
  (bf16 autocast), on CUDA also with TF32 allowed; every parameter must have
  a finite gradient, and the gradients must match those of a float64 copy of
  the same weights on the CPU, fed the same batch and the device's simulated
  rate (so that a spike flipped by rounding does not count as an error), to
  the tolerance of the mode (TOLERANCE), and the adjoint solve must reach
  RESIDUAL_LIMIT;
- resume: two epochs of mnist_conv (or `--resume-net`) on `digits` equal one epoch plus a resumed
  one, bit for bit (on CUDA with --deterministic), and the checkpoint evaluates
  on the CPU (`-e --resume`) to the accuracy it stores;
- ddp: two processes (torchrun, Gloo on CPUs; NCCL with --sync-bn when two
  GPUs are visible) take three steps of mnist_conv and alexnetf on small fake
  data sets and end with equal parameters;
- bench: `tools.bench` rows of mnist_conv and alexnetf at T = 30 and 100.

Longer than most modules: the four checks are one program, run together on a new machine.
"""
import argparse
import contextlib
import copy
import importlib
import io
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

from modules import NETS, build_model, precision
from tools import bench
from utils.checkpoint import CHECKPOINT_NAME
from utils.flags import DefaultsHelpFormatter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ("step", "resume", "ddp", "bench")
# mode: (bf16 autocast, TF32 allowed)
MODES = {"fp32": (False, False), "amp": (True, False), "fp32+tf32": (False, True), "amp+tf32": (True, True)}
# Relative error of all gradients against float64 at the same simulated rate that each mode must meet.
# float32 carries 24 bits, TF32 11 and bf16 8; rounding moves f's clamps and the deep nets' Jacobian point
# z = f(a), and (I - J)⁻¹ amplifies it. Measured on a CPU at T = 8, batch 8: float32 7e-8 (mnist_conv) to
# 4.4e-3 (cifarnetf), bf16 4e-3 to 0.14 (alexnetf, cifarnetf). TF32 (not measurable on a CPU) lies between.
TOLERANCE = {"fp32": 1e-2, "amp": 3e-1, "fp32+tf32": 3e-1, "amp+tf32": 3e-1}
# The smallest batch of the step and ddp checks: the tolerances hold there for every net (measured on a CPU
# at T = 8: amp 4e-3 to 0.10 at batch 4, 4e-3 to 0.11 at batch 8), while at batch 2 fashion_mlp's amp error
# reached 0.59, and at batch 1 its BatchNorm has no variance to normalise by.
MIN_BATCH = 4
# The adjoint solve always runs in full float32, so every mode must bring its residual this low
# (measured 4e-8 to 4e-7; TF32 products stalled near 2e-5 at the 30-iteration cap).
RESIDUAL_LIMIT = 5e-6
DDP_NETS = ("mnist_conv", "alexnetf")
DDP_WORLD = 2
TIMEOUT_S = 900

LAUNCHER = '''\
"""One torchrun process of a training script; saves its network's final state_dict as rank<RANK>.pt."""
import importlib, os, sys
repo, script, out = sys.argv[1:4]
sys.path.insert(0, repo)
import torch
from utils.training import distributed
nets, real_wrap = [], distributed.wrap
def wrap(model, *args, **kwargs):
    nets.append(model)
    return real_wrap(model, *args, **kwargs)
distributed.wrap = wrap
importlib.import_module(script).main(sys.argv[4:])
state = {k: v.detach().cpu() for k, v in nets[0].state_dict().items()}
torch.save(state, os.path.join(out, 'rank%s.pt' % os.environ['RANK']))
'''


class Report:
    """The results so far: prints one line per check and the table at the end."""

    def __init__(self):
        self.rows = []

    def add(self, check, name, ok, detail):
        """Record and print one check's result."""
        self.rows.append((check, name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {check:<6} {name:<24} {detail}", flush=True)

    def failed(self):
        """The number of failed checks."""
        return sum(not ok for _, _, ok, _ in self.rows)

    def table(self):
        """The summary as a Markdown table."""
        lines = ["| check | what | result | detail |", "|---|---|---|---|"]
        lines += [f"| {c} | {n} | {'PASS' if ok else 'FAIL'} | {d} |" for c, n, ok, d in self.rows]
        return "\n".join(lines)


class ChildFailed(RuntimeError):
    """A child process failed; `tail` holds its last lines of output, printed under the FAIL line."""

    def __init__(self, what, output, lines=15):
        self.tail = [line for line in output.strip().splitlines() if line.strip()][-lines:]
        super().__init__(f"{what}; last line: {self.tail[-1] if self.tail else '(no output)'}")


def attempt(report, check, name, work):
    """Run work() -> (ok, detail); an exception is a FAIL with its one-line message (and a child's last lines)."""
    tail = ()
    try:
        ok, detail = work()
    except Exception as exc:  # a broken check must not hide the others
        ok, detail = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        tail = getattr(exc, "tail", ())
    report.add(check, name, ok, detail)
    for line in tail:
        print(f"      | {line}", flush=True)


@contextlib.contextmanager
def quiet():
    """Swallow what the block prints (the training scripts' progress); re-raise its errors with the text."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield out
    except SystemExit as exc:
        raise RuntimeError(f"exit {exc.code}: {out.getvalue().strip()[-500:]}") from None


@contextlib.contextmanager
def tf32_policy(enabled):
    """allow_tf32(enabled) for the block; the policy and PyTorch's flags as before afterwards."""
    allowed, flags = precision.tf32_allowed(), precision.tf32_flags()
    precision.allow_tf32(enabled)
    try:
        yield
    finally:
        precision.allow_tf32(allowed)
        precision.set_tf32_flags(flags)


# ------------------------------------------------------------------------------ step
def calibrate_bn(model, x):
    """BN running statistics set to this batch's (a training forward at momentum 1), as a few steps would:
    with the initial ones the deep layers of the multi-layer nets are silent and most gradients zero."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 1.0
    model(x)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum


def paper_model(name, time_step, threshold, seed=0):
    """A paper net with its leak and solver, no dropout (the device and the reference draw no masks)."""
    torch.manual_seed(seed)
    return build_model(name, time_step=time_step, leaky=NETS[name].leaky, solver=NETS[name].solver,
                       threshold=threshold).train()


def gradients_at_rate(model, x, target, rate=None, amp=False):
    """(gradients, simulated rate) of one cross-entropy step; `rate` given replaces the simulation's."""
    snn = model.snn
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        snn.begin_forward()  # the reference too: its power-iteration step sets the feedback's scale
        if rate is None:
            with precision.forward_precision():
                rate, _ = snn.simulate(x)
        loss = F.cross_entropy(model.classifier(snn(x, rate).flatten(1)), target)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, rate


def relative_error(grads, reference):
    """‖g - g_ref‖ / ‖g_ref‖ over all parameters together (0 when both vanish)."""
    diff = math.sqrt(sum(float((grads[n].cpu().double() - g).square().sum()) for n, g in reference.items()))
    norm = math.sqrt(sum(float(g.square().sum()) for g in reference.values()))
    return diff / norm if norm > 0 else diff


def step_check(name, mode, device, time_step, batch, threshold):
    """One training step of net `name` in `mode` on device against float64 on the CPU: (ok, detail)."""
    amp, tf32 = MODES[mode]
    model = paper_model(name, time_step, threshold)
    x, target = bench.make_batch(name, batch, time_step, "cpu")
    if model.snn.layers:
        calibrate_bn(model, x)
    reference = copy.deepcopy(model).double()
    model.to(device)
    with tf32_policy(tf32):
        grads, rate = gradients_at_rate(model, x.to(device), target.to(device), amp=amp)
    stats = model.solver_stats
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    ref_grads, _ = gradients_at_rate(reference, x.double(), target, rate=rate.detach().cpu().double())
    error = relative_error(grads, ref_grads) if not missing else math.inf
    tol = TOLERANCE[mode]
    detail = (f"{stats['nstep']} iters, rel residual {stats['rel_residual']:.1e} (limit {RESIDUAL_LIMIT:.0e}), "
              f"grad rel err vs float64 {error:.1e} (tol {tol:.0e})")
    if missing:
        detail += f"; no finite gradient: {', '.join(missing[:3])}"
    return not missing and error <= tol and stats["rel_residual"] <= RESIDUAL_LIMIT, detail


# ------------------------------------------------------------------------------ resume
def script_main(name):
    """The training script's main(argv) of net `name`."""
    return importlib.import_module(NETS[name].script[:-3]).main


def load_state(path):
    """A checkpoint's state_dict, on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def resume_check(name, device, time_step, batch, threshold, folder):
    """Two epochs against one plus a resumed one (bit-identical weights), then CPU evaluation: (ok, detail)."""
    main = script_main(name)
    base = ["--dataset", "digits", "-j", "0", "--path", os.path.join(folder, "data"), "--time_step", time_step,
            "--train-batch", batch, "--threshold", threshold, "--schedule", 5, "--manualSeed", 0]
    if device == "cuda":
        base.append("--deterministic")
    base = [str(a) for a in base]
    straight, split = os.path.join(folder, "straight"), os.path.join(folder, "split")
    with quiet():
        main(base + ["-c", straight, "--epochs", "2"])
        main(base + ["-c", split, "--epochs", "1"])
        main(["--resume", os.path.join(split, CHECKPOINT_NAME), "--epochs", "2"]
             + (["--deterministic"] if device == "cuda" else []))
    a, b = (load_state(os.path.join(f, CHECKPOINT_NAME)) for f in (straight, split))
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    on_cpu = all(t.device.type == "cpu" for t in b["state_dict"].values())
    acc = evaluate_on_cpu(name, os.path.join(split, CHECKPOINT_NAME), device, folder)
    # The same device evaluates to the stored accuracy exactly; another may flip a spike, so an image or two.
    acc_ok = abs(acc - b["acc"]) <= (1e-6 if device == "cpu" else 1.0)
    detail = (f"{len(differ)} of {len(a['state_dict'])} tensors differ after 2 epochs vs 1+1; "
              f"CPU evaluation {acc:.2f}% vs stored {b['acc']:.2f}%")
    return not differ and on_cpu and acc_ok, detail


def evaluate_on_cpu(name, checkpoint, device, folder):
    """Test accuracy of `-e --resume checkpoint` run on the CPU (a process without CUDA when device is cuda)."""
    argv = ["-e", "--resume", checkpoint, "-j", "0", "--path", os.path.join(folder, "data")]
    if device == "cpu":
        with quiet():
            return float(script_main(name)(argv)["acc"])
    code = (f"import sys; sys.path.insert(0, {REPO!r}); import {NETS[name].script[:-3]} as s; "
            f"print('ACC', s.main({argv!r})['acc'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    lines = [line for line in out.stdout.splitlines() if line.startswith("ACC ")]
    if out.returncode != 0 or not lines:
        raise ChildFailed(f"CPU evaluation failed (exit {out.returncode})", out.stdout + out.stderr)
    return float(lines[-1].split()[1])


# ------------------------------------------------------------------------------ ddp
def fake_data(name, root, n_train, n_test):
    """A small fake data set in the real format of net `name`'s own data set: (--dataset, --path)."""
    from tools import fakedata
    dataset = NETS[name].dataset
    if dataset == "nmnist":  # every digit in both splits: at least max(n_train, n_test) samples each
        fakedata.make_nmnist_tree(root, fmt="raw", per_class=-(-max(n_train, n_test) // 10))
    elif dataset == "cifar10":
        fakedata.make_cifar(root, n_train=n_train, n_test=n_test)
    else:
        fakedata.make_mnist(root, n_train=n_train, n_test=n_test,
                            kind={"mnist": "MNIST", "fashionmnist": "FashionMNIST"}[dataset])
    return dataset, root


def ddp_check(name, device, time_step, batch, threshold, steps, folder):
    """`steps` steps of net `name` in two torchrun processes; parameters equal on both: (ok, detail)."""
    nccl = device == "cuda" and torch.cuda.device_count() >= DDP_WORLD
    out = os.path.join(folder, f"ddp_{name}")
    os.makedirs(out)
    dataset, root = fake_data(name, os.path.join(out, "data"), DDP_WORLD * steps * batch, DDP_WORLD * batch)
    launcher = os.path.join(out, "launch.py")
    with open(launcher, "w", encoding="utf-8") as f:
        f.write(LAUNCHER)
    argv = ["--dataset", dataset, "--path", root, "-j", "0", "--time_step", time_step, "--train-batch", batch,
            "--test-batch", batch, "--epochs", 1, "--threshold", threshold, "--manualSeed", 0,
            "-c", os.path.join(out, "run")] + (["--sync-bn"] if nccl else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    if not nccl:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(DDP_WORLD), launcher, REPO, NETS[name].script[:-3], out, *map(str, argv)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    saved = [os.path.join(out, f"rank{r}.pt") for r in range(DDP_WORLD)]
    if proc.returncode != 0 or not all(os.path.isfile(p) for p in saved):
        raise ChildFailed(f"torchrun exit {proc.returncode}", proc.stdout + proc.stderr)
    first, second = (torch.load(p, weights_only=True) for p in saved)
    differ = [k for k in first if not torch.equal(first[k], second[k])]
    backend = "NCCL --sync-bn" if nccl else "Gloo (CPU)"
    return not differ, f"{backend}, {steps} steps: {len(differ)} of {len(first)} tensors differ between the ranks"


# ------------------------------------------------------------------------------ bench
def bench_check(device, time_steps, batch, nets=DDP_NETS):
    """tools.bench rows for nets at time_steps: (ok, detail, rows); every number finite, memory flat in T.

    A solve that stops before any iteration evaluates no VJP: its ms/VJP and iter/VJP are nan, not a failure.
    """
    rows = [bench.measure(name, t, batch or bench.batch_size(argparse.Namespace(batch=None, device=device), name),
                          device, repeats=1) for name in nets for t in time_steps]
    finite = all(math.isfinite(v) for r in rows for c, v in r.items() if isinstance(v, float)
                 and not (c in ("ms/VJP", "iter/VJP") and r["n iters"] == 0))
    growth = max((q["peak MB"] / r["peak MB"] for r in rows for q in rows
                  if q["net"] == r["net"] and q["T"] > r["T"]), default=1.0)
    ok = finite and growth <= bench.MAX_PEAK_GROWTH
    steps = ", ".join(f"{r['net']} T={r['T']} {r['step ms']:.0f} ms" for r in rows)
    return ok, f"{steps}; peak memory growth with T {growth:.2f} (limit {bench.MAX_PEAK_GROWTH})", rows


# ------------------------------------------------------------------------------ main
def parse_args(argv=None):
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="python -m tools.smoke", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    p.add_argument("--nets", nargs="+", choices=tuple(NETS), default=list(NETS), help="nets of the step check")
    p.add_argument("--modes", nargs="+", choices=tuple(MODES), default=None,
                   help="modes of the step check (default: fp32 and amp; on CUDA also with TF32)")
    p.add_argument("--time-step", type=int, default=8, help="T of the step, resume and ddp checks")
    p.add_argument("--batch", type=int, default=8, help="batch of the step and ddp checks")
    p.add_argument("--threshold", type=int, default=30, help="adjoint solver iterations")
    p.add_argument("--resume-net", choices=("mnist_conv", "fashion_mlp"), default="mnist_conv",
                   help="net of the resume check (both train on digits)")
    p.add_argument("--resume-batch", type=int, default=64, help="training batch of the resume check")
    p.add_argument("--ddp-nets", nargs="+", choices=tuple(NETS), default=list(DDP_NETS))
    p.add_argument("--ddp-steps", type=int, default=3)
    p.add_argument("--bench-nets", nargs="+", choices=tuple(NETS), default=list(DDP_NETS))
    p.add_argument("--bench-time-steps", nargs="+", type=int, default=[30, 100])
    p.add_argument("--bench-batch", type=int, default=None, help="(default: tools.bench's for the device)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if min([args.time_step, args.batch, args.threshold, args.resume_batch, args.ddp_steps, *args.bench_time_steps]) < 1:
        p.error("--time-step, --batch, --threshold, --resume-batch, --ddp-steps and --bench-time-steps must be >= 1")
    if args.batch < MIN_BATCH:
        p.error(f"--batch: expected at least {MIN_BATCH}, the smallest batch at which the checks' tolerances "
                f"were measured, got {args.batch}")
    if args.modes is None:
        args.modes = list(MODES) if args.device == "cuda" else ["fp32", "amp"]
    return args


def run_checks(args, report, folder):
    """Every check asked for, in order, into report."""
    if "step" in args.checks:
        for name in args.nets:
            for mode in args.modes:
                attempt(report, "step", f"{name} {mode}", lambda: step_check(
                    name, mode, args.device, args.time_step, args.batch, args.threshold))
    if "resume" in args.checks:
        attempt(report, "resume", f"{args.resume_net} digits", lambda: resume_check(
            args.resume_net, args.device, args.time_step, args.resume_batch, args.threshold, folder))
    if "ddp" in args.checks:
        for name in args.ddp_nets:
            attempt(report, "ddp", name, lambda: ddp_check(
                name, args.device, args.time_step, args.batch, args.threshold, args.ddp_steps, folder))
    if "bench" in args.checks:
        tables = []

        def bench_work():
            ok, detail, rows = bench_check(args.device, args.bench_time_steps, args.bench_batch, args.bench_nets)
            tables.append(bench.markdown_table(rows))
            return ok, detail

        attempt(report, "bench", " ".join(args.bench_nets), bench_work)
        for table in tables:
            print("\n" + table)


def main(argv=None):
    """Run the checks; exit code 1 if any failed."""
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the training scripts pick a GPU whenever one is visible
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"smoke check: torch {torch.__version__}, {where}, T={args.time_step}, batch {args.batch}", flush=True)
    report, started = Report(), time.monotonic()
    try:  # the checks' runs write into a scratch folder: made before any of them
        scratch = tempfile.TemporaryDirectory(prefix="smoke_")
    except OSError as exc:
        sys.exit(f"python -m tools.smoke: error: cannot make a scratch folder: {exc}")
    with scratch as folder:
        run_checks(args, report, folder)
    print("\n" + report.table())
    failed = report.failed()
    print(f"\n{len(report.rows) - failed} passed, {failed} failed in {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
