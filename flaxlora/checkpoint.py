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
import logging
import os
import pathlib
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

STATE = 'state'
DATA = 'data'


class _QuietUntracked(logging.Filter):
  """Drops orbax's warning for checkpoints saved between evals (no metrics
  by design: the latest-N policy keeps them, not the best-metric one)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


logging.getLogger('absl').addFilter(_QuietUntracked())


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

  def restore_latest(self, abstract_state: Any
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    step = self.latest_step()
    if step is None:
      return None
    state, data_state = self.restore(step, abstract_state)
    return step, state, data_state

  def close(self) -> None:
    self._manager.close()


def _abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  return jax.ShapeDtypeStruct(x.shape, x.dtype,
                              sharding=getattr(x, 'sharding', None))
