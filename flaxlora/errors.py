"""One-line errors for the entry points: bad input exits 2, bugs exit 1.

    def main(argv): ...                  # an absl main
    def cli(argv=None): return errors.cli(main, argv)
    if __name__ == '__main__':
      sys.exit(cli())                    # tests call cli([...]) in-process

A user error prints `flaxlora: error: <message>` on stderr, on one line,
without a traceback, and exits 2. User errors are `UserError`, every
`ValueError` raised by flaxlora's own code or a config file (house style
raises ValueError only for bad input, `assert` for invariants), an `OSError`
(a missing, unreadable or unwritable file) and a bad flag. Anything else is
a bug: its traceback is printed and the exit code is 1. `--traceback` (or
FLAXLORA_TRACEBACK=1) prints the traceback of a user error too. An
interrupted run (`Interrupted`) exits 128 + the signal number.
"""
import os
import pathlib
import re
import shlex
import sys
import traceback
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags

# Code whose ValueErrors are user errors: flaxlora, configs, experiments.
_OWN = tuple(str(pathlib.Path(__file__).resolve().parents[1] / name) + os.sep
             for name in ('flaxlora', 'configs', 'experiments'))
TRACEBACK_ENV = 'FLAXLORA_TRACEBACK'
# The command line of the running entry point (set by `cli`), so that a
# message can give the exact command that continues a run.
_command: list[str] = []


class UserError(ValueError):
  """Bad input: a config value, flag, file or workdir; the message names it
  and the fix."""
  exit_code = 2


class Interrupted(UserError):
  """SIGINT/SIGTERM stopped a run after it saved a checkpoint."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is bad input (see the module docstring)."""
  if isinstance(error, (UserError, OSError, flags.Error, app.UsageError)):
    return True
  if not isinstance(error, ValueError):
    return False
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and frames[-1].filename.startswith(_OWN)


def one_line(error: BaseException) -> str:
  """The message of `error` on one line (a config file's error, wrapped by
  the flag parser in a traceback, reduced to its last line)."""
  text = str(error).strip()
  if isinstance(error, (KeyError, AttributeError)) and text[:1] in '"\'':
    text = text[1:-1].encode().decode('unicode_escape')
  if 'Traceback (most recent call last)' in text:
    head = text.split(':', 1)[0]
    last = [line for line in text.splitlines() if line.strip()][-1]
    text = f'{head}: {last.strip()}'
  text = re.sub(r'\s*\n\s*', '; ', text)
  if isinstance(error, OSError) and error.errno is not None:
    text = f'{type(error).__name__}: {text}'
  return text


def command(overrides: Mapping[str, Any] | None = None) -> str:
  """The running command with `overrides` ({'optimizer.lr': 1e-3}) set as
  --config.<key>=<value> flags (replacing earlier ones); '' when no entry
  point is running (library use)."""
  if not _command:
    return ''
  overrides = dict(overrides or {})
  keep = [a for a in _command[1:]
          if not any(a.startswith(f'--config.{k}=') for k in overrides)]
  keep = [a for a in keep if a not in ('--overwrite', '--traceback')]
  keep += [f'--config.{k}={v}' for k, v in overrides.items()]
  return shlex.join(['python', '-m', _command[0], *keep])


def wants_traceback(argv: Sequence[str]) -> bool:
  """--traceback in `argv`, or FLAXLORA_TRACEBACK set (not '' or '0')."""
  return ('--traceback' in argv or
          os.environ.get(TRACEBACK_ENV, '') not in ('', '0'))


def _reset_flags() -> None:
  """Forgets an earlier parse, so that `cli` can run again in-process
  (the config flag defines one override flag per --config.x.y it sees)."""
  values = flags.FLAGS
  values.unparse_flags()
  for name in list(values):
    if '.' in name:
      delattr(values, name)


def _parse(module: str, argv: Sequence[str]) -> list[str]:
  """Parses `argv` into absl's FLAGS; returns the positional arguments."""
  global _command
  _command = [module, *argv[1:]]
  saved, sys.argv = sys.argv, list(argv)  # config_flags reads sys.argv
  try:
    app.define_help_flags()  # --help, --helpfull (as app.run does)
    _reset_flags()
    return flags.FLAGS(list(argv))
  except flags.Error:
    raise
  except Exception as e:  # the config flag's errors (a mistyped key)
    text = one_line(e)
    key = re.match(r"'?(\w+)'?", text)
    named = [a.split('=')[0] for a in argv[1:]
             if key and f'.{key.group(1)}' in a.split('=')[0]]
    where = f'{named[0]}: no such config key' if named else 'bad flag'
    raise UserError(f'{where} ({text}); run with --helpfull for the '
                    'flags, or check the config file.') from e
  finally:
    sys.argv = saved


def cli(main: Callable[[list[str]], Any],
        argv: Sequence[str] | None = None,
        required: Sequence[str] = ()) -> int:
  """Parses flags and runs `main`; returns the exit code (see module doc).

  Args:
    main: an absl-style main taking the positional arguments.
    argv: the command line including the program name (default sys.argv).
    required: the flags this entry point needs. Checked here, not with
      absl's `mark_flags_as_required`, whose validators are global: every
      entry point imported into one process would then need every other's.
  """
  argv = list(sys.argv if argv is None else argv)
  module = main.__module__
  if module == '__main__':
    module = pathlib.Path(sys.argv[0]).stem
    module = f'experiments.{module}'
  show = wants_traceback(argv)
  argv = [a for a in argv if a != '--traceback']
  return guarded(lambda: main(_checked(_parse(module, argv), required)),
                 show)


def _checked(positional: list[str], required: Sequence[str]) -> list[str]:
  missing = [f'--{name}' for name in required
             if flags.FLAGS[name].value is None]
  if missing:
    raise UserError(f'{", ".join(missing)} must be given; run with --help '
                    'for the flags.')
  return positional


def guarded(fn: Callable[[], Any], show_traceback: bool = False) -> int:
  """Runs `fn()`; returns 0, or the exit code of the error it raised
  (printed by `report`)."""
  try:
    fn()
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    return report(e, show_traceback)
  return 0


def report(error: BaseException, show_traceback: bool = False) -> int:
  """Prints `error` as the entry points do; returns the exit code."""
  if isinstance(error, KeyboardInterrupt):
    print('flaxlora: interrupted before training started; nothing was '
          'written.', file=sys.stderr)
    return 130
  if not is_user_error(error):
    traceback.print_exception(error)
    return 1
  if show_traceback:
    traceback.print_exception(error)
  kind = 'stopped' if isinstance(error, Interrupted) else 'error'
  print(f'flaxlora: {kind}: {one_line(error)}', file=sys.stderr)
  return getattr(error, 'exit_code', 2)
