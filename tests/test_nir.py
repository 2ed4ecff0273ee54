"""NIR export and import (tools.nir): the exported graph, simulated by the NIR runner, is the project's evaluation.

"Identical" means float64 on both sides: the project's network in float64
(`model.double()`) against the graph (float64 weights, BN folded in float64)
run by the NIR runner in float64 gives 0 differing spikes in every layer at
every step, and logits equal to 1e-12 relative. (In float32 the folded BN
rounds differently from BN applied after the conv, and a potential within
1e-5 of Vth can flip; docs/nir.md has the measurement.)
"""
import io
import os
import re
import subprocess
import sys

import nir
import nirtorch.nir_interpreter
import numpy as np
import pytest
import torch
from torch import nn

from modules import build_model
from modules.models import Architecture, SNNClassifier
from tools.nir.__main__ import main as nir_main
from tools.nir.graph import (NIR_RESET, NIR_SPIKE, RESET_SUBTRACT, SPIKE_AT_THRESHOLD, NIRImportError, export_graph,
                             import_model)
from tools.nir.runner import NIRRunner, node_map

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 30
LIF = 0.95
PARAMETERS = ("weight", "bias", "r", "tau", "v_leak", "v_threshold", "v_reset")


def trained_looking(model, seed=0):
    """Eval-mode model with BN affine and running statistics away from their initial values."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.6, 1.4)
                module.bias.uniform_(-0.2, 0.5)
                module.running_mean.normal_(0.0, 0.3)
                module.running_var.uniform_(0.3, 2.0)
    return model.eval()


def net_input(model, batch=2, seed=1):
    """Gaussian images, or Bernoulli(0.3) spike frames with T frames for spike-input nets."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, *model.arch.input_shape)
    if model.arch.spike_input:
        return (torch.rand(*shape, model.snn.time_step, generator=gen) < 0.3).double()
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@torch.no_grad()
def project_run(model, x):
    """(logits, [per layer (T, B, n) spikes]) of the project's own evaluation of a float64 model."""
    snn = model.snn
    spikes = [[] for _ in range(len(snn.layers) + 1)]
    step_count = [0]

    def step(u, s, current):
        u, s = snn._fire_(u, s, current)
        spikes[step_count[0] % len(spikes)].append(s.flatten(1).clone())
        step_count[0] += 1
        return u, s
    loop_stats = snn.loop_stats()
    rate, _ = snn.unroll(x, snn.input_layer, lambda l, s: snn.layers[l](s, stats=loop_stats[l]), step)
    return model.classifier(rate.flatten(1)), [torch.stack(s) for s in spikes]


def file_bytes(graph):
    """The NIR file of a graph, as bytes."""
    buffer = io.BytesIO()
    nir.write(buffer, graph)
    return buffer.getvalue()


def read_back(graph):
    """The graph written to a file and read back by nir.read."""
    return nir.read(io.BytesIO(file_bytes(graph)))


def runner_spikes(graph, x, **kwargs):
    """(output, [per layer (T, B, n) spikes]) of the NIR runner."""
    out, spikes = NIRRunner(graph, **kwargs).run(x, record=True)
    return out, [spikes[name].flatten(2) for name in sorted(spikes)]


def assert_identical(model, graph, x):
    """0 differing spikes in every layer and step, logits equal to 1e-12 relative."""
    logits, spikes = project_run(model, x)
    out, nir_spikes = runner_spikes(graph, x)
    assert len(spikes) == len(nir_spikes)
    for ours, theirs in zip(spikes, nir_spikes):
        assert ours.shape == theirs.shape
        assert 0.02 < ours.mean() < 0.6  # a test on silent or saturated layers would prove nothing
        assert torch.equal(ours, theirs)
    torch.testing.assert_close(out, logits, rtol=1e-12, atol=1e-12)


def node_arrays(graph):
    """{(node, field): array} of every parameter array in a graph."""
    return {(name, key): getattr(node, key) for name, node in graph.nodes.items() for key in PARAMETERS
            if hasattr(node, key)}


@pytest.mark.parametrize("leaky", [None, LIF], ids=["IF", "LIF"])
@pytest.mark.parametrize("name", ["fashion_mlp", "mnist_conv", "nmnist_conv"])
def test_round_trip_gives_the_same_spikes(name, leaky):
    model = trained_looking(build_model(name, time_step=T, leaky=leaky))
    graph = export_graph(model, net=name)
    back = read_back(graph)
    written, read = node_arrays(graph), node_arrays(back)
    assert written.keys() == read.keys()
    for key, array in written.items():  # bit-identical weights, in float64
        assert read[key].dtype == np.float64 and read[key].tobytes() == array.tobytes(), key
    assert_identical(model.double(), back, net_input(model))


