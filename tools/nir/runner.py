"""Simulate a NIR graph step by step with nirtorch and this project's exact neuron semantics.

`nirtorch.nir_to_torch` wires the graph and cuts its cycle on the feedback
edge (the feedback of step t-1 reaches layer 1 at step t, zero at t = 0, the
project's own rule). The node map here replaces nirtorch 2.6's defaults
where they are wrong (the Affine map drops the bias, the Flatten map counts
dimensions without the batch) and supplies the neurons: each runs forward
Euler with step dt, u ← λ·reset(u) + gain·I (+ drive), in the project's
operation order, with the reset and spike rules of the graph's metadata
(NIR's own, reset to v_reset and u > v_threshold, when it states none).
"""
import nir
import nirtorch
import numpy as np
import torch
from torch import nn

from .graph import DT, NIR_RESET, NIR_SPIKE, RESET_SUBTRACT, SPIKE_AT_THRESHOLD, euler_parameters, metadata_of


def _scalar_or_buffer(module, name, values):
    """A float when every entry of values is equal (the project's case), else a buffer of them."""
    values = np.asarray(values, dtype=np.float64)
    if values.size and np.all(values == values.flat[0]):
        setattr(module, name, float(values.flat[0]))
    else:
        module.register_buffer(name, torch.from_numpy(values.copy()))


class EulerNeuron(nn.Module):
    """One NIR neuron node, stepped once per call: forward(I, state) -> (output, state).

    Spiking (IF, LIF): u ← λ·(u - Vth·s) + gain·I + drive with reset 'subtract'
    (or λ·(s ? v_reset : u) + … with reset 'to v_reset'), then s = [u ≥ Vth]
    (or [u > Vth]); the output is s. Integrators (I, LI): u ← λ·u + gain·I,
    the output is u.
    """

    def __init__(self, node, dt, reset, spike):
        super().__init__()
        self.spiking = isinstance(node, (nir.IF, nir.LIF))
        leak, gain, drive = euler_parameters(node, dt)
        for name, values in (("leak", leak), ("gain", gain), ("drive", drive)):
            _scalar_or_buffer(self, name, np.broadcast_to(values, np.shape(node.r)))
        if self.spiking:
            _scalar_or_buffer(self, "vth", node.v_threshold)
            _scalar_or_buffer(self, "v_reset", node.v_reset)
            if reset not in (RESET_SUBTRACT, NIR_RESET):
                raise ValueError(f"unknown reset rule {reset!r}")
            if spike not in (SPIKE_AT_THRESHOLD, NIR_SPIKE):
                raise ValueError(f"unknown spike rule {spike!r}")
            self.subtract = reset == RESET_SUBTRACT
            self.compare = torch.ge if spike == SPIKE_AT_THRESHOLD else torch.gt

    def forward(self, current, state=None):
        """One step; state is (u, s) of the previous step or None before the first."""
        if not _equals(self.gain, 1.0):
            current = current * self.gain
        if state is None:  # u[-1] = s[-1] = 0
            u = current
        else:
            u, s = state
            if self.spiking:
                u = u - s * self.vth if self.subtract else torch.where(s.bool(), self.v_reset, u)
            if not _equals(self.leak, 1.0):
                u = u * self.leak
            u = u + current
        if not _equals(self.drive, 0.0):
            u = u + self.drive
        if not self.spiking:
            return u, (u, None)
        s = self.compare(u, self.vth).to(u.dtype)
        return s, (u, s)


def _equals(value, constant):
    """True if value is the float constant (a multiplication or addition by it would change nothing)."""
    return isinstance(value, float) and value == constant


def affine(node):
    """nn.Linear with the node's weight and bias (nirtorch 2.6 loses the bias)."""
    module = nn.Linear(node.weight.shape[-1], node.weight.shape[-2], dtype=torch.float64)
    module.weight.data = torch.from_numpy(np.asarray(node.weight, dtype=np.float64).copy())
    module.bias.data = torch.from_numpy(np.asarray(node.bias, dtype=np.float64).copy())
    return module


