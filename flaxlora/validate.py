"""Checks of a run's config before anything is built or written.

    validate.config_values(config)          # sizes, periods, names
    validate.shapes(r, method, total_steps)    # ranks, regexes, tx

`config_values` needs nothing but the config. `shapes` (of the resolved
config, `flaxlora.resolved`) traces the PEFT
method's `prepare_base` and `init` and the optimizer's `init` with
`jax.eval_shape` over the model's abstract params (`build.abstract_params`:
no weight is read and nothing is compiled), so a rank larger than a kernel,
a `targets` regex that matches nothing or an optimizer that does not fit the
adapter fails in well under a second, before the workdir is claimed.
"""
from typing import Any

import jax

from flaxlora import build
from flaxlora import errors
from flaxlora import optimizers
from flaxlora import tasks
from flaxlora.peft import base as peft_base

# (section.key, smallest value)
_AT_LEAST = (('train.batch_size', 1), ('train.eval_batch_size', 1),
             ('train.steps', 0), ('train.epochs', 0),
             ('train.log_every', 0), ('train.eval_every', 0),
             ('train.checkpoint_every', 0), ('checkpoint.keep', 1),
             ('optimizer.grad_accum_steps', 1), ('optimizer.lr', 0),
             ('optimizer.warmup_steps', 0), ('optimizer.clip_norm', 0))
_WHY = {'checkpoint.keep': 'so that a run can resume',
        'train.batch_size': 'examples per step',
        'train.eval_batch_size': 'examples per eval step'}


def _get(config: Any, key: str) -> Any:
  section, name = key.split('.')
  return config[section][name]


def config_values(config: Any) -> None:
  """Raises errors.UserError for a config value no run can use."""
  for key, low in _AT_LEAST:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise errors.UserError(f'{key}={value!r} must be a number; set '
                             f'--config.{key}=<number >= {low}>.')
    if not value >= low:  # also catches NaN
      why = f' ({_WHY[key]})' if key in _WHY else ''
      raise errors.UserError(f'{key}={value} must be >= {low}{why}; set '
                             f'--config.{key} to a value >= {low}.')
  t = config.train
  if not t.steps and not t.epochs:
    raise errors.UserError('train.steps and train.epochs are both 0; set '
                           '--config.train.steps (or train.epochs) > 0.')
  if t.batch_size % config.optimizer.grad_accum_steps:
    raise errors.UserError(
        f'optimizer.grad_accum_steps={config.optimizer.grad_accum_steps} '
        f'must divide train.batch_size={t.batch_size}.')
  c = config.checkpoint
  if c.best_mode not in ('max', 'min'):
    raise errors.UserError(f"checkpoint.best_mode={c.best_mode!r}: use "
                           "'max' or 'min'.")
  names = tasks.metric_names(config)
  if c.best_metric and names and c.best_metric not in names:
    raise errors.UserError(
        f'checkpoint.best_metric={c.best_metric!r} is not an eval metric of '
        f'this run (task={config.task!r}, metrics {list(names)}); set it to '
        "one of them, or '' to keep only the latest checkpoints.")
  log = config.get('log', None)
  if log and log.wandb_mode not in ('offline', 'online', 'disabled'):
    raise errors.UserError(f"log.wandb_mode={log.wandb_mode!r}: use "
                           "'offline', 'online' or 'disabled'.")
  if log and not log.wandb_project:
    raise errors.UserError("log.wandb_project is empty; name the W&B "
                           "project, e.g. --config.log.wandb_project=flaxlora.")


def shapes(r: Any, method: peft_base.PeftMethod, total_steps: int) -> None:
  """Traces the method and optimizer over the abstract params of `r` (a
  `resolved.Resolved`; no compile).

  Raises:
    ValueError: what `method.prepare_base`/`init` or the optimizer raise
      for this model (a rank too large, a regex matching nothing, ...).
  """
  _, abstract = build.abstract_params(r)
  config = r.config
  rng = jax.random.PRNGKey(0)
  prepared = jax.eval_shape(method.prepare_base, abstract)
  adapter = jax.eval_shape(method.init, rng, prepared)
  if not jax.tree.leaves(adapter):
    raise errors.UserError(
        f'peft.method={config.peft.method!r} gives no trainable parameter '
        'for this model; check peft.targets / peft.trainable.')
  tx = optimizers.optimizer(config.optimizer, total_steps, method)
  jax.eval_shape(tx.init, adapter)
