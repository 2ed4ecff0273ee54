"""Fake Slurm commands for the tests: sbatch, srun, sacct, squeue, scontrol and scancel as executables on PATH.

Each records its arguments, one call per line, in $FAKE_SLURM/calls.txt and
answers as Slurm does: sbatch keeps a copy of the script and says
'Submitted batch job 4242'; srun runs its command with its --output/--error
files (the %A/%a/%j/%t patterns filled from the environment Slurm gives a task);
sacct prints $FAKE_SLURM/sacct.txt, the states a test sets with set_states.
"""
import os
import sys
import textwrap

JOB_ID = '4242'

HEADER = f'#!{sys.executable}\nimport os, shlex, shutil, sys\n' + textwrap.dedent('''
    fake = os.environ['FAKE_SLURM']
    name = os.path.basename(sys.argv[0])
    with open(os.path.join(fake, 'calls.txt'), 'a') as f:
        f.write(shlex.join([name] + sys.argv[1:]) + '\\n')
''')

BODIES = {
    'sbatch': f'''
        count = len([n for n in os.listdir(fake) if n.startswith('sbatch_')])
        shutil.copy(sys.argv[-1], os.path.join(fake, f'sbatch_{{count}}.sh'))
        print('Submitted batch job {JOB_ID}')
    ''',
    'srun': '''
        args, files = sys.argv[1:], {}
        while args[0].startswith('--'):
            if args[0] in ('--output', '--error'):
                files[args[0]] = args[1]
                args = args[2:]
            else:
                args = args[1:]
        env = os.environ
        for flag, path in files.items():
            path = path.replace('%A', env.get('SLURM_ARRAY_JOB_ID', '')).replace('%a', env.get('SLURM_ARRAY_TASK_ID', ''))
            path = path.replace('%j', env['SLURM_JOB_ID']).replace('%t', '0')
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1 if flag == '--output' else 2)
        with open(os.path.join(fake, 'srun_pids.txt'), 'a') as f:
            f.write(f'{os.getpid()}\\n')  # the task's PID: srun becomes its command
        os.execvp(args[0], args)
    ''',
    'sacct': '''
        with open(os.path.join(fake, 'sacct.txt')) as f:
            print(f.read(), end='')
    ''',
    'squeue': '',
    'scontrol': '',
    'scancel': '',
}


def install(folder):
    """Write the fake commands into folder/bin; return (the bin folder, the record folder)."""
    bin_dir, record = os.path.join(folder, 'bin'), os.path.join(folder, 'slurm')
    os.makedirs(bin_dir)
    os.makedirs(record)
    for name, body in BODIES.items():
        path = os.path.join(bin_dir, name)
        with open(path, 'w') as f:
            f.write(HEADER + textwrap.dedent(body))
        os.chmod(path, 0o755)
    set_states(record, {})
    return bin_dir, record


def set_states(record, states):
    """Make sacct answer with these {job id: state} (sacct --parsable2)."""
    lines = ['JobID|State|NodeList'] + [f'{job}|{state}|node1' for job, state in states.items()]
    with open(os.path.join(record, 'sacct.txt'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def calls(record):
    """The recorded calls, one command line each."""
    path = os.path.join(record, 'calls.txt')
    return open(path).read().splitlines() if os.path.exists(path) else []


def task_environment(bin_dir, record, task, job_id=JOB_ID):
    """The environment Slurm gives array task `task` of job_id (the fakes first on PATH)."""
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ['PATH'], FAKE_SLURM=record,
                SLURM_JOB_ID=str(int(job_id) + 1 + task), SLURM_ARRAY_JOB_ID=job_id, SLURM_ARRAY_TASK_ID=str(task),
                SLURM_PROCID='0', SLURM_LOCALID='0', SLURM_NODEID='0', SLURM_NTASKS='1', SLURM_JOB_NUM_NODES='1',
                SLURM_JOB_NODELIST='node1')


def task_pids(record):
    """The PIDs of the tasks the fake srun started."""
    with open(os.path.join(record, 'srun_pids.txt')) as f:
        return [int(line) for line in f.read().split()]


def submitit_job(folder, job_id):
    """The callable submitit pickled for job_id in folder (what the array task runs)."""
    from submitit.core.utils import DelayedSubmission, JobPaths

    return DelayedSubmission.load(JobPaths(folder, job_id).submitted_pickle).function
