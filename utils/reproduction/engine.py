"""The submitit side of reproduce.py: the job that trains runs, and the executors that run it.

Local: every job is handed the whole list and trains, one after another, each
run that is not finished and that no other job holds (a lock per run folder,
released by the operating system however the job ends), so N jobs share the
runs out among themselves, each on its own GPUs. Slurm: one array task per run.
Debug: one job, in this process. OUT/jobs.json records the jobs and their runs.
"""
import contextlib
import fcntl
import json
import os
import shlex
import signal
import socket
import subprocess
import sys

import cloudpickle
import submitit

from utils.checkpoint import CHECKPOINT_NAME
from utils.reproduction.folders import alive, read_json
from utils.training.status import STATUS_NAME

OUTPUT_NAME = 'output.txt'      # a run's printed output, appended by every attempt
CLAIM_NAME = '.job.lock'        # held by the job that trains the run (the script holds .lock itself)
JOBS_NAME = 'jobs.json'
RUNNER_LOCK = '.reproduce.lock'
REQUEUES = 100          # times a Slurm run may run out of time and be requeued (preemptions do not count)
SIGNAL_DELAY_S = 180    # Slurm's warning before the time limit: time for a run to finish its batch and stop
LOCAL_TIMEOUT_MIN = 60 * 24 * 365


class EngineError(Exception):
    """The engine cannot take the runs (GPUs, another runner, a failed submission); one line."""


class TrainRuns(submitit.helpers.Checkpointable):
    """A submitit job: train, one after another, each of its runs that is not finished and no other job holds.

    On the warning signal of Slurm (preemption, time limit) or of the local
    executor, the training run is stopped after its batch, keeping its last
    checkpoint, and submitit requeues the job, which resumes the run from it.
    """

    def __init__(self, runs, cwd):
        """runs: [(name, folder, the command line without --resume)], started in the folder cwd."""
        self.runs, self.cwd, self.process = runs, cwd, None

    def __call__(self):
        """Train the runs; RuntimeError naming those that failed (so that the job fails)."""
        failed = []
        for name, folder, argv in self.runs:
            code = self.train(folder, argv)
            if code:
                failed.append(f'{name} (exit code {code}; see {os.path.join(folder, OUTPUT_NAME)})')
        if failed:
            raise RuntimeError('failed: ' + ', '.join(failed))

    def train(self, folder, argv):
        """Train (or resume) the run in folder unless it is finished or another job holds it; its exit code."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, CLAIM_NAME), 'a') as claim:
            try:
                fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            with contextlib.suppress(OSError, ValueError, KeyError), open(os.path.join(folder, STATUS_NAME)) as f:
                if json.load(f)['state'] == 'finished':
                    return None
            checkpoint = os.path.join(folder, CHECKPOINT_NAME)
            argv = argv + (['--resume', checkpoint] if os.path.exists(checkpoint) else [])
            warning = getattr(signal, 'SIG' + submitit.JobEnvironment.USR_SIG)
            with open(os.path.join(folder, OUTPUT_NAME), 'ab') as output:
                # Slurm sends its warning to every process of the job: the run ignores it (an ignored
                # signal stays ignored across exec) and checkpoint() stops it after its batch instead.
                previous = signal.signal(warning, signal.SIG_IGN)
                try:
                    self.process = subprocess.Popen(argv, cwd=self.cwd, stdout=output, stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL,
                                                    env=dict(os.environ, PYTHONUNBUFFERED='1'))
                finally:
                    signal.signal(warning, previous)
                try:
                    return self.process.wait()
                finally:  # the job is stopping: so does its run
                    if self.process.poll() is None:
                        self.process.terminate()
                        self.process.wait()

    def checkpoint(self, *args, **kwargs):
        """Stop the run after its current batch (its last checkpoint stays); the job to requeue."""
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            # Reaped here, not with Popen.wait, whose lock the wait this signal interrupted may hold.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.process.pid, 0)
        return submitit.helpers.DelayedSubmission(TrainRuns(self.runs, self.cwd))

    def __getstate__(self):
        """Pickled without the running process."""
        return {'runs': self.runs, 'cwd': self.cwd, 'process': None}


# By value: a job then starts wherever Python finds submitit, not only where it finds this repository.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def gpu_groups(gpus, per_run, cpu_jobs):
    """The local jobs' GPU groups: --gpus (default: every visible GPU) in groups of per_run; else cpu_jobs ()."""
    import torch

    from utils.flags import parse_gpu_ids

    visible = torch.cuda.device_count()
    ids = parse_gpu_ids(gpus) if gpus else list(range(visible))
    if ids is None or any(i >= visible for i in ids):
        raise EngineError(f'--gpus: expected distinct indices of the {visible} visible CUDA GPU(s), got {gpus}')
    if len(ids) % per_run:
        raise EngineError(f'--gpus: {len(ids)} GPU(s) do not split into groups of --gpus-per-run {per_run}')
    return [tuple(ids[k:k + per_run]) for k in range(0, len(ids), per_run)] or [()] * cpu_jobs


