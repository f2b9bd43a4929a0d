"""The loop over a causal LM's blocks (`llama`, `gpt2`): unrolled, each
block with its key/value prefix or its cache buffers, or one scan over the
stacked blocks (`model.scan_layers`, `layer_scan`) for a call without a
cache.

    x, new_layers = causal_stack.blocks(
        self, Block, [f'layers_{i}' for i in range(n)], x, (rope, keep),
        deterministic, cache, prefix_kv)
"""
from typing import Any, Sequence

from flax import linen as nn
import jax

from flaxlora.models import layer_scan
from flaxlora.models import layers
from flaxlora.models import remat as remat_lib

Array = jax.Array
Cache = dict[str, Any]  # `causal.empty_cache`'s
BTH = ('batch', None, None)  # logical axes of [B, T, H] states


def layer_args(i: int, cache: Cache | None, prefix_kv: Array | None
               ) -> tuple[Array | None, dict[str, Array] | None,
                          Array | None]:
  """Layer i's (prefix [2, P, K*D], cache buffers, cache index), each None
  when absent."""
  if cache is None:
    return None if prefix_kv is None else prefix_kv[i], None, None
  return None, cache['layers'][i], cache['index']


def blocks(module: nn.Module, block: type[nn.Module], names: Sequence[str],
           x: Array, args: tuple[Any, ...], deterministic: bool,
           cache: Cache | None, prefix_kv: Array | None
           ) -> tuple[Array, list[Any]]:
  """x [B, T, H] through the blocks `names` of causal LM `module` -> (x,
  each layer's new cache buffers or None): `block(config, dtype,
  attention)` called as (x, *args, deterministic, prefix, buffers, index),
  returning (x, buffers), under `module.remat`; one scan (`layer_scan`)
  with `module.scan_layers`, except at init and with a cache."""
  c, dtype, attention = module.config, module.dtype, module.attention
  if module.scan_layers and cache is None and not module.is_initializing():
    x = layer_scan.blocks(
        module, block(c, dtype, attention, parent=None), names, x, args,
        deterministic, prefix_kv,
        output=lambda y: layers.constrain(y[0], BTH))
    return x, [None] * len(names)
  # `deterministic` follows x and args: a Python bool, so static.
  wrapped = remat_lib.wrap(block, module.remat,
                           static_argnums=(len(args) + 2,))
  new_layers = []
  for i, name in enumerate(names):
    x, buffers = wrapped(c, dtype, attention, name=name)(
        x, *args, deterministic, *layer_args(i, cache, prefix_kv))
    x = layers.constrain(x, BTH)
    new_layers.append(buffers)
  return x, new_layers
