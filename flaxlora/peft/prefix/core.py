"""Prefix tuning's construction (Li & Liang 2021), in PEFT's layout.

    method = prefix.prefix_tuning(num_tokens=20, projection=True)
    adapter = method.init(rng, base)
    params, kw = method.apply(base, adapter)  # kw == {'prefix_kv': ...}
    logits = model.apply({'params': params}, *inputs, **kw)

The trained prefix is P key/value vectors for every self-attention layer,
the models' one optional argument `prefix_kv` (see
`flaxlora.models.attention`: every token attends to them, and the input's
positions start at P). Hugging Face PEFT 0.21's PREFIX_TUNING stores them as
one table [P, 2 * L * W] (W = N * D, per position: layer 0's keys, layer 0's
values, layer 1's keys, ...), and so does this adapter ('prefix'). With
`projection` (PEFT's prefix_projection) the table is instead the output of
a two-layer MLP over P trained embeddings, tanh(E W1 + b1) W2 + b2, as Li &
Liang reparameterise it for stable training; the export writes the table
the MLP computes, which is all that inference needs.

Where the layers go, as PEFT passes them as `past_key_values`:
  * BERT: layer i reads keys 2i and values 2i + 1 of the table.
  * T5: transformers' T5 encoder takes no past key/values, so only the
    decoder's self-attention is prefixed (PEFT documents this); PEFT splits
    the table twice over the decoder, which gives decoder block i keys
    (4i mod 2L) and values (4i + 1 mod 2L) (L = 2: both blocks read entries
    0 and 1). flaxlora follows this exactly, so adapters move both ways;
    table entries no block reads get no gradient. Generation works with the
    key/value cache: the prefix fills its first P positions.
  * Llama-shaped and GPT-2 causal LMs: layer i reads keys 2i and values
    2i + 1, as BERT. With grouped-query attention the keys are K key/value
    heads wide (W = K * D, PEFT's token_dim for these models, with
    num_attention_heads = K): one prefix per key/value head, read by its
    group of query heads. The prefix keys carry no rotary position (they
    stand in the cache as they are), the tokens take positions P.. after
    them, and decoding puts them in the cache's first P slots.
"""
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec


INITS = ('random', 'zero')


class Layout(NamedTuple):
  """What a prefix needs to know of a model, read off its params.

  Attributes:
    family: 't5', 'bert' or 'causal' (Llama-shaped, GPT-2).
    num_layers: L, PEFT's num_layers (T5: encoder blocks, which must equal
      the decoder's).
    width: W = K * D, the joined width of one layer's keys (K key/value
      heads: N but for grouped-query attention).
  """
  family: str
  num_layers: int
  width: int


def _count(node: Any, name: str) -> int:
  return sum(1 for key in node if key.startswith(name + '_'))


