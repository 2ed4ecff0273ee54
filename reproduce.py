"""Reproduce the paper's results table: train each row's network for several seeds, then compare.

Each row of the paper's table (`paper_results.csv`) is trained by its own
script with the row's settings and the script's (the paper's) defaults
otherwise, once per seed, in `OUT/<row>/seed<k>/`. Finished runs are skipped,
interrupted ones resumed, failed ones retried; `OUT/summary.{md,csv,png}`
compares the runs' best test accuracies with the paper's after every run.

    python reproduce.py --list
    python reproduce.py --all --seeds 5 --path DATA --gpus 0,1,2,3
    python reproduce.py --rows mnist-conv-if-t30 fashion-mlp-if-t5 --dataset digits --seeds 3 --quick
    python reproduce.py --summarize results
"""
import contextlib
import csv
import dataclasses
import datetime
import difflib
import io
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from modules import NETS, is_leaky  # noqa: E402
from utils import flags as cli  # noqa: E402
from utils.files import atomic_write, atomic_write_text  # noqa: E402

PAPER_RESULTS = os.path.join(HERE, 'paper_results.csv')
CHECKPOINT_NAME = 'checkpoint.pth.tar'
OUTPUT_NAME = 'output.txt'
COMMAND_NAME = 'command.json'
USAGE_NAME = 'usage.json'
# What a training run leaves in its folder before its first checkpoint exists; the script refuses to
# start over log.txt or model_best.pth.tar, so a fresh start moves them aside.
LEFTOVER_NAMES = ('log.txt', 'log.png', 'model_best.pth.tar')
# The quick protocol: the README's quick-start flags, for a CPU demonstration on digits.
QUICK_FLAGS = ['-j', '0', '--threshold', '8', '--train-batch', '64', '--lr', '0.1', '--epochs', '3',
               '--schedule', '2']
QUICK_T = 8
DIGITS_FOR = ('mnist', 'fashionmnist')  # data sets that --dataset digits stands in for
# Flags that do not change what a run computes: differing values never make a folder's runs incomparable.
LOCAL_FLAGS = ('path', 'checkpoint', 'resume', 'gpu_id', 'evaluate')
# The training scripts' per-epoch line: "Epoch 3/100  lr ...  best 99.12  skipped 0  (12.3s)".
EPOCH_LINE = re.compile(r'^Epoch (\d+)/(\d+)\s.*\bbest ([-\d.]+|nan)\s.*\(([\d.]+)s\)\s*$')
TAIL_LINES = 15
POLL_S = 0.5


class UsageError(Exception):
    """Bad input: one line for the user, exit code 2."""


# ---------------------------------------------------------------- the paper's table

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


NETWORK_NAMES = {'mnist_conv': '64C5s (F64C5)', 'fashion_mlp': '400 (F400)', 'nmnist_conv': '64C5s (F64C5)',
                 'alexnetf': 'AlexNet-F', 'cifarnetf': 'CIFARNet-F'}
DATASET_NAMES = {'mnist': 'MNIST', 'fashionmnist': 'Fashion-MNIST', 'nmnist': 'N-MNIST', 'cifar10': 'CIFAR-10',
                 'cifar100': 'CIFAR-100', 'digits': 'digits'}


def paper_table_markdown(rows):
    """The paper's table as the README shows it (one line per row)."""
    lines = ['| row | data set | network | neuron | T | accuracy (%) | neurons | params |',
             '|---|---|---|---|---|---|---|---|']
    for row in rows.values():
        neuron = 'IF' if row.leaky is None else f'LIF, λ = {row.leaky:g}'
        lines.append(f'| `{row.id}` | {DATASET_NAMES[row.dataset]} | {NETWORK_NAMES[row.network]} | {neuron} '
                     f'| {row.time_steps} | {row.paper_text} | {row.neurons} | {row.params} |')
    return '\n'.join(lines)


# ---------------------------------------------------------------- command lines

def row_flags(row, dataset=None, quick=False):
    """The script flags that make a run of row: its data set, T and neuron (plus the quick protocol's)."""
    time_steps = min(row.time_steps, QUICK_T) if quick else row.time_steps
    flags = ['--dataset', dataset or row.dataset, '--time_step', str(time_steps), '--leaky', row.leaky_flag]
    return flags + (QUICK_FLAGS if quick else [])


def script_path(row):
    """The row's script as a path from the current folder (the runs start there, like --path and --out)."""
    return os.path.relpath(os.path.join(HERE, row.script))


