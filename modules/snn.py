"""Feedback spiking network: IF/LIF dynamics, equilibrium function, implicit training.

Layers 1..N (N = 1 for single-hidden-layer nets). With spikes s_l[t] and
membrane potentials u_l[t] (reset by subtraction, u[-1] = s[-1] = 0):

    I_1[t]     = F(x[t]) + W_fb s_N[t-1]          (input layer F, feedback W_fb)
    I_{l+1}[t] = W_l s_l[t]
    u_l[t]     = λ (u_l[t-1] - Vth s_l[t-1]) + I_l[t],   s_l[t] = H(u_l[t] - Vth)

IF is the case λ = 1. The state is the last layer's rate
a = Σ_t λ^(T-1-t) s_N[t] / Σ_t λ^(T-1-t) (the plain average for IF), which
approaches the equilibrium a* = f(a*) of

    f(a) = g_N ∘ … ∘ g_2 ( clamp((W_fb a + F(x̄)) / Vth, 0, 1) ),
    g_l(h) = clamp(W_{l-1} h / Vth, 0, 1),

x̄ being x for static input, or the same weighted time average of spike input.
"""
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .implicit import ImplicitGradient, ValueWithGradientOf, adjoint_solve
from .jacobian import hutchinson_frobenius, jacobian_norm, operator_norm
from .layers import Feedback, VariationalDropout, batch_stats, sync_group
from .precision import forward_precision, full_float32, full_float32_vjp


def is_leaky(leak):
    """True for a leak λ that makes a LIF neuron (0 < λ < 1); anything else means IF."""
    return leak is not None and 0.0 < leak < 1.0


def forget_autocast_copies(device_type):
    """Drop the low-precision weight copies autocast cached during a simulation (no-op outside autocast).

    The simulation runs without autograd inside the caller's autocast region.
    PyTorch releases before the fix of pytorch#112583 then hand f the cached
    copies, which have no autograd history, so the input-layer and loop weights
    would get no gradient (and DDP would wait for them forever).
    """
    if torch.is_autocast_enabled(device_type):
        torch.clear_autocast_cache()


def rate_weights(time_step, leak, dtype=torch.float32, device=None):
    """Weights w_t = λ^(T-1-t) / Σ_k λ^k of the state rate over t = 0..T-1 (1/T for IF)."""
    powers = torch.arange(time_step - 1, -1, -1, dtype=torch.float64, device=device)
    weights = torch.full_like(powers, leak) ** powers
    return (weights / weights.sum()).to(dtype)


