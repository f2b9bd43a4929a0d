"""Claiming a workdir without ever losing one.

    path = claim.check_path(flag_value)           # before anything else
    claim.prepare(path, config, overwrite=False, trained_step=300,
                  total_steps=800)                # after every other check

A workdir is claimed only when it is new, empty, or a flaxlora run:

* `check_path` refuses an empty or blank --workdir (an unset shell
  variable would otherwise mean the current directory), a file, a path
  under a file and a folder this user cannot write.
* `prepare` refuses a folder holding anything flaxlora does not write (a
  folder of runs, a source tree); `--overwrite` deletes only a flaxlora run
  and never the current directory, `/`, the home folder or a git checkout.
* A run of the same config resumes. A run whose config differs only in
  `COMPATIBLE` keys (longer training, a new learning rate, eval settings,
  ...) continues from its last checkpoint, and config.json records each
  change with the step it took effect (`changes`). Any other difference is
  refused, naming the keys.
* A key flaxlora added after a run was written (`ADDED`) reads, in that
  run's config.json, as the value that reproduces it: the run continues
  under that value and is refused under any other.
"""
import fnmatch
import json
import os
import pathlib
import shutil
from typing import Any, Mapping

from flaxlora import atomic
from flaxlora import errors
from flaxlora import workdir as workdir_lib

# Keys a continued run may change: they do not change the adapter, the
# optimizer state's shapes or the data order.
COMPATIBLE = ('train.steps', 'train.epochs', 'train.eval_every',
              'train.log_every', 'train.checkpoint_every',
              'train.eval_batch_size', 'optimizer.lr', 'optimizer.b1',
              'optimizer.b2', 'optimizer.eps', 'optimizer.clip_norm',
              'optimizer.warmup_steps', 'optimizer.schedule',
              'checkpoint.keep', 'eval.*', 'peft_export.*')
# Keys added to the config after runs were written -> the value that trains
# as those runs did (a run without the key is this value's run).
ADDED = {'model.pooling': 'cls'}
CHANGES = 'changes'  # config.json's record of continued-run changes
_SHOWN = 6  # differing keys named in a message


def check_path(workdir: Any) -> pathlib.Path:
  """`workdir` as a Path, if a run can be written there.

  Raises:
    errors.UserError: blank, a file, under a file, or not writable.
  """
  if workdir is None or not str(workdir).strip():
    raise errors.UserError(
        f'--workdir={str(workdir or "")!r} is empty; name the run\'s folder, '
        'e.g. --workdir=workdirs/my_run (an unset shell variable?).')
  path = pathlib.Path(str(workdir)).expanduser()
  if path.exists() and not path.is_dir():
    raise errors.UserError(f'--workdir={workdir} is a file, not a folder; '
                           'name a new or existing folder.')
  existing = path.absolute()
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise errors.UserError(f'--workdir={workdir} is under the file '
                           f'{existing}; name a folder path.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise errors.UserError(f'--workdir={workdir}: {existing} is not '
                           'writable by this user; pick a folder you own.')
  return path


def _is_run_entry(name: str) -> bool:
  """Whether flaxlora writes a file or folder of this name in a workdir
  (its temporary `.name.*` siblings included)."""
  if name.startswith('.'):
    name = name[1:]
    return any(name.startswith(known + '.')
               for known in workdir_lib.RUN_FILES)
  return name in workdir_lib.RUN_FILES or any(
      fnmatch.fnmatch(name, p) for p in workdir_lib.RUN_PATTERNS)


def foreign(workdir: pathlib.Path) -> list[str]:
  """Entries of `workdir` that flaxlora does not write (sorted)."""
  if not workdir.is_dir():
    return []
  return sorted(p.name + ('/' if p.is_dir() else '')
                for p in workdir.iterdir() if not _is_run_entry(p.name))


def _special(workdir: pathlib.Path) -> str:
  """What `workdir` is when --overwrite must never empty it ('' if not)."""
  path = workdir.resolve()
  cwd = pathlib.Path.cwd().resolve()
  if path == pathlib.Path(path.anchor):
    return 'the root folder'
  if path == pathlib.Path.home().resolve():
    return 'your home folder'
  if path == cwd or path in cwd.parents:
    return 'the current directory' + ('' if path == cwd else "'s parent")
  if (path / '.git').exists():
    return 'a git checkout'
  return ''


def _refuse_foreign(workdir: pathlib.Path, overwrite: bool) -> None:
  special = _special(workdir) if overwrite else ''
  others = foreign(workdir)
  if not special and not others:
    return
  runs = [n for n in others if (workdir / n / workdir_lib.CONFIG_FILE)
          .exists()]
  what = special or (f'a folder of runs ({", ".join(runs[:3])}...)' if runs
                     else 'a folder with files flaxlora did not write: '
                     + ', '.join(others[:_SHOWN]))
  if overwrite:
    raise errors.UserError(
        f'--overwrite refused: {workdir} is {what}. --overwrite deletes '
        'only a flaxlora run (config.json, metrics.jsonl, checkpoints/, '
        'adapter/, ...); name the run\'s own folder.')
  raise errors.UserError(f'--workdir={workdir} is {what}; a run needs a '
                         'new or empty folder (or its own earlier run).')


