"""The adjoint solvers (Broyden, Anderson, the damped iteration) against NumPy/SciPy solutions."""
import math

import numpy as np
import pytest
import scipy.optimize
import torch

from modules.solvers import SOLVERS, _LowRankInverse, anderson, broyden, fixed_point_iter, get_solver, phantom_steps

pytestmark = pytest.mark.usefixtures("single_thread")

SOLVER_FUNCS = {name: entry.solve for name, entry in SOLVERS.items()}
ALL_SOLVERS = sorted(SOLVER_FUNCS)


def random_contraction(batch, n, radius, seed):
    """(B, n, n) matrices J with spectral radius exactly `radius` (< 1), float64."""
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
    rho = torch.linalg.eigvals(J).abs().amax(dim=1)
    return J * (radius / rho)[:, None, None]


def linear_problem(batch=4, n=12, radius=0.8, seed=0):
    """func(y) = v + y·J per sample, and its solution v (I - J)^-1 computed by numpy.linalg.solve."""
    J = random_contraction(batch, n, radius, seed)
    v = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    eye = np.eye(n)
    exact = np.stack([np.linalg.solve((eye - J[b].numpy()).T, v[b].numpy()) for b in range(batch)])

    def func(y):
        return v + torch.einsum("bn,bnm->bm", y, J)
    return func, v, torch.from_numpy(exact)


def rel_err(a, b):
    """Relative error ‖a - b‖ / ‖b‖ over the whole batch."""
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_linear_adjoint_problem_matches_numpy(solver):
    """Every solver solves batched y = v + y·J (spectral radius 0.8) to 1e-8 of numpy.linalg.solve."""
    func, v, exact = linear_problem()
    y, info = SOLVER_FUNCS[solver](func, torch.zeros_like(v), max_iter=300, tol=None)
    err = rel_err(y, exact)
    print(f"{solver}: relative error {err:.1e} after {info['nstep']} iterations")
    assert err <= 1e-8
    assert info["residual"] <= 1e-8 * info["init_residual"]
    assert info["stop"] == "tol" and info["nstep"] < 300


def test_broyden_is_fast_on_linear_problems():
    """Broyden converges on a non-normal linear problem in far fewer steps than the damped
    iteration, whose error after 30 steps is still far from 1e-8 at spectral radius 0.95."""
    func, v, exact = linear_problem(n=8, radius=0.95, seed=3)
    y_b, info_b = broyden(func, torch.zeros_like(v), max_iter=30)
    y_i, _ = fixed_point_iter(func, torch.zeros_like(v), max_iter=30)
    print(f"30 steps: broyden {rel_err(y_b, exact):.1e}, iter {rel_err(y_i, exact):.1e}")
    assert rel_err(y_b, exact) <= 1e-8
    assert rel_err(y_i, exact) > 1e-4


def reference_broyden(func, y0, max_iter, memory):
    """Textbook limited-memory good Broyden with a dense inverse-Jacobian estimate, one sample at a time.

    H starts at -I and takes the rank-one update (Δy - HΔg) Δyᵀ H / (Δyᵀ H Δg);
    once `memory` terms are stored the oldest is subtracted again. Returns each
    sample's lowest-residual iterate.
    """
    out = []
    for b in range(y0.shape[0]):
        g = lambda z: (func(z[None].expand(y0.shape[0], -1)) - z)[b]  # noqa: E731
        n = y0.shape[1]
        y, terms = y0[b].clone(), []
        H = -torch.eye(n, dtype=y0.dtype)
        gy = g(y)
        best, best_res = y, gy.norm()
        for _ in range(max_iter):
            y_new = y - H @ gy
            g_new = g(y_new)
            dy, dg = y_new - y, g_new - gy
            vT = dy @ H
            u = (dy - H @ dg) / (vT @ dg)
            terms.append((u, vT))
            H = H + torch.outer(u, vT)
            if len(terms) > memory:
                u_old, v_old = terms.pop(0)
                H = H - torch.outer(u_old, v_old)
            y, gy = y_new, g_new
            if gy.norm() < best_res:
                best, best_res = y, gy.norm()
        out.append(best)
    return torch.stack(out)