def launcher(nproc):
    """The program that starts a run: python, or torchrun with nproc processes."""
    if nproc is None:
        return [sys.executable]
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']


def show(argv):
    """A command line to read or paste (this interpreter shown as python, torchrun's module as torchrun)."""
    argv = list(argv)
    if argv[:3] == [sys.executable, '-m', 'torch.distributed.run']:
        argv = ['torchrun'] + argv[3:]
    elif argv and argv[0] == sys.executable:
        argv[0] = 'python'
    return shlex.join(argv)


@dataclasses.dataclass
class Job:
    """One (row, seed) run: where it lives and the flags that define it."""
    row: Row
    seed: int
    folder: str
    flags: list             # the script's flags but --path, -c and --resume (recorded in command.json)
    path: str
    nproc: int = None       # torchrun processes per run (None: plain python)
    epochs: int = 0         # epochs the run trains in all
    done: int = 0           # epochs its checkpoint holds
    attempts: int = 0       # processes started for it by this invocation

    @property
    def name(self):
        """'mnist-conv-if-t30 seed 0'."""
        return f'{self.row.id} seed {self.seed}'

    @property
    def checkpoint(self):
        """The run's checkpoint file."""
        return os.path.join(self.folder, CHECKPOINT_NAME)

    def argv(self, resume=False):
        """The run's command line; resume=True continues its checkpoint."""
        argv = launcher(self.nproc) + [script_path(self.row), '--path', self.path] + self.flags
        argv += ['-c', self.folder]
        return argv + (['--resume', self.checkpoint] if resume else [])

    def record(self):
        """What command.json holds: the flags that define the run."""
        return {'row': self.row.id, 'seed': self.seed, 'script': self.row.script, 'flags': self.flags,
                'nproc_per_run': self.nproc}


def make_jobs(rows, seeds, out, path, extra, dataset=None, quick=False, nproc=None):
    """One Job per (seed, row), seed-major (every row gets its first run early)."""
    jobs = []
    for seed in seeds:
        for row in rows:
            flags = row_flags(row, dataset if row.dataset in DIGITS_FOR else None, quick)
            flags += list(extra) + ['--manualSeed', str(seed)]
            folder = os.path.join(out, row.id, f'seed{seed}')
            jobs.append(Job(row, seed, folder, flags, path, nproc, epochs=parsed_flags(row, flags)['epochs']))
    return jobs


def parsed_flags(row, flags):
    """The row's script's flag values for flags (its parser's defaults for the rest); UsageError if refused."""
    parser = cli.build_parser(row.network)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = parser.parse_args(list(flags) + ['--path', '.'])
    except SystemExit:
        raise UsageError(f'{row.id}: {row.script} refuses the flags: {" ".join(stderr.getvalue().split())}') from None
    return vars(args)


# ---------------------------------------------------------------- run folders

def read_checkpoint(path):
    """(epoch, epochs, best_acc) of a checkpoint, read with weights_only=True; OSError/RuntimeError if unreadable."""
    import torch

    # mmap: only the few numbers are read, never the weights of a large net.
    ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    args = ckpt.get('args') or {}
    best = ckpt.get('best_acc')
    return int(ckpt['epoch']), int(args['epochs']), None if best is None else float(best)


def folder_state(folder):
    """('new' | 'finished' | 'interrupted' | 'leftovers' | 'unreadable', detail) of a run folder.

    detail: (epoch, epochs, best) for a checkpoint, the leftover names, or the reason a checkpoint is unreadable.
    """
    checkpoint = os.path.join(folder, CHECKPOINT_NAME)
    if os.path.exists(checkpoint):
        try:
            epoch, epochs, best = read_checkpoint(checkpoint)
        except Exception as exc:  # torch raises many kinds for a damaged file
            return 'unreadable', ' '.join(str(exc).split('. ')[0].split())[:200]
        return ('finished' if epoch >= epochs else 'interrupted'), (epoch, epochs, best)
    leftovers = [name for name in LEFTOVER_NAMES if os.path.exists(os.path.join(folder, name))]
    return ('leftovers', leftovers) if leftovers else ('new', None)


