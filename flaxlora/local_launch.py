"""Runs a sweep's points on this host: one after the other in this
process (`run`), or a few at once as `experiments.run` subprocesses that
share the host's GPUs (`run_parallel`), then writes the sweep's results
(`sweep_results.collect`). The other launchers are `slurm` and
`tpu_launch`; `sweeps.plan` makes the points they all take.

    todo = sweeps.plan(config, 'configs/t5_lora.py:runlocal', root)
    local_launch.run_parallel(todo, root, parallel=2)
"""
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from flaxlora import errors
from flaxlora import sweep_results
from flaxlora import sweeps
from flaxlora import workdir as workdir_lib


def run(todo: Sequence[sweeps.Point], root: str | os.PathLike, *,
        train_fn: Callable[[Any, pathlib.Path], dict]
        ) -> list[dict[str, Any]]:
  """Runs the points one after the other in this process, then writes the
  results (`sweep_results.collect`).

  Args:
    todo: the points (`sweeps.plan`).
    root: the sweep's folder.
    train_fn: (config, workdir) -> summary, e.g. trainer.train_and_evaluate.
  """
  for i, point in enumerate(todo):
    if workdir_lib.read_summary(point.workdir) is not None:
      print(f'sweep: point {point.name} is done; skipped.')
    else:
      print(f'sweep: point {i + 1}/{len(todo)}: {point.overrides}',
            flush=True)
    train_fn(point.config, point.workdir)
  return sweep_results.collect(todo, root)


def run_parallel(todo: Sequence[sweeps.Point], root: str | os.PathLike,
                 parallel: int) -> list[dict[str, Any]]:
  """Runs up to `parallel` points at once, each an `experiments.run`
  subprocess (this interpreter) logging to ROOT/logs/<name>.log; then
  writes the results. The host's GPUs (`nvidia-smi -L`) are split evenly
  over the `parallel` slots through CUDA_VISIBLE_DEVICES; on a CPU host
  the points share the cores.

  Args:
    todo: the points (`sweeps.plan`).
    root: the sweep's folder.
    parallel: how many points run at once.

  Raises:
    errors.UserError: a point failed (its log's error line is named).
  """
  root = pathlib.Path(root)
  slots = gpu_slots(visible_gpus(), parallel)
  (root / sweeps.LOG_DIR).mkdir(parents=True, exist_ok=True)
  queue = []
  for point in todo:
    if workdir_lib.read_summary(point.workdir) is None:
      queue.append(point)
    else:
      print(f'sweep: point {point.name} is done; skipped.')
  running, failed = {}, []
  while queue or running:
    while queue and len(running) < parallel:
      point, slot = queue.pop(0), slots.pop(0)
      proc, log = _start(point, slot, root)
      running[proc] = (point, slot, log)
    time.sleep(0.2)
    for proc in [p for p in running if p.poll() is not None]:
      point, slot, log = running.pop(proc)
      log.close()
      slots.append(slot)
      ok = proc.returncode == 0
      print(f'sweep: {"finished" if ok else "FAILED"} {point.name}',
            flush=True)
      if not ok:
        failed.append(point.name)
  rows = sweep_results.collect(todo, root)
  if failed:
    raise errors.UserError(
        f'{len(failed)} point(s) failed: ' + '; '.join(
            f'{n}: {sweeps.last_error(sweeps.log_path(root, n))}'
            for n in failed))
  return rows


def gpu_slots(gpus: Sequence[str], parallel: int) -> list[list[str]]:
  """`gpus` split into `parallel` equal slots ([] each on a CPU host).

  Raises:
    errors.UserError: `parallel` does not divide the number of GPUs.
  """
  if gpus and len(gpus) % parallel:
    raise errors.UserError(
        f'--parallel={parallel} does not divide the {len(gpus)} GPUs; pick '
        'a divisor so that every point gets the same devices.')
  share = len(gpus) // parallel
  return [list(gpus[i * share:(i + 1) * share]) for i in range(parallel)]


def _start(point: sweeps.Point, slot: Sequence[str], root: pathlib.Path
           ) -> tuple[subprocess.Popen, Any]:
  """(`point`'s experiments.run subprocess on the GPUs of `slot`, its log:
  the open file its output is appended to, for the caller to close when
  the point ends)."""
  env = dict(os.environ)
  if slot:
    env['CUDA_VISIBLE_DEVICES'] = ','.join(slot)
  log = open(sweeps.log_path(root, point.name), 'a')  # pylint: disable=R1732
  print(f'sweep: started {point.name}', flush=True)
  proc = subprocess.Popen(
      [sys.executable, '-m', 'experiments.run', *point.args], env=env,
      stdout=log, stderr=subprocess.STDOUT)
  return proc, log


def visible_gpus() -> list[str]:
  """The GPU indices `nvidia-smi -L` lists ([] without NVIDIA GPUs)."""
  try:
    listing = subprocess.run(['nvidia-smi', '-L'], capture_output=True,
                             text=True, check=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, line in enumerate(listing.splitlines())
          if line.startswith('GPU ')]