def linear(node):
    """nn.Linear without bias."""
    module = nn.Linear(node.weight.shape[-1], node.weight.shape[-2], bias=False, dtype=torch.float64)
    module.weight.data = torch.from_numpy(np.asarray(node.weight, dtype=np.float64).copy())
    return module


def conv2d(node):
    """nn.Conv2d; an all-zero bias is left out, as the project's feedback convolution has none."""
    weight = np.asarray(node.weight, dtype=np.float64)
    has_bias = node.bias is not None and np.any(node.bias != 0)
    module = nn.Conv2d(weight.shape[1] * node.groups, weight.shape[0], tuple(weight.shape[2:]),
                       stride=tuple(int(s) for s in node.stride), padding=tuple(int(p) for p in node.padding),
                       dilation=tuple(int(d) for d in node.dilation), groups=int(node.groups), bias=has_bias,
                       dtype=torch.float64)
    module.weight.data = torch.from_numpy(weight.copy())
    if has_bias:
        module.bias.data = torch.from_numpy(np.asarray(node.bias, dtype=np.float64).copy())
    return module


def flatten(node):
    """nn.Flatten over NIR's batch-free dimensions (nirtorch 2.6 would flatten the batch axis too)."""
    shift = lambda d: int(d) + 1 if int(d) >= 0 else int(d)
    return nn.Flatten(shift(node.start_dim), shift(node.end_dim))


def node_map(dt=DT, reset=RESET_SUBTRACT, spike=SPIKE_AT_THRESHOLD):
    """The nirtorch node map: correct Affine/Conv2d/Flatten, and Euler neurons with the given rules."""
    neuron = lambda node: EulerNeuron(node, dt, reset, spike)
    return {nir.Affine: affine, nir.Linear: linear, nir.Conv2d: conv2d, nir.Flatten: flatten,
            nir.IF: neuron, nir.LIF: neuron, nir.I: neuron, nir.LI: neuron}


class NIRRunner:
    """A NIR graph as a step-by-step torch module, run for the graph's T steps.

    reset and spike default to the graph's metadata (NIR's own rules if it has
    none); `nirtorch_map` replaces the node map (to run stock mappings).
    """

    def __init__(self, graph, dtype=torch.float64, reset=None, spike=None, time_step=None, nirtorch_map=None):
        self.meta = meta = metadata_of(graph)
        self.time_step = time_step or int(meta["time_step"])
        self.frames = meta.get("input") == "frames"
        self.output_step = int(meta.get("output_step", self.time_step - 1))
        mapping = nirtorch_map if nirtorch_map is not None else node_map(
            float(meta.get("dt", DT)), reset or meta.get("reset", NIR_RESET), spike or meta.get("spike", NIR_SPIKE))
        self.module = nirtorch.nir_to_torch(graph, mapping, dtype=dtype)
        self.dtype = dtype
        self.neurons = [name for name, node in graph.nodes.items() if isinstance(node, (nir.IF, nir.LIF))]

    @torch.no_grad()
    def run(self, x, record=False):
        """(output at the graph's output step, {neuron node: (T, B, ...) spikes} if record else None).

        x: (B, ...) static input, or (B, ..., T') frames with T' ≥ T when the
        graph's input is spike frames (frame t is fed at step t).
        """
        x = x.to(self.dtype)
        if self.frames and x.shape[-1] < self.time_step:
            raise ValueError(f"spike input has {x.shape[-1]} frames, the graph runs {self.time_step} steps")
        spikes = {name: [] for name in self.neurons}
        # The spikes are each neuron module's output, whatever the module keeps as its state.
        hooks = [self.module.get_submodule(name.replace(".", "_")).register_forward_hook(  # nirtorch renames a.b to a_b
            lambda module, args, out, name=name: spikes[name].append(out[0] if isinstance(out, tuple) else out))
            for name in (self.neurons if record else [])]
        try:
            state, output = None, None
            for t in range(self.time_step):
                out, state = self.module(x[..., t] if self.frames else x, state)
                if t == self.output_step:
                    output = out
        finally:
            for hook in hooks:
                hook.remove()
        return output, ({name: torch.stack(s) for name, s in spikes.items()} if record else None)

    def __call__(self, x):
        """The output (logits for graphs of this project) at the output step."""
        return self.run(x)[0]