@pytest.fixture(params=["broadcast", "matmul"])
def products(request, monkeypatch):
    """Run Broyden's products with H both ways: broadcast (the CPU's) and batched matrix products (CUDA's)."""
    if request.param == "matmul":
        monkeypatch.setattr(_LowRankInverse, "MATMUL_DEVICES", ("cuda", "cpu"))
    return request.param


@pytest.mark.parametrize("memory", [1, 3, 27])
def test_broyden_matches_the_textbook_method(memory, products):
    """With iterates tracked per sample, our Broyden takes exactly the steps of a dense textbook
    implementation, including when the limited memory overwrites its oldest terms, with H's products
    run either way."""
    func, v, exact = linear_problem(batch=3, n=10, radius=0.9, seed=5)
    steps = 8
    y, info = broyden(func, torch.zeros_like(v), max_iter=steps, tol=None, memory=memory)
    assert info["nstep"] == steps
    assert rel_err(y, reference_broyden(func, torch.zeros_like(v), steps, memory)) <= 1e-10
    if memory >= 10:  # with a memory as large as the problem, it also converges
        y_long, _ = broyden(func, torch.zeros_like(v), max_iter=200, tol=None, memory=memory)
        assert rel_err(y_long, exact) <= 1e-8


def test_broyden_long_solve_rewrites_its_basis_without_changing_the_steps(products):
    """With memory 3 the storage holds 11 vectors, so 60 iterations rewrite the basis several times
    (as the terms of H, the newest residual and H g): the iterates stay those of the dense textbook
    method."""
    func, v, _ = linear_problem(batch=3, n=40, radius=0.95, seed=13)
    y, info = broyden(func, torch.zeros_like(v), max_iter=60, tol=None, memory=3)
    assert info["nstep"] == 60
    assert rel_err(y, reference_broyden(func, torch.zeros_like(v), 60, 3)) <= 1e-9


@pytest.mark.parametrize("memory", [4, 27])
def test_broyden_in_float32_follows_the_textbook_method(memory, products):
    """In float32, 30 iterations on a 200-dimensional problem stay as close to the dense float64
    textbook method as the dense method itself run in float32 (within 10×, about 1e-7 here):
    working through the Gram matrix of the stored residuals loses no accuracy, with or without
    memory overwrites. The bound follows this CPU's own float32 rounding."""
    func, v, _ = linear_problem(batch=3, n=200, radius=0.95, seed=7)
    reference = reference_broyden(func, torch.zeros_like(v), 30, memory)
    func32 = lambda z: func(z.double()).float()  # noqa: E731
    y0 = torch.zeros_like(v, dtype=torch.float32)
    dense32 = reference_broyden(func32, y0, 30, memory)
    y, info = broyden(func32, y0, max_iter=30, tol=None, memory=memory)
    assert info["nstep"] == 30
    err, floor = rel_err(y.double(), reference), rel_err(dense32.double(), reference)
    print(f"memory {memory}: float32 error {err:.1e}, the dense method's in float32 {floor:.1e}")
    assert 0 < floor <= 1e-6 and err <= 10 * floor


def test_damped_iteration_fixed_point_is_the_true_solution():
    """The damped update y ← y + ½(func(y) - y) converges to v(I - J)^-1, not to v(2I - J)^-1
    (the release's damping of the residual)."""
    func, v, exact = linear_problem(batch=2, n=6, radius=0.5, seed=5)
    y, _ = fixed_point_iter(func, v.clone(), max_iter=200)
    J = random_contraction(2, 6, 0.5, 5)
    wrong = torch.stack([torch.linalg.solve((2 * torch.eye(6, dtype=J.dtype) - J[b]).T, v[b]) for b in range(2)])
    assert rel_err(y, exact) <= 1e-8
    assert rel_err(y, wrong) > 0.1


