"""Merging a LoRA-family adapter into dense kernels, and back.

    params = merge.merge(base, adapter, method)   # plain arrays, fp32
    base_again = merge.unmerge(params, adapter, method)

`merge` runs the method's `apply` and replaces every adapted kernel by its
dense fp32 equivalent W + scale A B (DoRA: m / ||W + scale A B||_col times
that), so any chain (LoRA + `trainable` copies) merges in one call.

Precision: the merge is done in fp32 with HIGHEST matmul precision. Merging
in bf16 instead (W, A, B cast to bf16, result rounded to bf16) keeps only
bf16's 8 significant bits: on a [64, 64] kernel with N(0, 0.02) entries, R = 8
factors with N(0, 0.1) entries and scale 2 (merged entries up to 0.28) the max
absolute error is 1.5e-3, 0.5% of the largest entry (median relative error
0.3%); `tests/test_lora.py` measures and bounds it. Merge in fp32 and cast
afterwards if a bf16 checkpoint is needed.
"""
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from flaxlora.peft import base as peft_base
from flaxlora.peft.lora import kernel as lora_kernel
from flaxlora.peft import method_parts


def _is_kernel(node: Any) -> bool:
  return isinstance(node, lora_kernel.LoraKernel)


def merge(base: Mapping[str, Any], adapter: Any,
          method: peft_base.PeftMethod) -> dict[str, Any]:
  """Params with every adapted kernel merged to a dense fp32 array.

  Args:
    base: the base params (PiSSA: original or `method.prepare_base`d).
    adapter: the trained adapter.
    method: the method that made it (any chain of LoRA/trainable).

  Returns:
    A params tree of plain arrays that the model runs without kwargs.
  """
  params, kwargs = method.apply(base, adapter)
  if kwargs:
    raise ValueError(f'merge: the method also passes model kwargs '
                     f'{sorted(kwargs)} (e.g. prompt tuning), which cannot '
                     'be merged into weights.')
  return jax.tree.map(lambda n: n.merged() if _is_kernel(n) else n, params,
                      is_leaf=_is_kernel)


def unmerge(merged: Mapping[str, Any], adapter: Any,
            method: peft_base.PeftMethod) -> dict[str, Any]:
  """Inverts `merge` for LoRA: W = merged - scale A B, in fp32.

  Fully trained copies (`trainable`) keep their trained values: the base
  value they replaced is not recoverable from the merged params.

  Raises:
    ValueError: for DoRA, whose merge rescales each column by m / ||W + sAB||;
      that factor cannot be recovered from the merged kernel alone (any
      rescaled column is an equally valid preimage). Keep the base params.
  """
  updates = {}
  for config, sub_adapter in method_parts.parts(method, adapter):
    if not isinstance(config, lora_kernel.LoraConfig):
      continue
    if config.use_dora:
      raise ValueError('unmerge cannot invert a DoRA merge (the per-column '
                       'norm of W is lost); keep the base params instead.')
    for path, node in lora_kernel.kernels(config, merged, sub_adapter).items():
      delta = node.scale * jnp.matmul(
          jnp.asarray(node.a, jnp.float32), jnp.asarray(node.b, jnp.float32),
          precision=jax.lax.Precision.HIGHEST)
      updates[path] = jnp.asarray(node.w, jnp.float32) - delta
  if not updates:
    return dict(merged)
  return peft_base.replace(merged, updates)
