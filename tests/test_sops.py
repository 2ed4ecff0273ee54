"""Synaptic operations, MACs and energy: hand counts, an independent count, the paper nets' MACs."""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modules import build_model
from tests.test_rates import HandClassifier, hand_net
from utils.analysis.rates import evaluate_rates
from utils.analysis.sops import EnergyCosts, OpCounts, SpikeCounter, fanout_map, network_links, sops_of, spike_links


def spike_at(shape, *position):
    """A (1, *shape) map with one spike at position."""
    spikes = torch.zeros(1, *shape)
    spikes[(0, *position)] = 1.0
    return spikes


def single_spike_sops(linear, shape, position):
    """SOPs of one spike at position of an input of shape."""
    return sops_of(spike_at(shape, *position).sum(0), fanout_map(linear, shape))


# ---------------------------------------------------------------- one spike, counted by hand

# Conv2d(2 -> 3, k5, stride 2, padding 2) on 6x6 (output 3x3). Output row o reads input rows
# 2o-2..2o+2: o=0 rows -2..2, o=1 rows 0..4, o=2 rows 2..6. So input row y is read by
# y=0: o 0,1 (2); y=1: 0,1 (2); y=2: 0,1,2 (3); y=3: 1,2 (2); y=4: 1,2 (2); y=5: 2 (1); same for columns.
# One spike drives (rows reading it) x (columns reading it) x 3 output channels.
CONV_K5S2P2 = [((0, 0, 0), 2 * 2 * 3),   # top-left corner
               ((1, 5, 5), 1 * 1 * 3),   # bottom-right corner, second input channel
               ((0, 0, 2), 2 * 3 * 3),   # top edge
               ((1, 2, 5), 3 * 1 * 3),   # right edge
               ((0, 2, 2), 3 * 3 * 3),   # middle, read by 3 outputs each way
               ((0, 3, 4), 2 * 2 * 3)]   # middle, read by 2 outputs each way
# Conv2d(2 -> 4, k3, stride 1, padding 1) on 4x4: rows read by y=0: 2 outputs, y=1,2: 3, y=3: 2.
CONV_K3S1P1 = [((0, 0, 0), 2 * 2 * 4), ((1, 0, 3), 2 * 2 * 4), ((0, 0, 1), 2 * 3 * 4), ((1, 2, 1), 3 * 3 * 4)]
# ConvTranspose2d(2 -> 3, k3, stride 2, padding 1, output_padding 1) on 3x3 (output 6x6), the
# paper nets' feedback: input row i writes output rows 2i-1+k, k=0..2, kept in 0..5:
# i=0: rows 0,1 (2; row -1 is cut by the padding); i=1: rows 1,2,3 (3); i=2: rows 3,4,5 (3).
CONVT_K3S2P1 = [((0, 0, 0), 2 * 2 * 3),  # corner
                ((1, 2, 2), 3 * 3 * 3),  # the opposite corner keeps all 3 taps thanks to output_padding
                ((0, 0, 1), 2 * 3 * 3),  # edge
                ((1, 1, 1), 3 * 3 * 3)]  # middle
# Without output_padding the output is 5x5 and input row 2 writes rows 3,4 only (2).
CONVT_NO_OUTPUT_PADDING = [((1, 2, 2), 2 * 2 * 3), ((0, 1, 2), 3 * 2 * 3)]


@pytest.mark.parametrize('linear,shape,cases', [
    (nn.Conv2d(2, 3, 5, 2, 2), (2, 6, 6), CONV_K5S2P2),
    (nn.Conv2d(2, 4, 3, 1, 1), (2, 4, 4), CONV_K3S1P1),
    (nn.ConvTranspose2d(2, 3, 3, 2, 1, output_padding=1), (2, 3, 3), CONVT_K3S2P1),
    (nn.ConvTranspose2d(2, 3, 3, 2, 1), (2, 3, 3), CONVT_NO_OUTPUT_PADDING),
], ids=['conv-k5s2p2', 'conv-k3s1p1', 'convT-k3s2p1-op1', 'convT-k3s2p1'])
def test_one_spike_drives_the_synapses_counted_by_hand(linear, shape, cases):
    for position, expected in cases:
        assert single_spike_sops(linear, shape, position) == expected, position


