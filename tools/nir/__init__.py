"""Export a trained feedback SNN to NIR, read it back, and simulate NIR graphs: `python -m tools.nir`."""
