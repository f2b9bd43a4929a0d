"""LoRA+ (Hayou et al. 2024): B trains with a larger learning rate than A.

From a config, LoRA+ is the `loraplus_ratio` argument of `lora.lora` (and
`qlora.qlora`): the method's `optimizer` hook (`optimizer_hook`) gives the
run's optimizer a second copy at `ratio` x the learning rate for every B.
Outside a run:

    tx = loraplus.loraplus_optimizer(1e-4, ratio=16, weight_decay=0.01)
    opt_state = tx.init(adapter)

Every 'b' leaf of a LoRA entry gets `ratio` times the learning rate of all
other adapter leaves (A, DoRA magnitudes, `trainable` copies).
"""
from typing import Any, Callable, Mapping

import optax

from flaxlora.peft import base as peft_base

LABEL_B = 'lora_b'
LABEL_OTHER = 'other'


def _is_factors(node: Any) -> bool:
  return isinstance(node, Mapping) and 'a' in node and 'b' in node


def labels(adapter: Any) -> Any:
  """A tree like `adapter` with LABEL_B at LoRA 'b' leaves, else LABEL_OTHER.
  """
  if isinstance(adapter, (tuple, list)):
    return type(adapter)(labels(a) for a in adapter)
  out = {}
  for path, leaf in peft_base.flatten(adapter, is_leaf=_is_factors).items():
    if _is_factors(leaf):
      out[path] = {k: LABEL_B if k == 'b' else LABEL_OTHER for k in leaf}
    else:
      out[path] = LABEL_OTHER
  return peft_base.unflatten(out)


def by_factor(make_tx: peft_base.TxFactory,
              ratio: float) -> optax.GradientTransformation:
  """`make_tx(ratio)` for every B, `make_tx(1)` for the other leaves."""
  if not ratio > 0:
    raise ValueError(f'loraplus ratio must be > 0, got {ratio!r}.')
  return optax.multi_transform(
      {LABEL_OTHER: make_tx(1.0), LABEL_B: make_tx(ratio)}, labels)


def optimizer_hook(ratio: float) -> Callable[[peft_base.TxFactory], Any]:
  """A `PeftMethod.optimizer` hook: LoRA+ at `ratio`, plain at 1.0."""
  if ratio == 1.0:
    return peft_base.plain_optimizer
  return lambda make_tx: by_factor(make_tx, ratio)


def _scaled(learning_rate: float | optax.Schedule, ratio: float):
  if callable(learning_rate):
    return lambda step: ratio * learning_rate(step)
  return ratio * learning_rate


def loraplus_optimizer(learning_rate: float | optax.Schedule, *,
                       ratio: float = 16.0,
                       tx_factory: Callable[..., optax.GradientTransformation]
                       = optax.adamw,
                       **tx_kwargs) -> optax.GradientTransformation:
  """An optimizer for adapters that trains LoRA B `ratio` times faster.

  Args:
    learning_rate: A's learning rate: a float or an optax schedule.
    ratio: lr(B) / lr(A); the paper suggests 2**4.
    tx_factory: builds the inner optimizer as
      `tx_factory(learning_rate=..., **tx_kwargs)` (optax.adamw by default).
    **tx_kwargs: further arguments of `tx_factory` (weight_decay, b1, ...).

  Returns:
    An optax transformation over the adapter (`optax.multi_transform`).
  """
  def make_tx(multiplier):
    return tx_factory(learning_rate=_scaled(learning_rate, multiplier),
                      **tx_kwargs)
  return by_factor(make_tx, ratio)