def nonlinear_problem(batch=3, n=6, seed=7):
    """func(y) = v + tanh(y·A)/2 per sample (a contraction for ‖A‖ ≤ 1)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
    A = A / torch.linalg.matrix_norm(A, 2)[:, None, None]
    v = torch.randn(batch, n, generator=gen, dtype=torch.float64)

    def func(y):
        return v + torch.tanh(torch.einsum("bn,bnm->bm", y, A)) / 2
    return func, v, A


def scipy_reference(func, v, method):
    """Each sample's solution of func(y) = y from SciPy (`root` or `anderson`), checked by its residual.

    SciPy's success flag is not used: near the last bits its stopping tests depend on the CPU's
    rounding (`root` at tol 1e-14 reports "xtol is too small" on some CPUs with a fine solution).
    """
    exact = []
    for b in range(v.shape[0]):
        def residual(y, b=b):
            full = v.clone()
            full[b] = torch.from_numpy(np.asarray(y))
            return (func(full) - full)[b].numpy()
        if method == "root":
            x = scipy.optimize.root(residual, np.zeros(v.shape[1]), tol=1e-14).x
        else:
            x = scipy.optimize.anderson(residual, np.zeros(v.shape[1]), M=5, f_tol=1e-13, maxiter=500)
        assert np.linalg.norm(residual(x)) <= 1e-12 * float(v[b].norm()), f"SciPy's {method} did not solve sample {b}"
        exact.append(x)
    return torch.from_numpy(np.stack(exact))


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_nonlinear_problem_matches_scipy_root(solver):
    """y = v + tanh(y·A)/2: each sample's solution agrees with scipy.optimize.root to 1e-8."""
    func, v, A = nonlinear_problem()
    exact = scipy_reference(func, v, "root")
    y, info = SOLVER_FUNCS[solver](func, torch.zeros_like(v), max_iter=200)
    print(f"{solver}: relative error {rel_err(y, exact):.1e} after {info['nstep']} iterations")
    assert rel_err(y, exact) <= 1e-8


def test_broyden_returns_lowest_residual_iterate_and_survives_nan():
    """After a few good steps func turns to NaN: Broyden keeps going without crashing and returns
    the best finite iterate, whose residual is the lowest one it saw (and is reported)."""
    func, v, exact = linear_problem(batch=3, n=10, radius=0.9, seed=11)
    calls = {"n": 0}
    seen = []  # (iterate, per-sample residual) of every evaluation

    def poisoned(y):
        calls["n"] += 1
        out = func(y)
        seen.append((y.clone(), (out - y).norm(dim=1)))
        return torch.full_like(out, math.nan) if calls["n"] > 4 else out

    y, info = broyden(poisoned, torch.zeros_like(v), max_iter=12)
    assert torch.isfinite(y).all()
    assert info["nstep"] == 12
    residuals = torch.stack([r for _, r in seen[:4]])          # the finite evaluations
    best = residuals.nan_to_num(math.inf).argmin(dim=0)
    assert len(set(best.tolist())) > 1, "the best iterates should come from different iterations"
    for b in range(v.shape[0]):
        assert torch.equal(y[b], seen[best[b]][0][b])
    true_residual = (func(y) - y).norm(dim=1)
    assert torch.allclose(true_residual, residuals.min(dim=0).values)
    assert info["trace"][-1] == pytest.approx(float(true_residual.norm()), rel=1e-12)
    # The returned batch mixes iterations, so the map is asked once more at it: here it answers NaN.
    assert torch.equal(seen[-1][0], y) and info["nfev"] == 14 == len(seen)
    assert info["residual"] == math.inf


def test_broyden_recovers_from_a_transient_nan_in_one_sample():
    """One sample's map value is NaN at a single call: no NaN reaches the stored Broyden terms,
    so that sample restarts from its best iterate and still converges, like the others."""
    func, v, exact = linear_problem(batch=3, n=10, radius=0.8, seed=23)
    calls = {"n": 0}

    def glitch(y):
        calls["n"] += 1
        out = func(y)
        if calls["n"] == 4:
            out = out.clone()
            out[1] = math.nan
        return out

    y, info = broyden(glitch, torch.zeros_like(v), max_iter=100)
    assert torch.isfinite(y).all()
    for b in range(3):
        assert rel_err(y[b], exact[b]) <= 1e-8, b


