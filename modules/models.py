"""The paper's five networks and the classifier that reads their equilibrium state."""
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import Connection, Feedback
from .settings import NETS
from .bptt import gradient_method
from .snn import FeedbackSNN, is_leaky


@dataclass(frozen=True)
class Architecture:
    """A feedback SNN's shape: input layer, convs inside the loop, feedback operator.

    kind 'fc': input_layer = fc(in → widths[0]); feedback = fc(widths[0] → widths[0]).
    kind 'conv': input_layer = conv(in_channels → widths[0], k, stride, padding) + BN;
    loop layers conv(widths[l-1] → widths[l], k3 p1, strides[l]) + BN + bias;
    feedback: same-size conv (single layer) or a ConvTranspose back to layer 1.
    """
    kind: str
    input_shape: tuple            # (C, H, W), without the time axis of spike input
    widths: tuple                 # channels (or units) of the spiking layers 1..N
    input_kernel: int = 3
    input_stride: int = 1
    input_padding: int = 1
    loop_strides: tuple = ()      # stride of each layer inside the loop, layers 2..N
    feedback_kernel: int = 5      # single-layer conv feedback
    spike_input: bool = False
    description: str = ""
    table: dict = field(default_factory=dict)  # the paper's rounded counts, per class count


ARCHITECTURES = {
    "mnist_conv": Architecture(
        "conv", (1, 28, 28), (64,), input_kernel=5, input_stride=2, input_padding=2,
        description="64C5s (F64C5), MNIST",
        table={10: ("13K", "229K")}),
    "fashion_mlp": Architecture(
        "fc", (1, 28, 28), (400,),
        description="400 (F400), Fashion-MNIST",
        table={10: ("1.2K", "478K")}),
    "nmnist_conv": Architecture(
        "conv", (2, 34, 34), (64,), input_kernel=5, input_stride=2, input_padding=2,
        spike_input=True,
        description="64C5s (F64C5), N-MNIST spike input",
        table={10: ("21K", "291K")}),
    "alexnetf": Architecture(
        "conv", (3, 32, 32), (96, 256, 384, 384, 256), input_kernel=3, input_stride=2,
        input_padding=1, loop_strides=(1, 2, 1, 1),
        description="AlexNet-F, CIFAR",
        table={10: ("159K", "3.7M"), 100: ("159K", "5.2M")}),
    "cifarnetf": Architecture(
        "conv", (3, 32, 32), (128, 256, 512, 1024, 512), input_kernel=3, input_stride=2,
        input_padding=1, loop_strides=(1, 2, 1, 1),
        description="CIFARNet-F, CIFAR",
        table={10: ("232K", "11.8M"), 100: ("232K", "14.8M")}),
}