def read_json(path):
    """The JSON content of path, or None if there is no such file."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def flag_differences(job, recorded):
    """'name was A, now B' for each flag in which a folder's recorded run differs from job ([]: same)."""
    if recorded.get('flags') == job.flags and recorded.get('nproc_per_run') == job.nproc:
        return []
    differences = []
    if recorded.get('nproc_per_run') != job.nproc:
        differences.append(f'processes per run was {recorded.get("nproc_per_run")}, now {job.nproc}')
    try:
        before = parsed_flags(job.row, recorded.get('flags') or [])
    except UsageError:
        return differences + [f'flags were {shlex.join(recorded.get("flags") or [])}, now {shlex.join(job.flags)}']
    now = parsed_flags(job.row, job.flags)
    for key in sorted(set(before) | set(now)):
        if key not in LOCAL_FLAGS and before.get(key) != now.get(key):
            differences.append(f'{key} was {before.get(key)}, now {now.get(key)}')
    return differences


def check_folder(job):
    """UsageError unless job's folder is empty or holds a run made by this script with the same flags."""
    if not os.path.isdir(job.folder):
        if os.path.exists(job.folder):
            raise UsageError(f'{job.folder} exists and is not a folder')
        return
    recorded = read_json(os.path.join(job.folder, COMMAND_NAME))
    if recorded is None:
        if os.listdir(job.folder):
            raise UsageError(f'{job.folder} holds files but no {COMMAND_NAME} (not a run of reproduce.py); '
                             f'choose another --out')
        return
    differences = flag_differences(job, recorded)
    if differences:
        raise UsageError(f'{job.folder} holds a run with different flags ({"; ".join(differences)}); '
                         f'use the same flags or another --out')


def move_leftovers(folder, names):
    """Move the named files of a run that never finished an epoch into folder/leftovers-<time>/; return it."""
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    target = os.path.join(folder, f'leftovers-{stamp}')
    suffix = 1
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(folder, f'leftovers-{stamp}-{suffix}')
    os.makedirs(target)
    for name in names:
        os.replace(os.path.join(folder, name), os.path.join(target, name))
    return target


