"""Synaptic operations (SOPs), multiply-accumulates (MACs) and energy of a feedback SNN.

Every connection of the network (input layer F, layers W_l inside the loop,
feedback W_fb, classifier) is a linear operator h ↦ A h. Its synapses are the
(input, output) pairs that one weight joins; the fan-out of an input position
is the number of synapses leaving it. With A⁰ the operator whose weights are
all 1 (no bias), the fan-out map is A⁰ᵀ 1: the vector-Jacobian product of A⁰
with an all-ones output. For a convolution this counts exactly the outputs
(over every output channel) whose receptive field holds the position, so
borders, stride and padding are accounted for (zero padding is no synapse).

- A spike drives every synapse leaving its neuron once: SOPs = Σ spikes ×
  fan-out, summed over every call of the connection in the simulation. The
  feedback reads s_N[t-1] at steps t = 1..T-1, so the last layer's spikes at
  the last step drive no feedback synapse; the counts follow the simulation.
- The ANN equivalent applies each connection once to real values: its MACs are
  its synapses, Σ fan-out.
- The classifier reads the real-valued state rate a once: its MACs, in the SNN
  as in the ANN. Static images are real-valued too: the simulation computes
  F(x) once (MACs once), a chip without that shortcut every step (T times).
  Spike input (N-MNIST) drives F with spikes: SOPs, like any spike.
- Energy: E_AC per SOP (an accumulate) and E_MAC per MAC; 0.9 pJ and 4.6 pJ
  are 32-bit float add and multiply-add in 45 nm (Horowitz, ISSCC 2014).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

E_AC_PJ = 0.9   # pJ per accumulate, 32-bit float add, 45 nm (Horowitz, ISSCC 2014)
E_MAC_PJ = 4.6  # pJ per multiply-accumulate, 32-bit float mult (3.7) + add (0.9)


@dataclass(frozen=True)
class EnergyCosts:
    """Energy per synaptic operation (accumulate) and per multiply-accumulate, in pJ."""
    e_ac: float = E_AC_PJ
    e_mac: float = E_MAC_PJ


# ---------------------------------------------------------------- fan-out

def ones_operator(linear):
    """x ↦ A⁰ x: linear (nn.Linear, nn.Conv2d or nn.ConvTranspose2d) with every weight 1 and no bias, in float64."""
    ones = torch.ones(linear.weight.shape, dtype=torch.float64)
    if isinstance(linear, nn.Linear):
        return lambda x: F.linear(x, ones)
    if isinstance(linear, (nn.Conv2d, nn.ConvTranspose2d)) and linear.padding_mode != 'zeros':
        raise TypeError(f'fan-out of a {linear.padding_mode}-padded convolution is not a count of synapses')
    if isinstance(linear, nn.Conv2d):
        return lambda x: F.conv2d(x, ones, None, linear.stride, linear.padding, linear.dilation, linear.groups)
    if isinstance(linear, nn.ConvTranspose2d):
        return lambda x: F.conv_transpose2d(x, ones, None, linear.stride, linear.padding, linear.output_padding,
                                            linear.groups, linear.dilation)
    raise TypeError(f'no fan-out rule for {type(linear).__name__}')


def fanout_map(linear, input_shape, flatten=False):
    """Number of synapses leaving each input position of linear, shape input_shape (float64, exact integers).

    input_shape excludes the batch; flatten: the operator reads the input flattened.
    """
    x = torch.ones((1, math.prod(input_shape)) if flatten else (1, *input_shape), dtype=torch.float64,
                   requires_grad=True)
    with torch.enable_grad():
        # A⁰ is linear: the gradient of Σ A⁰x is A⁰ᵀ 1 at any x.
        (grad,) = torch.autograd.grad(ones_operator(linear)(x).sum(), x)
    return grad.reshape(input_shape)


def synapse_count(linear, input_shape, flatten=False):
    """Synapses of linear on inputs of input_shape: the MACs of applying it once."""
    return int(fanout_map(linear, input_shape, flatten).sum().item())


def sops_of(count_map, fanout):
    """Σ count × fan-out of a map of spike counts (any leading dimensions) and the fan-out map of its shape."""
    return (count_map.double().cpu() * fanout).sum().item()


# ---------------------------------------------------------------- the network's connections

@dataclass(eq=False)
class Link:
    """One connection of the network: its module, input shape and presynaptic layer."""
    name: str
    source: int          # index of the presynaptic spiking layer; -1: the input, None: the state rate a
    module: nn.Module    # a modules.layers.Connection, or the classifier's nn.Linear
    input_shape: tuple   # without the batch dimension
    flatten: bool

    @property
    def operator(self):
        """The linear operator whose synapses are counted."""
        return self.module.linear if hasattr(self.module, 'linear') else self.module

    def fanout(self):
        """The fan-out map of this connection's inputs, shape input_shape."""
        return fanout_map(self.operator, self.input_shape, self.flatten)

    def synapses(self):
        """MACs of applying this connection once."""
        return synapse_count(self.operator, self.input_shape, self.flatten)


