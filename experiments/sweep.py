r"""Runs every point of a config's `get_sweep(arg)`, each in its own workdir.

  python -m experiments.sweep --config=configs/t5_lora.py:runlocal \
      --workdir=workdirs/t5_sweep [--launch=local|slurm|tpu] [--status]

--launch=local (default) runs the points here one after the other, or
--parallel=N at once as subprocesses (the host's GPUs split between them);
--dry_run prints one command per point. --launch=slurm submits one job array
(resources: the config's `get_launch(arg)['slurm']`, then --slurm.<field>
flags; --dry_run prints the script). --launch=tpu prints the gcloud commands
per TPU slice (--tpu.<field>), --execute runs them. --status shows every
point's state. Finished points are skipped and stopped ones resume; ROOT
gets results.csv, results.md and results.png. --config.x=y overrides apply
to every point. See docs/sweeps.md.
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from flaxlora import errors
from flaxlora import slurm
from flaxlora import tpu_launch

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file with get_sweep(), e.g. '
    'configs/t5_lora.py:runlocal.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The sweep root folder.')
_LAUNCH = flags.DEFINE_enum('launch', 'local', ['local', 'slurm', 'tpu'],
                            'Where the points run.')
_PARALLEL = flags.DEFINE_integer(
    'parallel', 1, '--launch=local: points run at once (>1: subprocesses).')
_EXECUTE = flags.DEFINE_bool('execute', False,
                             '--launch=tpu: run the commands, not print them.')
_STATUS = flags.DEFINE_bool('status', False,
                            "Show every point's state; run nothing.")
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Print the commands (local) or the sbatch script '
    '(slurm); run nothing.')
# The launch sections and their defaults; --slurm.<field>=v and
# --tpu.<field>=v on the command line override them (set aside by `cli`).
_SECTIONS = {'slurm': slurm.defaults, 'tpu': tpu_launch.defaults}
_LAUNCH_OVERRIDES = {name: {} for name in _SECTIONS}


def _split_launch_flags(argv: list[str]) -> list[str]:
  """argv without its --slurm.x=v / --tpu.x=v flags, which go to
  _LAUNCH_OVERRIDES (as text; `sweeps.launch_settings` types them)."""
  rest = []
  for name in _SECTIONS:
    _LAUNCH_OVERRIDES[name] = {}
  for arg in argv:
    name, dot, assignment = arg.lstrip('-').partition('.')
    if arg.startswith('--') and dot and name in _SECTIONS:
      key, equals, value = assignment.partition('=')
      if not equals:
        raise errors.UserError(f'{arg}: give a value, --{name}.{key}=VALUE.')
      _LAUNCH_OVERRIDES[name][key] = value
    else:
      rest.append(arg)
  return rest


def _settings(config_arg: str, name: str):
  """The launch section `name`: defaults, the config file's
  get_launch(arg)[name], then the command line's --<name>.* flags."""
  # pylint: disable=g-import-not-at-top
  from flaxlora import sweeps
  return sweeps.launch_settings(config_arg, name, _SECTIONS[name](),
                                _LAUNCH_OVERRIDES[name])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # pylint: disable=g-import-not-at-top
  from flaxlora import local_launch
  from flaxlora import sweep_results
  from flaxlora import sweeps
  config_arg = config_flags.get_config_filename(flags.FLAGS['config'])
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  launch = _LAUNCH.value
  root = _WORKDIR.value
  if launch == 'slurm' or _STATUS.value:  # the nodes need the whole path
    root = os.path.abspath(root)
  points = sweeps.plan(_CONFIG.value, config_arg, root, overrides)
  root = points[0].workdir.parent
  if _STATUS.value:
    from flaxlora import sweep_status
    tasks = slurm.task_states(slurm.jobs(root))
    print(sweep_status.table(sweep_status.rows(points, root, tasks)), end='')
    sweep_results.collect(points, root)  # results.md of the points done so far
  elif launch == 'slurm':
    slurm.submit_sweep(points, root, _settings(config_arg, 'slurm'),
                       dry_run=_DRY_RUN.value)
  elif launch == 'tpu':
    plan = tpu_launch.commands(points, _settings(config_arg, 'tpu'))
    if not _EXECUTE.value:
      print(tpu_launch.show(plan), end='')
      return
    failed = tpu_launch.execute(plan, root)
    sweep_results.collect(points, root)
    if failed:
      raise errors.UserError(f'--launch=tpu: {", ".join(failed)} failed; '
                             f'see {root}/logs/, then launch again to resume.')
  elif _DRY_RUN.value:
    for point in points:
      print(sweeps.command(point))
  elif _PARALLEL.value > 1:
    local_launch.run_parallel(points, root, _PARALLEL.value)
  else:
    from flaxlora import trainer
    local_launch.run(points, root, train_fn=trainer.train_and_evaluate)


def cli(argv=None) -> int:
  """Runs main with `argv` (default sys.argv); returns the exit code:
  0, 2 for bad input (one line on stderr), 1 for a bug (a traceback)."""
  argv = list(sys.argv if argv is None else argv)
  try:
    argv = _split_launch_flags(argv)
  except errors.UserError as e:
    return errors.report(e)
  return errors.cli(main, argv, required=('config', 'workdir'))


if __name__ == '__main__':
  sys.exit(cli())