def write_json(path, payload):
    """Write payload as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2) + '\n')


# ---------------------------------------------------------------- data sets

def data_problem(dataset, path):
    """Why `dataset` cannot be read under path (the files torchvision would look for), or None."""
    from torchvision import datasets

    if dataset == 'digits':
        return None
    if dataset in ('mnist', 'fashionmnist'):
        cls = datasets.MNIST if dataset == 'mnist' else datasets.FashionMNIST
        raw = os.path.join(path, cls.__name__, 'raw')
        files = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
        missing = [f for f in files if not os.path.isfile(os.path.join(raw, f))
                   and not os.path.isfile(os.path.join(raw, f + '.gz'))]
        return f'{raw} lacks {", ".join(m + "[.gz]" for m in missing)}' if missing else None
    if dataset in ('cifar10', 'cifar100'):
        cls = datasets.CIFAR10 if dataset == 'cifar10' else datasets.CIFAR100
        folder = os.path.join(path, cls.base_folder)
        files = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta['filename']]
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing and not os.path.isfile(os.path.join(path, cls.filename)):
            return f'{folder} lacks {", ".join(missing)} and there is no {os.path.join(path, cls.filename)}'
        return None
    if dataset == 'nmnist':
        from utils.data.nmnist import find_split_dir

        missing = [name for name, train in (('Train', True), ('Test', False)) if find_split_dir(path, train) is None]
        return f'{path} lacks {" and ".join(m + "/0..9/" for m in missing)} (N-MNIST)' if missing else None
    return f'unknown data set {dataset}'


def check_data(jobs, download):
    """UsageError naming every row whose data set is missing (after one download try per set if asked)."""
    problems = {}
    for job in jobs:
        dataset = parsed_flags(job.row, job.flags)['dataset']
        if (job.row.id, dataset) not in problems:
            problems[(job.row.id, dataset)] = data_problem(dataset, job.path)
    if download:
        from utils.data.datasets import DataError, get_datasets

        for dataset in sorted({d for (_, d), problem in problems.items() if problem and d != 'nmnist'}):
            print(f'Fetching {dataset} into {jobs[0].path} ...', flush=True)
            with contextlib.suppress(DataError):
                get_datasets(dataset, jobs[0].path)
        problems = {key: data_problem(key[1], jobs[0].path) for key in problems}
    lines = [f'{row_id}: {dataset} not found: {problem}' for (row_id, dataset), problem in problems.items() if problem]
    if lines:
        hint = '' if download else ' (--download fetches the torchvision sets when a connection exists)'
        raise UsageError('\n'.join(lines) + f'\nmissing data under --path {jobs[0].path}{hint}')


# ---------------------------------------------------------------- devices

def gpu_slots(gpus, nproc):
    """The device groups runs take turns on: [None] (the CPU / the script's choice) or groups of nproc GPUs."""
    if gpus is None:
        return [None]
    ids = cli.parse_gpu_ids(gpus)
    if ids is None:
        raise UsageError(f'--gpus: expected distinct comma-separated GPU indices such as 0,1,2,3, got {gpus!r}')
    import torch

    visible = torch.cuda.device_count()
    absent = [i for i in ids if i >= visible]
    if absent:
        listed = ', '.join(map(str, absent))
        raise UsageError(f'--gpus: {"GPU " + listed + " does" if len(absent) == 1 else "GPUs " + listed + " do"} '
                         f'not exist ({visible} CUDA GPU{"s" if visible != 1 else ""} visible)')
    per_run = nproc or 1
    if len(ids) % per_run:
        raise UsageError(f'--gpus: {len(ids)} GPUs do not split into groups of --nproc-per-run {per_run}')
    outer = os.environ.get('CUDA_VISIBLE_DEVICES')
    names = [p.strip() for p in outer.split(',')] if outer else [str(i) for i in range(visible)]
    return [[names[i] for i in ids[k:k + per_run]] for k in range(0, len(ids), per_run)]


# ---------------------------------------------------------------- progress

def parse_epoch_lines(text):
    """[(epoch, epochs, best, seconds)] of the per-epoch lines in a run's output."""
    found = []
    for line in text.splitlines():
        match = EPOCH_LINE.match(line.strip())
        if match:
            e, total, best, secs = match.groups()
            found.append((int(e), int(total), float(best), float(secs)))
    return found


def read_text(path):
    """The text of path ('' if absent), undecodable bytes replaced."""
    try:
        with open(path, 'rb') as f:
            return f.read().decode('utf-8', 'replace')
    except FileNotFoundError:
        return ''


def duration(seconds):
    """'1:02:03' (or '?' when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return '?'
    return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
    """Epoch times seen per row, for the per-run and overall estimates of the time left."""

    def __init__(self, jobs, slots):
        """Start from the epoch times already in the runs' output files."""
        self.slots = slots
        self.runs = len(jobs)
        self.times = {}
        for job in jobs:
            for _, _, _, secs in parse_epoch_lines(read_text(os.path.join(job.folder, OUTPUT_NAME))):
                self.add(job.row.id, secs)

    def add(self, row_id, seconds):
        """Record one epoch's time of a row."""
        self.times.setdefault(row_id, []).append(seconds)

    def epoch_s(self, row_id):
        """Expected time of one epoch of row_id (its own mean, else that of every row seen), or None."""
        own = self.times.get(row_id)
        if own:
            return statistics.fmean(own)
        every = [t for times in self.times.values() for t in times]
        return statistics.fmean(every) if every else None

    def eta(self, jobs):
        """Time left for jobs (epochs left × expected epoch time), spread over the device slots."""
        total = 0.0
        for job in jobs:
            left = max(job.epochs - job.done, 0)
            if left:
                per_epoch = self.epoch_s(job.row.id)
                if per_epoch is None:
                    return None
                total += left * per_epoch
        return total / len(self.slots)

    def epoch_lines(self, job, text, pending, ended):
        """Record the epochs in text, new output of job; one progress line each.

        pending: the jobs not ended yet (job among them), for the overall estimate; ended: how many have.
        """
        lines = []
        for epoch, total, best, secs in parse_epoch_lines(text):
            job.done = epoch
            self.add(job.row.id, secs)
            left = self.epoch_s(job.row.id) * (total - epoch)
            lines.append(f'{job.name}: epoch {epoch}/{total}  best {best:.2f}  {secs:.1f}s/epoch  ETA {duration(left)}'
                         f'  | all: {ended}/{self.runs} runs ended, ETA {duration(self.eta(pending))}')
        return lines


# ---------------------------------------------------------------- one run: what it calls for, its process

def folder_action(state):
    """What a run folder in state (see folder_state) calls for: 'skip', 'refuse' (unreadable), 'resume' or 'start'."""
    return {'finished': 'skip', 'unreadable': 'refuse', 'interrupted': 'resume'}.get(state, 'start')


def run_outcome(state, stopping, attempt, retries):
    """What a run that exited calls for: 'finished', 'stopped' (a stop was asked), 'retry' or 'failed'."""
    if state == 'finished':
        return 'finished'
    if stopping:
        return 'stopped'
    return 'retry' if attempt <= retries else 'failed'


def saved_text(state, detail):
    """What a run's folder holds now, in words."""
    if state == 'interrupted':
        return f'{detail[0]}/{detail[1]} epochs saved'
    return 'no epoch saved'


def slot_text(slot):
    """'cpu' or 'CUDA_VISIBLE_DEVICES=0,1': where a run on slot computes."""
    return 'cpu' if slot is None else 'CUDA_VISIBLE_DEVICES=' + ','.join(slot)


@dataclasses.dataclass
class Active:
    """A started run: its process, output file and where its unread output starts."""
    job: Job
    proc: subprocess.Popen
    slot: object
    attempt: int
    started: float
    output: object
    offset: int
    partial: str = ''

    def new_text(self):
        """The complete lines the run has written to its output since the last look."""
        with open(os.path.join(self.job.folder, OUTPUT_NAME), 'rb') as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        lines = (self.partial + data.decode('utf-8', 'replace')).split('\n')
        self.partial = lines.pop()
        return '\n'.join(lines)

    def exit_usage(self):
        """The process's resource usage once it has exited (setting proc.returncode), else None."""
        pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
        if pid == 0:
            return None
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return usage

    def kill(self, signum):
        """Send signum to the run's process group (SIGTERM: the scripts stop after their batch)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)


def launch(job, slot, resume, attempt):
    """Start job's process on slot, its output appended to the run's output.txt after a header line."""
    argv = job.argv(resume=resume)
    output = open(os.path.join(job.folder, OUTPUT_NAME), 'ab')
    stamp = datetime.datetime.now().isoformat(timespec='seconds')
    output.write(f'==== reproduce.py {stamp} ({slot_text(slot)}): {show(argv)}\n'.encode())
    output.flush()
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    if slot is not None:
        env['CUDA_VISIBLE_DEVICES'] = ','.join(slot)
    # A session of its own: a Ctrl-C at the terminal reaches this scheduler only, which then
    # stops each run once, so that it saves nothing half-done.
    proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    return Active(job, proc, slot, attempt, time.monotonic(), output, output.tell())


def start_run(job, state, detail, slot, say):
    """Start job on slot from its folder's state (see folder_state), saying how; its Active."""
    os.makedirs(job.folder, exist_ok=True)
    if state == 'leftovers':
        target = move_leftovers(job.folder, detail)
        say(f'{job.name}: no checkpoint, so the run never finished an epoch; moved {", ".join(detail)} '
            f'into {target} and starting afresh')
    write_json(os.path.join(job.folder, COMMAND_NAME), job.record())
    resume = folder_action(state) == 'resume'
    active = launch(job, slot, resume, job.attempts)
    how = f'resuming at epoch {detail[0] + 1}' if resume else 'starting'
    say(f'{job.name}: {how} ({slot_text(slot)}): {show(active.proc.args)}')
    job.done = detail[0] if resume else 0
    return active


def record_usage(active, usage):
    """Append this attempt's exit status, wall time and peak resident memory to the run's usage.json."""
    path = os.path.join(active.job.folder, USAGE_NAME)
    record = read_json(path) or []
    record.append({'attempt': active.attempt, 'exit': active.proc.returncode,
                   'wall_s': round(time.monotonic() - active.started, 3),
                   # Linux reports ru_maxrss in KiB: the largest process of the run (torchrun's workers included).
                   'max_rss_mb': round(usage.ru_maxrss / 1024, 1),
                   'devices': 'cpu' if active.slot is None else ','.join(active.slot)})
    write_json(path, record)


def failure_lines(job, why):
    """What to say of a failed run: why, then the tail of its output."""
    path = os.path.join(job.folder, OUTPUT_NAME)
    tail = read_text(path).rstrip('\n').split('\n')[-TAIL_LINES:]
    return [f'{job.name}: FAILED: {why}; the end of {path}:'] + [f'    {line}' for line in tail]


def stop_runs(actives, signum, say):
    """Send signum to every running run (SIGTERM: the scripts stop after their batch)."""
    if signum == signal.SIGTERM:
        say(f'Stopping: asking {len(actives)} running run(s) to stop after their current batch '
            f'(Ctrl-C again to kill them at once) ...')
    for active in actives:
        active.kill(signum)


@contextlib.contextmanager
def signals_recorded(received):
    """In the block, SIGINT and SIGTERM are appended to received instead of stopping the program (main thread)."""
    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda number, frame: received.append(number))
    except ValueError:
        pass  # not the main thread
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------- scheduler