def test_broyden_returns_the_best_iterate_when_the_residual_rises():
    """On a map whose residual grows after a few calls, the returned iterate is the one with
    the lowest residual seen (per sample), not the last, and info reports that residual."""
    func, v, _ = nonlinear_problem(batch=2, n=4, seed=2)
    seen = []  # (iterate, per-sample residual) of every evaluation

    def rising(y):  # the good map for three calls, then ever larger residuals
        out = func(y) if len(seen) < 3 else func(y) + 10.0 * len(seen)
        seen.append((y.clone(), (out - y).norm(dim=1)))
        return out

    y, info = broyden(rising, torch.zeros_like(v), max_iter=8)
    residuals = torch.stack([r for _, r in seen])
    best = residuals.argmin(dim=0)
    assert (best < 3).all() and (residuals[-1] > residuals.min(dim=0).values).all()
    for b in range(v.shape[0]):
        assert torch.equal(y[b], seen[best[b]][0][b])
        assert not torch.equal(y[b], seen[-1][0][b])
    assert info["residual"] == pytest.approx(float(residuals.min(dim=0).values.norm()), rel=1e-12)
    assert info["trace"][-1] == info["residual"]


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_tolerance_stops_early(solver):
    """A relative `tol` stops as soon as the residual falls below tol × initial residual."""
    func, v, _ = linear_problem(radius=0.5, seed=13)
    y, info = SOLVER_FUNCS[solver](func, torch.zeros_like(v), max_iter=500, tol=1e-6)
    assert info["nstep"] < 500 and info["stop"] == "tol"
    assert info["residual"] < 1e-6 * info["init_residual"]
    assert info["trace"][-2] >= 1e-6 * info["init_residual"]  # and not a step later


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_no_tolerance_runs_every_iteration(solver):
    """tol=None runs max_iter iterations on a problem that does not converge to ~0 in time."""
    func, v, _ = linear_problem(radius=0.95, seed=17)
    _, info = SOLVER_FUNCS[solver](func, torch.zeros_like(v), max_iter=7, tol=None)
    assert info["nstep"] == 7 and info["stop"] == "cap"
    assert len(info["trace"]) == 8


@pytest.mark.parametrize("solver", ["broyden", "iter"])
def test_no_tolerance_stops_when_converged_to_zero(solver):
    """tol=None still stops once the residual is ~0: a constant map is solved exactly
    (Broyden in one step, the damped iteration when the residual underflows)."""
    v = torch.randn(3, 5, dtype=torch.float64)
    y, info = SOLVER_FUNCS[solver](lambda y: v.clone(), torch.zeros_like(v), max_iter=200, tol=None)
    assert torch.allclose(y, v, atol=1e-9)
    assert info["nstep"] < 200
    if solver == "broyden":
        assert info["nstep"] == 1 and info["residual"] == 0.0


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_info_fields(solver):
    """info holds nstep, residual, init_residual and a trace of one residual per iteration
    plus the initial one; residual is ‖func(y) - y‖ of the returned iterate."""
    func, v, _ = linear_problem(seed=19)
    y, info = SOLVER_FUNCS[solver](func, torch.zeros_like(v), max_iter=10)
    assert {"nstep", "nfev", "residual", "init_residual", "trace", "stop", "syncs"} <= set(info)
    assert info["nstep"] == 10 and len(info["trace"]) == 11
    assert info["init_residual"] == pytest.approx(float(v.norm()))
    assert info["trace"][0] == info["init_residual"] and info["trace"][-1] == info["residual"]
    assert info["residual"] == pytest.approx(float((func(y) - y).norm()), rel=1e-10)
    assert all(isinstance(r, float) for r in info["trace"])


def test_get_solver():
    """get_solver gives the table's entries; only the damped iteration starts the adjoint solve from v;
    unknown names are rejected with ValueError."""
    assert set(SOLVERS) == {"broyden", "anderson", "iter"}
    assert get_solver("broyden").solve is broyden and get_solver("anderson").solve is anderson
    assert get_solver("iter").solve is fixed_point_iter
    assert [name for name, entry in SOLVERS.items() if entry.starts_from_v] == ["iter"]
    assert "memory" in get_solver("anderson").options and not get_solver("iter").options
    with pytest.raises(ValueError, match="nope"):
        get_solver("nope")


