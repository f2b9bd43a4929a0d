"""A stack of identical blocks run as one `jax.lax.scan` (`model.scan_layers`).

    # inside a stack module's call, after init:
    x = layer_scan.blocks(self, Block(config, parent=None), names, x,
                          (mask,), deterministic, prefix_kv)

An unrolled stack puts every block's program into the step: the compile
time and the compiler's host memory grow with the depth. A scan traces one
block and loops it over the layers (MaxText's and t5x's `scan_layers`), so
the program holds one block whatever the depth, and under FSDP the loop
body gathers one layer's kernels at a time.

The params keep their per-layer layout (`block_0`, ..., `block_{L-1}`): the
scan stacks the layers' subtrees leaf by leaf at apply time, [L, ...] per
leaf, adapted kernels (LoRA's `LoraKernel`, NF4, ...) included, and the loop
body rebuilds one layer's tree from its slices. Checkpoints, Hugging Face
I/O and PEFT methods see the same params as without the scan; the cost is
one stacked copy of the layers' params inside the step. Every layer must
have the same structure, leaf shapes and dtypes (`stack` names the first
difference). Init, and the cached decoding paths, stay unrolled.
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlora.models import remat as remat_lib

Array = jax.Array
# (layer params, x [B, T, H], the layer's slice of `per_layer`, rngs) -> x.
Layer = Callable[[Any, Array, Any, dict[str, Array]], Array]


def layer_params(module: nn.Module, names: Sequence[str]) -> list[Any]:
  """The params subtrees of `module`'s submodules `names` (bound module,
  not initialising: the params come from `apply`)."""
  params = module.variables.get('params', {})
  missing = [n for n in names if n not in params]
  if missing:
    where = '/'.join(module.path) or 'the model'
    raise ValueError(f'model.scan_layers: {where} has no params for '
                     f'{missing[:3]}; pass the full params to apply.')
  return [params[n] for n in names]


def dropout_rng(module: nn.Module, deterministic: bool) -> Array | None:
  """The stack's dropout key for `run` (None when deterministic or the
  call has no 'dropout' rng)."""
  if deterministic or not module.has_rng('dropout'):
    return None
  return module.make_rng('dropout')


def paths(module: nn.Module, names: Sequence[str]) -> list[str]:
  """The submodules' "/"-joined param paths, for errors."""
  return ['/'.join((*module.path, name)) for name in names]


def _key(entry: Any) -> str:
  """A tree path entry's name: a dict key, an attribute or an index."""
  for field in ('key', 'name', 'idx'):
    if hasattr(entry, field):
      return str(getattr(entry, field))
  return str(entry)


def _leaves(tree: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{"/"-joined leaf path: (shape, dtype)} of a params tree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(map(_key, keys)): (tuple(jnp.shape(x)), jnp.result_type(x))
          for keys, x in flat}


def _difference(first: Any, other: Any) -> str:
  """How `other`'s params tree differs from `first`'s, in a few words."""
  a, b = _leaves(first), _leaves(other)
  missing, extra = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
  changed = [path for path in a if path in b and a[path] != b[path]]
  if missing:
    return f'{missing[0]} is missing'
  if extra:
    return f'{extra[0]} is extra'
  if changed:
    (sa, da), (sb, db) = a[changed[0]], b[changed[0]]
    return f'{changed[0]} is {list(sb)} {db}, not {list(sa)} {da}'
  return ('a static field of an adapted kernel differs, e.g. a LoRA scale '
          'set by alpha_pattern')


def stack(trees: Sequence[Any], names: Sequence[str]
          ) -> tuple[Any, list[Array]]:
  """(the layers' common treedef, its leaves stacked: [L, ...] each).

  Raises:
    ValueError: a layer's tree differs from the first's (a PEFT
      rank_pattern, or targets that pick some layers only), naming it.
  """
  first, treedef = jax.tree.flatten(trees[0])
  columns = [[x] for x in first]
  for name, tree in zip(names[1:], trees[1:]):
    leaves, other = jax.tree.flatten(tree)
    same = other == treedef and all(
        jnp.shape(x) == jnp.shape(c[0]) and
        jnp.result_type(x) == jnp.result_type(c[0])
        for x, c in zip(leaves, columns))
    if not same:
      raise ValueError(
          f'model.scan_layers: the params of {name} differ from those of '
          f'{names[0]} ({_difference(trees[0], tree)}), and a scan needs '
          'identical layers: set model.scan_layers=False, or give every '
          'layer the same PEFT targets and rank.')
    for column, x in zip(columns, leaves):
      column.append(x)
  return treedef, [jnp.stack(column) for column in columns]


def run(layer: Layer, x: Array, trees: Sequence[Any], names: Sequence[str],
        per_layer: Any = None, *, remat: str = 'none',
        rng: Array | None = None) -> Array:
  """x [B, T, H] through every layer in turn, as one scan.

  Args:
    layer: applies one layer (a block's functional `apply`): see `Layer`.
    x: the first layer's input; every layer returns its shape and dtype.
    trees: the layers' params subtrees, in order (`layer_params`).
    names: their names, for errors.
    per_layer: a pytree of [L, ...] arrays whose slice i goes to layer i
      (a prefix tuning `prefix_kv`), or None.
    remat: the policy (`remat.POLICIES`) of the loop body, as `model.remat`
      gives each unrolled block.
    rng: the stack's dropout key, split into one per layer; None when
      deterministic.
  """
  treedef, stacked = stack(trees, names)
  keys = None if rng is None else jax.random.split(rng, len(trees))

  def body(x, xs):
    leaves, extra, key = xs
    rngs = {} if key is None else {'dropout': key}
    return layer(jax.tree.unflatten(treedef, leaves), x, extra, rngs), None

  body = remat_lib.checkpoint(body, remat)
  return jax.lax.scan(body, x, (stacked, per_layer, keys))[0]


def blocks(module: nn.Module, cell: nn.Module, names: Sequence[str],
           x: Array, args: tuple[Any, ...], deterministic: bool,
           prefix_kv: Array | None = None,
           output: Callable[[Any], Array] = lambda y: y) -> Array:
  """x [B, T, H] through `module`'s blocks `names` as one scan (`run`).

  Args:
    module: the bound stack module (after init: its params hold `names`);
      its `remat` policy rematerialises the loop body.
    cell: the block module, unbound (`parent=None`): block i is
      `cell(x, *args, deterministic, prefix=prefix_kv[i])` over its params.
    names: the blocks' submodule names, in order.
    x, args, deterministic: the blocks' inputs (args: the same for each).
    prefix_kv: [L, 2, P, ...] per-layer prefix keys/values, or None.
    output: the next x from what a block returns (e.g. a pair's first).
  """

  def one(params, x, prefix, rngs):
    return output(cell.apply({'params': params}, x, *args, deterministic,
                             prefix=prefix, rngs=rngs))

  return run(one, x, layer_params(module, names), paths(module, names),
             prefix_kv, remat=module.remat,
             rng=dropout_rng(module, deterministic))
