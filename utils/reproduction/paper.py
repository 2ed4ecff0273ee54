"""The paper's results table (paper_results.csv) and the summary that compares a reproduction's runs with it."""
import csv
import dataclasses
import io
import math
import os
import statistics

from modules import NETS, is_leaky
from utils.files import atomic_write, atomic_write_text
from utils.checkpoint import CHECKPOINT_NAME
from utils.reproduction.folders import inspect, read_record, run_folders

PAPER_RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             'paper_results.csv')


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the paper's results table (accuracies in %)."""
    id: str
    dataset: str
    network: str            # a name of modules.NETS
    neuron: str             # 'IF' or 'LIF'
    leaky: float            # None for IF
    time_steps: int
    mean: float
    std: float
    best: float
    neurons: str
    params: str

    @property
    def script(self):
        """The row's training script."""
        return NETS[self.network].script

    @property
    def leaky_flag(self):
        """The --leaky value: the row's leak for LIF, 1 (outside (0, 1), so IF) for IF."""
        return f'{self.leaky:g}' if self.leaky is not None else '1'

    @property
    def paper_text(self):
        """'99.49 ± 0.04 (99.55)'."""
        return f'{self.mean:.2f} ± {self.std:.2f} ({self.best:.2f})'


def read_rows(path=PAPER_RESULTS):
    """The paper's rows by id, in the table's order."""
    with open(path, newline='', encoding='utf-8') as f:
        records = list(csv.DictReader(f))
    rows = {}
    for r in records:
        leaky = float(r['leaky']) if r['leaky'] else None
        row = Row(r['id'], r['dataset'], r['network'], r['neuron'], leaky, int(r['time_steps']),
                  float(r['mean']), float(r['std']), float(r['best']), r['neurons'], r['params'])
        if (row.neuron == 'LIF') != is_leaky(row.leaky) or row.network not in NETS \
                or row.dataset not in NETS[row.network].datasets or row.id in rows:
            raise ValueError(f'{path}: inconsistent row {row.id}')
        rows[row.id] = row
    return rows


# ---------------------------------------------------------------- summary

@dataclasses.dataclass
class RunResult:
    """What one run folder holds, for the summary."""
    row: str
    seed: int
    dataset: str
    time_steps: int
    epoch: int
    epochs: int
    best: float
    epoch_times: list
    peak_rss_mb: float
    note: str = ''          # why the run is left out: its checkpoint is missing or unreadable

    @property
    def finished(self):
        """The checkpoint has reached the last epoch."""
        return not self.note and self.epochs > 0 and self.epoch >= self.epochs


def collect(out, rows):
    """RunResults of every run folder of OUT with a checkpoint, readable or not, or whose checkpoint is missing."""
    results = []
    for row, seed, folder in run_folders(out, rows):
        found = inspect(folder)
        if not (found.note or os.path.exists(os.path.join(folder, CHECKPOINT_NAME))):
            continue
        record, status = read_record(folder) or {}, found.status or {}
        results.append(RunResult(row.id, seed, record.get('dataset', row.dataset),
                                 record.get('time_step', row.time_steps), found.epoch, found.epochs or 0, found.best,
                                 status.get('epoch_seconds') or [], status.get('peak_rss_mb'), found.note))
    return results


def row_summary(row, results):
    """The numbers of one row's summary line (None where undefined)."""
    done = [r for r in results if r.finished]
    bests = [r.best for r in done]
    times = [t for r in results for t in r.epoch_times]
    rss = [r.peak_rss_mb for r in results if r.peak_rss_mb is not None]
    mean = statistics.fmean(bests) if bests else None
    return {
        'row': row.id,
        'dataset': ' '.join(sorted({r.dataset for r in results})) or row.dataset,
        'time_steps': ' '.join(str(t) for t in sorted({r.time_steps for r in results})) or str(row.time_steps),
        'runs_finished': len(done),
        'runs_unfinished': len(results) - len(done),
        'mean': mean,
        # The sample standard deviation (ddof = 1); undefined for a single run.
        'std': statistics.stdev(bests) if len(bests) > 1 else None,
        'best': max(bests) if bests else None,
        'paper_mean': row.mean, 'paper_std': row.std, 'paper_best': row.best,
        'diff': None if mean is None else mean - row.mean,
        'epoch_s': statistics.fmean(times) if times else None,
        'peak_rss_mb': max(rss) if rss else None,
    }


def number(value, fmt='.2f'):
    """value formatted, or '—' when undefined."""
    return '—' if value is None else format(value, fmt)


