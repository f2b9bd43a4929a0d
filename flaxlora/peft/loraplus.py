"""LoRA+ (Hayou et al. 2024): B trains with a larger learning rate than A.

    tx = loraplus.loraplus_optimizer(1e-4, ratio=16, weight_decay=0.01)
    opt_state = tx.init(adapter)

Every 'b' leaf of a LoRA entry gets `ratio` times the learning rate of all
other adapter leaves (A, DoRA magnitudes, `trainable` copies).
"""
from typing import Any, Callable

import optax

from flaxlora.peft import base as peft_base
from flaxlora.peft import lora

LABEL_B = 'lora_b'
LABEL_OTHER = 'other'


def labels(adapter: Any) -> Any:
  """A tree like `adapter` with LABEL_B at LoRA 'b' leaves, else LABEL_OTHER.
  """

  def label(tree):
    if isinstance(tree, (tuple, list)):
      return type(tree)(label(t) for t in tree)
    flat = peft_base.flatten(tree, is_leaf=lora.is_lora_node)
    out = {}
    for path, leaf in flat.items():
      if lora.is_lora_node(leaf):
        out[path] = {k: LABEL_B if k == 'b' else LABEL_OTHER for k in leaf}
      else:
        out[path] = LABEL_OTHER
    return peft_base.unflatten(out)

  return label(adapter)


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
  if not ratio > 0:
    raise ValueError(f'loraplus ratio must be > 0, got {ratio!r}.')
  transforms = {
      LABEL_OTHER: tx_factory(learning_rate=learning_rate, **tx_kwargs),
      LABEL_B: tx_factory(learning_rate=_scaled(learning_rate, ratio),
                          **tx_kwargs),
  }
  return optax.multi_transform(transforms, labels)

