"""What other simulators' NIR importers do with an exported graph: `python -m tools.nir.stock net.nir --dataset digits`.

Two measurements per library that is installed (snntorch, norse,
spikingjelly, sinabs; none is a requirement of this project):
1. its own import function on the whole file: does it load and run?
2. its neuron mapping for IF/LIF, placed in this project's runner (which
   keeps the correct Affine, Flatten and readout): spikes of the first
   spiking layer that differ from the exact simulation, and test accuracy.
The reference is the NIR runner with the file's own rules, in float64; every
other row runs in float32, as the libraries do.
"""
import argparse
import contextlib
import importlib.util
import io
import sys

import nir
import torch
from torch import nn

from utils.data.datasets import DATASETS, build_loaders, get_datasets

from .graph import NIR_RESET, NIR_SPIKE
from .runner import NIRRunner, node_map


class MemoryNeuron(nn.Module):
    """An snnTorch neuron (forward(x, mem) -> (spikes, mem)) as a nirtorch stateful module."""

    def __init__(self, neuron):
        super().__init__()
        self.neuron = neuron

    def forward(self, x, state=None):
        """One step from the previous membrane potential (zero at the first step)."""
        spikes, mem = self.neuron(x, torch.zeros_like(x) if state is None else state[0])
        return spikes, (mem, spikes)


def snntorch_map():
    """snnTorch 1.0's own neuron conversion (snntorch.import_nir), one step per call."""
    from snntorch.import_nir import _nir_to_snntorch_module
    return lambda node: MemoryNeuron(_nir_to_snntorch_module(node, init_hidden=False))


def snntorch_subtract_map(graph_meta):
    """snn.Leaky with β = λ, threshold Vth, reset by subtraction applied in the same step: the project's neuron."""
    import snntorch
    leak, vth = float(graph_meta["leak"]), float(graph_meta["vth"])
    return lambda node: MemoryNeuron(snntorch.Leaky(beta=leak, threshold=vth, reset_mechanism="subtract",
                                                    reset_delay=False))


def norse_map(subtract):
    """Norse's own neuron conversion with dt = 1 (reset to v_reset, or by subtraction)."""
    import norse.torch.functional.reset as reset
    from norse.torch.utils.import_nir import _import_norse_module
    method = reset.reset_subtract if subtract else reset.reset_value
    return lambda node: _import_norse_module(node, ignore_warnings=True, reset_method=method, dt=1.0)


def spikingjelly_map(soft_reset):
    """SpikingJelly's own neuron conversion with dt = 1 (hard reset to v_reset, or v_reset = None: subtraction)."""
    from spikingjelly.activation_based.nir_exchange.from_nir import _NodeMapper
    mapper = _NodeMapper(dt=1.0)

    def convert(node):
        module = mapper.map_if(node) if isinstance(node, nir.IF) else mapper.map_lif(node)
        if soft_reset:
            module.module.v_reset = None
        return module
    return convert


def whole_file_imports():
    """{library: function importing a NIR graph} for the installed libraries."""
    imports = {}
    if importlib.util.find_spec("snntorch"):
        imports["snnTorch import_from_nir"] = lambda g: __import__("snntorch.import_nir").import_nir.import_from_nir(g)
    if importlib.util.find_spec("norse"):
        imports["Norse from_nir(dt=1)"] = lambda g: __import__("norse.torch").torch.from_nir(g, dt=1.0)
    if importlib.util.find_spec("spikingjelly"):
        def jelly(g):
            from spikingjelly.activation_based.nir_exchange.from_nir import import_from_nir
            return import_from_nir(g, dt=1.0)
        imports["SpikingJelly import_from_nir(dt=1)"] = jelly
    if importlib.util.find_spec("sinabs"):
        imports["Sinabs from_nir"] = lambda g: __import__("sinabs.nir").nir.from_nir(g, batch_size=1, num_timesteps=8)
    return imports