def network_links(model):
    """F, W_1..W_{N-1}, W_fb and the classifier of an SNNClassifier, in that order."""
    snn, shapes = model.snn, [tuple(s) for s in model.state_shapes]
    links = [Link('F', -1, snn.input_layer, tuple(model.arch.input_shape), snn.input_layer.flatten)]
    links += [Link(f'W{l + 1}', l, layer, shapes[l], layer.flatten) for l, layer in enumerate(snn.layers)]
    links.append(Link('W_fb', len(shapes) - 1, snn.feedback, shapes[-1], snn.feedback.flatten))
    links.append(Link('classifier', None, model.classifier, shapes[-1], True))
    return links


def spike_links(model):
    """The connections that spikes drive: W_l, W_fb, and F for spike input."""
    return [link for link in network_links(model)
            if link.source is not None and (link.source >= 0 or model.snn.spike_input)]


class SpikeCounter:
    """While active, sums over time steps and samples the input each spike-driven connection receives.

    A context manager: forward pre-hooks add the batch sum of every call's
    input (B, *input_shape) to one float64 map per connection, on the input's
    device. In evaluation these inputs are 0/1 spikes, so each map holds the
    spike count of every presynaptic position over the calls made.
    """

    def __init__(self, links):
        """Count the inputs of links (see spike_links)."""
        self.links = list(links)
        self.counts = {link.name: None for link in self.links}
        self._handles = []

    def _hook(self, link):
        def add(module, inputs):
            batch_sum = inputs[0].detach().sum(dim=0, dtype=torch.float64)
            total = self.counts[link.name]
            self.counts[link.name] = batch_sum if total is None else total.add_(batch_sum)
        return add

    def __enter__(self):
        self._handles = [link.module.register_forward_pre_hook(self._hook(link)) for link in self.links]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def spikes(self, name):
        """Spikes that reached connection name so far."""
        count = self.counts[name]
        return 0.0 if count is None else count.sum().item()

    def sops(self, name):
        """SOPs of connection name so far: Σ spike count × fan-out."""
        link = next(link for link in self.links if link.name == name)
        count = self.counts[name]
        return 0.0 if count is None else sops_of(count.reshape(link.input_shape), link.fanout())


# ---------------------------------------------------------------- per-sample counts

@dataclass
class OpCounts:
    """Operations per test sample (averages over the samples) of a feedback SNN run for T steps."""
    time_step: int
    spike_input: bool
    input_shape: tuple      # without the batch (and time) dimension
    num_classes: int
    input_spikes: float     # spike input: input spikes in frames 0..T-1; static input: 0
    input_sops: float       # spike input: their SOPs through F; static input: 0
    input_macs: int         # synapses of F: MACs of applying it once (F(x) of a static image, and the ANN's)
    layer_sops: list        # per spiking layer: SOPs of its spikes through its outgoing connections
    layer_macs: list        # per spiking layer: synapses of its outgoing connections (the ANN's MACs)
    classifier_macs: int    # the classifier applied once to the state rate a

    @property
    def input_neurons(self):
        """Neurons of the input (pixels, or spike channels per frame)."""
        return math.prod(self.input_shape)

    @property
    def input_rate(self):
        """Spike input: input spikes / (neurons · T); static input: None."""
        return self.input_spikes / (self.input_neurons * self.time_step) if self.spike_input else None

    @property
    def total_sops(self):
        """Every synaptic operation of the simulation."""
        return self.input_sops + sum(self.layer_sops)

    def input_layer_macs(self, every_step=False):
        """MACs of F in the SNN: once (as simulated) or every step; none for spike input (counted as SOPs)."""
        if self.spike_input:
            return 0
        return self.input_macs * (self.time_step if every_step else 1)

    def snn_macs(self, every_step=False):
        """The SNN's MACs: F on a static image (once or every step) and the classifier."""
        return self.input_layer_macs(every_step) + self.classifier_macs

    @property
    def ann_macs(self):
        """MACs of the same architecture as an ANN: every connection applied once."""
        return self.input_macs + sum(self.layer_macs) + self.classifier_macs

    @property
    def sops_per_ann_mac(self):
        """Total SOPs over the ANN's MACs."""
        return self.total_sops / self.ann_macs

    def energy_pj(self, costs=EnergyCosts(), every_step=False):
        """The SNN's energy per sample in pJ: SOPs × E_AC + MACs × E_MAC."""
        return self.total_sops * costs.e_ac + self.snn_macs(every_step) * costs.e_mac

    def ann_energy_pj(self, costs=EnergyCosts()):
        """The ANN's energy per sample in pJ: MACs × E_MAC."""
        return self.ann_macs * costs.e_mac


def op_counts(model, counter, samples):
    """OpCounts of model from a SpikeCounter that watched its simulation of `samples` samples."""
    links = network_links(model)
    n_layers = len(model.state_shapes)
    layer_sops = [sum(counter.sops(link.name) for link in counter.links if link.source == l) / samples
                  for l in range(n_layers)]
    layer_macs = [sum(link.synapses() for link in links if link.source == l) for l in range(n_layers)]
    spike_input = model.snn.spike_input
    return OpCounts(time_step=model.snn.time_step, spike_input=spike_input, input_shape=links[0].input_shape,
                    num_classes=model.classifier.out_features,
                    input_spikes=counter.spikes('F') / samples if spike_input else 0.0,
                    input_sops=counter.sops('F') / samples if spike_input else 0.0,
                    input_macs=links[0].synapses(), layer_sops=layer_sops, layer_macs=layer_macs,
                    classifier_macs=links[-1].synapses())
