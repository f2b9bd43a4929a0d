"""Fully trained copies of selected params ("modules to save") as a method.

    method = base.chain(lora.lora(targets='bert'),
                        trainable.trainable(r'classifier/.*'))

Chained after a method with a PEFT form, the copies are written as PEFT's
`modules_to_save`.
"""
import dataclasses
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp

from flaxlora.models import layers
from flaxlora.peft import base as peft_base


@dataclasses.dataclass(frozen=True)
class TrainableConfig:
  patterns: tuple[str, ...]


def trainable(patterns: str | Iterable[str]) -> peft_base.PeftMethod:
  """Fully trained copies of selected params ("modules to save").

  The adapter holds fp32 copies of the matched leaves (e.g. a classifier head
  or biases); `apply` swaps them in. Base params stay untouched.

  Args:
    patterns: regexes over "/"-joined param paths, e.g. r'classifier/.*'.
  """
  patterns = peft_base.as_patterns(patterns, 'trainable patterns')

  def init(rng, base):
    del rng  # copies, not fresh values
    paths = peft_base.select(base, patterns, what='trainable patterns')
    # A real copy: a donated adapter buffer must never alias the base.
    return peft_base.unflatten({
        p: jnp.array(peft_base.get(base, p), jnp.float32, copy=True)
        for p in paths})

  def apply(base, adapter):
    updates = peft_base.flatten(adapter)
    for path in updates:
      if layers.is_adapted_kernel(peft_base.get(base, path)):
        raise ValueError(
            f'trainable({list(patterns)}) would replace {path}, which an '
            'earlier chained method already adapted; exclude it from one of '
            'the two.')
    return peft_base.replace(base, updates), {}

  no_export = peft_base.Export(
      reason='trainable() copies alone are no PEFT adapter; chain them after '
      'lora or prompt_tuning')
  return peft_base.PeftMethod(init, apply, TrainableConfig(patterns),
                              export=no_export)


def with_copies(method: peft_base.PeftMethod, adapter: Any,
                copies: Mapping[str, Any]) -> tuple[peft_base.PeftMethod, Any]:
  """(method, adapter), chained with `trainable` copies when there are any
  (a PEFT folder's modules to save: {flax path: value})."""
  if not copies:
    return method, adapter
  method = peft_base.chain(method, trainable(
      [re.escape(path) for path in sorted(copies)]))
  return method, (adapter, jax.tree.map(jnp.asarray,
                                        peft_base.unflatten(copies)))
