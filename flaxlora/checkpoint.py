"""Training checkpoints with orbax: the last N, plus the best by a metric.

A checkpoint holds what a resumed run needs to continue bit for bit:

  state  the train state (adapter, optimizer state, step, rng); the base
         params are not saved (they are reloaded from the model source)
  data   the training iterator's position (a small JSON dict)

Orbax writes each step into a temporary folder and renames it when complete,
so a run killed at any moment leaves only whole checkpoints behind.

    ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', keep=2,
                                   best_metric='accuracy', best_mode='max')
    restored = ckpt.restore_latest(abstract_state)   # None on a fresh run
    ckpt.save(step, state, loader.state(), metrics={'accuracy': 0.9})
"""
import contextlib
import json
import logging
import os
import pathlib
import re
import sys
from typing import Any, Iterator, Mapping

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from flaxlora import errors

STATE = 'state'
DATA = 'data'
# Orbax's JSON files in a step folder.
_JSON_FILES = ('_METADATA', '_CHECKPOINT_METADATA', 'metadata', '_sharding',
               'metrics')


class _QuietUntracked(logging.Filter):
  """Drops orbax's warning for checkpoints saved between evals (no metrics
  by design: the latest-N policy keeps them, not the best-metric one)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


logging.getLogger('absl').addFilter(_QuietUntracked())


def steps_on_disk(directory: str | os.PathLike) -> list[int]:
  """The steps of the checkpoint folders in `directory` (ascending), read
  without orbax: for checks before a run claims its workdir."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir()
                if p.name.isdigit() and p.is_dir())


class Checkpointer:
  """Keeps the last `keep` checkpoints and the best one by `best_metric`.

  Attributes:
    directory: where the step folders live.
    best_metric: name of the eval metric ranking checkpoints ('' = none).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2,
               best_metric: str = '', best_mode: str = 'max'):
    if keep < 1:
      raise ValueError(f'checkpoint.keep={keep}: keep at least 1 checkpoint '
                       'so that a run can resume.')
    if best_mode not in ('max', 'min'):
      raise ValueError(f"checkpoint.best_mode={best_mode!r}: use 'max' or "
                       "'min'.")
    self.directory = pathlib.Path(directory).absolute()
    self.best_metric = best_metric
    policies = [checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if best_metric:
      best_fn = lambda metrics: metrics[best_metric]
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=best_fn, reverse=best_mode == 'min', n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(
            policies),
        best_fn=best_fn, best_mode=best_mode,
        enable_async_checkpointing=False, create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=(STATE, DATA), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None without metrics)."""
    return self._manager.best_step() if self.best_metric else None

  def save(self, step: int, state: Any, data_state: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> None:
    """Writes step `step` (synchronously; returns once it is complete)."""
    if metrics is not None and self.best_metric:
      if self.best_metric not in metrics:
        raise ValueError(
            f'checkpoint.best_metric={self.best_metric!r} is not among the '
            f'eval metrics {sorted(metrics)}; set it to one of them.')
      metrics = {self.best_metric: float(metrics[self.best_metric])}
    else:
      metrics = None
    self._manager.save(
        step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            DATA: ocp.args.JsonSave(dict(data_state))}),
        metrics=metrics, force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any
              ) -> tuple[Any, dict[str, Any]]:
    """(state, data_state) of `step`, laid out like `abstract_state`.

    `abstract_state` holds arrays or ShapeDtypeStructs (with shardings, to
    restore each shard on its own device).
    """
    abstract = jax.tree.map(_abstract, abstract_state)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract),
            DATA: ocp.args.JsonRestore()}))
    return restored[STATE], dict(restored[DATA])

  def restore_latest(self, abstract_state: Any, check_only: bool = False
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, data_state) of the newest intact checkpoint; None when
    there is none yet.

    A checkpoint that fails to read is reported in one line and moved
    aside (`<step>.unreadable`), and the next older one is tried.
    `check_only`: report and move nothing (a check before the workdir is
    claimed).

    Raises:
      errors.UserError: checkpoints exist but none of them reads.
    """
    steps = sorted(self.all_steps(), reverse=True)
    failures = []
    for step in steps:
      try:
        with _quiet():
          state, data_state = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        if not isinstance(sys.stderr, _NoClosedLoopNoise):
          sys.stderr = _NoClosedLoopNoise(sys.stderr)
        folder = self.directory / str(step)
        failures.append(f'step {step}: {_reason(folder, e)}')
        if not check_only:
          print(f'flaxlora: warning: checkpoint {failures[-1]}; trying an '
                'older one.', file=sys.stderr, flush=True)
        continue
      if failures and not check_only:
        self._set_aside([s for s in steps if s > step])
      return step, state, data_state
    if not steps:
      return None
    raise errors.UserError(
        f'no intact checkpoint in {self.directory} ({"; ".join(failures)}); '
        'to start over, pass --overwrite (or move the checkpoints folder '
        'away).')

  def _set_aside(self, steps: list[int]) -> None:
    """Renames unreadable step folders to `<step>.unreadable` (kept for a
    post-mortem, ignored by orbax) so that training can save those steps
    again."""
    for step in steps:
      folder = self.directory / str(step)
      folder.rename(folder.with_name(f'{step}.unreadable'))
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()


def check_restorable(directory: str | os.PathLike,
                     abstract_state: Any) -> int | None:
  """The step of the newest checkpoint in `directory` that reads (None:
  there is none yet); a read-only check (each state is restored whole
  onto one device).

  Raises:
    errors.UserError: checkpoints exist but none of them reads.

  Args:
    directory: a run's checkpoints folder.
    abstract_state: the train state's ShapeDtypeStructs.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      abstract_state)
  ckpt = Checkpointer(directory)
  try:
    restored = ckpt.restore_latest(abstract, check_only=True)
  finally:
    ckpt.close()
  return None if restored is None else restored[0]


