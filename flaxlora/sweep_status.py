"""Where every point of a launched sweep stands, from its workdir, its log
and (when the sweep went to Slurm) squeue / sacct.

    rows = sweep_status.rows(points, root, slurm.task_states(...))
    print(sweep_status.table(rows))

States: done (final metrics), running (step, last eval), queued, requeued
(waiting to resume from its checkpoint at step N), failed (the error's one
line), stopped (interrupted, not queued again: rerun the sweep to resume)
and not started.
"""
import os
import pathlib
import socket
from typing import Any, Mapping, Sequence

from flaxlora import lock
from flaxlora import slurm
from flaxlora import sweeps
from flaxlora import workdir as workdir_lib

# Slurm states of a task that ended without finishing its run.
_ENDED = ('FAILED', 'TIMEOUT', 'CANCELLED', 'NODE_FAIL', 'OUT_OF_MEMORY',
          'BOOT_FAIL', 'DEADLINE', 'PREEMPTED', 'COMPLETED')


def _progress(workdir: os.PathLike) -> str:
  """'step N, last eval (step M) k v, ...' from metrics.jsonl."""
  records = workdir_lib.read_metrics(workdir)
  train = [r['step'] for r in records if r.get('split') == 'train']
  evals = [r for r in records if r.get('split') == 'eval']
  text = f'step {train[-1]}' if train else 'starting'
  if evals:
    last = evals[-1]
    shown = ', '.join(f'{k} {_fmt(v)}' for k, v in last.items()
                      if k not in ('step', 'split'))
    text += f', last eval (step {last["step"]}) {shown}'
  return text


def _fmt(value: Any) -> str:
  return f'{value:.4g}' if isinstance(value, float) else str(value)


def _holder_alive(workdir: pathlib.Path) -> bool:
  """Whether a live process of this host holds the workdir's lock."""
  holder = lock.read(workdir / workdir_lib.LOCK_FILE)
  if not holder or holder.get('host') != socket.gethostname():
    return False
  try:
    os.kill(int(holder['pid']), 0)
  except (ProcessLookupError, ValueError, TypeError, KeyError):
    return False
  except PermissionError:
    return True
  return True


def point_state(point: sweeps.Point, root: os.PathLike,
                task: Mapping[str, Any] | None = None) -> tuple[str, str]:
  """(state, detail) of one point; `task` is its Slurm task (see
  `slurm.task_states`), None when it was not submitted there."""
  summary = workdir_lib.read_summary(point.workdir)
  if summary is not None:
    final = {k: v for k, v in summary.items() if k.startswith('eval_')}
    return 'done', ', '.join(f'{k} {_fmt(v)}' for k, v in final.items())
  log = sweeps.log_path(root, point.name)
  error = sweeps.last_error(log)
  started = workdir_lib.read_metrics(point.workdir)
  state = (task or {}).get('state', '')
  where = f'job {task["job"]}: ' if task else ''
  if state in slurm.ACTIVE:
    return 'running', where + _progress(point.workdir)
  if state in slurm.WAITING:
    if started or (task or {}).get('restarts'):
      return 'requeued', where + f'resumes from {_progress(point.workdir)}'
    return 'queued', where + (task.get('reason') or 'waiting')
  if state in _ENDED:
    return 'failed', where + (error or f'Slurm state {state}')
  if _holder_alive(point.workdir):
    return 'running', _progress(point.workdir)
  if error.startswith('flaxlora: stopped:'):
    return 'stopped', error
  if error:
    return 'failed', error
  if started:
    return 'stopped', _progress(point.workdir)
  return 'not started', ''


def rows(points: Sequence[sweeps.Point], root: os.PathLike,
         tasks: Mapping[str, Mapping[str, Any]]
         ) -> list[tuple[str, str, str]]:
  """(point name, state, detail) per point."""
  return [(p.name, *point_state(p, root, tasks.get(p.name))) for p in points]


def table(status: Sequence[tuple[str, str, str]]) -> str:
  """A fixed-width text table of `rows`, with a count per state."""
  width = max(len(name) for name, _, _ in status)
  lines = [f'{"point":<{width}}  {"state":<11}  detail']
  lines += [f'{name:<{width}}  {state:<11}  {detail}'.rstrip()
            for name, state, detail in status]
  counts = {}
  for _, state, _ in status:
    counts[state] = counts.get(state, 0) + 1
  lines.append(', '.join(f'{n} {s}' for s, n in counts.items()))
  return '\n'.join(lines) + '\n'
