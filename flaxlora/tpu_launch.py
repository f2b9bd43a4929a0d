"""A sweep on Cloud TPU VM slices: `gcloud compute tpus tpu-vm ssh`.

    for slice_name, commands in tpu_launch.commands(points, settings):
      ...  # the setup command, then one command per point

Every worker of a slice runs the same command (`--worker=all`): one
`experiments.run` of the point, a multi-host run whose processes find each
other by themselves on a TPU pod slice (`flaxlora.distributed`). The slices
named in the settings take the points in turn (point i on slice i mod n);
on each slice the setup (install, data) runs once, before its first point,
and the points run one after the other. A preempted slice's point resumes
from its checkpoint when the sweep is launched again (finished points are
skipped: the run itself checks its workdir's summary.json).
"""
import pathlib
import shlex
import subprocess
import threading
from typing import Any, Sequence

import ml_collections

from flaxlora import sweeps


def defaults() -> ml_collections.ConfigDict:
  """The TPU settings: a config file's `get_launch(arg)['tpu']`, then
  --tpu.<field> flags, override them."""
  return ml_collections.ConfigDict(dict(
      slices='',  # TPU VM names, comma-separated, e.g. 'v4-32-a,v4-32-b'
      zone='',  # '' = gcloud's configured zone
      project='',  # '' = gcloud's configured project
      repo='~/flaxlora',  # the repository on the workers
      setup='',  # run once per slice on every worker, e.g. 'pip install .'
      env='',  # set for every point, e.g. 'FLAXLORA_DATA=/mnt/data'
      python='python3',  # the interpreter on the workers
  ))


def slice_names(settings: Any) -> list[str]:
  names = [n.strip() for n in str(settings.slices).split(',') if n.strip()]
  if not names:
    raise ValueError('--launch=tpu needs the TPU VM names: set '
                     "get_launch(arg)['tpu']['slices'] in the config or "
                     '--tpu.slices=NAME[,NAME...].')
  return names


def ssh(settings: Any, name: str, remote: str) -> list[str]:
  """The gcloud command that runs `remote` on every worker of `name`."""
  argv = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', name,
          '--worker=all']
  if settings.zone:
    argv.append(f'--zone={settings.zone}')
  if settings.project:
    argv.append(f'--project={settings.project}')
  return argv + [f'--command={remote}']


def commands(points: Sequence[sweeps.Point], settings: Any
             ) -> list[tuple[str, list[tuple[str, list[str]]]]]:
  """Per slice: (its name, [(what, gcloud argv)]), the setup first (what =
  'setup') and then its points in order (what = the point's name)."""
  names = slice_names(settings)
  cd = f'cd {settings.repo}'  # unquoted: '~' expands on the worker
  env = f'{settings.env} ' if settings.env else ''
  plan = []
  for k, name in enumerate(names):
    steps = []
    if settings.setup:
      steps.append(('setup', ssh(settings, name,
                                 f'{cd} && {settings.setup}')))
    for point in points[k::len(names)]:
      run = shlex.join([settings.python, '-m', 'experiments.run',
                        *point.args])
      steps.append((point.name, ssh(settings, name, f'{cd} && {env}{run}')))
    if len(steps) > bool(settings.setup):
      plan.append((name, steps))
  return plan


def show(plan: Sequence[tuple[str, list[tuple[str, list[str]]]]]) -> str:
  """The commands as a shell script: one block per slice, run in the
  background side by side (the points of a slice one after another)."""
  lines = ['#!/bin/bash', '# experiments.sweep --launch=tpu: one block per '
           'slice; its points run in turn.']
  for name, steps in plan:
    lines.append(f'(  # slice {name}')
    lines += [f'  {shlex.join(argv)}' for _, argv in steps]
    lines.append(') &')
  lines.append('wait')
  return '\n'.join(lines) + '\n'


def execute(plan: Sequence[tuple[str, list[tuple[str, list[str]]]]],
            root: pathlib.Path) -> list[str]:
  """Runs the plan: slices side by side, each slice's commands in turn,
  each point's output (all workers') appended to ROOT/logs/<point>.log.
  A failed setup skips its slice's points; a failed point does not stop
  the next. Returns the names (points or 'setup on X') that failed."""
  (root / sweeps.LOG_DIR).mkdir(parents=True, exist_ok=True)
  failed = []

  def one_slice(name, steps):
    for what, argv in steps:
      log = (root / sweeps.LOG_DIR / f'setup_{name}.log' if what == 'setup'
             else sweeps.log_path(root, what))
      print(f'sweep: {name}: {what}', flush=True)
      with open(log, 'a') as f:
        code = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT,
                              check=False).returncode
      if code:
        failed.append(f'setup on {name}' if what == 'setup' else what)
        if what == 'setup':
          return

  threads = [threading.Thread(target=one_slice, args=step)
             for step in plan]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  return failed