def test_linear_fanout_is_the_output_count():
    linear = nn.Linear(5, 7)
    assert single_spike_sops(linear, (5,), (3,)) == 7
    # An fc input layer reads an image flattened: every pixel reaches every output.
    assert fanout_map(linear, (1, 5, 1), flatten=True).tolist() == [[[7.0]] * 5]


# ---------------------------------------------------------------- many spikes, counted independently

def reached_outputs(linear, shape, position):
    """Outputs that one input position feeds, found by walking every output and kernel tap (no torch ops)."""
    c, y, x = position
    k, s, p = linear.kernel_size[0], linear.stride[0], linear.padding[0]
    height, width = shape[1:]
    if isinstance(linear, nn.ConvTranspose2d):
        out_h = (height - 1) * s - 2 * p + k + linear.output_padding[0]
        out_w = (width - 1) * s - 2 * p + k + linear.output_padding[1]
        rows = {y * s - p + t for t in range(k)} & set(range(out_h))
        cols = {x * s - p + t for t in range(k)} & set(range(out_w))
        channels = linear.out_channels
    else:
        out_h, out_w = (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1
        rows = {o for o in range(out_h) if any(o * s - p + t == y for t in range(k))}
        cols = {o for o in range(out_w) if any(o * s - p + t == x for t in range(k))}
        channels = linear.out_channels
    return channels * len(rows) * len(cols)


@pytest.mark.parametrize('linear,shape', [
    (nn.Conv2d(3, 4, 5, 2, 2), (3, 7, 6)),
    (nn.Conv2d(2, 5, 3, 2, 1), (2, 8, 8)),
    (nn.ConvTranspose2d(3, 2, 3, 2, 1, output_padding=1), (3, 4, 5)),
])
def test_random_spike_maps_give_the_independent_count(linear, shape):
    gen = torch.Generator().manual_seed(0)
    spikes = (torch.rand(4, *shape, generator=gen) < 0.3).float()   # (B, C, H, W)
    expected = 0
    for b, c, y, x in itertools.product(*(range(n) for n in spikes.shape)):
        if spikes[b, c, y, x]:
            expected += reached_outputs(linear, shape, (c, y, x))
    assert sops_of(spikes.sum(0), fanout_map(linear, shape)) == expected


# ---------------------------------------------------------------- through a simulation

# The hand net's spike trains (tests.test_rates) over T = 4 for x = 1:
#   IF:  layer 1 (4 neurons) 0101, 1111, 0001, 0010 -> 8 spikes, each into the 3 synapses of W_1;
#        layer 2 (3 neurons) 1111, 0101, 0111 -> 9 spikes, but the feedback reads steps 0..2 only:
#        111, 010, 011 -> 6 spikes into the 4 synapses of W_fb.
#   LIF λ=0.75: layer 1 0010, 1111, 0000, 0001 -> 6 spikes x 3; layer 2 1111, 0010, 0010 -> steps
#        0..2: 111, 001, 001 -> 5 spikes x 4.
# F (1 -> 4) costs 4 MACs once; the classifier (3 -> 2) 6 MACs; the ANN applies F, W_1 (12),
# W_fb (12) and the classifier once: 34 MACs.
HAND_SOPS = {1.0: (8 * 3, 6 * 4), 0.75: (6 * 3, 5 * 4)}


@pytest.mark.parametrize('leak', sorted(HAND_SOPS))
def test_hand_net_sops_feedback_and_classifier(leak):
    # Four samples with x = 1 and two silent ones (x = 0).
    x = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0], [1.0]])
    loader = DataLoader(TensorDataset(x, torch.zeros(6, dtype=torch.long)), batch_size=4)
    stats = evaluate_rates(HandClassifier(hand_net(leak)), loader)
    ops = stats.ops
    assert ops.layer_sops == [4 * n / 6 for n in HAND_SOPS[leak]]
    assert (ops.input_macs, ops.layer_macs, ops.classifier_macs, ops.ann_macs) == (4, [12, 12], 6, 34)
    assert (ops.input_sops, ops.snn_macs(), ops.snn_macs(every_step=True)) == (0.0, 4 + 6, 4 * 4 + 6)
    assert ops.total_sops == pytest.approx(4 * sum(HAND_SOPS[leak]) / 6, rel=1e-15)