class Scheduler:
    """Runs jobs on device slots, one per slot at a time; skips, resumes, retries; stops cleanly on a signal."""

    def __init__(self, jobs, slots, retries, on_finish=None, say=print):
        """jobs: the runs to do; on_finish(job, ok) is called after every run that ended."""
        self.queue, self.slots, self.retries, self.say = list(jobs), slots, retries, say
        self.on_finish = on_finish or (lambda job, ok: None)
        self.active, self.signals = [], []  # signals: the SIGINT/SIGTERMs received, each a stop request
        self.finished, self.failed, self.skipped, self.stopped = [], [], [], []
        self.progress = Progress(jobs, slots)

    def run(self):
        """Run every job; return True unless a run failed or a signal stopped them."""
        with signals_recorded(self.signals):
            acted_on = 0
            while self.queue or self.active:
                if len(self.signals) > acted_on:
                    acted_on = len(self.signals)
                    stop_runs(self.active, signal.SIGTERM if acted_on == 1 else signal.SIGKILL, self.say)
                free = [slot for slot in self.slots if all(a.slot is not slot for a in self.active)]
                while free and self.queue and not self.signals:
                    self.start(self.queue.pop(0), free.pop(0))
                for active in list(self.active):
                    self.poll(active)
                if self.active:
                    time.sleep(POLL_S)
                elif self.signals:
                    break
        return not (self.failed or self.signals)

    def start(self, job, slot):
        """Launch job on slot (fresh, resumed or after moving leftovers aside), unless it is already finished."""
        state, detail = folder_state(job.folder)
        action = folder_action(state)
        if action == 'skip':
            self.say(f'{job.name}: finished ({detail[0]}/{detail[1]} epochs, best {detail[2]:.2f}); skipped')
            self.skipped.append(job)
        elif action == 'refuse':
            self.fail(job, f'its checkpoint {job.checkpoint} cannot be read ({detail}); move it aside to start '
                           f'the run again')
        else:
            job.attempts += 1
            self.active.append(start_run(job, state, detail, slot, self.say))

    def poll(self, active):
        """Report the run's new epochs; once it has exited, record its usage and count it."""
        # Looked at before the output, so that an exited run's output is read to its end.
        usage = active.exit_usage()
        ended = len(self.finished) + len(self.failed) + len(self.skipped)
        pending = self.queue + [a.job for a in self.active]
        for line in self.progress.epoch_lines(active.job, active.new_text(), pending, ended):
            self.say(line)
        if usage is not None:
            active.output.close()
            self.active.remove(active)
            record_usage(active, usage)
            self.ended(active)

    def ended(self, active):
        """Count a run that exited: finished, stopped by a signal, retried or failed."""
        job, code = active.job, active.proc.returncode
        state, detail = folder_state(job.folder)
        outcome = run_outcome(state, self.signals, active.attempt, self.retries)
        if outcome == 'finished':
            self.say(f'{job.name}: finished, best {detail[2]:.2f}')
            self.finished.append(job)
            self.on_finish(job, True)
        elif outcome == 'stopped':
            self.say(f'{job.name}: stopped ({saved_text(state, detail)})')
            self.stopped.append(job)
        elif outcome == 'retry':
            self.say(f'{job.name}: exited with code {code}; retrying ({saved_text(state, detail)})')
            self.queue.insert(0, job)
        else:
            self.fail(job, f'exited with code {code} after {active.attempt} attempt(s)')

    def fail(self, job, why):
        """Count job as failed, saying why with the tail of its output."""
        for line in failure_lines(job, why):
            self.say(line)
        self.failed.append(job)
        self.on_finish(job, False)


