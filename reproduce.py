"""Reproduce the paper's results table: every row × seed is a run of the row's training script, run by submitit.

A run is the script's own command line (the row's data set, T and neuron, the
script's defaults, i.e. the paper's, otherwise, and --manualSeed k) in
OUT/<row>/seed<k>/, where command.json records it. submitit runs the runs on this
machine (--cluster local: one job per GPU group, or --jobs N on the CPU), as one
Slurm job array (--cluster slurm: a run preempted or out of time is requeued and
resumes from its checkpoint) or in this process (--cluster debug). Finished runs
are skipped, interrupted ones resumed. Progress comes from each run's
status.json and checkpoint; OUT/summary.{md,csv,png} compares them with the paper.

    python reproduce.py --list
    python reproduce.py --all --seeds 3 --path DATA --cluster slurm --partition gpu --time 2880
    python reproduce.py --all --seeds 3 --path DATA --gpus 0,1,2,3
    python reproduce.py --status --out results
    python reproduce.py --summarize results
"""
import argparse
import contextlib
import dataclasses
import difflib
import io
import json
import os
import shlex
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from utils import flags  # noqa: E402
from utils.checkpoint import CHECKPOINT_NAME  # noqa: E402
from utils.files import CheckpointError, atomic_write_text, make_writable_folder  # noqa: E402
from utils.reproduction import engine  # noqa: E402
from utils.reproduction.folders import (COMMAND_NAME, RecordError, duration, inspect, read_record,  # noqa: E402
                                        status_table, time_left)
from utils.reproduction.paper import read_rows, write_summary  # noqa: E402
from utils.training.status import read_status  # noqa: E402

# The quick protocol: the README's quick-start flags, for a CPU demonstration on digits.
QUICK_FLAGS = ['-j', '0', '--threshold', '8', '--train-batch', '64', '--lr', '0.1', '--epochs', '3', '--schedule', '2']
QUICK_T = 8
DIGITS_FOR = ('mnist', 'fashionmnist')  # data sets that --dataset digits stands in for
# Flags reproduce.py sets on every run itself, or that would make a run something else than training.
RUNNER_FLAGS = {'dataset', 'time_step', 'leaky', 'manualSeed', 'checkpoint', 'resume', 'path', 'evaluate', 'rewind',
                'sweep_T', 'overwrite', 'gpu_id', 'start_epoch'}
# What may differ between the seeds of a row: anything else makes them different protocols.
SEED_FLAGS = set(flags.LOCAL_FLAGS) | {'manualSeed', 'path'}
POLL_S = 1.0


class UsageError(Exception):
    """Bad input, or a folder that needs a person: one line each, exit code 2."""


@dataclasses.dataclass
class Run:
    """One (row, seed) run: its folder and the script's flags that make it (--resume aside)."""
    row: object
    seed: int
    folder: str
    flags: list
    processes: int = 1      # torchrun processes, one per GPU, for --gpus-per-run > 1

    @property
    def name(self):
        """'mnist-conv-if-t30 seed 0'."""
        return f'{self.row.id} seed {self.seed}'

    @property
    def argv(self):
        """The run's command line from the current folder: python (or torchrun), the script, its flags."""
        torchrun = ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={self.processes}']
        return [sys.executable] + (torchrun if self.processes > 1 else []) + \
            [os.path.relpath(os.path.join(HERE, self.row.script))] + self.flags


def make_runs(rows, seeds, args, extra):
    """One Run per (seed, row), seed-major (every row gets its first run early)."""
    runs = []
    for seed in seeds:
        for row in rows:
            dataset = 'digits' if args.dataset and row.dataset in DIGITS_FOR else row.dataset
            time_steps = min(row.time_steps, QUICK_T) if args.quick else row.time_steps
            folder = os.path.join(args.out, row.id, f'seed{seed}')
            run_flags = ['--path', args.path, '--dataset', dataset, '--time_step', str(time_steps),
                         '--leaky', row.leaky_flag] + (QUICK_FLAGS if args.quick else [])
            run_flags += list(extra) + ['--manualSeed', str(seed), '-c', folder]
            runs.append(Run(row, seed, folder, run_flags, args.gpus_per_run))
    return runs


