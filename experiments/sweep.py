r"""Runs every point of a config's `get_sweep(arg)`, each in its own workdir.

  python -m experiments.sweep --config=configs/t5_lora.py:runlocal \
      --workdir=workdirs/t5_sweep [--dry_run]

Finished points are skipped and stopped ones resume; ROOT gets results.csv,
results.md and results.png. --config.x=y overrides apply to every point.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from flaxlora import errors

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file with get_sweep(), e.g. '
    'configs/t5_lora.py:runlocal.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The sweep root folder.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False,
                             'Print one command per point; run nothing.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # pylint: disable=g-import-not-at-top
  from flaxlora import sweeps
  config_arg = config_flags.get_config_filename(flags.FLAGS['config'])
  overrides = config_flags.get_override_values(flags.FLAGS['config'])
  if _DRY_RUN.value:
    train_fn = None
  else:
    from flaxlora import trainer
    train_fn = trainer.train_and_evaluate
  sweeps.run(_CONFIG.value, config_arg, _WORKDIR.value, train_fn=train_fn,
             base_overrides=overrides, dry_run=_DRY_RUN.value)


def cli(argv=None) -> int:
  """Runs main with `argv` (default sys.argv); returns the exit code:
  0, 2 for bad input (one line on stderr), 1 for a bug (a traceback)."""
  return errors.cli(main, argv)


if __name__ == '__main__':
  sys.exit(cli())
