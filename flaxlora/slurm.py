"""A sweep as one Slurm job array: one array task per point.

    script = slurm.script(points, root, settings)      # the sbatch file
    job = slurm.submit(root, points, script)            # sbatch --parsable
    slurm.task_states(slurm.jobs(root))                 # squeue / sacct

Plain `sbatch` of a generated script (not submitit): the script is a file a
user can read, edit and resubmit by hand; nothing is pickled; each task runs
the same `experiments.run` command line as a local sweep; and `--array=%N`,
`--signal`, `--requeue` are sbatch options with no wrapper in between.

Each task appends its run's output to ROOT/logs/<point>.log (Slurm's own
output goes to ROOT/logs/slurm-<job>_<task>.out) and starts its point with
`srun`, one process per task: a multi-node task (`nodes`, `ntasks_per_node`)
is one multi-host run, whose processes find each other through Slurm's
environment (`flaxlora.distributed`).

Preemption: Slurm sends SIGUSR1 `signal_seconds` before the time limit (and,
where the cluster's PreemptParameters say send_user_signal, on preemption),
SIGTERM on preemption or `scontrol requeue`. The run saves a checkpoint at
the current step and exits (`flaxlora.interrupt`); after a SIGUSR1 the task
requeues itself, after a preemption Slurm requeues it (`--requeue`), and the
requeued task resumes from the checkpoint, ending as an uninterrupted run.
"""
import json
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

import ml_collections

from flaxlora import atomic
from flaxlora import errors
from flaxlora import sweeps
from flaxlora import workdir as workdir_lib

SLURM_DIR = 'slurm'  # ROOT/slurm: the submitted scripts and jobs.json
JOBS_FILE = 'jobs.json'  # [{'job', 'points': [name per array index]}]
WARN = signal.SIGUSR1  # the time-limit warning; the run checkpoints, exits
# Task states of squeue / sacct that mean the task will still run.
WAITING = ('PENDING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED',
           'CONFIGURING', 'SUSPENDED', 'RESIZING')
ACTIVE = ('RUNNING', 'COMPLETING', 'STAGE_OUT', 'SIGNALING')


def defaults() -> ml_collections.ConfigDict:
  """The Slurm settings: a config file's `get_launch(arg)['slurm']`, then
  --slurm.<field> flags, override them."""
  return ml_collections.ConfigDict(dict(
      job_name='flaxlora_sweep',
      partition='',  # '' = the cluster's default (and below: not asked)
      account='',
      qos='',
      nodes=1,  # >1: a multi-host run per point
      ntasks_per_node=1,  # processes per node (e.g. one per GPU)
      gpus_per_task=0,
      cpus_per_task=0,
      mem='',  # per node, e.g. '64G'
      time='',  # e.g. '4:00:00'
      max_parallel=0,  # the array's %N: points running at once (0: all)
      signal_seconds=120,  # SIGUSR1 this long before the time limit
      extra=(),  # more '#SBATCH' options, e.g. ('--constraint=a100',)
      setup='',  # shell lines run before each point (modules, venv)
      python='',  # the interpreter on the nodes ('': this one)
  ))


def _options(settings: Any, count: int, logs: pathlib.Path) -> list[str]:
  limit = f'%{settings.max_parallel}' if settings.max_parallel else ''
  options = [f'--job-name={settings.job_name}',
             f'--array=0-{count - 1}{limit}',
             f'--output={logs}/slurm-%A_%a.out', '--open-mode=append',
             '--requeue', f'--signal={WARN.name[3:]}@'
             f'{settings.signal_seconds}',
             f'--nodes={settings.nodes}',
             f'--ntasks-per-node={settings.ntasks_per_node}']
  for name in ('partition', 'account', 'qos', 'gpus_per_task',
               'cpus_per_task', 'mem', 'time'):
    value = settings[name]
    if value:
      options.append(f'--{name.replace("_", "-")}={value}')
  return options + [str(e) for e in settings.extra]


def script(points: Sequence[sweeps.Point], root: pathlib.Path,
           settings: Any, cwd: pathlib.Path | None = None) -> str:
  """The sbatch script of `points` (array index i runs points[i]).

  Args:
    points: the points to run (`sweeps.plan`).
    root: the sweep's folder (absolute: the nodes read it).
    settings: `defaults()` as the config and flags set them.
    cwd: where tasks run (the repository with configs/; default: here).
  """
  if not points:
    raise ValueError('no sweep point to submit.')
  if settings.nodes < 1 or settings.ntasks_per_node < 1:
    raise ValueError(f'slurm nodes={settings.nodes} and ntasks_per_node='
                     f'{settings.ntasks_per_node} must be at least 1.')
  logs = root / sweeps.LOG_DIR
  python = settings.python or sys.executable
  lines = ['#!/bin/bash']
  lines += [f'#SBATCH {o}' for o in _options(settings, len(points), logs)]
  lines += [
      '# experiments.sweep --launch=slurm: array task i runs point i (its',
      '# output in logs/<point>.log). SIGUSR1 before the time limit or',
      '# SIGTERM on preemption: the run checkpoints and exits, the task is',
      '# requeued and resumes from its checkpoint.',
      f'cd {shlex.quote(str(cwd or pathlib.Path.cwd()))} || exit 1',
      settings.setup, 'case "$SLURM_ARRAY_TASK_ID" in']
  for i, point in enumerate(points):
    lines.append(f'  {i}) point={shlex.quote(point.name)}; '
                 f'args=({shlex.join(point.args)}) ;;')
  lines += ['esac', f'root={shlex.quote(str(root))}',
            'log="$root/logs/$point.log"',
            'echo "sweep: job ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}'
            ' restart ${SLURM_RESTART_COUNT:-0} on $(hostname) at $(date)"'
            ' >> "$log"',
            '# A requeued task runs only once its previous run has ended: a',
            '# lock that run left (killed, or on another node) is stale.',
            'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then',
            f'  rm -f "$root/$point/{workdir_lib.LOCK_FILE}"', 'fi',
            f'srun --kill-on-bad-exit=1 {shlex.quote(python)} -m '
            'experiments.run "${args[@]}" >> "$log" 2>&1',
            'rc=$?',
            f'if [ $rc -eq {128 + WARN} ]; then  # warned, checkpointed',
            '  scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"',
            'fi', 'exit $rc']
  return '\n'.join(line for line in lines if line) + '\n'


