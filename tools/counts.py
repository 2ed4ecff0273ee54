"""Print the neurons and learnable parameters of the paper's nets: `python -m tools.counts`."""
from modules import ARCHITECTURES, build_model


def count_rows():
    """(net, classes, neurons, params, paper neurons, paper params) for every row of the paper's table."""
    rows = []
    for name, arch in ARCHITECTURES.items():
        for classes, (neurons, params) in arch.table.items():
            model = build_model(name, num_classes=classes)
            rows.append((name, classes, model.count_neurons(), model.count_parameters(), neurons, params))
    return rows


def markdown_table(rows):
    """The rows of `count_rows()` as a Markdown table (one string)."""
    lines = ["| net | classes | neurons | params | paper neurons | paper params |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {classes} | {neurons:,} | {params:,} | {paper_n} | {paper_p} |"
              for name, classes, neurons, params, paper_n, paper_p in rows]
    return "\n".join(lines)


def main():
    """Print the counts table in Markdown (the only output of this module, when run as a script)."""
    print(markdown_table(count_rows()))


if __name__ == "__main__":
    main()
