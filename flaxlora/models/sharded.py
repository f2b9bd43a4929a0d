"""Params straight into their shards: sharded init and checkpoint loading.

    model, params, config = sharded.load('google-t5/t5-small', mesh, rules)
    params, axes = sharded.init(model, rng, mesh, rules)

Neither ever holds a whole array on one device: `init` is shape-first
(`jax.eval_shape` -> shardings -> `jax.jit(init, out_shardings=...)`), and
`load` reads each device's slice of each tensor from the memory-mapped
safetensors files (on several hosts, each host reads only its own slices).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from flaxlora import distributed
from flaxlora import models
from flaxlora import sharding
from flaxlora.models import hf_io

Tree = Any


def init(model: Any, rng: jax.Array, mesh: Mesh,
                 rules: sharding.Rules, *init_args,
                 **init_kwargs) -> tuple[Tree, Tree]:
  """Initialises params directly into their shards, never whole on a device.

  Shape first: `jax.eval_shape` gives the param shapes and their logical
  axes, which give the shardings; then `jax.jit(init, out_shardings=...)`
  makes every device compute only its own slices.

  Args:
    model: a flaxlora model (its family's `init` and `logical_axes` are
      used), or any flax module whose params carry logical-axis boxes, then
      initialised as `model.init(rng, *init_args, **init_kwargs)`.
    rng: PRNG key.
    mesh: the device mesh.
    rules: logical -> mesh axes table.
    *init_args: init inputs (dummy batch arrays), for a plain flax module.
    **init_kwargs: more init keyword arguments, for a plain flax module.

  Returns:
    (params as unboxed sharded jax arrays, their logical axes).
  """
  family = None if init_args or init_kwargs else _family_or_none(model)
  if family is not None:
    init = functools.partial(family.init, model)
    axes = family.logical_axes(model)
  else:
    def init(r):
      out = model.init(r, *init_args, **init_kwargs)
      return nn.unbox(out['params'])
    axes = sharding.logical_axes(jax.eval_shape(
        lambda r: model.init(r, *init_args, **init_kwargs)['params'], rng))
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.named_shardings(abstract, axes, mesh, rules)
  return jax.jit(init, out_shardings=shardings)(rng), axes


def _family_or_none(model: Any) -> Any:
  try:
    return models.family_of_model(model)
  except TypeError:
    return None


class _Slicer:
  """A checkpoint tensor read lazily, one device slice at a time."""

  def __init__(self, array: np.ndarray):
    self.array = array  # a memory-mapped (possibly transposed) view
    self.shape = array.shape

  def __getitem__(self, index):
    return np.asarray(self.array[index], np.float32)


def load(path_or_hub_id: Any, mesh: Mesh, rules: sharding.Rules, *,
                 dtype: Any = np.float32, rng: jax.Array | None = None,
                 config_dict: dict[str, Any] | None = None,
                 **head_kwargs) -> tuple[Any, Tree, Any]:
  """Like `models.load`, but each device reads only its slice of each tensor.

  The safetensors files are memory-mapped; `jax.make_array_from_callback`
  asks for each addressable device's index, so no array is ever whole on
  one device (and, on several hosts, each host reads only its own slices).
  Parameters the checkpoint lacks (a new task head) are initialised
  sharded. `config_dict`: the checkpoint's config.json as `models.locate`
  read it, with `path_or_hub_id` the local folder or GGUF file it gave
  (`flaxlora.resolved`: neither is resolved or read again).

  Returns:
    (model, params as sharded global arrays, config).
  """
  folder, config_dict, tensors = models.read_checkpoint(path_or_hub_id,
                                                         config_dict)
  family = models.family_of(config_dict, models.config_source(folder))
  config = family.config_from_hf(config_dict)
  model = family.build(config, dtype=dtype, **head_kwargs)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  init = functools.partial(family.init, model)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding.named_shardings(
      abstract, family.logical_axes(model), mesh, rules)
  hf_rules = family.hf_rules(model, keys=set(tensors))
  # `to_flax` reads values from `expected` only for the optional params the
  # checkpoint lacks: those get small placeholders, the rest stays abstract.
  missing = [r.path for r in hf_rules if r.optional and r.key not in tensors]
  expected = _replace(abstract, missing,
                      lambda x, _: np.zeros(x.shape, np.float32))
  host, fresh = hf_io.to_flax(tensors, hf_rules, expected, source=str(folder),
                              ignore=family.HF_IGNORE)
  params = distributed.host_to_global(jax.tree.map(_Slicer, host), shardings)
  if fresh:
    pick = lambda tree: [_get(tree, path) for path in missing]
    values = jax.jit(lambda r: pick(init(r)),
                     out_shardings=pick(shardings))(rng)
    by_path = dict(zip(missing, values))
    params = _replace(params, missing, lambda _, path: by_path[path])
    print(f'flaxlora: newly initialised (not in {folder}): {fresh}')
  return model, params, config


def _get(tree: Tree, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _replace(tree: Tree, paths: list[tuple[str, ...]], fn) -> Tree:
  """A copy of nested dict `tree` with `fn(leaf, path)` at `paths`."""
  def one(key_path, leaf):
    path = tuple(k.key for k in key_path)
    return fn(leaf, path) if path in paths else leaf
  return jax.tree_util.tree_map_with_path(one, tree)