class TinyClassifier(nn.Module):
    """A tiny FeedbackSNN with a classifier, behind the interface utils.analysis.rates and utils.analysis.sops read."""

    def __init__(self, snn, input_shape, state_shapes, num_classes=3):
        super().__init__()
        self.snn, self.state_shapes = snn, state_shapes
        self.arch = SimpleNamespace(input_shape=input_shape)
        self.classifier = nn.Linear(math.prod(state_shapes[-1]), num_classes).double()

    def check_input(self, x):
        """Any input of the tiny net's shape is fine."""


def loop_fanout(linear, shape):
    """The fan-out map of a conv or transposed conv from reached_outputs, position by position."""
    fanout = torch.zeros(shape, dtype=torch.float64)
    for position in itertools.product(*(range(n) for n in shape)):
        fanout[position] = reached_outputs(linear, shape, position)
    return fanout


def test_counts_of_a_simulation_equal_spikes_times_fanout_counted_apart(tiny_snn):
    """Spike input through a three-layer loop with a transposed-conv feedback, every count made independently.

    Layers inside the loop read every step's spikes: their counts are rate x T. The feedback reads
    the last layer's spikes of steps 0..T-2, i.e. all spikes of a simulation one step shorter.
    """
    T = 5
    snn = tiny_snn('multi', spike=True, time_step=T, gain=0.9).eval()
    model = TinyClassifier(snn, (1, 4, 4), [(2, 4, 4), (3, 2, 2), (3, 2, 2)])
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(6, 1, 4, 4, T + 2, generator=gen) < 0.6).double()
    loader = DataLoader(TensorDataset(x, torch.zeros(6, dtype=torch.long)), batch_size=4)
    ops = evaluate_rates(model, loader).ops

    rates = snn.all_rates(x)
    snn.time_step = T - 1
    shorter = snn.all_rates(x)
    snn.time_step = T
    counts = [r.sum(0) * T for r in rates[:-1]] + [shorter[-1].sum(0) * (T - 1)]
    shapes = model.state_shapes
    operators = [layer.linear for layer in snn.layers] + [snn.feedback.linear]
    expected = [(count.reshape(shape) * loop_fanout(op, shape)).sum().item() / 6
                for count, shape, op in zip(counts, shapes, operators)]
    assert min(expected) > 0
    assert ops.layer_sops == pytest.approx(expected, rel=1e-12)
    input_count = x[..., :T].sum(dim=(0, -1))
    assert ops.input_spikes == input_count.sum().item() / 6
    assert ops.input_sops == pytest.approx(
        (input_count * loop_fanout(snn.input_layer.linear, (1, 4, 4))).sum().item() / 6, rel=1e-12)
    assert ops.snn_macs() == ops.snn_macs(every_step=True) == ops.classifier_macs == 12 * 3


def test_counter_hooks_are_removed():
    snn = hand_net(1.0).eval()
    model = HandClassifier(snn)
    with SpikeCounter(spike_links(model)) as counter:
        snn.all_rates(torch.ones(1, 1))
    snn.all_rates(torch.ones(1, 1))
    assert counter.spikes('W1') == 8 and counter.spikes('W_fb') == 6


# ---------------------------------------------------------------- the paper nets