def parsed_flags(row, run_flags):
    """The script's values for run_flags, after its own cross-flag checks; UsageError if it refuses them."""
    parser, stderr = flags.build_parser(row.network), io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(run_flags)
            flags.check_args(parser, args, row.network)
    except SystemExit:
        raise UsageError(f'{row.id}: {" ".join(stderr.getvalue().split())}') from None
    return vars(args)


def show(argv):
    """A command line to read or paste (this interpreter shown as python, torchrun's module as torchrun)."""
    if argv[1:3] == ['-m', 'torch.distributed.run']:
        return shlex.join(['torchrun'] + argv[3:])
    return shlex.join(['python'] + argv[1:])


def check_protocol(run, now):
    """UsageError unless every run of run's row already in OUT was made by reproduce.py with its flags (now)."""
    row_dir = os.path.dirname(run.folder)
    for name in sorted(os.listdir(row_dir)) if os.path.isdir(row_dir) else []:
        folder = os.path.join(row_dir, name)
        record = read_record(folder) if name.startswith('seed') else None
        if record is None:
            if name.startswith('seed') and os.listdir(folder):
                raise UsageError(f'{folder} holds files but no {COMMAND_NAME} (not a run of reproduce.py); '
                                 f'choose another --out')
            continue
        before = parsed_flags(run.row, record['flags'])
        differences = [f'{k} was {before[k]}, now {now[k]}' for k in sorted(now)
                       if k not in SEED_FLAGS and before.get(k) != now[k]]
        if record.get('processes', 1) != run.processes:
            differences.append(f'processes per run was {record.get("processes", 1)}, now {run.processes}')
        if differences:
            raise UsageError(f'{folder} holds a run with other flags ({"; ".join(differences)}); the seeds of a '
                             f'row share one protocol: use the same flags or another --out')


def plan(args, extra, rows):
    """The runs of this invocation and what their folders hold, after every check (UsageError on a problem)."""
    unknown = [i for i in args.rows or [] if i not in rows]
    if unknown:
        close = {i: difflib.get_close_matches(i, list(rows), n=3, cutoff=0.5) for i in unknown}
        raise UsageError('--rows: unknown row ' + '; '.join(
            f'{i!r}' + (f' (did you mean {", ".join(c)}?)' if c else '') for i, c in close.items()) + '; see --list')
    chosen = list(rows.values()) if args.all else [rows[i] for i in dict.fromkeys(args.rows)]
    other = [row.id for row in chosen if args.dataset and row.dataset not in DIGITS_FOR]
    if other:
        raise UsageError(f'--dataset digits: stands in for MNIST and Fashion-MNIST only, not for {", ".join(other)}')
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f'--out: {args.out} exists and is not a folder')
    runs = make_runs(chosen, dict.fromkeys(args.seed_list or range(args.seeds)), args, extra)
    values = {run.name: parsed_flags(run.row, run.flags) for run in runs}  # the scripts' own checks, first
    typed = set(vars(flags.build_parser(chosen[0].network, suppress=True).parse_args(extra)))
    if typed & RUNNER_FLAGS:
        raise UsageError(f'after --: reproduce.py sets {", ".join(sorted(typed & RUNNER_FLAGS))} of every run '
                         f'itself (see --rows, --seeds, --path, --out, --dataset)')
    for run in runs:
        check_protocol(run, values[run.name])
    found = {run.name: inspect(run.folder) for run in runs}
    problems = [f'{run.name}: {found[run.name].note}' for run in runs if found[run.name].note]
    problems += [f'{run.name}: a training process (PID {found[run.name].status["pid"]}) runs in {run.folder}'
                 for run in runs if found[run.name].state == 'running'
                 and found[run.name].status.get('host') == socket.gethostname()]
    if problems:
        raise UsageError('\n'.join(problems))
    return runs, found, values


def slurm_parameters(args, todo):
    """The Slurm executor's parameters for the runs todo."""
    return engine.slurm_parameters([show(run.argv) for run in todo], args.gpus_per_run, args.cpus_per_run,
                                   args.time or 1440, args.partition, args.mem, args.array_parallelism,
                                   args.slurm_extra)


