r"""Plans a config's train step on a TPU slice (or this host) ahead of time.

  python -m experiments.plan --config=configs/pod_lora.py:model=flan-t5-xxl \
      --target=v5e-16 --json=plan.json

Compiles the run's real train step for the target with the target's own
compiler (TPU slices: libtpu's, on any CPU machine; `pip install
'flaxlora[tpu]'`) on abstract params, and prints per chip the memory of
base, adapter, optimizer state and temporaries vs HBM, the FLOPs, the
roofline step time and its MFU (`flaxlora.plan`). --target takes a slice
(v5e-16, v5e-256, v5p-128, v4-32, v5e-1), a topology (v5e:4x4) or cpu (this
host's devices; --cpu_devices splits it), several comma-separated
(`flaxlora.chips`).
--max_batch also bisects the largest global batch that fits (one compile per
try). --json writes the reports (a list, with the host and versions).
Config fields are overridable as for experiments.run, e.g.
--config.train.batch_size=64.
"""
import datetime
import json
import pathlib
import platform
import subprocess
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import cli as cli_lib
from flaxlora import errors


def _host() -> dict[str, str]:
  """What made the numbers: host CPU, versions, commit, date."""
  # pylint: disable=g-import-not-at-top
  import jax
  from importlib import metadata
  cpu = platform.processor()
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'],
                            capture_output=True, text=True, check=True,
                            cwd=pathlib.Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = ''
  try:
    libtpu = metadata.version('libtpu')
  except metadata.PackageNotFoundError:
    libtpu = ''
  return {'cpu': cpu, 'jax': jax.__version__, 'libtpu': libtpu,
          'commit': commit,
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec='seconds')}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli_lib.quiet_logs()
  # pylint: disable=g-import-not-at-top
  import jax
  # Plans compile; nothing runs on an accelerator of this host.
  jax.config.update('jax_platforms', 'cpu')
  if flags.FLAGS.cpu_devices:
    jax.config.update('jax_num_cpu_devices', flags.FLAGS.cpu_devices)
  from flaxlora import chips
  from flaxlora import plan
  from flaxlora import plan_tables
  config = flags.FLAGS.config
  targets = [chips.target(name) for name in flags.FLAGS.target]
  reports, host = [], _host()
  for t in targets:
    report = plan.plan(config, t)
    if flags.FLAGS.max_batch:
      report.update(plan.search_batch(config, t, flags.FLAGS.batch_limit))
    report.update(command=errors.command(), host=host)
    reports.append(report)
    text = plan_tables.table([report])
    print(text.splitlines()[-1] if len(reports) > 1 else text, flush=True)
  if flags.FLAGS.json:
    path = pathlib.Path(flags.FLAGS.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(reports, indent=1) + '\n')
    print(f'flaxlora: wrote {path}')


def cli(argv=None) -> int:
  """Runs main with `argv` (default sys.argv); returns the exit code:
  0, 2 for bad input (one line on stderr), 1 for a bug (a traceback)."""
  return errors.cli(main, argv, required=('config',))


def define_flags():
  """The command's flags, defined only when it runs as a command, so
  tests import this module beside other commands that have a --config."""
  config_flags.DEFINE_config_file(
      'config', None, 'Config file, e.g. configs/pod_lora.py:model=flan-t5-xl.',
      lock_config=True)
  flags.DEFINE_list(
      'target', ['cpu'], 'Slices (v5e-16, v5p-128, v4-32), topologies '
      '(v5e:4x4) or cpu, comma-separated.')
  flags.DEFINE_string('json', None, 'Write the reports here (JSON).')
  flags.DEFINE_bool(
      'max_batch', False, 'Also bisect the largest global batch that fits.')
  flags.DEFINE_integer(
      'batch_limit', 4096, 'The largest global batch --max_batch tries.')
  flags.DEFINE_integer(
      'cpu_devices', None, 'XLA CPU devices of this host for --target=cpu.')


if __name__ == '__main__':
  define_flags()
  sys.exit(cli())