def summary_markdown(out, summaries, results, rows):
    """summary.md's text: one line per row, then one per run (and why a run is left out)."""
    lines = [f'# Reproduction summary of {out}', '',
             'Best test accuracy of each run (%). Ours: mean ± sample standard deviation (ddof = 1) over the '
             'finished runs, and the best of them; Δ = our mean − the paper\'s mean, in percentage points. '
             'Time per epoch: the mean over every epoch in the runs\' status.json; peak RSS: the largest '
             'resident host memory of a run\'s training process (rank 0), from its status.json (GPU memory is '
             'not recorded).', '',
             '| row | data set | T | runs | ours: mean ± std | ours: best | paper: mean ± std (best) | Δ mean '
             '| s/epoch | peak RSS MB |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for s in summaries:
        row = rows[s['row']]
        dataset = s['dataset'] if s['dataset'] == row.dataset else f'{s["dataset"]} (paper: {row.dataset})'
        t = s['time_steps']
        t = t if t == str(row.time_steps) else f'{t} (paper: {row.time_steps})'
        runs = str(s['runs_finished']) + (f' (+{s["runs_unfinished"]} unfinished)' if s['runs_unfinished'] else '')
        lines.append(f'| `{s["row"]}` | {dataset} | {t} | {runs} | {number(s["mean"])} ± {number(s["std"])} '
                     f'| {number(s["best"])} | {row.paper_text} | {number(s["diff"], "+.2f")} '
                     f'| {number(s["epoch_s"], ".1f")} | {number(s["peak_rss_mb"], ".0f")} |')
    lines += ['', '| row | seed | epochs | best |', '|---|---|---|---|']
    lines += [f'| `{r.row}` | {r.seed} | {r.epoch}/{r.epochs} | {number(r.best)} |' for r in results if not r.note]
    left_out = [r for r in results if r.note]
    if left_out:
        lines += ['', 'Left out:', ''] + [f'- `{r.row}` seed {r.seed}: {r.note}' for r in left_out]
    return '\n'.join(lines) + '\n'


def summary_csv(summaries):
    """summary.csv's text: one line per row (numbers unrounded, empty where undefined)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(summaries[0]) if summaries else ['row'], lineterminator='\n')
    writer.writeheader()
    for s in summaries:
        writer.writerow({k: '' if v is None else v for k, v in s.items()})
    return out.getvalue()


def summary_png(summaries, results, rows):
    """summary.png's bytes: per row, each finished run's best accuracy against the paper's mean ± std."""
    from matplotlib.figure import Figure

    shown = [s for s in summaries if s['runs_finished']]
    cols = min(4, max(1, len(shown)))
    nrows = max(1, math.ceil(len(shown) / cols))
    fig = Figure(figsize=(3.2 * cols, 2.6 * nrows))
    for i, s in enumerate(shown):
        ax = fig.add_subplot(nrows, cols, i + 1)
        row = rows[s['row']]
        ax.axhspan(row.mean - row.std, row.mean + row.std, color='tab:orange', alpha=0.3,
                   label='paper mean ± std')
        ax.axhline(row.mean, color='tab:orange')
        ax.plot([0], [row.best], marker='x', color='tab:orange', linestyle='', label='paper best')
        bests = [r.best for r in results if r.row == s['row'] and r.finished]
        ax.plot([1] * len(bests), bests, marker='o', color='tab:blue', linestyle='', alpha=0.7, label='our runs')
        ax.set_xlim(-0.8, 1.8)
        ax.set_xticks([0, 1], ['paper', 'ours'])
        ax.set_title(f'{s["row"]}\n({s["dataset"]}, T {s["time_steps"]})', fontsize=8)
        ax.set_ylabel('best test acc. (%)', fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=6, loc='best')
    if not shown:
        fig.text(0.5, 0.5, 'no finished runs yet', ha='center')
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=110)
    return buffer.getvalue()


def write_summary(out, rows):
    """Write out/summary.md, summary.csv and summary.png (atomically); (the md text, the runs left out)."""
    results = collect(out, rows)
    summaries = [row_summary(row, [r for r in results if r.row == row_id])
                 for row_id, row in rows.items() if any(r.row == row_id for r in results)]
    text = summary_markdown(out, summaries, results, rows)
    atomic_write_text(os.path.join(out, 'summary.md'), text)
    atomic_write_text(os.path.join(out, 'summary.csv'), summary_csv(summaries))
    png = summary_png(summaries, results, rows)
    atomic_write(os.path.join(out, 'summary.png'), lambda f: f.write(png))
    return text, [r for r in results if r.note]