def follow(jobs, runs):
    """Print each run's epochs as its status file records them, until every job has ended."""
    said = {}
    while True:
        ended = all(job.done() for job, _ in jobs)
        for run in runs:
            with contextlib.suppress(ValueError):
                status = read_status(run.folder)
                if status and status['epoch'] and said.get(run.name) != status['epoch']:
                    said[run.name] = status['epoch']
                    found = inspect(run.folder)
                    print(f'{run.name}: epoch {status["epoch"]}/{status["epochs"]}  best {status["best_acc"]:.2f}  '
                          f'{status["epoch_seconds"][-1]:.1f}s/epoch  {duration(time_left(found))} left', flush=True)
        if ended:
            return
        time.sleep(POLL_S)


def launch(args, runs, found, values, rows):
    """Submit the unfinished runs; on this machine, follow them to the end. The exit code."""
    todo = [run for run in runs if found[run.name].state != 'finished']
    groups = engine.gpu_groups(args.gpus, args.gpus_per_run, args.jobs) if args.cluster == 'local' else ()
    make_writable_folder(args.out)
    with engine.runner_lock(args.out):
        live = engine.live_jobs(args.out)
        if live:
            raise UsageError(f'{args.out} has jobs that have not ended ({", ".join(live)}); follow them with '
                             f'--status --out {args.out}, or stop them first')
        for run in runs:
            if run not in todo:
                print(f'{run.name}: finished ({found[run.name].epoch} epochs, best {found[run.name].best:.2f}); '
                      f'skipped')
        for run in todo:
            make_writable_folder(run.folder)
            record = dict(row=run.row.id, seed=run.seed, processes=run.processes, flags=run.flags,
                          **{k: values[run.name][k] for k in ('dataset', 'time_step', 'epochs')})
            atomic_write_text(os.path.join(run.folder, COMMAND_NAME), json.dumps(record, indent=1) + '\n')
        parameters = slurm_parameters(args, todo) if args.cluster == 'slurm' else \
            {'timeout_min': args.time} if args.time else None
        jobs = engine.submit(args.cluster, os.path.join(args.out, 'submitit'),
                             [(run.name, run.folder, run.argv) for run in todo], parameters, groups) if todo else []
        if args.cluster != 'debug':
            engine.record_jobs(args.out, args.cluster, jobs)
        for job, names in jobs if args.cluster != 'slurm' else ():
            print(f'{args.cluster} job {job.job_id}: {len(names)} run(s), logs in {os.path.join(args.out, "submitit")}')
        if args.cluster == 'slurm':
            print(f'Submitted {len(todo)} run(s) to Slurm (job {jobs[0][0].job_id.split("_")[0] if jobs else "-"}); '
                  f'follow them with: python reproduce.py --status --out {args.out}')
            return 0
        try:
            follow(jobs, todo)
        except KeyboardInterrupt:
            for job, _ in jobs:
                job.cancel()
            print('Stopped: every run keeps its last checkpoint; run the same command to continue')
            return 130
    print(summarize(args.out, rows) + engine_table(args.out, rows))
    unfinished = [run.name for run in runs if inspect(run.folder).state != 'finished']
    print(f'{len(runs) - len(unfinished)} of {len(runs)} run(s) finished; summary: '
          f'{os.path.join(args.out, "summary.md")}')
    return 1 if unfinished else 0


def summarize(out, rows):
    """Write OUT's summary files; their markdown, and a line on stderr for each run left out."""
    text, left_out = write_summary(out, rows)
    for result in left_out:
        print(f'{result.row} seed {result.seed}: left out of the summary: {result.note}', file=sys.stderr)
    return text


def engine_table(out, rows):
    """The table of OUT's runs with their jobs' states."""
    return status_table(out, rows, engine.job_states(out))


