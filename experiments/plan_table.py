r"""The Markdown table of `experiments.plan` JSON reports (docs/pod_scale.md).

  python -m experiments.plan_table experiments/results/plan/*.json

One row per report, in the order given: model, PEFT method, batch, remat,
base dtype, target slice, per-chip memory vs HBM, headroom, whether it fits,
roofline step time, MFU and the largest batch that fits (when searched).
"""
import json
import pathlib
import sys

from absl import app

from flaxlora import errors


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('give the JSON files of experiments.plan --json.')
  from flaxlora import plan_tables  # pylint: disable=g-import-not-at-top
  reports = []
  for name in argv[1:]:
    reports.extend(json.loads(pathlib.Path(name).read_text()))
  print(plan_tables.markdown(reports))


def cli(argv=None) -> int:
  """Runs main with `argv` (default sys.argv); returns the exit code."""
  return errors.cli(main, argv)


if __name__ == '__main__':
  sys.exit(cli())
