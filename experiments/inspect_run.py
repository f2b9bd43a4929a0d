r"""Prints what a finished run's adapter learned, and writes its plots.

  python -m experiments.inspect_run --workdir=workdirs/t5_runlocal

Prints the parameter summary (totals by module and overall; --leaves for
every parameter), which adapter leaves changed since initialisation, the
per-layer LoRA analysis (relative update norms, spectra, effective ranks,
amplification) and, for prompt tuning, the nearest vocabulary tokens of each
prompt vector. Writes lora_heatmap.png and lora_spectra.png into --out
(default: the workdir).
"""
import sys

from absl import app
from absl import flags

from flaxlora import errors

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished run\'s folder.')
_OUT = flags.DEFINE_string('out', None, 'Where to write the plots '
                           '(default: --workdir).')
_LEAVES = flags.DEFINE_bool('leaves', False, 'Print every parameter.')
_TOP_K = flags.DEFINE_integer('top_k', None, 'Directions of each update to '
                              'project the base kernel on (default: rank).')
_MAX_DENSE = flags.DEFINE_integer(
    'max_dense_elements', 1 << 22, 'Largest in*out for which a dense '
    '[in, out] matrix (base SVD, DoRA update) is formed.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Imported here so that --help and flag errors do not wait for JAX.
  from flaxlora.inspect import runs  # pylint: disable=g-import-not-at-top
  run = runs.load_run(_WORKDIR.value)
  print(runs.inspect_run(run, _OUT.value or _WORKDIR.value,
                         leaves=_LEAVES.value, top_k=_TOP_K.value,
                         max_dense_elements=_MAX_DENSE.value))


def cli(argv=None) -> int:
  """Runs main with `argv` (default sys.argv); returns the exit code:
  0, 2 for bad input (one line on stderr), 1 for a bug (a traceback)."""
  return errors.cli(main, argv, required=('workdir',))


if __name__ == '__main__':
  sys.exit(cli())