def build_parser():
    """reproduce.py's flags (the training scripts' flags go after --)."""
    p = flags.OneLineParser(prog='reproduce.py', description=__doc__.split('\n\n')[0],
                            formatter_class=flags.DefaultsHelpFormatter,
                            epilog='Arguments after -- are passed to every run (e.g. -- --amp).')
    what = p.add_mutually_exclusive_group()
    what.add_argument('--list', action='store_true', help='list every row: id, command line, the paper\'s numbers')
    what.add_argument('--rows', nargs='+', metavar='ID', help='rows to run (see --list)')
    what.add_argument('--all', action='store_true', help='run every row')
    what.add_argument('--status', action='store_true', help='print the table of the runs in --out')
    what.add_argument('--summarize', metavar='DIR', help='only write DIR/summary.{md,csv,png} from its runs')
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument('--seeds', type=flags.POSITIVE_INT, default=1, help='seeds 0..N-1')
    seeds.add_argument('--seed-list', type=flags.SEED, nargs='+', metavar='K', help='these seeds')
    p.add_argument('--path', default='./data', help='data folder of the runs')
    p.add_argument('--out', default='results', help='folder of the runs: OUT/<row>/seed<k>/')
    p.add_argument('--dataset', choices=['digits'],
                   help='train MNIST and Fashion-MNIST rows on scikit-learn digits instead (CPU demonstration)')
    p.add_argument('--quick', action='store_true',
                   help=f'the quick-start protocol: {" ".join(QUICK_FLAGS)} and T = min(row\'s T, {QUICK_T})')
    p.add_argument('--dry-run', action='store_true', help='print the commands (and the sbatch script); start nothing')
    e = p.add_argument_group('where the runs go (submitit)')
    e.add_argument('--cluster', choices=['local', 'slurm', 'debug'], default='local',
                   help='this machine, a Slurm job array, or one run after another in this process')
    e.add_argument('--gpus', metavar='IDS', help='local: GPU indices to share out (default: every visible GPU)')
    e.add_argument('--gpus-per-run', type=flags.POSITIVE_INT, default=1,
                   help='GPUs per run; more than one starts the run under torchrun, one process per GPU')
    e.add_argument('--jobs', type=flags.POSITIVE_INT, default=1, help='local, without GPUs: runs at once')
    e.add_argument('--time', type=flags.POSITIVE_INT, metavar='MINUTES',
                   help='time limit of a job (Slurm: 1440 unless given); a run out of time is requeued')
    e.add_argument('--partition', help='Slurm partition')
    e.add_argument('--cpus-per-run', type=flags.POSITIVE_INT, default=8, help='Slurm CPUs per run')
    e.add_argument('--mem', metavar='SIZE', help='Slurm memory per run, e.g. 32G')
    e.add_argument('--array-parallelism', type=flags.POSITIVE_INT, default=64, help='Slurm runs at once')
    e.add_argument('--slurm-extra', nargs='+', default=[], metavar='KEY=VALUE', type=key_value,
                   help='more sbatch options, e.g. account=abc qos=high constraint=a100')
    return p


def key_value(text):
    """An argparse type: KEY=VALUE."""
    if not text.split('=', 1)[0] or '=' not in text:
        raise argparse.ArgumentTypeError(f'expected KEY=VALUE, got {text!r}')
    return text


def main(argv=None):
    """Run reproduce.py with argv (default: sys.argv[1:]); return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv else (argv, [])
    parser = build_parser()
    args = parser.parse_args(own)
    rows = read_rows()
    try:
        if args.list:
            for row in rows.values():
                (run,) = make_runs([row], [0], argparse.Namespace(**{**vars(args), 'out': 'OUT'}), [])
                print(f'{row.id:<27}  {row.paper_text:<21}  {show(run.argv[:-4])}')
        elif args.summarize or args.status:
            folder = args.summarize or args.out
            if not os.path.isdir(folder):
                raise UsageError(f'no such folder {folder}')
            print(summarize(folder, rows) if args.summarize else engine_table(folder, rows) + '\n', end='')
        elif not (args.rows or args.all):
            parser.error('choose --rows ID... or --all (or --list, --status, --summarize DIR)')
        else:
            runs, found, values = plan(args, extra, rows)
            if not args.dry_run:
                return launch(args, runs, found, values, rows)
            for run in runs:
                resume = ['--resume', os.path.join(run.folder, CHECKPOINT_NAME)] if found[run.name].epoch else []
                skipped = found[run.name].state == 'finished'
                print(f'# {run.name}: finished; skipped' if skipped else show(run.argv + resume))
            todo = [run for run in runs if found[run.name].state != 'finished']
            if args.cluster == 'slurm' and todo:
                print(engine.sbatch_text(os.path.join(args.out, 'submitit'), len(todo), slurm_parameters(args, todo)))
    except (UsageError, RecordError, CheckpointError, engine.EngineError) as exc:
        lines = str(exc).split('\n')
        print('\n'.join(lines[:-1] + [f'reproduce.py: error: {lines[-1]}']), file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
