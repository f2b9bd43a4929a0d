"""The optimizer of a run, from its config's `optimizer` section.

    tx = optimizers.optimizer(config.optimizer, total_steps, method)

The run's optimizer (AdamW or Adafactor with warm-up + decay) is handed to
the PEFT method as a factory, `make_tx(lr_multiplier)`, so that the method
shapes its own optimizer (LoRA+ gives every B `ratio` x the rate, with
`optax.multi_transform`) without the trainer knowing which method it is.
Gradient clipping and accumulation are done by the train step
(`flaxlora.steps`), over all adapter leaves at once.
"""
from typing import Any

import optax

from flaxlora.peft import base as peft_base


def schedule(opt: Any, total_steps: int) -> optax.Schedule:
  """Warmup (linear from 0) then 'linear' (to 0), 'cosine' or 'constant'.

  Args:
    opt: the config's optimizer section (lr, warmup_steps, schedule).
    total_steps: the number of optimizer updates of the run.
  """
  warmup = int(opt.warmup_steps)
  if warmup < 0:
    raise ValueError(f'optimizer.warmup_steps={warmup} must be >= 0.')
  decay_steps = max(total_steps - warmup, 1)
  lr = float(opt.lr)
  decays = {
      'linear': lambda: optax.linear_schedule(lr, 0.0, decay_steps),
      'cosine': lambda: optax.cosine_decay_schedule(lr, decay_steps),
      'constant': lambda: optax.constant_schedule(lr),
  }
  if opt.schedule not in decays:
    raise ValueError(f'optimizer.schedule={opt.schedule!r}: use one of '
                     f'{sorted(decays)}.')
  if not warmup:
    return decays[opt.schedule]()
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), decays[opt.schedule]()],
      [warmup])


def factory(opt: Any, total_steps: int) -> peft_base.TxFactory:
  """`make_tx(lr_multiplier)`: AdamW or Adafactor at a scaled schedule.

  Adafactor reads the optional `adafactor_decay_rate` (default 0.8) and
  `adafactor_parameter_scale` (default True) fields. `make_tx.schedule`
  (updates done -> rate, at multiplier 1) and `make_tx.peak` (optimizer.lr)
  let a method read the rate (ScaLoRA's L eta).
  """
  lr = schedule(opt, total_steps)
  if opt.name not in ('adamw', 'adafactor'):
    raise ValueError(f"optimizer.name={opt.name!r}: use 'adamw' or "
                     "'adafactor'.")

  def make_tx(multiplier: float = 1.0) -> optax.GradientTransformation:
    rate = lr if multiplier == 1.0 else (lambda step: multiplier * lr(step))
    if opt.name == 'adamw':
      return optax.adamw(rate, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                         weight_decay=opt.weight_decay)
    # Defaults are optax's (and Lester et al.'s decay rate 0.8); prompt
    # tuning turns the parameter scaling off.
    return optax.adafactor(
        rate, weight_decay_rate=opt.weight_decay or None,
        decay_rate=opt.get('adafactor_decay_rate', 0.8),
        multiply_by_parameter_scale=opt.get('adafactor_parameter_scale',
                                            True))

  make_tx.schedule, make_tx.peak = lr, float(opt.lr)
  return make_tx


def optimizer(opt: Any, total_steps: int, method: peft_base.PeftMethod
              ) -> optax.GradientTransformation:
  """The optimizer over `method`'s adapter, shaped by the method."""
  return method.optimizer(factory(opt, total_steps))


def clip_norm(opt: Any) -> float:
  """The gradient clipping norm of the config (0: no clipping)."""
  if opt.clip_norm < 0:
    raise ValueError(f'optimizer.clip_norm={opt.clip_norm} must be >= 0 '
                     '(0 disables clipping).')
  return float(opt.clip_norm)