def slurm_parameters(commands, gpus, cpus, time, partition=None, mem=None, parallelism=64, extra=()):
    """SlurmExecutor's parameters: resources per run, requeue, and the array's command lines as comments."""
    listing = ['# array task: the run it trains (with --resume CHECKPOINT once the run has one)']
    listing += [f'#   {k}: {command}' for k, command in enumerate(commands)]
    sbatch = {'requeue': True, **({'mem': mem} if mem else {}), **dict(item.split('=', 1) for item in extra)}
    return dict(job_name='reproduce', partition=partition, time=time, gpus_per_node=gpus, cpus_per_task=cpus,
                array_parallelism=parallelism, signal_delay_s=SIGNAL_DELAY_S, additional_parameters=sbatch,
                setup=listing)


def sbatch_text(folder, count, parameters):
    """The sbatch script SlurmExecutor submits for count runs (one job, or an array)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = os.path.abspath(folder)
    command = f'{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(folder)}'
    return _make_sbatch_string(command=command, folder=folder, map_count=count if count > 1 else None, **parameters)


def submit(cluster, folder, runs, parameters=None, gpu_groups_=()):
    """Hand runs [(name, folder, argv)] to submitit; [(job, names of its runs)]."""
    folder, cwd, names = os.path.abspath(folder), os.getcwd(), [name for name, _, _ in runs]
    if cluster == 'debug':
        return [(submitit.DebugExecutor(folder).submit(TrainRuns(runs, cwd)), names)]
    if cluster == 'slurm':
        try:  # no srun here, or sbatch refused the script: submitit's first line says which
            executor = submitit.SlurmExecutor(folder, max_num_timeout=REQUEUES)
            executor.update_parameters(**parameters)
            with executor.batch():
                jobs = [executor.submit(TrainRuns([run], cwd)) for run in runs]
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f'Slurm: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}') from None
        return [(job, [name]) for job, name in zip(jobs, names)]
    executor, jobs = submitit.LocalExecutor(folder), []
    for gpus in gpu_groups_:
        executor.update_parameters(**{'timeout_min': LOCAL_TIMEOUT_MIN, **(parameters or {}),
                                      'gpus_per_node': len(gpus), 'visible_gpus': gpus})
        jobs.append((executor.submit(TrainRuns(runs, cwd)), names))
    return jobs


def record_jobs(out, cluster, jobs):
    """Add the jobs and their runs to OUT/jobs.json."""
    from utils.files import atomic_write_text

    record = read_json(os.path.join(out, JOBS_NAME), 'job record') or []
    record += [{'cluster': cluster, 'job_id': str(job.job_id), 'runs': names} for job, names in jobs]
    atomic_write_text(os.path.join(out, JOBS_NAME), json.dumps(record, indent=1) + '\n')


def job_states(out):
    """{run name: 'its latest job and that job's state'} from OUT/jobs.json (Slurm's through sacct)."""
    folder, states = os.path.join(out, 'submitit'), {}
    for entry in read_json(os.path.join(out, JOBS_NAME), 'job record') or []:
        cluster, job_id = entry['cluster'], entry['job_id']
        if cluster == 'slurm':
            state = submitit.SlurmJob(folder, job_id).state
        else:  # a local job's id is its controller's PID; the controller writes a result when the job ends
            done = submitit.LocalJob(folder, job_id).paths.result_pickle.exists()
            state = 'RUNNING' if not done and alive(socket.gethostname(), job_id) else 'ENDED'
        for name in entry['runs']:  # local jobs share their runs: one still running may be training it
            if not (cluster == 'local' and states.get(name, '').endswith('RUNNING')):
                states[name] = f'{cluster} {job_id} {state}'
    return states


def live_jobs(out):
    """The jobs of OUT/jobs.json that have not ended."""
    # UNKNOWN: Slurm's accounting no longer (or never) knew the job, e.g. OUT was copied off the cluster.
    ended = ('ENDED', 'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'OUT_OF_MEMORY', 'NODE_FAIL', 'BOOT_FAIL',
             'DEADLINE', 'UNKNOWN')
    jobs = {' '.join(state.split()[:2]) for state in job_states(out).values()
            if not state.split()[2].startswith(ended)}
    return sorted(jobs)


@contextlib.contextmanager
def runner_lock(out):
    """Hold OUT's runner lock for the block; EngineError if another reproduce.py holds it."""
    with open(os.path.join(out, RUNNER_LOCK), 'a+') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise EngineError(f'{out} is in use by another reproduce.py (PID {f.read().strip() or "?"}); follow it '
                             f'with: python reproduce.py --status --out {out}') from None
        f.truncate(0)
        f.write(f'{os.getpid()}\n')
        f.flush()
        yield
