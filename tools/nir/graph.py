"""A trained feedback SNN as a NIR graph, and back.

The graph of a net with spiking layers 1..N (a single-layer net has N = 1):

    input -> [flatten_in] -> input_op -> layer1 -> loop1 -> layer2 ... -> layerN
    layerN -> feedback -> layer1                         (the cycle: one-step delay)
    layerN -> [flatten_out] -> readout -> classifier -> output

input_op is the input layer F with its eval-mode BN folded into the weight and
bias; each loop layer likewise; the feedback is the weight evaluation uses,
clamp(g)·V/σ̂ with σ̂ from the stored power-iteration vectors; dropout is gone
(identity in evaluation). The neurons are NIR `IF` (r = 1/dt) or `LIF`
(τ = dt/(1-λ), r = τ/dt, v_leak = 0), so forward Euler with dt gives the
project's u ← λ(u - Vth·s) + I once the reset and spike rules in the graph's
metadata (`CONVENTIONS`) are honoured. The readout integrates the last
layer's spikes into the classifier's λ-weighted rate: an `I` with
r = 1/(T·dt) (IF) or an `LI` with r = 1/((1-λ)·Z), Z = Σ_k λ^k (LIF); its
value after step T-1 is the rate, so the graph's output at that step is the
project's logits (the graph is exported for one T).

Weights are float64: BN is folded in float64 and the simulation in float64
reproduces the project's float64 evaluation spike for spike (docs/nir.md says
why float32 cannot promise that once BN is folded).

A transposed-convolution feedback (the CIFAR nets) has no NIR node. NIR has no
reshape either, so it can only be written as a dense `Affine` on flattened
spiking layers, which makes every operator inside the loop dense; the export
does that while the dense weights stay under `DENSE_LIMIT` entries and refuses
otherwise.
"""
import math

import nir
import numpy as np
import torch
from torch import nn

from modules.models import Architecture, SNNClassifier
from modules.snn import is_leaky

DT = 1.0  # one time step of the simulation is one unit of NIR time

# Largest number of weight entries the dense operators of a loop may have together (512 MiB in float64).
DENSE_LIMIT = 2 ** 26

# The reset and spike rules, as the metadata names them: this project's, and NIR 1.0's own.
RESET_SUBTRACT, SPIKE_AT_THRESHOLD = "subtract", "u >= v_threshold"
NIR_RESET, NIR_SPIKE = "to v_reset", "u > v_threshold"

# What NIR 1.0 leaves open or defines otherwise, stated in every exported graph's metadata.
CONVENTIONS = {
    "format": "ide-fsnn",
    "dt": DT,
    "discretisation": "forward Euler with step dt: u[t] = (1 - dt/tau) u[t-1] + (dt/tau) (v_leak + r I[t])",
    "reset": RESET_SUBTRACT,        # u <- u - v_threshold after a spike (NIR: u <- v_reset)
    "spike": SPIKE_AT_THRESHOLD,    # (NIR: u > v_threshold)
    "feedback_delay": "one step: the cycle into layer1 reads the feedback of the previous step (zero at t = 0)",
}


class NIRExportError(ValueError):
    """A network that this exporter cannot write as a NIR graph (one line)."""


class NIRImportError(ValueError):
    """A NIR graph that does not read as a FeedbackSNN of this project (one line)."""


# ------------------------------------------------------------------------ export
def _array(tensor):
    """A float64 numpy copy of a tensor."""
    return tensor.detach().to(torch.float64).cpu().numpy().copy()


def folded(connection):
    """(weight, bias) of a Connection's linear op with its eval-mode BN folded in, in float64.

    BN(h) = (h - μ)·γ/√(σ² + ε) + β per output channel, so the folded weight is
    W·γ/√(σ² + ε) and the folded bias (b - μ)·γ/√(σ² + ε) + β.
    """
    linear = connection.linear
    weight = linear.weight.detach().double()
    bias = linear.bias.detach().double() if linear.bias is not None else weight.new_zeros(weight.shape[0])
    bn = connection.bn
    if bn is None:
        return weight, bias
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = weight * scale.view(-1, *[1] * (weight.dim() - 1))
    return weight, (bias - bn.running_mean.double()) * scale + bn.bias.detach().double()