def layout(base: Any) -> Layout:
  """The `Layout` of T5, BERT, Llama or GPT-2 params (arrays or
  abstract)."""
  if 'decoder' in base and 'encoder' in base and 'block_0' in base['encoder']:
    layers_, decoder = _count(base['encoder'], 'block'), _count(
        base['decoder'], 'block')
    if decoder != layers_:
      raise ValueError(
          f'prefix_tuning: this T5 has {layers_} encoder and {decoder} '
          'decoder blocks; PEFT sizes the prefix by num_layers (the encoder) '
          'and feeds it to the decoder, so both counts must match.')
    kernel = base['encoder']['block_0']['attention']['k']['kernel']
    return Layout('t5', layers_, int(kernel.shape[1]))
  if 'encoder' in base and 'layer_0' in base['encoder']:
    kernel = base['encoder']['layer_0']['attention']['key']['kernel']
    return Layout('bert', _count(base['encoder'], 'layer'),
                  int(kernel.shape[1]))
  if 'layers_0' in base:  # Llama-shaped: keys [H, K*D]
    kernel = base['layers_0']['self_attn']['k_proj']['kernel']
    return Layout('causal', _count(base, 'layers'), int(kernel.shape[1]))
  if 'h_0' in base:  # GPT-2: fused q | k | v [H, 3H]
    kernel = base['h_0']['attn']['c_attn']['kernel']
    return Layout('causal', _count(base, 'h'), int(kernel.shape[1]) // 3)
  raise ValueError('prefix_tuning needs T5, BERT, Llama or GPT-2 params '
                   '(encoder/block_i, encoder/layer_i, layers_i or h_i); got '
                   f'top-level keys {sorted(base)[:8]}.')


def prefix_kv(table: jax.Array, lay: Layout) -> Any:
  """PEFT's table [P, 2 * L * W] -> the model argument `prefix_kv`.

  Returns:
    BERT, causal LMs: [L, 2, P, W]; T5: {'decoder': [L, 2, P, W]} (see the
    module docstring for which entries each T5 decoder block reads).
  """
  p, l, w = table.shape[0], lay.num_layers, lay.width
  kv = jnp.swapaxes(table.reshape(p, 2 * l, w), 0, 1)  # [2L, P, W]
  if lay.family in ('bert', 'causal'):
    return kv.reshape(l, 2, p, w)
  rows = np.array([[(4 * i) % (2 * l), (4 * i + 1) % (2 * l)]
                   for i in range(l)])
  return {'decoder': kv[rows]}  # [L, 2, P, W]


@dataclasses.dataclass(frozen=True)
class PrefixConfig:
  """Prefix tuning hyperparameters (PEFT's names in parentheses).

  Attributes:
    num_tokens: P (num_virtual_tokens).
    projection: train through the MLP (prefix_projection).
    hidden: the MLP's hidden size (encoder_hidden_size); 0: W.
    init: 'random' (PEFT's default: N(0, 1) table or embeddings, torch's
      Linear init for the MLP) or 'zero' (a zero table, or a zero last MLP
      layer: init_weights='zero').
  """
  num_tokens: int = 20
  projection: bool = False
  hidden: int = 0
  init: str = 'random'


def table(config: PrefixConfig, adapter: dict[str, Any]) -> jax.Array:
  """The prefix table [P, 2 * L * W] an adapter stands for (fp32)."""
  if not config.projection:
    return adapter['prefix']
  dot = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  h = jnp.tanh(dot(adapter['embedding'], adapter['w1']) + adapter['b1'])
  return dot(h, adapter['w2']) + adapter['b2']


def _linear(rng, fan_in, shape, zero):
  """torch.nn.Linear's default init, U(-1/sqrt(in), 1/sqrt(in)), or zeros."""
  if zero:
    return jnp.zeros(shape, jnp.float32)
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def _init(config: PrefixConfig, rng: jax.Array, lay: Layout
          ) -> dict[str, jax.Array]:
  p, w = config.num_tokens, lay.width
  flat = 2 * lay.num_layers * w
  zero = config.init == 'zero'
  keys = jax.random.split(rng, 5)
  if not config.projection:
    if zero:
      return {'prefix': jnp.zeros((p, flat), jnp.float32)}
    return {'prefix': jax.random.normal(keys[0], (p, flat), jnp.float32)}
  e = config.hidden or w
  return {'embedding': jax.random.normal(keys[0], (p, w), jnp.float32),
          'w1': _linear(keys[1], w, (w, e), False),
          'b1': _linear(keys[2], w, (e,), False),
          'w2': _linear(keys[3], e, (e, flat), zero),
          'b2': _linear(keys[4], e, (flat,), zero)}


def make_config(num_tokens: int = 20, projection: bool = False,
                hidden: int = 0, init: str = 'random') -> PrefixConfig:
  """Validates arguments into a `PrefixConfig`; see `prefix.prefix_tuning`."""
  if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or (
      num_tokens < 1):
    raise ValueError(f'prefix_tuning num_tokens={num_tokens!r}; it must be '
                     'an int >= 1.')
  if init not in INITS:
    raise ValueError(f'prefix_tuning init={init!r}; choose one of {INITS}.')
  if not isinstance(hidden, int) or hidden < 0:
    raise ValueError(f'prefix_tuning hidden={hidden!r}; it must be an int '
                     '>= 0 (0: the key width).')
  return PrefixConfig(num_tokens, bool(projection), hidden, init)


def init(config: PrefixConfig, rng: jax.Array, base: Any
         ) -> dict[str, jax.Array]:
  """The adapter of `config` for the model whose params are `base`."""
  return _init(config, rng, layout(base))


def apply(config: PrefixConfig, base: Any, adapter: dict[str, Any]
          ) -> dict[str, Any]:
  """The model kwargs: {'prefix_kv': ...} for the layers of `base`."""
  return {'prefix_kv': prefix_kv(table(config, adapter), layout(base))}


def adapter_logical_axes(base_axes: Any, adapter: dict[str, Any]
                         ) -> dict[str, PartitionSpec]:
  """Small and read by every device: replicated."""
  del base_axes
  out = {}
  for name, value in adapter.items():
    first = 'prompt' if name in ('prefix', 'embedding') else None
    out[name] = PartitionSpec(first, *(None,) * (value.ndim - 1))
  return out