# ---------------------------------------------------------------- summary

@dataclasses.dataclass
class RunResult:
    """What one run folder holds."""
    row: str
    seed: int
    dataset: str
    time_steps: int
    epoch: int
    epochs: int
    best: float
    epoch_times: list
    max_rss_mb: float

    @property
    def finished(self):
        """The checkpoint has reached the last epoch."""
        return self.epochs > 0 and self.epoch >= self.epochs


def collect(out, rows):
    """RunResults of every run folder DIR/<row>/seed<k> with a checkpoint, for the known rows."""
    results = []
    for row_id, row in rows.items():
        row_dir = os.path.join(out, row_id)
        if not os.path.isdir(row_dir):
            continue
        for name in sorted(os.listdir(row_dir), key=lambda n: (len(n), n)):
            match = re.fullmatch(r'seed(\d+)', name)
            folder = os.path.join(row_dir, name)
            if not match:
                continue
            state, detail = folder_state(folder)
            if state not in ('finished', 'interrupted'):
                continue
            flags = (read_json(os.path.join(folder, COMMAND_NAME)) or {}).get('flags')
            values = parsed_flags(row, flags) if flags else {'dataset': row.dataset, 'time_step': row.time_steps}
            times = [secs for _, _, _, secs in parse_epoch_lines(read_text(os.path.join(folder, OUTPUT_NAME)))]
            rss = [a['max_rss_mb'] for a in read_json(os.path.join(folder, USAGE_NAME)) or [] if 'max_rss_mb' in a]
            results.append(RunResult(row_id, int(match.group(1)), values['dataset'], values['time_step'],
                                     detail[0], detail[1], detail[2], times, max(rss) if rss else None))
    return results