def feedback_weight(feedback):
    """The feedback weight as evaluation uses it, clamp(g)·V/σ̂ with the stored u, v, in float64."""
    spectral = feedback.spectral
    V = feedback.linear.parametrizations.weight.original.detach().double()
    sigma = torch.dot(spectral.u.double(), V.flatten(1) @ spectral.v.double())
    return spectral.g.detach().double().clamp(-1.0, 1.0) * V / sigma


def readout_rate(time_step, leak):
    """Z = Σ_{k<T} λ^k, the normaliser of the classifier's λ-weighted rate (T for IF)."""
    return sum(leak ** k for k in range(time_step))


def neuron_node(shape, leak, vth):
    """An IF (λ = 1) or LIF node of the given shape whose Euler step is u ← λ u + I."""
    ones = np.ones(shape)
    if not is_leaky(leak):
        return nir.IF(r=ones / DT, v_threshold=vth * ones, v_reset=0 * ones)
    tau = DT / (1.0 - leak)
    return nir.LIF(tau=tau * ones, r=tau / DT * ones, v_leak=0 * ones, v_threshold=vth * ones, v_reset=0 * ones)


def readout_node(size, leak, time_step):
    """An I or LI node whose value after T steps of spikes s is Σ_t λ^(T-1-t) s[t] / Z."""
    ones = np.ones(size)
    if not is_leaky(leak):
        return nir.I(r=ones / (time_step * DT))
    tau = DT / (1.0 - leak)
    return nir.LI(tau=tau * ones, r=ones / ((1.0 - leak) * readout_rate(time_step, leak)), v_leak=0 * ones)


def conv_node(conv, weight, bias, in_shape):
    """A NIR Conv2d for torch conv `conv` with the given float64 weight and bias, on input (C, H, W)."""
    if conv.groups != 1 or conv.padding_mode != "zeros":
        raise NIRExportError(f"only plain convolutions export (groups 1, zero padding), got {conv}")
    return nir.Conv2d(input_shape=tuple(in_shape[1:]), weight=_array(weight), stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=1, bias=_array(bias))


def dense_matrix(op, in_shape):
    """The matrix (out, in) of the linear map h ↦ op(h) without bias, on flattened (C, H, W) input."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64).view(n, *in_shape)
    return op(basis).flatten(1).t().contiguous()


def dense_sizes(model):
    """{operator: weight entries} of the loop's operators written densely (conv nets with several layers)."""
    shapes = model.state_shapes
    sizes = {f"loop{l}": math.prod(shapes[l - 1]) * math.prod(shapes[l]) for l in range(1, len(shapes))}
    sizes["feedback"] = math.prod(shapes[-1]) * math.prod(shapes[0])
    return sizes


def needs_dense_loop(model):
    """True if the feedback is a transposed convolution, which NIR can only carry as a dense Affine."""
    return isinstance(model.snn.feedback.linear, nn.ConvTranspose2d)


def check_dense_size(model, limit=DENSE_LIMIT):
    """NIRExportError (one line) if the dense loop of `model` has more than `limit` weight entries."""
    total = sum(dense_sizes(model).values())
    if total > limit:
        raise NIRExportError(
            f"NIR has no transposed convolution or reshape: this net's feedback ({math.prod(model.state_shapes[-1]):,}"
            f" -> {math.prod(model.state_shapes[0]):,} neurons) would make its loop dense, {total:,} weight entries,"
            f" over the limit of {limit:,}; nothing written")


def loop_node(connection, in_shape, out_shape, dense):
    """A loop layer W_l with BN folded: a Conv2d, or (dense loop) an Affine on flattened layers."""
    weight, bias = folded(connection)
    if not dense:
        return conv_node(connection.linear, weight, bias, in_shape)
    conv = lambda h: connection.linear._conv_forward(h, weight, None)
    # The flattened (C, H, W) output holds each channel's H·W values in a row: its bias repeats H·W times.
    return nir.Affine(weight=_array(dense_matrix(conv, in_shape)),
                      bias=_array(bias.repeat_interleave(math.prod(out_shape[1:]))))