class FeedbackSNN(nn.Module):
    """A feedback spiking network trained by implicit differentiation (see module docstring).

    input_layer: Connection F; layers: Connections W_1..W_{N-1} (conv + BN + bias);
    feedback: Feedback W_fb from layer N back to layer 1. `leak` is λ, with
    λ = 1 for IF. `spike_input` means x is (B, ..., T), one frame per step.
    The adjoint equation is solved by `solver` ('broyden', 'anderson' or 'iter')
    with at most `threshold` iterations, optional relative tolerance `tol` and
    `solver_memory`, or approximated by `grad` 'jfb' or 'phantom' (`phantom_k`
    steps of size `phantom_tau`, in `phantom_form` 'neumann' or 'unroll');
    see modules.implicit.
    J is taken at the simulated rate for single-layer nets and at z = f(a) for
    multi-layer nets (`jacobian_at_f`), as in the paper's release: early in
    training a deep loop's last layer can be silent (a = 0), and one step of f
    gives a far more informative linearisation there.
    `jac_reg` γ > 0 adds the Jacobian regulariser γ‖J‖_F²/d at that point
    (Bai, Koltun & Kolter, ICML 2021) on a fraction `jac_reg_freq` of the
    training forwards, as `jacobian_penalty` for the caller to add to its loss.
    """

    def __init__(self, input_layer, layers, feedback, time_step=30, vth=2.0, leak=1.0,
                 spike_input=False, solver="broyden", threshold=30, tol=None, grad="ide", solver_memory=None,
                 phantom_k=5, phantom_tau=0.5, phantom_form="neumann", forward_residual=True, jac_reg=0.0,
                 jac_reg_freq=1.0):
        super().__init__()
        if time_step < 1:
            raise ValueError(f"time_step must be >= 1, got {time_step}")
        if vth <= 0:
            raise ValueError(f"vth must be > 0, got {vth}")
        if not isinstance(feedback, Feedback):
            raise TypeError("feedback must be a modules.layers.Feedback")
        self.input_layer = input_layer
        self.layers = nn.ModuleList(layers)
        self.feedback = feedback
        self.time_step = time_step
        self.vth = vth
        self.leak = leak if is_leaky(leak) else 1.0
        self.spike_input = spike_input
        self.configure_solver(solver, threshold, tol, grad, solver_memory, phantom_k, phantom_tau, phantom_form)
        self.forward_residual = forward_residual  # record ‖f(a) - a‖/‖a‖ in solver_stats (see _recorder)
        self.jacobian_at_f = len(layers) > 0
        if jac_reg < 0:
            raise ValueError(f"jac_reg must be >= 0, got {jac_reg}")
        if not 0.0 < jac_reg_freq <= 1.0:
            raise ValueError(f"jac_reg_freq must be in (0, 1], got {jac_reg_freq}")
        self.jac_reg, self.jac_reg_freq = jac_reg, jac_reg_freq
        # γ‖J‖_F²/d of the last training forward (autograd graph to the parameters), or None.
        self.jacobian_penalty = None
        # Set by the caller: the next training forward measures ‖W_fb‖₂/Vth and ‖J‖₂ (see _diagnostics).
        self.measure_norms = False
        self.norm_tol = 1e-3  # relative accuracy of each measured spectral norm
        self.solver_stats = None
        # A modules.bptt.BPTT trains by back-propagation through the simulation instead (None: IDE).
        self.bptt = None
        # A tool's timer(name) -> context manager, entered around each part of a training step (see region).
        self.timer = None

    def configure_solver(self, solver="broyden", threshold=30, tol=None, grad="ide", solver_memory=None,
                         phantom_k=5, phantom_tau=0.5, phantom_form="neumann"):
        """Choose the gradient mode and the adjoint solver (see modules.implicit.adjoint_solve)."""
        self.adjoint = adjoint_solve(grad, solver, threshold, tol, solver_memory, phantom_k, phantom_tau, phantom_form)
        self.solver, self.threshold, self.tol = solver, threshold, tol
        self.grad, self.solver_memory, self.phantom_k, self.phantom_tau = grad, solver_memory, phantom_k, phantom_tau
        self.phantom_form = phantom_form

    # ---------------------------------------------------------------- simulation
    def input_frames(self, x):
        """The T input frames as a list (static input: T references to x)."""
        if not self.spike_input:
            return [x] * self.time_step
        return self._check_frames(x).unbind(-1)[:self.time_step]

    def _check_frames(self, x):
        """x, if spike input x has at least T frames; ValueError naming both numbers otherwise."""
        if x.shape[-1] < self.time_step:
            raise ValueError(f"spike input has {x.shape[-1]} frames, the network simulates "
                             f"{self.time_step} time steps")
        return x

    def average_input(self, x):
        """x̄: x itself for static input, the rate-weighted time average of spike input."""
        if not self.spike_input:
            return x
        w = rate_weights(self.time_step, self.leak, x.dtype, x.device)
        # A new tensor: the paper's release averaged in place, corrupting the input.
        return torch.tensordot(self._check_frames(x)[..., :self.time_step], w, dims=([-1], [0]))

    def input_stats(self, x):
        """BN statistics of the input layer for the simulation (None: no BN or evaluation).

        In training they are the batch statistics of the linear output on x̄,
        exactly those f uses, so that the time-averaged simulated input current
        equals F(x̄) in f; the running statistics are not touched here.
        """
        if self.input_layer.bn is None or not self.training:
            return None
        h = self.input_layer.linear_part(self.average_input(x))
        # Under autocast h is bf16, but CPU batch norm wants statistics in its parameters' dtype.
        # Under --sync-bn, f's SyncBatchNorm takes F(x̄)'s statistics over every process's batch: so do these.
        return batch_stats(h.to(self.input_layer.bn.weight.dtype), sync_group(self.input_layer.bn))

    def loop_stats(self):
        """BN statistics for the layers inside the loop during simulation.

        In training the simulation normalises them with running statistics;
        the batch-statistics version appears only in f (the paper's rule).
        """
        if not self.training:
            return [None] * len(self.layers)
        return [layer.running_stats() if layer.bn is not None else None for layer in self.layers]

    @torch.no_grad()
    def simulate(self, x, all_rates=False):
        """Run T steps of IF/LIF dynamics; return (state rate, per-layer firing rates or None).

        The state rate is the weighted rate of the last layer (see module docstring).
        Per-layer firing rates, on request, are plain spike counts / T for every
        spiking layer in the order the input flows through them.
        """
        in_stats, loop_stats = self.input_stats(x), self.loop_stats()
        rate, rates = self.unroll(x, lambda h: self.input_layer(h, stats=in_stats),
                                  lambda l, s: self.layers[l](s, stats=loop_stats[l]), self._fire_, all_rates)
        forget_autocast_copies(x.device.type)
        return rate, rates

    def unroll(self, x, input_current, layer_current, step, all_rates=False):
        """The T-step loop shared by the simulation and BPTT's differentiable simulation.

        input_current(x or a frame) gives the input layer's current,
        layer_current(l, s) that of loop layer l (self.layers[l]) on spikes s,
        and step(u, s, current) -> (u, s)
        advances one layer's potentials u and spikes s by one time step (in
        place in the simulation, out of place with a surrogate gradient in BPTT).
        """
        frames = self.input_frames(x)
        n_layers = len(self.layers) + 1
        u, s, counts = [None] * n_layers, [None] * n_layers, [None] * n_layers
        state = None
        constant_current = None if self.spike_input else input_current(x)
        with parametrize.cached():
            for t, frame in enumerate(frames):
                current = constant_current if constant_current is not None else input_current(frame)
                if t > 0:
                    current = current + self.feedback(s[-1])
                for l in range(n_layers):
                    if l > 0:
                        current = layer_current(l - 1, s[l - 1])
                    if u[l] is None:
                        # u[-1] = s[-1] = 0. Under autocast the currents may be bf16; potentials
                        # and spikes stay in x's dtype (the updates promote the currents).
                        u[l], s[l] = torch.zeros_like(current, dtype=x.dtype), torch.zeros_like(current, dtype=x.dtype)
                        if all_rates:
                            counts[l] = torch.zeros_like(s[l])
                    u[l], s[l] = step(u[l], s[l], current)
                    if all_rates:
                        counts[l].add_(s[l])
                state = s[-1].clone() if state is None else self._leak_(state).add_(s[-1])
        norm = sum(self.leak ** k for k in range(self.time_step))
        rates = [c.div_(self.time_step) for c in counts] if all_rates else None
        return state.div_(norm), rates

    def _fire_(self, u, s, current):
        """One time step of one layer in place: u ← λ (u - Vth s) + I, then s ← H(u - Vth)."""
        self._integrate_(u, s, current)
        torch.ge(u, self.vth, out=s)
        return u, s

    def _leak_(self, h):
        """h ← λ·h in place (nothing to do for IF)."""
        return h.mul_(self.leak) if self.leak != 1.0 else h

    def _integrate_(self, u, s, current):
        """One step of the membrane potential in place: u ← λ (u - Vth s) + I."""
        # Buffers updated in place: allocating fresh ones every step costs more than the arithmetic on a CPU.
        return self._leak_(u.sub_(s, alpha=self.vth)).add_(current)

    # --------------------------------------------------------------- equilibrium
    def f(self, a, current, update_stats=False):
        """The equilibrium function f(a) given the input current F(x̄)."""
        h = torch.clamp((self.feedback(a) + current) / self.vth, 0, 1)
        for layer in self.layers:
            h = torch.clamp(layer(h, update_stats=update_stats) / self.vth, 0, 1)
        return h

    def equilibrium_function(self, x, update_stats=False):
        """f as a function of the state alone, for input x (for analysis and tests)."""
        current = self.input_layer(self.average_input(x), update_stats=update_stats)
        return lambda a: self.f(a, current)

    # ------------------------------------------------------------------ training
    def begin_forward(self):
        """Per-forward training state: one power-iteration step, fresh dropout masks."""
        self.feedback.power_iteration()
        for module in self.modules():
            if isinstance(module, VariationalDropout):
                module.reset()

    def differentiable_parts(self, x, rate):
        """(z, point, f_point): f at the state with autograd, and the point where J is taken with f there.

        f_point is computed without autocast: bf16 products would leave the
        adjoint residual far above the level where the solve stops, so it
        would run every iteration (the solve also forbids TF32, see forward).
        """
        # The only place where BN running statistics move: once per training step.
        current = self.input_layer(self.average_input(x), update_stats=True)
        state = rate.detach().requires_grad_()
        z = self.f(state, current, update_stats=True)
        if self.jacobian_at_f or torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                point = (z if self.jacobian_at_f else state).detach().to(rate.dtype).requires_grad_()
                f_point = self.f(point, current.detach().to(rate.dtype))
        else:  # J at the state, in the state's dtype: z's own graph serves
            point, f_point = state, z
        return z, point, f_point

    def region(self, name):
        """The context of one part of a training step: 'ide.simulate' (with begin_forward), 'ide.f' (f with
        autograd), 'ide.solve' (the adjoint solve), 'ide.vjp' (each of its vector–Jacobian products).

        A torch.profiler range, or `self.timer(name)` when a tool has set one.
        """
        return torch.profiler.record_function(name) if self.timer is None else self.timer(name)

    def forward(self, x, rate=None):
        """The state rate; in training its gradient is the implicit one (or BPTT's, see `bptt`).

        rate: the state rate of this forward's simulation, when the caller has
        run it already (begin_forward, then simulate under forward_precision).
        """
        self.jacobian_penalty = None
        if self.bptt is not None and self.training and torch.is_grad_enabled():
            return self.bptt(self, x)
        if rate is None:
            with self.region("ide.simulate"):
                if self.training:
                    self.begin_forward()
                with forward_precision():
                    rate, _ = self.simulate(x)
        if not (self.training and torch.is_grad_enabled()):
            return rate
        if self.grad == "phantom" and self.phantom_form == "unroll":
            with self.region("ide.f"), forward_precision():
                return self._unrolled_phantom(x, rate)
        with self.region("ide.f"), forward_precision():
            z, point, f_point = self.differentiable_parts(x, rate)
            diagnostics = self._diagnostics(rate, z, point, f_point)
            self.jacobian_penalty = self._jacobian_penalty(point, f_point, diagnostics)
        # The adjoint solve's vector–Jacobian products in f_point's graph run in full float32 (no TF32).
        return ImplicitGradient.apply(z, rate, full_float32_vjp(point, f_point), point, self._solve,
                                      self.adjoint.starts_from_v, self._recorder(diagnostics))

    def _unrolled_phantom(self, x, rate):
        """The unrolled phantom gradient: value a, gradient of z_K, K damped steps z ← (1 - τ) z + τ f(z) from a.

        z_0 = a carries no gradient (the fixed point's estimate, as in TorchDEQ);
        autograd differentiates the K steps, each at its own iterate.
        """
        current = self.input_layer(self.average_input(x), update_stats=True)
        # A leaf with a graph, so that the diagnostics and the regulariser can take J at z_0 = a.
        start, tau = rate.detach().requires_grad_(), self.phantom_tau
        z = start
        for k in range(self.phantom_k):
            # The first application of f is the only place where BN running statistics move.
            f_z = self.f(z, current, update_stats=k == 0)
            if k == 0:
                f_rate = f_z
            z = (1 - tau) * z + tau * f_z
        diagnostics = self._diagnostics(rate, f_rate, start, f_rate)
        self.jacobian_penalty = self._jacobian_penalty(start, f_rate, diagnostics)
        self._recorder(diagnostics)({"nstep": self.phantom_k, "nfev": self.phantom_k, "stop": "cap"})
        return ValueWithGradientOf.apply(rate, z)

    def _solve(self, func, y0, f0=None):
        def adjoint_map(y):
            with self.region("ide.vjp"):
                return func(y)
        with self.region("ide.solve"):
            return self.adjoint(adjoint_map, y0, f0=f0)

    def _diagnostics(self, rate, z, point, f_point):
        """This forward's diagnostics of the equilibrium, as tensors on the device (read with the solver's info).

        `forward_residual` (when self.forward_residual) = ‖f(a) - a‖/‖a‖ of the
        simulated rate a, from the z = f(a) that training computes anyway (inf
        for a silent state with f(a) ≠ 0; under autocast z carries bf16 rounding).
        When `measure_norms` was set (it is then cleared), to relative accuracy
        `norm_tol` by Lanczos on the products (modules.jacobian):
        `feedback_norm` = ‖W_fb‖₂/Vth, the spectral norm of the feedback
        operator (the fc, conv or transposed conv on the state's size) over
        Vth, the feedback's Lipschitz constant in f; and `jacobian_norm` = ‖J‖₂
        of J = ∂f/∂a at the point the backward uses, over the whole batch (its
        samples are coupled by BN's batch statistics). `jac_frobenius` is added
        by `_jacobian_penalty` on the steps that apply it.
        """
        diagnostics = {}
        if self.forward_residual:
            a = rate.detach()
            ratio = (z.detach().to(a.dtype) - a).norm() / a.norm()
            diagnostics["forward_residual"] = ratio.nan_to_num(nan=0.0, posinf=math.inf)  # 0/0: a = f(a) = 0
        if self.measure_norms:
            self.measure_norms = False
            weight = self.feedback.linear.weight
            with torch.autocast(rate.device.type, enabled=False), parametrize.cached():
                norm = operator_norm(self.feedback.linear_part, (1, *rate.shape[1:]), self.norm_tol,
                                     weight.dtype, weight.device)
            with full_float32():
                jacobian = jacobian_norm(f_point, point, self.norm_tol)
            diagnostics["feedback_norm"] = torch.tensor(norm / self.vth, dtype=torch.float64, device=rate.device)
            diagnostics["jacobian_norm"] = torch.tensor(jacobian, dtype=torch.float64, device=rate.device)
        return diagnostics

    def _jacobian_penalty(self, point, f_point, diagnostics):
        """γ‖J‖_F²/d at the backward's point, with autograd (or None: off, or not drawn this step).

        Bai, Koltun & Kolter (ICML 2021): Hutchinson's estimate with one
        Gaussian vector, d the number of entries of the batch's state (as their
        code divides). Drawn on a fraction jac_reg_freq of the forwards; both
        draws use the global random stream, and only when γ > 0.
        """
        if self.jac_reg == 0 or (self.jac_reg_freq < 1 and float(torch.rand(())) >= self.jac_reg_freq):
            return None
        frobenius = hutchinson_frobenius(f_point, point) / f_point.numel()
        diagnostics["jac_frobenius"] = frobenius.detach()
        return self.jac_reg * frobenius

    def _recorder(self, diagnostics):
        """The function that stores the backward's solver info, with this forward's diagnostics, in solver_stats."""

        def record(info):
            values = [value.to(torch.float64) for value in diagnostics.values()]
            values = torch.stack(values).tolist() if values else []
            self.solver_stats = {**info, "grad": self.grad, **dict(zip(diagnostics, values))}
        return record

    def all_rates(self, x):
        """Firing rate of every spiking layer, each flattened to (B, n_l)."""
        with forward_precision():
            _, rates = self.simulate(x, all_rates=True)
        return [r.flatten(1) for r in rates]