def build_snn(arch, time_step=30, leak=1.0, vth=2.0, dropout=0.0, solver="broyden", threshold=30, tol=None,
              **gradient_options):
    """The FeedbackSNN of an Architecture; gradient_options: FeedbackSNN's grad, solver_memory, phantom_k,
    phantom_tau, phantom_form, forward_residual, jac_reg, jac_reg_freq."""
    w = arch.widths
    if arch.kind == "fc":
        input_layer = Connection(nn.Linear(math.prod(arch.input_shape), w[0]), bn=True,
                                 dropout=dropout, flatten=True)
        layers = []
        feedback = Feedback(nn.Linear(w[0], w[0], bias=False), dropout=dropout)
    else:
        input_layer = Connection(nn.Conv2d(arch.input_shape[0], w[0], arch.input_kernel, arch.input_stride,
                                           arch.input_padding), bn=True, dropout=dropout)
        layers = [Connection(nn.Conv2d(w[l - 1], w[l], 3, arch.loop_strides[l - 1], 1), bn=True, dropout=dropout)
                  for l in range(1, len(w))]
        if layers:
            # Undo the loop's total downsampling on the way back to layer 1.
            stride = math.prod(arch.loop_strides)
            feedback_op = nn.ConvTranspose2d(w[-1], w[0], 3, stride, 1, output_padding=stride - 1, bias=False)
        else:
            k = arch.feedback_kernel
            feedback_op = nn.Conv2d(w[0], w[0], k, 1, k // 2, bias=False)
        feedback = Feedback(feedback_op, dropout=dropout)
    return FeedbackSNN(input_layer, layers, feedback, time_step=time_step, vth=vth, leak=leak,
                       spike_input=arch.spike_input, solver=solver,
                       threshold=threshold, tol=tol, **gradient_options)


class SNNClassifier(nn.Module):
    """A feedback SNN followed by one linear classifier on its flattened state rate."""

    def __init__(self, arch, num_classes=10, **snn_kwargs):
        super().__init__()
        self.arch = arch
        self.snn = build_snn(arch, **snn_kwargs)
        self.state_shapes = self._layer_shapes()
        self.classifier = nn.Linear(math.prod(self.state_shapes[-1]), num_classes)

    @torch.no_grad()
    def _layer_shapes(self):
        """Shape (without batch) of every spiking layer, found by pushing a zero input through."""
        h = self.snn.input_layer.linear_part(torch.zeros(1, *self.arch.input_shape))
        shapes = [tuple(h.shape[1:])]
        for layer in self.snn.layers:
            h = layer.linear_part(h)
            shapes.append(tuple(h.shape[1:]))
        return shapes

    def check_input(self, x):
        """Raise one clear error for an input of the wrong shape or dtype."""
        shape = tuple(self.arch.input_shape) + (("T",) if self.arch.spike_input else ())
        expected = "(B, " + ", ".join(str(d) for d in shape) + ")"
        if not torch.is_tensor(x) or not x.is_floating_point():
            got = f"dtype {x.dtype}" if torch.is_tensor(x) else type(x).__name__
            raise TypeError(f"expected a floating-point input tensor of shape {expected}, got {got}")
        fixed = tuple(x.shape[1:1 + len(self.arch.input_shape)])
        ok = x.dim() == 1 + len(shape) and fixed == tuple(self.arch.input_shape) and x.shape[0] > 0
        if self.arch.kind == "fc" and x.dim() == 2 and x.shape[1] == math.prod(self.arch.input_shape):
            ok = True
        if not ok:
            raise ValueError(f"expected input of shape {expected}, got {tuple(x.shape)}")

    def forward(self, x):
        """Logits (B, num_classes)."""
        self.check_input(x)
        return self.classifier(self.snn(x).flatten(1))

    def get_all_rate(self, x):
        """Average firing rate of every spiking layer, as (B, n_l) tensors in input-flow order."""
        self.check_input(x)
        return self.snn.all_rates(x)

    @property
    def jacobian_penalty(self):
        """The Jacobian regulariser of the last training forward, to add to the loss (see FeedbackSNN), or None."""
        return self.snn.jacobian_penalty

    def request_norms(self):
        """Measure ‖W_fb‖₂/Vth and ‖J‖₂ in the next training forward (see FeedbackSNN)."""
        self.snn.measure_norms = True

    @property
    def solver_stats(self):
        """Info of the last adjoint solve with the forward's diagnostics (see FeedbackSNN._diagnostics), or None."""
        return self.snn.solver_stats

    def count_neurons(self):
        """Input neurons plus spiking neurons."""
        return math.prod(self.arch.input_shape) + sum(math.prod(s) for s in self.state_shapes)

    def count_parameters(self):
        """Learnable parameters (classifier, BN affine and the feedback scale g included)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def build_model(name, num_classes=10, time_step=30, leaky=None, vth=2.0, dropout=0.0,
                solver=None, threshold=30, tol=None, method="ide", surrogate="sigmoid", surrogate_alpha=None,
                detach_reset=False, bptt_bn="batch", grad="ide", solver_memory=None, phantom_k=5, phantom_tau=0.5,
                phantom_form="neumann", forward_residual=True, jac_reg=0.0, jac_reg_freq=1.0):
    """One of the paper's nets by name: mnist_conv, fashion_mlp, nmnist_conv, alexnetf, cifarnetf.

    `leaky` None, ≥ 1 or ≤ 0 gives IF neurons; 0 < leaky < 1 gives LIF with λ = leaky.
    `solver` None takes the paper's choice for the net (`modules.settings.NETS`):
    'iter' for nmnist_conv, 'broyden' for the others.
    `method` 'ide' trains by implicit differentiation, 'bptt' by back-propagation through
    time (`modules.bptt`) with the `surrogate` spike derivative ('sigmoid', 'atan', 'rect')
    of sharpness `surrogate_alpha` (None: the surrogate's default), `detach_reset` cutting
    the reset term's gradient, and `bptt_bn` 'batch' (the loop layers' BN by each step's batch
    statistics) or 'running' (by their running statistics, IDE's forward exactly); evaluation
    is the same for both.
    With 'ide', `grad` chooses the exact implicit gradient ('ide', solved by `solver` with
    `solver_memory`), Jacobian-free backpropagation ('jfb') or the phantom gradient ('phantom',
    `phantom_k` steps of size `phantom_tau`, in `phantom_form` 'neumann' or 'unroll');
    `forward_residual` records ‖f(a) - a‖/‖a‖ in solver_stats (modules.implicit, FeedbackSNN); `jac_reg` γ > 0
    adds the Jacobian regulariser γ‖J‖_F²/d on a fraction `jac_reg_freq` of the training steps
    (FeedbackSNN.jacobian_penalty).
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown network {name!r}; choose one of {sorted(ARCHITECTURES)}")
    bptt = gradient_method(method, surrogate, surrogate_alpha, detach_reset, bptt_bn)
    leak = leaky if is_leaky(leaky) else 1.0
    model = SNNClassifier(ARCHITECTURES[name], num_classes=num_classes, time_step=time_step, leak=leak,
                         vth=vth, dropout=dropout, solver=solver or NETS[name].solver, threshold=threshold,
                         tol=tol, grad=grad, solver_memory=solver_memory, phantom_k=phantom_k,
                         phantom_tau=phantom_tau, phantom_form=phantom_form, forward_residual=forward_residual,
                         jac_reg=jac_reg, jac_reg_freq=jac_reg_freq)
    model.snn.bptt = bptt
    return model