def feedback_node(feedback, in_shape, dense):
    """W_fb as evaluation uses it: Linear (fc), Conv2d with zero bias, or (dense loop) the transposed conv's matrix."""
    W, op = feedback_weight(feedback), feedback.linear
    if dense:
        transposed = lambda h: nn.functional.conv_transpose2d(h, W, None, op.stride, op.padding,
                                                              op.output_padding, op.groups, op.dilation)
        return nir.Linear(weight=_array(dense_matrix(transposed, in_shape)))
    if isinstance(op, nn.Linear):
        return nir.Linear(weight=_array(W))
    return conv_node(op, W, W.new_zeros(W.shape[0]), in_shape)


def export_graph(model, net=None, dense_limit=DENSE_LIMIT):
    """The NIR graph of an SNNClassifier as its evaluation runs it (see the module docstring)."""
    snn, arch = model.snn, model.arch
    dense = needs_dense_loop(model)
    if dense:
        check_dense_size(model, dense_limit)
    with torch.no_grad():
        shapes = [tuple(s) for s in model.state_shapes]
        layer_shapes = [(math.prod(s),) for s in shapes] if dense else shapes
        nodes = {"input": nir.Input(input_type=np.array(arch.input_shape))}
        edges = []
        source = "input"

        def link(name, node, src=None):
            nonlocal source
            nodes[name] = node
            edges.append((src or source, name))
            source = name

        # Input layer F.
        weight, bias = folded(snn.input_layer)
        if snn.input_layer.flatten:
            link("flatten_in", nir.Flatten(input_type=np.array(arch.input_shape), start_dim=0))
            link("input_op", nir.Affine(weight=_array(weight), bias=_array(bias)))
        else:
            link("input_op", conv_node(snn.input_layer.linear, weight, bias, arch.input_shape))
            if dense:
                link("flatten_op", nir.Flatten(input_type=np.array(shapes[0]), start_dim=0))
        # Spiking layers and the loop between them.
        for l, shape in enumerate(layer_shapes, start=1):
            if l > 1:
                link(f"loop{l - 1}", loop_node(snn.layers[l - 2], shapes[l - 2], shapes[l - 1], dense))
            link(f"layer{l}", neuron_node(shape, snn.leak, snn.vth))
        last = source
        # The feedback W_fb from layer N to layer 1.
        link("feedback", feedback_node(snn.feedback, shapes[-1], dense), src=last)
        edges.append(("feedback", "layer1"))
        # Readout: the λ-weighted rate of layer N, then the classifier.
        source = last
        if len(layer_shapes[-1]) > 1:
            link("flatten_out", nir.Flatten(input_type=np.array(layer_shapes[-1]), start_dim=0))
        link("readout", readout_node(math.prod(shapes[-1]), snn.leak, snn.time_step))
        link("classifier", nir.Affine(weight=_array(model.classifier.weight), bias=_array(model.classifier.bias)))
        link("output", nir.Output(output_type=np.array([model.classifier.out_features])))
    metadata = dict(CONVENTIONS, time_step=snn.time_step, output_step=snn.time_step - 1,
                    input="frames" if snn.spike_input else "static", leak=float(snn.leak), vth=float(snn.vth))
    if net is not None:
        metadata["net"] = net
    return nir.NIRGraph(nodes=dict(sorted(nodes.items())), edges=sorted(edges), metadata=metadata)