def test_multi_layer_loop_exports_dense_and_gives_the_same_spikes():
    torch.manual_seed(0)
    arch = Architecture("conv", (3, 8, 8), (4, 6), input_stride=2, loop_strides=(2,))
    model = trained_looking(SNNClassifier(arch, num_classes=5, time_step=T, leak=0.9))
    with torch.no_grad():  # deep layers see few spikes: shift their current up so they fire
        model.snn.layers[0].bn.bias.uniform_(0.3, 0.8)
    graph = read_back(export_graph(model))
    assert isinstance(graph.nodes["feedback"], nir.Linear) and graph.nodes["feedback"].weight.shape == (64, 24)
    assert_identical(model.double(), graph, net_input(model, batch=4))
    with pytest.raises(NIRImportError, match="several spiking layers"):
        import_model(graph)


@pytest.mark.parametrize("leaky", [None, LIF], ids=["IF", "LIF"])
def test_imported_graph_is_a_feedback_snn_and_exports_to_the_same_file(leaky):
    model = trained_looking(build_model("mnist_conv", time_step=T, leaky=leaky))
    original = file_bytes(export_graph(model, net="mnist_conv"))
    imported, meta = import_model(nir.read(io.BytesIO(original)))
    assert not imported.training and imported.snn.time_step == T and imported.snn.leak == (leaky or 1.0)
    assert file_bytes(export_graph(imported, net=meta["net"])) == original
    x = net_input(model)
    logits, spikes = project_run(model.double(), x)
    imported_logits, imported_spikes = project_run(imported, x)
    assert all(torch.equal(a, b) for a, b in zip(spikes, imported_spikes))
    torch.testing.assert_close(imported_logits, logits, rtol=1e-12, atol=1e-12)


def test_plain_nir_graph_loads_and_runs():
    """A graph built from NIR nodes alone (no metadata): T comes from the readout, λ from τ."""
    gen = np.random.default_rng(0)
    n, leak, steps, vth = 20, 0.9, 12, 1.0
    tau = 1.0 / (1.0 - leak)
    ones = np.ones(n)
    z = sum(leak ** k for k in range(steps))
    nodes = {
        "in": nir.Input(input_type=np.array([3, 4])),
        "flat": nir.Flatten(input_type=np.array([3, 4]), start_dim=0),
        "fc": nir.Affine(weight=gen.normal(0, 1, (n, 12)), bias=gen.normal(0.0, 0.2, n)),
        "lif": nir.LIF(tau=tau * ones, r=tau * ones, v_leak=0 * ones, v_threshold=vth * ones),
        "rec": nir.Linear(weight=gen.normal(0, 0.2, (n, n))),
        "li": nir.LI(tau=tau * ones, r=ones / ((1 - leak) * z), v_leak=0 * ones),
        "cls": nir.Affine(weight=gen.normal(0, 1, (3, n)), bias=gen.normal(0, 1, 3)),
        "out": nir.Output(output_type=np.array([3])),
    }
    edges = [("in", "flat"), ("flat", "fc"), ("fc", "lif"), ("lif", "rec"), ("rec", "lif"), ("lif", "li"),
             ("li", "cls"), ("cls", "out")]
    graph = nir.NIRGraph(nodes=nodes, edges=edges)
    model, _ = import_model(graph)
    assert (model.snn.time_step, model.snn.leak, model.snn.vth) == (steps, leak, vth)
    x = torch.from_numpy(gen.normal(0, 1, (4, 3, 4)))
    logits, spikes = project_run(model, x)
    out, nir_spikes = runner_spikes(graph, x, time_step=steps, reset=RESET_SUBTRACT, spike=SPIKE_AT_THRESHOLD)
    assert 0.05 < spikes[0].mean() < 0.6 and torch.equal(spikes[0], nir_spikes[0])
    torch.testing.assert_close(out, logits, rtol=1e-12, atol=1e-12)


def test_reset_to_zero_and_stock_affine_change_the_spikes():
    """The two stock behaviours the project's node map replaces do change the result (so the tests above can fail)."""
    model = trained_looking(build_model("fashion_mlp", time_step=T, leaky=LIF))
    graph, x = read_back(export_graph(model)), net_input(model, batch=4)
    _, spikes = runner_spikes(graph, x)
    _, reset_to_zero = runner_spikes(graph, x, reset=NIR_RESET)
    stock_affine = {**node_map(), nir.Affine: nirtorch.nir_interpreter._default_map_affine}
    _, stock = runner_spikes(graph, x, nirtorch_map=stock_affine)
    assert (reset_to_zero[0] != spikes[0]).float().mean() > 0.01
    assert (stock[0] != spikes[0]).float().mean() > 0.01