def row_summary(row, results):
    """The numbers of one row's summary line (None where undefined)."""
    done = [r for r in results if r.finished]
    bests = [r.best for r in done]
    times = [t for r in results for t in r.epoch_times]
    rss = [r.max_rss_mb for r in results if r.max_rss_mb is not None]
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
    """summary.md's text: one line per row, then one per run."""
    lines = [f'# Reproduction summary of {out}', '',
             'Best test accuracy of each run (%). Ours: mean ± sample standard deviation (ddof = 1) over the '
             'finished runs, and the best of them; Δ = our mean − the paper\'s mean, in percentage points. '
             'Time per epoch: the mean over every epoch line in the runs\' output.txt; peak RSS: the largest '
             'resident memory of a run\'s processes (host memory, measured by reproduce.py; GPU memory is not '
             'recorded).', '',
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
    lines += [f'| `{r.row}` | {r.seed} | {r.epoch}/{r.epochs} | {number(r.best)} |' for r in results]
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
    """Write out/summary.md, summary.csv and summary.png (atomically) from the run folders; return the md text."""
    results = collect(out, rows)
    summaries = [row_summary(row, [r for r in results if r.row == row_id])
                 for row_id, row in rows.items() if any(r.row == row_id for r in results)]
    text = summary_markdown(out, summaries, results, rows)
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, 'summary.md'), text)
    atomic_write_text(os.path.join(out, 'summary.csv'), summary_csv(summaries))
    png = summary_png(summaries, results, rows)
    atomic_write(os.path.join(out, 'summary.png'), lambda f: f.write(png))
    return text


# ---------------------------------------------------------------- command line

def build_parser():
    """reproduce.py's flags (the training scripts' flags go after --)."""
    p = cli.OneLineParser(prog='reproduce.py', description=__doc__.split('\n\n')[0],
                          formatter_class=cli.DefaultsHelpFormatter,
                          epilog='Arguments after -- are passed to every run (e.g. -- --epochs 2).')
    what = p.add_mutually_exclusive_group()
    what.add_argument('--list', action='store_true', help='list every row: id, command line, the paper\'s numbers')
    what.add_argument('--rows', nargs='+', metavar='ID', help='rows to run (see --list)')
    what.add_argument('--all', action='store_true', help='run every row')
    what.add_argument('--summarize', metavar='DIR', help='only write DIR/summary.{md,csv,png} from its runs')
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument('--seeds', type=cli.POSITIVE_INT, default=1, help='seeds 0..N-1')
    seeds.add_argument('--seed-list', type=cli.SEED, nargs='+', metavar='K', help='these seeds')
    p.add_argument('--path', default='./data', help='data folder of the runs')
    p.add_argument('--out', default='results', help='folder of the runs: OUT/<row>/seed<k>/')
    p.add_argument('--dataset', choices=['digits'],
                   help='train MNIST and Fashion-MNIST rows on scikit-learn digits instead (CPU demonstration)')
    p.add_argument('--quick', action='store_true',
                   help=f'the quick-start protocol: {" ".join(QUICK_FLAGS)} and T = min(row\'s T, {QUICK_T})')
    p.add_argument('--gpus', metavar='IDS',
                   help='GPU indices, one run per GPU (or per --nproc-per-run group) at a time')
    p.add_argument('--nproc-per-run', type=cli.POSITIVE_INT, metavar='K',
                   help='launch each run under torchrun --standalone --nproc_per_node K')
    p.add_argument('--retries', type=cli.NON_NEGATIVE_INT, default=1, help='further attempts for a failed run')
    p.add_argument('--download', action='store_true', help='fetch missing torchvision data sets before starting')
    p.add_argument('--dry-run', action='store_true', help='print the command lines and exit')
    return p


def split_extra(argv):
    """(reproduce.py's arguments, the arguments after -- for every run)."""
    if '--' in argv:
        i = argv.index('--')
        return argv[:i], argv[i + 1:]
    return argv, []