# ------------------------------------------------------------------------ import
def metadata_of(graph):
    """The graph's metadata with strings decoded and numpy scalars as Python numbers."""
    out = {}
    for key, value in (graph.metadata or {}).items():
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def uniform(values, what):
    """The single value of an array whose entries are all equal; NIRImportError otherwise."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or not np.all(values == values.flat[0]):
        raise NIRImportError(f"{what} differs between neurons; a FeedbackSNN has one value for all")
    return float(values.flat[0])


def euler_parameters(node, dt):
    """(λ, gain, drive) of a neuron node: its Euler step is u ← λ u + gain·I + drive."""
    if isinstance(node, (nir.IF, nir.I)):
        return 1.0, dt * np.asarray(node.r, dtype=np.float64), 0.0
    tau = np.asarray(node.tau, dtype=np.float64)
    return 1.0 - dt / tau, dt / tau * np.asarray(node.r, dtype=np.float64), dt / tau * node.v_leak


def _one_successor(graph, name, successors, kinds, what):
    """The single successor of node `name`, which must be one of `kinds`."""
    nxt = successors.get(name, [])
    if len(nxt) != 1 or not isinstance(graph.nodes[nxt[0]], kinds):
        found = ", ".join(type(graph.nodes[n]).__name__ for n in nxt) or "nothing"
        raise NIRImportError(f"expected {what} after node {name!r}, found {found}")
    return nxt[0]


def _skip_flatten(graph, name, successors):
    """The node after `name`, past one Flatten if there is one."""
    nxt = successors.get(name, [])
    if len(nxt) == 1 and isinstance(graph.nodes[nxt[0]], nir.Flatten):
        return nxt[0], successors.get(nxt[0], [])
    return name, nxt


def read_structure(graph):
    """The names of the nodes of a single-spiking-layer feedback net (see the module docstring)."""
    successors = {}
    for src, dst in graph.edges:
        successors.setdefault(src, []).append(dst)
    inputs = [n for n, node in graph.nodes.items() if isinstance(node, nir.Input)]
    if len(inputs) != 1:
        raise NIRImportError(f"a FeedbackSNN graph has one Input node, this one has {len(inputs)}")
    ops = (nir.Affine, nir.Conv2d)
    flatten_in, nxt = _skip_flatten(graph, inputs[0], successors)
    if len(nxt) != 1 or not isinstance(graph.nodes[nxt[0]], ops):
        raise NIRImportError("expected an Affine or Conv2d input layer after the Input node")
    input_op = nxt[0]
    _, nxt = _skip_flatten(graph, input_op, successors)
    if len(nxt) != 1 or not isinstance(graph.nodes[nxt[0]], (nir.IF, nir.LIF)):
        raise NIRImportError(f"expected an IF or LIF layer after the input layer {input_op!r}")
    layer = nxt[0]
    branches = successors.get(layer, [])
    feedback = [n for n in branches if successors.get(n) == [layer]]
    if len(branches) != 2 or len(feedback) != 1:
        raise NIRImportError(f"layer {layer!r} must feed one feedback node back to itself and one readout "
                             "(graphs with several spiking layers run in the NIR runner only)")
    if not isinstance(graph.nodes[feedback[0]], (nir.Linear, nir.Affine, nir.Conv2d)):
        raise NIRImportError(f"feedback node {feedback[0]!r} is a {type(graph.nodes[feedback[0]]).__name__}")
    readout_from = next(n for n in branches if n != feedback[0])
    if isinstance(graph.nodes[readout_from], nir.Flatten):
        readout_from = _one_successor(graph, readout_from, successors, (nir.I, nir.LI), "an I or LI readout")
    elif not isinstance(graph.nodes[readout_from], (nir.I, nir.LI)):
        raise NIRImportError(f"expected an I or LI readout after layer {layer!r}")
    classifier = _one_successor(graph, readout_from, successors, nir.Affine, "an Affine classifier")
    _one_successor(graph, classifier, successors, nir.Output, "the Output node")
    return dict(input=inputs[0], flatten=flatten_in != inputs[0], input_op=input_op, layer=layer,
                feedback=feedback[0], readout=readout_from, classifier=classifier)


def time_step_of(readout, leak, dt):
    """T from a readout whose value after T steps is the λ-weighted rate (r = 1/(T dt) or 1/((1-λ) Z))."""
    _, gain, _ = euler_parameters(readout, dt)
    z = 1.0 / uniform(gain, "the readout's r")  # gain = 1/Z for both I and LI
    steps = round(z) if not is_leaky(leak) else round(math.log(1.0 - z * (1.0 - leak)) / math.log(leak))
    if steps < 1 or not math.isclose(readout_rate(steps, leak), z, rel_tol=1e-9):
        raise NIRImportError(f"the readout's r matches no number of time steps (Z = {z})")
    return steps


def _set(parameter, array):
    """Copy a numpy array into a parameter or buffer, bit for bit."""
    parameter.data = torch.from_numpy(np.array(array, dtype=np.float64))


def unit_spectral_estimate(spectral, V):
    """Set u, v so that σ̂ = u·(V v) is exactly 1, making clamp(1)·V/σ̂ equal V bit for bit.

    v is one-hot at a column j, scaled by 1/V[i, j], u one-hot at row i: σ̂ is
    the single product V[i, j]·(1/V[i, j]), picked among the entries where
    that product rounds to exactly 1.
    """
    matrix = V.flatten(1)
    for i, j in torch.nonzero(matrix).tolist():
        inverse = 1.0 / matrix[i, j]
        if matrix[i, j] * inverse == 1.0:
            spectral.u.zero_()[i] = 1.0
            spectral.v.zero_()[j] = inverse
            spectral.g.data.fill_(1.0)
            return
    raise NIRImportError("the feedback weight is zero")


def import_model(graph):
    """(SNNClassifier in eval mode, float64, metadata) of a graph read by `read_structure`.

    BN lives in the weights (the Connections' BN is removed). The feedback is
    parametrised as V = W with σ̂ = 1 and g = 1 (see unit_spectral_estimate),
    exactly W in evaluation; training it further would renormalise it.
    Neurons reset by subtraction and spike at u ≥ Vth whatever the graph says.
    """
    meta = metadata_of(graph)
    dt = float(meta.get("dt", DT))
    names = read_structure(graph)
    node = lambda key: graph.nodes[names[key]]
    neuron = node("layer")
    leak, gain, drive = euler_parameters(neuron, dt)
    leak = uniform(leak, "the leak")
    if not math.isclose(uniform(gain, "r·dt/tau"), 1.0, rel_tol=1e-12) or np.any(np.asarray(drive) != 0):
        raise NIRImportError("a FeedbackSNN neuron has r·dt/tau = 1 and v_leak = 0")
    vth = uniform(neuron.v_threshold, "v_threshold")
    time_step = int(meta.get("time_step", time_step_of(node("readout"), leak, dt)))
    input_shape = tuple(int(d) for d in graph.nodes[names["input"]].input_type["input"])
    in_op, fb = node("input_op"), node("feedback")
    state_shape = tuple(int(d) for d in neuron.input_type["input"])
    if isinstance(in_op, nir.Affine):
        arch = Architecture("fc", input_shape, (state_shape[0],))
    else:
        k = in_op.weight.shape[-1]
        if not isinstance(fb, nir.Conv2d) or fb.weight.shape[-1] % 2 == 0 or tuple(fb.stride) != (1, 1) \
                or tuple(fb.padding) != (fb.weight.shape[-1] // 2,) * 2:
            raise NIRImportError("a conv net's feedback is a same-size Conv2d (odd kernel, stride 1, padding k//2)")
        arch = Architecture("conv", input_shape, (state_shape[0],), input_kernel=k, input_stride=in_op.stride[0],
                            input_padding=in_op.padding[0], feedback_kernel=fb.weight.shape[-1],
                            spike_input=meta.get("input") == "frames")
    classifier = node("classifier")
    model = SNNClassifier(arch, num_classes=classifier.weight.shape[0], time_step=time_step, leak=leak, vth=vth)
    model = model.double().eval()
    if tuple(model.state_shapes[0]) != state_shape:
        raise NIRImportError(f"layer {names['layer']!r} has shape {state_shape}, the input layer gives "
                             f"{tuple(model.state_shapes[0])}")
    snn = model.snn
    with torch.no_grad():
        snn.input_layer.bn = None
        _set(snn.input_layer.linear.weight, in_op.weight)
        _set(snn.input_layer.linear.bias, in_op.bias)
        if getattr(fb, "bias", None) is not None and np.any(fb.bias != 0):
            raise NIRImportError(f"feedback node {names['feedback']!r} has a bias; a FeedbackSNN's feedback has none")
        original = snn.feedback.linear.parametrizations.weight.original
        _set(original, fb.weight)
        unit_spectral_estimate(snn.feedback.spectral, original)
        _set(model.classifier.weight, classifier.weight)
        _set(model.classifier.bias, classifier.bias)
    return model, meta