# MACs of each net as an ANN: every connection applied once, one MAC per synapse (zero padding
# joins nothing). Per axis, the number of (output, tap) pairs that land inside the input:
#   conv k5 s2 p2, 28 -> 14: output o reads rows 2o-2..2o+2: o=0 keeps 3, o=1..12 keep 5, o=13 keeps 4
#       (row 28 is padding): 3 + 60 + 4 = 67;  34 -> 17: 3 + 15*5 + 4 = 82.
#   conv k5 s1 p2 (single-layer feedback), n -> n: 3 + 4 + 5(n-4) + 4 + 3 = 5n - 6: 14 -> 64, 17 -> 79.
#   conv k3 s1 p1, n -> n: 3n - 2: 16 -> 46, 8 -> 22.
#   conv k3 s2 p1, 2n -> n: o=0 keeps 2 (row -1 is padding), the others 3: 3n - 1: 32 -> 16: 47, 16 -> 8: 23.
#   convT k3 s2 p1 op1, n -> 2n: input row i writes rows 2i-1..2i+1: i=0 keeps 2, the others 3: 3n - 1:
#       8 -> 16: 23.
# A conv's MACs: C_out * C_in * (per-axis count)^2.
#   mnist_conv:  F 64*1*67^2 = 287,296; W_fb 64*64*64^2 = 16,777,216; classifier 64*14*14*10 = 125,440.
#   fashion_mlp: F 784*400 = 313,600; W_fb 400*400 = 160,000; classifier 400*10 = 4,000.
#   nmnist_conv: F 64*2*82^2 = 860,672; W_fb 64*64*79^2 = 25,563,136; classifier 64*17*17*10 = 184,960.
#   alexnetf (96x16x16, 256x16x16, 384x8x8, 384x8x8, 256x8x8; 10 classes):
#       F 96*3*47^2 = 636,192; W1 256*96*46^2 = 52,002,816; W2 384*256*23^2 = 52,002,816;
#       W3 384*384*22^2 = 71,368,704; W4 256*384*22^2 = 47,579,136; W_fb 96*256*23^2 = 13,000,704;
#       classifier 256*8*8*10 = 163,840.
#   cifarnetf (128x16x16, 256x16x16, 512x8x8, 1024x8x8, 512x8x8; 10 classes):
#       F 128*3*47^2 = 848,256; W1 256*128*46^2 = 69,337,088; W2 512*256*23^2 = 69,337,088;
#       W3 1024*512*22^2 = 253,755,392; W4 512*1024*22^2 = 253,755,392; W_fb 128*512*23^2 = 34,668,544;
#       classifier 512*8*8*10 = 327,680.
PAPER_MACS = {
    'mnist_conv': {'F': 287_296, 'W_fb': 16_777_216, 'classifier': 125_440},
    'fashion_mlp': {'F': 313_600, 'W_fb': 160_000, 'classifier': 4_000},
    'nmnist_conv': {'F': 860_672, 'W_fb': 25_563_136, 'classifier': 184_960},
    'alexnetf': {'F': 636_192, 'W1': 52_002_816, 'W2': 52_002_816, 'W3': 71_368_704, 'W4': 47_579_136,
                 'W_fb': 13_000_704, 'classifier': 163_840},
    'cifarnetf': {'F': 848_256, 'W1': 69_337_088, 'W2': 69_337_088, 'W3': 253_755_392, 'W4': 253_755_392,
                  'W_fb': 34_668_544, 'classifier': 327_680},
}
PAPER_TOTAL_MACS = {'mnist_conv': 17_189_952, 'fashion_mlp': 477_600, 'nmnist_conv': 26_608_768,
                    'alexnetf': 236_754_208, 'cifarnetf': 682_029_440}


@pytest.mark.parametrize('name', sorted(PAPER_MACS))
def test_paper_nets_macs_equal_the_hand_derived_counts(name):
    links = network_links(build_model(name))
    assert {link.name: link.synapses() for link in links} == PAPER_MACS[name]
    assert sum(link.synapses() for link in links) == PAPER_TOTAL_MACS[name]


def test_energy_is_sops_times_e_ac_plus_macs_times_e_mac():
    ops = OpCounts(time_step=10, spike_input=False, input_shape=(1, 2, 2), num_classes=2, input_spikes=0.0,
                   input_sops=0.0, input_macs=100, layer_sops=[300.0, 50.0], layer_macs=[1000, 400],
                   classifier_macs=20)
    assert ops.energy_pj() == pytest.approx(350 * 0.9 + 120 * 4.6)
    assert ops.energy_pj(EnergyCosts(1.0, 2.0), every_step=True) == 350 + (1000 + 20) * 2
    assert ops.ann_energy_pj(EnergyCosts(1.0, 2.0)) == (100 + 1400 + 20) * 2
    assert ops.sops_per_ann_mac == 350 / 1520
