"""Export a checkpoint to NIR, or measure a NIR graph's test accuracy through the NIR runner.

    python -m tools.nir export --resume CKPT -o net.nir
    python -m tools.nir eval net.nir --dataset digits

See docs/nir.md for the mapping and its conventions.
"""
import argparse
import io
import sys

import nir
import torch
from torch import nn

from modules import NETS, build_model
from utils.checkpoint import load_checkpoint, load_into_model
from utils.data.datasets import DATASETS, DataError, build_loaders, get_datasets
from utils.files import CheckpointError, atomic_write, refuse_existing_files
from utils.training.console import error
from utils.training.epoch import EpochMeters

from .graph import DENSE_LIMIT, NIRExportError, export_graph, metadata_of
from .runner import NIRRunner

PROG = "python -m tools.nir"
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def parse_args(argv):
    """The two commands' flags."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a checkpoint's network as a NIR graph")
    export.add_argument("--resume", required=True, metavar="CKPT", help="checkpoint of a training script")
    export.add_argument("-o", "--output", required=True, metavar="FILE", help="the NIR file to write")
    export.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    export.add_argument("--dense-limit", type=int, default=DENSE_LIMIT, metavar="N",
                        help="most weight entries a dense loop may have (transposed-conv feedback; "
                             f"default {DENSE_LIMIT:,})")
    evaluate = commands.add_parser("eval", help="test accuracy of a NIR graph through the NIR runner")
    evaluate.add_argument("graph", metavar="FILE", help="a NIR file written by `export`")
    evaluate.add_argument("--dataset", choices=DATASETS, type=str.lower,
                          help="test set (default: the net's script's default)")
    evaluate.add_argument("--path", default="./data", help="data folder (default ./data)")
    evaluate.add_argument("--test-batch", type=int, default=200, help="samples per batch (default 200)")
    evaluate.add_argument("--workers", type=int, default=0, help="data loader processes (default 0)")
    evaluate.add_argument("--dtype", choices=DTYPES, default="float64",
                          help="simulation precision; float64 reproduces the project's spikes exactly "
                               "(docs/nir.md), float32 is faster")
    return parser.parse_args(argv)


def export_checkpoint(args):
    """Build the checkpoint's network, export it and write the file; return the line to print."""
    refuse_existing_files([args.output], args.overwrite)
    ckpt = load_checkpoint(args.resume)
    arch = ckpt.get("arch")
    if arch is None or "model_args" not in ckpt:
        raise CheckpointError(f"{args.resume} names no network ('arch' and 'model_args'); "
                              "export checkpoints saved by this project's training scripts")
    model = build_model(arch, **ckpt["model_args"])
    load_into_model(model, ckpt, expected_arch=arch)
    graph = export_graph(model.eval(), net=arch, dense_limit=args.dense_limit)
    buffer = io.BytesIO()
    nir.write(buffer, graph)
    atomic_write(args.output, lambda f: f.write(buffer.getvalue()))
    meta = metadata_of(graph)
    neuron = "IF" if meta["leak"] == 1.0 else f"LIF (leak {meta['leak']})"
    return (f"Wrote {args.output}: {arch}, {neuron}, T = {meta['time_step']}, {len(graph.nodes)} nodes, "
            f"{len(buffer.getvalue()):,} bytes")


def evaluate_graph(args):
    """(loss, top-1 %) of the graph on a test set, simulated by the NIR runner."""
    try:
        graph = nir.read(args.graph)
    except (OSError, KeyError, ValueError, AssertionError) as exc:
        raise DataError(f"{args.graph} is not a readable NIR graph: {exc}") from exc
    runner = NIRRunner(graph, dtype=DTYPES[args.dtype])
    net = runner.meta.get("net")
    dataset = args.dataset or (NETS[net].dataset if net in NETS else None)
    if dataset is None:
        raise DataError(f"{args.graph} names no network of this project: pass --dataset")
    _, test_set, num_classes = get_datasets(dataset, args.path, time_step=runner.time_step)
    loader = build_loaders(test_set, test_set, args.test_batch, args.test_batch, args.workers)[1]
    print(f"Data: {dataset}, {len(test_set)} test, {num_classes} classes; graph: {net or 'unnamed'}, "
          f"T = {runner.time_step}, {args.dtype}")
    criterion, meters = nn.CrossEntropyLoss(), EpochMeters()
    for inputs, targets in loader:
        outputs = runner(inputs)
        meters.update(outputs, targets, criterion(outputs, targets), None)
    return meters.loss.avg, meters.top1.avg


def main(argv=None):
    """Run one command; exit status 1 with one line on stderr for bad input."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "export":
            print(export_checkpoint(args))
        else:
            loss, top1 = evaluate_graph(args)
            print(f"Test Loss: {loss:.4f}  Test Acc: {top1:.2f}")
    except (CheckpointError, NIRExportError, DataError, ValueError) as exc:
        error(PROG, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