def try_whole_import(load, data, x):
    """'runs' or the first line of the error that the library's import or first step raised."""
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the libraries print their warnings
            module = load(nir.read(io.BytesIO(data)))
            module(x)
        return "loads and runs a step (semantics: see the neuron rows)"
    except Exception as exc:  # any failure of a foreign library is the measurement
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def neuron_rows(graph):
    """(label, runner keyword arguments) of every neuron mapping to measure."""
    meta_rows = [("this project's runner, float64 (reference)", dict(dtype=torch.float64)),
                 ("this project's runner, float32", dict(dtype=torch.float32)),
                 ("NIR's rules: reset to v_reset, u > Vth", dict(dtype=torch.float32, reset=NIR_RESET,
                                                                   spike=NIR_SPIKE))]
    neuron_types = (nir.IF, nir.LIF)
    meta = NIRRunner(graph).meta
    mapped = []
    if importlib.util.find_spec("snntorch"):
        mapped += [("snnTorch neuron map (import_nir)", snntorch_map()),
                   ("snn.Leaky(beta=λ, threshold=Vth, subtract, reset_delay=False)", snntorch_subtract_map(meta))]
    if importlib.util.find_spec("norse"):
        mapped += [("Norse neuron map, dt=1", norse_map(False)),
                   ("Norse neuron map, dt=1, reset_subtract", norse_map(True))]
    if importlib.util.find_spec("spikingjelly"):
        mapped += [("SpikingJelly neuron map, dt=1", spikingjelly_map(False)),
                   ("SpikingJelly neuron map, dt=1, v_reset=None", spikingjelly_map(True))]
    for label, convert in mapped:
        mapping = {**node_map(), **{kind: convert for kind in neuron_types}}
        meta_rows.append((label, dict(dtype=torch.float32, nirtorch_map=mapping)))
    return meta_rows


def measure(graph, loader):
    """[(label, spikes, spikes that differ from the first row's, top-1 %)] for every row of neuron_rows."""
    rows, reference = [], None
    for label, kwargs in neuron_rows(graph):
        with contextlib.redirect_stdout(sys.stderr):  # the libraries print their warnings
            runner = NIRRunner(graph, **kwargs)
        first = sorted(runner.neurons)[0]
        correct, total, spikes = 0, 0, []
        for inputs, targets in loader:
            out, recorded = runner.run(inputs, record=True)
            s = recorded[first].to(torch.float64)
            spikes.append(s)
            correct += (out.argmax(1) == targets).sum().item()
            total += targets.numel()
        spikes = torch.cat(spikes, dim=1)
        if reference is None:
            reference = spikes
        differing = (spikes != reference).sum().item()
        rows.append((label, int(spikes.sum().item()), differing, 100.0 * correct / total))
        print(f"  {label}: {differing:,} differing spikes, {100.0 * correct / total:.2f}%", file=sys.stderr)
    return rows


def main(argv=None):
    """Print a Markdown table of both measurements."""
    parser = argparse.ArgumentParser(prog="python -m tools.nir.stock", description=__doc__.split("\n")[0])
    parser.add_argument("graph", help="a NIR file written by `python -m tools.nir export`")
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--path", default="./data")
    parser.add_argument("--test-batch", type=int, default=150)
    args = parser.parse_args(argv)
    data = open(args.graph, "rb").read()
    graph = nir.read(io.BytesIO(data))
    runner = NIRRunner(graph)
    _, test_set, _ = get_datasets(args.dataset, args.path, time_step=runner.time_step)
    loader = build_loaders(test_set, test_set, args.test_batch, args.test_batch, 0)[1]
    x = next(iter(loader))[0][:2]
    print("| library call on the whole file | outcome |\n|---|---|")
    for label, load in whole_file_imports().items():
        print(f"| {label} | {try_whole_import(load, data, x)} |")
    print(f"\n| neuron mapping (first spiking layer, {len(test_set)} {args.dataset} test samples, T = "
          f"{runner.time_step}) | spikes | differing from the reference | top-1 % |\n|---|---|---|---|")
    for label, spikes, differing, top1 in measure(graph, loader):
        print(f"| {label} | {spikes:,} | {differing:,} | {top1:.2f} |")


if __name__ == "__main__":
    main()