def _compatible(key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, p) for p in COMPATIBLE)


def _diffs(old: Mapping[str, Any], new: Mapping[str, Any]
           ) -> dict[str, tuple[Any, Any]]:
  """{dotted key: (old, new)} of the keys that differ."""
  old_flat = {**ADDED, **workdir_lib.flatten(old)}
  new_flat = workdir_lib.flatten(new)
  absent = '<absent>'
  return {k: (old_flat.get(k, absent), new_flat.get(k, absent))
          for k in sorted(set(old_flat) | set(new_flat))
          if old_flat.get(k, absent) != new_flat.get(k, absent)}


def _read_config(workdir: pathlib.Path) -> dict[str, Any] | None:
  path = workdir / workdir_lib.CONFIG_FILE
  if not path.exists():
    return None
  try:
    old = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise errors.UserError(
        f'{path} is not valid JSON ({e}); it is not a run flaxlora can '
        'continue: use another --workdir or pass --overwrite.') from None
  if not isinstance(old, dict):
    raise errors.UserError(f'{path} holds no config object; use another '
                           '--workdir or pass --overwrite.')
  return old


def changes(workdir: str | os.PathLike, config: Any,
            trained_step: int | None, total_steps: int | None
            ) -> list[dict[str, Any]] | None:
  """The compatible changes of `config` against the run in `workdir`
  ([{'step', 'key', 'from', 'to'}]; None: no earlier run).

  Raises:
    errors.UserError: an incompatible change (naming the keys), or fewer
      total steps than the run already trained.
  """
  workdir = pathlib.Path(workdir)
  old = _read_config(workdir)
  if old is None:
    return None
  old.pop(CHANGES, None)
  diffs = _diffs(old, workdir_lib.config_dict(config))
  bad = [f'{k}: {a!r} -> {b!r}' for k, (a, b) in diffs.items()
         if not _compatible(k)]
  if bad:
    raise errors.UserError(
        f'workdir {workdir} holds a run of a different config ({len(bad)} '
        f'incompatible keys: {"; ".join(bad[:_SHOWN])}'
        f'{"; ..." if len(bad) > _SHOWN else ""}); use another --workdir, '
        'or pass --overwrite to discard that run.')
  step = trained_step or 0
  if total_steps is not None and step > total_steps:
    raise errors.UserError(
        f'workdir {workdir} already trained {step} steps, more than the '
        f'{total_steps} this config asks for; raise train.steps (or '
        'train.epochs), or use another --workdir.')
  return [{'step': step, 'key': k, 'from': a, 'to': b}
          for k, (a, b) in diffs.items()]


def prepare(workdir: str | os.PathLike, config: Any, *,
            overwrite: bool = False, write: bool = True,
            trained_step: int | None = None,
            total_steps: int | None = None) -> list[dict[str, Any]]:
  """Claims `workdir` for `config` (see the module docstring).

  Args:
    workdir: the run's folder (checked by `check_path`).
    config: the run's ConfigDict.
    overwrite: discard the flaxlora run in `workdir` (only a run).
    write: whether this process writes (the main process); False only
      checks.
    trained_step: the latest checkpoint's step in `workdir` (None: none).
    total_steps: the config's number of train steps (None: not known
      yet, not checked).

  Returns:
    The compatible changes that continue the run ([] when none).
  """
  workdir = check_path(workdir)
  _refuse_foreign(workdir, overwrite)
  if overwrite:
    new_changes, kept = [], []
  else:
    new_changes = changes(workdir, config, trained_step, total_steps) or []
    kept = (_read_config(workdir) or {}).get(CHANGES, [])
  if not write:
    return new_changes
  if overwrite and workdir.exists():
    clear(workdir)
  if new_changes:  # a finished run continues: its summary is rewritten
    (workdir / workdir_lib.SUMMARY_FILE).unlink(missing_ok=True)
  for change in new_changes:
    print(f"flaxlora: continuing at step {change['step']} with "
          f"{change['key']} {change['from']!r} -> {change['to']!r}")
  workdir.mkdir(parents=True, exist_ok=True)
  resolved = workdir_lib.config_dict(config)
  if kept or new_changes:
    resolved[CHANGES] = kept + new_changes
  atomic.write_file(workdir / workdir_lib.CONFIG_FILE,
                    json.dumps(resolved, indent=2, sort_keys=True))
  return new_changes


def clear(workdir: pathlib.Path) -> None:
  """Empties a flaxlora run's `workdir` (--overwrite; `prepare` checked
  that it holds only what flaxlora writes)."""
  for child in workdir.iterdir():
    if child.name == workdir_lib.LOCK_FILE:
      continue  # this run's own lock
    if child.is_dir() and not child.is_symlink():
      shutil.rmtree(child)
    else:
      child.unlink()