def test_strict_threshold_changes_spikes_on_a_binary_grid():
    """u > Vth and u ≥ Vth differ only when u lands on Vth: weights and inputs on a grid of 1/8 make it so."""
    graph = export_graph(build_model("fashion_mlp", time_step=T, leaky=0.5).eval())
    gen = torch.Generator().manual_seed(0)
    on_grid = lambda shape: (torch.randint(-2, 3, shape, generator=gen) / 8.0).double().numpy()
    graph.nodes["input_op"].weight = on_grid(graph.nodes["input_op"].weight.shape)
    graph.nodes["input_op"].bias = np.full(graph.nodes["input_op"].bias.shape, 0.25)
    graph.nodes["feedback"].weight = on_grid(graph.nodes["feedback"].weight.shape)
    x = (torch.randint(0, 3, (4, 1, 28, 28), generator=gen) / 8.0).double()
    _, ours = runner_spikes(graph, x)
    _, strict = runner_spikes(graph, x, spike=NIR_SPIKE)
    model, _ = import_model(graph)
    assert torch.equal(ours[0], project_run(model, x)[1][0])
    assert (strict[0] != ours[0]).sum() > 0


def checkpoint_of(model, arch, path):
    """A checkpoint file as the training scripts write it (the keys tools.nir reads)."""
    args = dict(time_step=model.snn.time_step, leaky=model.snn.leak)
    torch.save(dict(state_dict=model.state_dict(), arch=arch, model_args=args), path)


def test_cifar_net_over_the_limit_is_refused_in_one_line(tmp_path, capsys):
    ckpt, out = tmp_path / "alexnetf.pth.tar", tmp_path / "net.nir"
    checkpoint_of(build_model("alexnetf", time_step=4), "alexnetf", ckpt)
    assert nir_main(["export", "--resume", str(ckpt), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "transposed convolution" in err
    assert "4,630,511,616 weight entries" in err and not out.exists()
    assert os.listdir(tmp_path) == ["alexnetf.pth.tar"]


def test_export_refuses_an_existing_file(tmp_path, capsys):
    ckpt, out = tmp_path / "c.pth.tar", tmp_path / "net.nir"
    checkpoint_of(build_model("fashion_mlp", time_step=4), "fashion_mlp", ckpt)
    out.write_bytes(b"keep")
    assert nir_main(["export", "--resume", str(ckpt), "-o", str(out)]) == 1
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep"


def test_cli_export_writes_the_graph_of_the_checkpoint(tmp_path):
    model = trained_looking(build_model("mnist_conv", time_step=5, leaky=LIF))
    ckpt, out = tmp_path / "c.pth.tar", tmp_path / "net.nir"
    checkpoint_of(model, "mnist_conv", ckpt)
    assert nir_main(["export", "--resume", str(ckpt), "-o", str(out)]) == 0
    assert out.read_bytes() == file_bytes(export_graph(model, net="mnist_conv"))


def accuracy_line(text):
    """The accuracy in the last 'Test Loss: … Test Acc: …' line of a run's output."""
    return re.findall(r"Test Loss: [\d.]+\s+Test Acc: ([\d.]+)", text)[-1]


@pytest.mark.slow
def test_quick_start_checkpoint_has_the_same_digits_accuracy_through_nir(tmp_path):
    """Train the quick start's net (1 epoch, T = 4), then `-e` and `tools.nir eval` print the same accuracy."""
    folder = tmp_path / "ckpt"
    common = [sys.executable, "mnist_conv.py", "--dataset", "digits", "-j", "0"]
    subprocess.run(common + ["--time_step", "4", "--threshold", "4", "--train-batch", "64", "--lr", "0.1",
                             "--epochs", "1", "--manualSeed", "0", "-c", str(folder)],
                   cwd=ROOT, check=True, capture_output=True)
    best = str(folder / "model_best.pth.tar")
    evaluated = subprocess.run(common + ["-e", "--resume", best], cwd=ROOT, check=True, capture_output=True,
                               text=True).stdout
    graph = str(tmp_path / "net.nir")
    tool = [sys.executable, "-m", "tools.nir"]
    subprocess.run(tool + ["export", "--resume", best, "-o", graph], cwd=ROOT, check=True, capture_output=True)
    through_nir = subprocess.run(tool + ["eval", graph, "--dataset", "digits"], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout
    assert float(accuracy_line(evaluated)) > 50.0
    assert accuracy_line(through_nir) == accuracy_line(evaluated)
