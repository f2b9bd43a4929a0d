r"""Evaluates a trained run's adapter: on its eval data, or on another file.

  python -m experiments.evaluate --workdir=workdirs/sst2 \
      [--config.data.eval_file=test.tsv] [--step=N|best] [--name=NAME]

Loads the run's config.json (fields overridable as --config.a.b=value; an
eval file switches the data source to files), its base and its adapter (the
final one, a checkpoint step, or the best checkpoint), evaluates with the
task's metrics on this host's devices (any mesh: a run trained on another
device or process count is fine), prints one result line and writes
WORKDIR/eval/NAME/metrics.json and predictions.jsonl (+
squad_predictions.json for SQuAD). NAME defaults to
'<eval file stem or data source>_<final|best|stepN>'. All eval examples are
used unless the config caps them (--config.eval.max_examples=0 lifts it).
--verbosity=0 shows third-party INFO logs.
"""
import pathlib
import sys

from absl import app
from absl import flags

from experiments import cli as cli_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run to evaluate.')
_STEP = flags.DEFINE_string(
    'step', 'final', "Adapter: 'final' (adapter/), 'best' (the best "
    'checkpoint by checkpoint.best_metric) or a checkpoint step.')
_NAME = flags.DEFINE_string('name', None, 'Output folder under WORKDIR/eval.')
_OVERRIDES = []


def _adapter(step: str) -> str | int:
  if step in ('final', 'best'):
    return step
  try:
    return int(step)
  except ValueError:
    raise app.UsageError(f"--step={step!r}: use 'final', 'best' or a "
                         'checkpoint step number.') from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli_lib.quiet_logs()
  # pylint: disable=g-import-not-at-top
  from flaxlora import evaluation
  from flaxlora.inspect import runs
  workdir = pathlib.Path(_WORKDIR.value)
  config = evaluation.override(runs.read_config(workdir), _OVERRIDES)
  loaded = evaluation.load(workdir, config, _adapter(_STEP.value))
  name = _NAME.value or evaluation.default_name(config, loaded)
  out_dir = workdir / evaluation.EVAL_DIR / name
  result = evaluation.evaluate(loaded, out_dir)
  if loaded.run.is_main:
    print(evaluation.result_line(result, out_dir), flush=True)


def cli(argv=None) -> int:
  """`main` on `argv` (default sys.argv); see `cli_lib.run_with_overrides`."""
  return cli_lib.run_with_overrides(main, _OVERRIDES, argv, ('workdir',))


if __name__ == '__main__':
  sys.exit(cli())
