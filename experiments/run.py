r"""Trains and evaluates one config: the thin entry point.

  python -m experiments.run --config=configs/t5_lora.py:runlocal \
      --workdir=workdirs/t5_runlocal

Flags: --config (a config file, variants after ':', fields overridable as
--config.optimizer.lr=3e-4), --workdir, --overwrite, --release_freed_memory
(leave glibc's malloc as it is; by default the process keeps freed host
memory mapped, see `flaxlora.host_memory`), --cpu_devices (on a CPU-only
host, split it into this many XLA devices: the config's mesh then spreads
the batch over them, e.g. one per core), and for several processes
--coordinator_address / --num_processes / --process_id (or the JAX_*
environment variables; automatic on TPU pod slices). Third-party INFO logs
(orbax, JAX) are off unless --verbosity=0; the run ends with one line: the
final and best eval metrics, the wall time, the adapter and PEFT folders.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import cli as cli_lib
from flaxlora import errors

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/t5_lora.py:runlocal.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the run writes.')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Discard a run of a different config in --workdir.')
_RELEASE_FREED_MEMORY = flags.DEFINE_bool(
    'release_freed_memory', False,
    'Let glibc return freed host memory to the system. Otherwise XLA:CPU '
    'steps reuse their temporary buffers\' pages instead of page-faulting '
    'them in anew every step (flaxlora.host_memory). Default: keep on hosts '
    'with more than 20 GB of memory, release on smaller ones.')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', None,
    'XLA CPU devices of this process (JAX\'s default: 1). On CPU-only hosts '
    'one per core lets XLA run its single-threaded ops (batched attention '
    'products) side by side; batch sizes must divide by the device count.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, "Multi-process: process 0's host:port.")
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Multi-process: how many processes.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Multi-process: this process, in [0, num_processes).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli_lib.quiet_logs()
  # Imported here so that --help and flag errors do not wait for JAX.
  # pylint: disable=g-import-not-at-top
  from flaxlora import host_memory
  keep = (not _RELEASE_FREED_MEMORY.value
          if flags.FLAGS['release_freed_memory'].present
          else host_memory.keep_by_default())
  note = host_memory.cpu_settings(keep, _CPU_DEVICES.value)  # before JAX
  if note:
    print(note)
  from flaxlora import build
  from flaxlora import distributed
  from flaxlora import trainer
  distributed.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                     _PROCESS_ID.value)
  # The peft fields written for the file's method go when the command line
  # switches peft.method; those the command line sets stay (and fail if the
  # method does not take them).
  config = build.settle_peft(_CONFIG.value, config_flags.get_override_values(
      flags.FLAGS['config']))
  trainer.train_and_evaluate(config, _WORKDIR.value,
                             overwrite=_OVERWRITE.value)


def cli(argv=None) -> int:
  """Runs main with `argv` (default sys.argv); returns the exit code:
  0, 2 for bad input (one line on stderr), 1 for a bug (a traceback)."""
  return errors.cli(main, argv, required=('config', 'workdir'))


if __name__ == '__main__':
  sys.exit(cli())