def _abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype,
                              sharding=getattr(x, 'sharding', None))


def _reason(folder: pathlib.Path, error: BaseException) -> str:
  """'<file>: <why>' of a failed restore of step folder `folder`, on one
  line (the file: one the error names, or a JSON file that does not
  parse)."""
  text = ' '.join(str(error).split())
  named = re.search(re.escape(str(folder)) + r'[^"\s:]*', text)
  where = named.group(0) if named else str(folder)
  if isinstance(error, json.JSONDecodeError):
    for path in sorted(folder.rglob('*')):
      try:
        if path.name in _JSON_FILES and path.is_file():
          json.loads(path.read_text())
      except UnicodeDecodeError:
        continue
      except json.JSONDecodeError:
        where = str(path)
        break
  if len(text) > 200:  # the cause is at the end of tensorstore's messages
    text = f'{text[:100]} ... {text[-100:]}'
  return f'{where}: {type(error).__name__}: {text}'


class _NoClosedLoopNoise:
  """A stderr wrapper that drops the tracebacks of asyncio's 'Event loop is
  closed': tensorstore callbacks of a failed restore land after orbax
  closed its event loop, and print one traceback each (~40 per restore).
  Other output passes unchanged."""

  _NOISE = ('asyncio/base_events.py', 'self._check_closed()',
            "raise RuntimeError('Event loop is closed')",
            'RuntimeError: Event loop is closed')
  _HEADER = 'Traceback (most recent call last):'

  def __init__(self, stream: Any):
    self.stream = stream
    self.partial = ''
    self.headers = 0  # held back until the next line shows what follows

  def write(self, text: str) -> int:
    lines = (self.partial + text).split('\n')
    self.partial = lines.pop()
    for line in lines:
      if line.strip() == self._HEADER:
        self.headers += 1
      elif any(n in line for n in self._NOISE):
        self.headers = 0
      else:
        self.stream.write(f'{self._HEADER}\n' * self.headers + line + '\n')
        self.headers = 0
    return len(text)

  def flush(self) -> None:
    self.stream.flush()

  def __getattr__(self, name: str) -> Any:
    return getattr(self.stream, name)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
  """Silences orbax's and asyncio's logging of a failed restore (the cause
  is reported in one line by `restore_latest`)."""
  loggers = [logging.getLogger(n) for n in ('absl', 'asyncio', 'orbax')]
  levels = [l.level for l in loggers]
  for l in loggers:
    l.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for l, level in zip(loggers, levels):
      l.setLevel(level)