def _run(argv: Sequence[str]) -> str:
  """The stdout of a Slurm command; errors.UserError naming its stderr."""
  if shutil.which(argv[0]) is None:
    raise errors.UserError(f'{argv[0]} is not on PATH: --launch=slurm needs '
                           'a Slurm client (run it on the login node).')
  result = subprocess.run(list(argv), capture_output=True, text=True,
                          timeout=120, check=False)
  if result.returncode:
    raise errors.UserError(f'{shlex.join(argv)} failed: '
                           f'{result.stderr.strip() or result.stdout.strip()}')
  return result.stdout


def submit(root: pathlib.Path, points: Sequence[sweeps.Point],
           text: str) -> str:
  """Writes `text` to ROOT/slurm/submit_<n>.sbatch, submits it, records
  the job in ROOT/slurm/jobs.json; returns the job id."""
  folder = root / SLURM_DIR
  records = jobs(root)
  path = folder / f'submit_{len(records)}.sbatch'
  atomic.write_file(path, text)
  (root / sweeps.LOG_DIR).mkdir(parents=True, exist_ok=True)
  job = _run(['sbatch', '--parsable', str(path)]).strip().split(';')[0]
  records.append({'job': job, 'script': path.name,
                  'points': [p.name for p in points],
                  'submitted': time.strftime('%Y-%m-%d %H:%M:%S')})
  atomic.write_file(folder / JOBS_FILE, json.dumps(records, indent=1))
  return job


def jobs(root: pathlib.Path) -> list[dict[str, Any]]:
  """The submissions recorded under `root` (oldest first)."""
  path = root / SLURM_DIR / JOBS_FILE
  return json.loads(path.read_text()) if path.is_file() else []


def task_states(records: Sequence[Mapping[str, Any]]
                ) -> dict[str, dict[str, Any]]:
  """Point name -> {'job', 'state', 'restarts', 'reason'} of its latest
  submission that Slurm still knows, from squeue (finished tasks stay
  there for MinJobAge) and, for older ones, sacct where accounting is on.
  Empty without Slurm's commands."""
  if not records or shutil.which('squeue') is None:
    return {}
  names = {}  # (job, array index) -> point
  for record in records:
    for i, name in enumerate(record['points']):
      names[(str(record['job']), str(i))] = name
  ids = ','.join(str(r['job']) for r in records)
  known, lines = {}, []
  for record in records:  # one query each: squeue fails on a job it forgot
    lines += subprocess.run(
        ['squeue', '--array', '--states=all', '--noheader',
         f'--jobs={record["job"]}', '-O',
         'ArrayJobID:20,ArrayTaskID:12,State:20,RestartCnt:6,Reason:40'],
        capture_output=True, text=True, timeout=60,
        check=False).stdout.splitlines()
  for line in lines:
    parts = line.split(None, 4)
    if len(parts) >= 4 and (parts[0], parts[1]) in names:
      known[(parts[0], parts[1])] = dict(
          state=parts[2], restarts=int(parts[3]) if parts[3].isdigit() else 0,
          reason=parts[4].strip() if len(parts) > 4 else '')
  if shutil.which('sacct') is not None:
    acct = subprocess.run(
        ['sacct', '--noheader', '--parsable2', '--jobs', ids, '--format',
         'JobID,State'], capture_output=True, text=True, timeout=60,
        check=False)  # fails where accounting is off: squeue alone then
    for line in acct.stdout.splitlines() if acct.returncode == 0 else ():
      job_id, _, state = line.partition('|')
      job, _, index = job_id.partition('_')
      if (job, index) in names and (job, index) not in known:
        known[(job, index)] = dict(state=state.split()[0], restarts=0,
                                   reason='')
  out = {}
  for key, name in names.items():  # later submissions win
    if key in known:
      out[name] = dict(known[key], job=f'{key[0]}_{key[1]}')
  return out


def submit_sweep(points: Sequence[sweeps.Point], root: pathlib.Path,
                 settings: Any, dry_run: bool = False) -> str | None:
  """Submits the points that are neither done nor queued/running as one
  array; prints what it did. Returns the job id (None: nothing to submit,
  or a dry run, which prints the script instead)."""
  states = task_states(jobs(root))
  todo = []
  for point in points:
    state = states.get(point.name, {}).get('state')
    if workdir_lib.read_summary(point.workdir) is not None:
      print(f'sweep: {point.name} is done; not submitted.')
    elif state in WAITING + ACTIVE:
      print(f'sweep: {point.name} is {state.lower()} in job '
            f'{states[point.name]["job"]}; not submitted again.')
    else:
      todo.append(point)
  if not todo:
    print('sweep: nothing to submit.')
    return None
  text = script(todo, root, settings)
  if dry_run:
    print(text, end='')
    return None
  job = submit(root, todo, text)
  print(f'sweep: submitted job array {job} ({len(todo)} points, script '
        f'{root / SLURM_DIR / jobs(root)[-1]["script"]}); follow with '
        '--status.')
  return job