def coupled_problem(batch=3, n=8, seed=6):
    """func(y) = v + 0.9·tanh((y - mean over the batch)·A): the samples interact, as through BN statistics."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = A / torch.linalg.matrix_norm(A, 2)
    v = torch.randn(batch, n, generator=gen, dtype=torch.float64)

    def func(y):
        return v + 0.9 * torch.tanh((y - y.mean(0, keepdim=True)) @ A)
    return func, v


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_reported_residual_is_that_of_the_returned_batch(solver):
    """On a map coupling the samples, info['residual'] is ‖func(y) - y‖ at the returned y itself. For
    Broyden, whose samples' best iterates here come from different iterations, that takes one more
    call of func, and differs from the per-sample best residuals the trace ends with."""
    func, v = coupled_problem()
    y, info = SOLVER_FUNCS[solver](func, torch.zeros_like(v), max_iter=8)
    true = float((func(y) - y).norm())
    assert info["residual"] == pytest.approx(true, rel=1e-12)
    if solver == "broyden":
        assert info["nfev"] == info["nstep"] + 2
        assert abs(info["trace"][-1] - true) > 0.1 * true


def test_anderson_matches_scipy_anderson():
    """y = v + tanh(y·A)/2: with a relative tolerance of 1e-13, Anderson (memory 5) reaches a residual
    as small as SciPy's `anderson` (memory 5, whose answer is judged by its residual, 1e-12·‖v‖) and the
    same solution to 1e-10."""
    func, v, _ = nonlinear_problem()
    exact = scipy_reference(func, v, "anderson")
    y, info = anderson(func, torch.zeros_like(v), max_iter=100, tol=1e-13, memory=5)
    print(f"anderson: relative error {rel_err(y, exact):.1e} after {info['nstep']} iterations")
    assert info["stop"] == "tol" and info["nstep"] < 100
    assert info["residual"] <= 1e-12 * float(v.norm())
    assert rel_err(y, exact) <= 1e-10


def test_anderson_survives_a_rank_deficient_history():
    """A sample whose v is zero is solved by y0 = 0 with an exactly zero residual, so its Gram matrix is
    all zeros at every iteration: the regularised weights stay finite, that sample stays exact and the
    others converge as usual. A constant map is solved in one step."""
    func, v, exact = linear_problem(batch=3, n=10, radius=0.8, seed=29)
    v[0] = 0.0  # func reads v: sample 0's solution is now y = 0
    exact[0] = 0.0
    y, info = anderson(func, torch.zeros_like(v), max_iter=100, memory=5)
    assert torch.isfinite(y).all() and info["stop"] == "tol"
    assert torch.equal(y[0], exact[0])
    assert rel_err(y, exact) <= 1e-8
    y, info = anderson(lambda z: v.clone(), torch.zeros_like(v), max_iter=10, memory=5)
    assert torch.equal(y, v) and info["residual"] == 0.0 and info["nstep"] == 1


def test_anderson_recovers_from_a_transient_nan():
    """A NaN map value sends Anderson back to its best iterate with an empty history; it still converges."""
    func, v, exact = linear_problem(batch=3, n=10, radius=0.8, seed=23)
    calls = {"n": 0}

    def glitch(y):
        calls["n"] += 1
        out = func(y)
        return torch.full_like(out, math.nan) if calls["n"] == 4 else out

    y, info = anderson(glitch, torch.zeros_like(v), max_iter=100)
    assert torch.isfinite(y).all() and info["stop"] == "tol"
    assert rel_err(y, exact) <= 1e-8


class HostReadCounter:
    """Counts the Tensor methods that copy a value to the host (item, tolist, float(), int(), bool())."""

    METHODS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("solver", ALL_SOLVERS + ["phantom"])
def test_host_reads_are_one_per_iteration(monkeypatch, solver):
    """A solve reads the device once per iteration (the stop test) plus once, and reports that count
    as info['syncs']; the phantom steps, which have no stop test, read it once in all. (The reads are
    counted where Python reaches the host: Tensor.item, tolist, float(), ...)"""
    func, v, _ = linear_problem(radius=0.95, seed=31)
    solve = phantom_steps if solver == "phantom" else SOLVER_FUNCS[solver]
    counter = HostReadCounter(monkeypatch)
    _, info = solve(func, torch.zeros_like(v), max_iter=12, tol=None, f0=v)
    monkeypatch.undo()
    assert info["nstep"] == 12
    # Broyden evaluates the returned batch once more when it mixes iterations: one more read for its residual.
    extra = info["nfev"] - info["nstep"]
    expected = 1 if solver == "phantom" else info["nstep"] + 1 + extra
    assert counter.count == info["syncs"] == expected