def select_rows(rows, ids):
    """The rows named by ids, in the given order; UsageError naming unknown ids and their close matches."""
    unknown = [i for i in ids if i not in rows]
    if unknown:
        parts = []
        for i in unknown:
            close = difflib.get_close_matches(i, list(rows), n=3, cutoff=0.5)
            parts.append(f'{i!r}' + (f' (did you mean {", ".join(close)}?)' if close else ''))
        raise UsageError(f'--rows: unknown row {"; ".join(parts)}; see --list')
    return [rows[i] for i in dict.fromkeys(ids)]


def list_rows(rows, path):
    """--list: each row's id, command line and the paper's mean ± std (best)."""
    commands = {row.id: show(launcher(None) + [script_path(row), '--path', path] + row_flags(row))
                for row in rows.values()}
    width = max(len(i) for i in rows)
    cmd_width = max(len(c) for c in commands.values())
    print(f'{"row":<{width}}  {"command":<{cmd_width}}  paper: mean ± std (best), %')
    for row in rows.values():
        print(f'{row.id:<{width}}  {commands[row.id]:<{cmd_width}}  {row.paper_text}')


def plan(args, extra, rows):
    """The jobs of this invocation, after every check that needs no run (UsageError on the first problem)."""
    chosen = list(rows.values()) if args.all else select_rows(rows, args.rows)
    if args.dataset == 'digits':
        other = [row.id for row in chosen if row.dataset not in DIGITS_FOR]
        if other:
            raise UsageError(f'--dataset digits: stands in for MNIST and Fashion-MNIST only, not for the rows '
                             f'{", ".join(other)}')
    seeds = args.seed_list if args.seed_list else list(range(args.seeds))
    jobs = make_jobs(chosen, list(dict.fromkeys(seeds)), args.out, args.path, extra, args.dataset, args.quick,
                     args.nproc_per_run)
    for job in jobs:
        check_folder(job)
        state, detail = folder_state(job.folder)
        job.done = detail[0] if state in ('finished', 'interrupted') else 0
    check_data(jobs, args.download and not args.dry_run)
    return jobs


def dry_run(jobs):
    """Print what each job would do."""
    for job in jobs:
        state, detail = folder_state(job.folder)
        action = folder_action(state)
        if action == 'skip':
            print(f'# {job.name}: finished ({detail[0]}/{detail[1]} epochs); would be skipped')
        elif action == 'refuse':
            print(f'# {job.name}: checkpoint unreadable ({detail}); would be reported as failed')
        else:
            if state == 'leftovers':
                print(f'# {job.name}: would move {", ".join(detail)} aside first')
            print(show(job.argv(resume=action == 'resume')))


def continue_hint(argv):
    """The command that continues this invocation (the same one)."""
    return show([sys.executable, os.path.relpath(os.path.abspath(__file__))] + list(argv))


def main(argv=None):
    """Run reproduce.py with argv (default: sys.argv[1:]); return the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = split_extra(argv)
    parser = build_parser()
    args = parser.parse_args(own)
    rows = read_rows()
    if args.list:
        list_rows(rows, args.path)
        return 0
    if args.summarize:
        if not os.path.isdir(args.summarize):
            parser.error(f'--summarize: no such folder {args.summarize}')
        print(write_summary(args.summarize, rows), end='')
        return 0
    if not (args.rows or args.all):
        parser.error('choose --rows ID... or --all (or --list, --summarize DIR)')
    try:
        slots = gpu_slots(args.gpus, args.nproc_per_run)
        jobs = plan(args, extra, rows)
    except UsageError as exc:
        lines = str(exc).split('\n')
        for line in lines[:-1]:
            print(line, file=sys.stderr)
        print(f'reproduce.py: error: {lines[-1]}', file=sys.stderr)
        return 2
    if args.dry_run:
        dry_run(jobs)
        return 0
    os.makedirs(args.out, exist_ok=True)

    def summarize(job, ok):
        """Rewrite the summary after every run that ended."""
        write_summary(args.out, rows)

    scheduler = Scheduler(jobs, slots, args.retries, on_finish=summarize,
                          say=lambda text: print(text, flush=True))
    ok = scheduler.run()
    write_summary(args.out, rows)
    print(f'{len(scheduler.finished)} run(s) finished, {len(scheduler.skipped)} already done, '
          f'{len(scheduler.failed)} failed; summary: {os.path.join(args.out, "summary.md")}')
    if scheduler.signals:
        print(f'Stopped. Continue with the same command: {continue_hint(argv)}')
        return 130
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
