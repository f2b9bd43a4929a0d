"""Flattening params and adapter trees into "/"-joined paths.

Every inspection table is keyed by the same path strings that PEFT methods
match their target regexes against (`encoder/block_0/attention/q/kernel`).
Flax boxed params (`nn.Partitioned`) are unboxed; an adapted kernel node
(`LoraKernel(w, a, b, scale)`) placed in the params by a PEFT method's
`apply` flattens into its array children (`.../kernel/w`, `.../kernel/a`).
"""
from typing import Any

import flax.linen as nn
import jax
import numpy as np


def key_name(key: Any) -> str:
  """The readable name of one jax tree path entry."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple[Any, ...]) -> str:
  return '/'.join(key_name(k) for k in path)


def _is_array_like(x: Any) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def flatten(tree: Any) -> dict[str, Any]:
  """{"a/b/c": leaf} in tree order; None leaves are dropped."""
  tree = nn.meta.unbox(tree)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(path): leaf for path, leaf in flat if leaf is not None}


def shape_dtype(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of an array, ShapeDtypeStruct or Python scalar."""
  if _is_array_like(leaf):
    return tuple(leaf.shape), np.dtype(leaf.dtype)
  value = np.asarray(leaf)
  return value.shape, value.dtype
