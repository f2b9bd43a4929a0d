"""What the entry points share: quiet third-party logs, `--config.*`
overrides of a saved run config.

absl's `app.run` turns INFO logging on unless `--verbosity` is given, and
orbax and JAX log at INFO (~190 lines per runlocal run). `quiet_logs()`
keeps warnings and errors only; `--verbosity=0` brings INFO back.
"""
import sys
from typing import Any, Callable

from absl import flags
from absl import logging

from flaxlora import errors

CONFIG_PREFIX = '--config.'


def quiet_logs() -> None:
  """Warnings and errors only, unless --verbosity/-v was given."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(argv without them, ['a.b=value', ...]) of the `--config.a.b=value`
  (or `--config.a.b value`) arguments."""
  rest, overrides = [], []
  args = iter(argv)
  for arg in args:
    if not arg.startswith(CONFIG_PREFIX):
      rest.append(arg)
      continue
    assignment = arg[len(CONFIG_PREFIX):]
    if '=' not in assignment:
      assignment += '=' + next(args, '')
    overrides.append(assignment)
  return rest, overrides


def run_with_overrides(main: Callable[[list[str]], Any], store: list[str],
                       argv: list[str] | None = None,
                       required: tuple[str, ...] = ()) -> int:
  """Runs an absl `main` on `argv` (default sys.argv) with its
  `--config.*` overrides set aside in `store` (for a saved run config);
  returns the exit code of `errors.cli`: 0, 2 for bad input (one line on
  stderr), 1 for a bug (a traceback)."""
  rest, overrides = split_overrides(list(sys.argv if argv is None else argv))
  store[:] = overrides
  return errors.cli(main, rest, required)
