"""Pieces shared by the causal (decoder-only) language models, `llama` and
`gpt2`: positions, the attention mask, the key/value cache and attention over
grouped key/value heads; what a call does around its blocks (`inputs`: the
soft prompt, positions and mask; `next_cache`; the loop over the blocks is
`causal_stack`'s) and `build`, so that a family writes only its blocks.

A causal LM is called as

    logits = model.apply({'params': p}, input_ids, attention_mask)  # [B,T,V]
    logits, cache = model.apply({'params': p}, ids, mask, cache=cache)

`attention_mask` [B, T] is 1 for tokens and 0 for padding (left padding
allowed); positions default to `cumsum(mask) - 1`, so a left-padded row
numbers its first token 0. `segment_ids` [B, T] packs several examples in a
row: a token attends only to earlier tokens of its own segment (give
`positions` that restart at each segment too).

The cache (`empty_cache`) is a dict of plain arrays, one buffer per key/value
head (grouped query heads read the same buffer):

    {'index': int32 [] (the next slot), 'mask': int32 [B, S] (1: a real key),
     'layers': ({'key': [B, K, S, D], 'value': [B, K, S, D]}, ...)}

A call with a cache writes its T tokens at slots index..index+T-1 and
attends over every real slot up to its own; the next call continues. A
key/value prefix (prefix tuning) fills slots 0..P-1 when the cache is made.
"""
from typing import Any, NamedTuple, Sequence

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxlora.models import attention as attention_lib
from flaxlora.models import layers
from flaxlora.models import remat as remat_lib

Array = jax.Array
Cache = dict[str, Any]
_NEG = float(np.finfo(np.float32).min)


def default_mask(input_ids: Array, attention_mask: Array | None) -> Array:
  """The mask [B, T] as int32 (all ones when None)."""
  if attention_mask is None:
    return jnp.ones(input_ids.shape, jnp.int32)
  return jnp.asarray(attention_mask).astype(jnp.int32)


def default_positions(mask: Array, offset: Array | int = 0) -> Array:
  """[B, T] positions: `offset` [B] or scalar + cumsum(mask) - 1, >= 0.

  Pads take position 0 (what transformers' generate gives them).
  """
  pos = jnp.cumsum(mask, axis=-1) - 1 + jnp.reshape(offset, (-1, 1))
  return jnp.where(mask > 0, pos, 0).astype(jnp.int32)


def token_positions(mask: Array, positions: Array | None,
                    segment_ids: Array | None, cache: Cache | None,
                    num_prompt: int, num_prefix: int) -> Array:
  """The positions [B, P + T] of a soft prompt's P slots and the tokens.

  Args:
    mask: [B, P + T] (`prepend_prompt`'s).
    positions: [B, T] the caller's, or None: after the cache's real slots
      or a prefix's `num_prefix`, counting only real tokens
      (`default_positions`).
    segment_ids: [B, T] packed rows, or None.
    cache: the decoding cache, or None.
    num_prompt: P, the soft prompt's length (0 without one): its slots take
      positions 0..P-1 ahead of the caller's.
    num_prefix: the prefix's length (0 without one).

  Raises:
    ValueError: packed rows with a soft prompt.
  """
  if segment_ids is not None and num_prompt:
    raise ValueError('segment_ids (packed rows) with a soft prompt: '
                     'prompt tuning reads one example per row.')
  if positions is None:
    offset = (num_prefix if cache is None else
              jnp.sum(cache['mask'], axis=1))
    return default_positions(mask, offset)
  if not num_prompt:
    return positions
  batch = mask.shape[0]
  return jnp.concatenate(
      [jnp.broadcast_to(jnp.arange(num_prompt), (batch, num_prompt)),
       positions + num_prompt], axis=1)


def empty_cache(batch: int, max_length: int, *, num_layers: int,
                kv_heads: int, head_dim: int, dtype: Any = jnp.float32,
                prefix_kv: Array | None = None) -> Cache:
  """A cache of `max_length` slots per row (see the module docstring).

  Args:
    batch: B.
    max_length: S, slots for every token the cache will see (prompt and
      generated tokens; a prefix's P slots are added).
    num_layers: L.
    kv_heads: K, key/value heads.
    head_dim: D.
    dtype: of the key/value buffers.
    prefix_kv: [L, 2, P, K*D] keys/values in front (prefix tuning) or None.
  """
  p = 0 if prefix_kv is None else prefix_kv.shape[-2]
  shape = (batch, kv_heads, p + max_length, head_dim)
  buffers = []
  for i in range(num_layers):
    k = jnp.zeros(shape, dtype)
    v = jnp.zeros(shape, dtype)
    if p:
      fill = lambda x: jnp.broadcast_to(  # [P, K*D] -> [B, K, P, D]
          split_heads(x[None].astype(dtype), kv_heads), (batch,) +
          shape[1:2] + (p, head_dim))
      k = k.at[:, :, :p].set(fill(prefix_kv[i, 0]))
      v = v.at[:, :, :p].set(fill(prefix_kv[i, 1]))
    buffers.append({'key': k, 'value': v})
  mask = jnp.zeros((batch, p + max_length), jnp.int32).at[:, :p].set(1)
  return {'index': jnp.int32(p), 'mask': mask, 'layers': tuple(buffers)}


def split_heads(x: Array, num_heads: int) -> Array:
  """[B, T, N*D] -> [B, N, T, D]."""
  x = x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)
  return jnp.swapaxes(x, -2, -3)


def merge_heads(x: Array) -> Array:
  """[B, N, T, D] -> [B, T, N*D]."""
  x = jnp.swapaxes(x, 1, 2)
  return x.reshape(*x.shape[:2], -1)


def keep_mask(mask: Array, positions: Array, segment_ids: Array | None,
              cache: Cache | None, num_prefix: int = 0,
              sliding_window: int | None = None) -> tuple[Array, Array]:
  """Which keys each query may attend to, and the key mask for the cache.

  Args:
    mask: [B, T] this call's token mask.
    positions: [B, T] this call's positions.
    segment_ids: [B, T] or None (no cache then).
    cache: None (keys are this call's T tokens, after `num_prefix` prefix
      keys) or the cache the call writes to (keys are its S slots).
    num_prefix: P, prefix keys before the tokens (no cache).
    sliding_window: W: a query sees keys less than W positions back.

  Returns:
    (keep [B, 1, T, S] bool, key mask [B, S] int32: the cache's new mask).
  """
  b, t = mask.shape
  if cache is None:
    key_mask = jnp.concatenate([jnp.ones((b, num_prefix), jnp.int32), mask],
                               axis=1)
    slot = jnp.arange(num_prefix + t) - num_prefix  # prefix slots < 0
    query_slot = jnp.arange(t)
    key_pos = jnp.concatenate([jnp.full((b, num_prefix), -1, jnp.int32),
                               positions], axis=1)
  else:
    if segment_ids is not None:
      raise ValueError('segment_ids (packed rows) with a cache: decode one '
                       'example per row instead.')
    index = cache['index']
    key_mask = jax.lax.dynamic_update_slice(cache['mask'], mask, (0, index))
    slot = jnp.arange(key_mask.shape[1])
    query_slot = index + jnp.arange(t)
    key_pos = None
  keep = (slot[None, :] <= query_slot[:, None])[None]  # [1, T, S]
  keep = keep & key_mask[:, None, :].astype(bool)
  if segment_ids is not None:
    seg = jnp.concatenate([jnp.full((b, num_prefix), -1, segment_ids.dtype),
                           segment_ids], axis=1) if num_prefix else segment_ids
    same = segment_ids[:, :, None] == seg[:, None, :]
    keep = keep & (same | (slot < 0)[None, None, :])
  if sliding_window is not None:
    if key_pos is None:  # slots of a cache: one position per slot
      key_pos = jnp.cumsum(key_mask, axis=1) - 1
    keep = keep & (positions[:, :, None] - key_pos[:, None, :] <
                   sliding_window)
  return keep[:, None], key_mask


def write_cache(buffers: dict[str, Array], index: Array, k: Array,
                v: Array) -> dict[str, Array]:
  """Writes k, v [B, K, T, D] at slot `index` of one layer's buffers."""
  start = (0, 0, index, 0)
  return {
      'key': jax.lax.dynamic_update_slice(buffers['key'],
                                          k.astype(buffers['key'].dtype),
                                          start),
      'value': jax.lax.dynamic_update_slice(buffers['value'],
                                            v.astype(buffers['value'].dtype),
                                            start)}


def keys_values(k: Array, v: Array, prefix: Array | None,
                buffers: dict[str, Array] | None, index: Array | None
                ) -> tuple[Array, Array, dict[str, Array] | None]:
  """The keys and values a layer attends over, and its new cache buffers.

  Args:
    k, v: [B, K, T, D] this call's keys (positions applied) and values.
    prefix: [2, P, K*D] this layer's prefix keys/values (no cache), or None.
    buffers: this layer's cache (then `prefix` is in it), or None.
    index: the cache slot of the first of the T tokens.

  Returns:
    (keys, values [B, K, S, D], new buffers or None): the cache's S slots,
    else the prefix's P and the T tokens.
  """
  if buffers is not None:
    buffers = write_cache(buffers, index, k, v)
    return buffers['key'], buffers['value'], buffers
  if prefix is not None:
    b, heads, _, d = v.shape
    widen = lambda y: jnp.broadcast_to(  # [P, K*D] -> [B, K, P, D]
        split_heads(y[None].astype(v.dtype), heads),
        (b, heads, y.shape[0], d))
    k = jnp.concatenate([widen(prefix[0]), k], axis=2)
    v = jnp.concatenate([widen(prefix[1]), v], axis=2)
  return k, v, None


# Query positions per block of `attend(..., chunked=True)`.
QUERY_BLOCK = 256


def attend(q: Array, k: Array, v: Array, keep: Array, *, dtype: Any,
           dropout: Any, deterministic: bool, chunked: bool = False
           ) -> Array:
  """Scaled dot-product attention with K key/value heads for N query heads.

  Args:
    q: [B, N, T, D] queries (not yet scaled).
    k: [B, K, S, D] keys; N is a multiple of K, query head n reads key
      head n // (N / K) (grouped-query attention; K = N is multi-head).
    v: [B, K, S, D] values.
    keep: [B, 1, T, S] bool, True where a query may attend.
    dtype: compute dtype.
    dropout: a `layers.Dropout` for the attention probabilities.
    deterministic: disables dropout.
    chunked: `QUERY_BLOCK` queries at a time, in a scan whose steps are
      rematerialised: the scores [B, N, T, S] and their gradient never live
      at once, only one block's (`model.attention='chunked'`); the same
      values. Needs no attention dropout (rate 0 or deterministic).

  Returns:
    [B, N, T, D] in `dtype`.
  """
  b, n, t, d = q.shape
  groups = n // k.shape[1]
  q = q.reshape(b, k.shape[1], groups, t, d)  # [B, K, G, T, D]
  q = q * jnp.asarray(d**-0.5, q.dtype)

  def block(q, keep):
    scores = layers.einsum('bkgtd,bksd->bkgts', q, k, dtype=dtype)
    scores = jnp.where(keep[:, :, None], scores, _NEG)  # [B, K, G, T, S]
    return jax.nn.softmax(scores, axis=-1).astype(dtype)

  if not chunked or t <= QUERY_BLOCK:
    probs = dropout(block(q, keep), deterministic=deterministic)
    out = layers.einsum('bkgts,bksd->bkgtd', probs, v, dtype=dtype)
    return out.astype(dtype).reshape(b, n, t, d)
  if dropout.rate and not deterministic:
    raise ValueError("model.attention='chunked' has no attention dropout: "
                     'set model.dropout=0 or use the reference attention.')
  blocks = -(-t // QUERY_BLOCK)
  pad = blocks * QUERY_BLOCK - t
  q = jnp.pad(q, ((0, 0),) * 3 + ((0, pad), (0, 0)))
  keep = jnp.pad(keep, ((0, 0), (0, 0), (0, pad), (0, 0)))
  qs = jnp.moveaxis(q.reshape(q.shape[:3] + (blocks, QUERY_BLOCK, d)), 3, 0)
  keeps = jnp.moveaxis(keep.reshape(b, 1, blocks, QUERY_BLOCK, -1), 2, 0)

  @jax.checkpoint
  def one(q, keep):
    return layers.einsum('bkgts,bksd->bkgtd', block(q, keep), v,
                         dtype=dtype).astype(dtype)

  _, out = jax.lax.scan(lambda _, x: (None, one(*x)), None, (qs, keeps))
  out = jnp.moveaxis(out, 0, 3).reshape(q.shape)[:, :, :, :t]
  return out.reshape(b, n, t, d)


def prepend_prompt(x: Array, mask: Array, prompt: Array | None
                   ) -> tuple[Array, Array]:
  """Embeddings x [B, T, H] and mask [B, T] with a soft prompt [P, H] or
  [B, P, H] in front -> [B, P + T, H], [B, P + T]."""
  if prompt is None:
    return x, mask
  prompt = jnp.broadcast_to(prompt, x.shape[:1] + prompt.shape[-2:])
  ones = jnp.ones(prompt.shape[:2], mask.dtype)
  return (jnp.concatenate([prompt.astype(x.dtype), x], axis=1),
          jnp.concatenate([ones, mask], axis=1))


class Inputs(NamedTuple):
  """What every layer of a causal LM call reads (see `inputs`).

  Attributes:
    x: [B, P + T, H] token embeddings after a soft prompt's P.
    num_prompt: P (0 without a soft prompt).
    positions: [B, P + T].
    keep: [B, 1, P + T, S] which keys each query may attend to.
    key_mask: [B, S] the cache's new mask (S: its slots, or the prefix's
      and the tokens').
  """
  x: Array
  num_prompt: int
  positions: Array
  keep: Array
  key_mask: Array


def inputs(embeddings: Array, input_ids: Array, attention_mask: Array | None,
           positions: Array | None, segment_ids: Array | None,
           cache: Cache | None, prompt: Array | None,
           prefix_kv: Array | None, sliding_window: int | None = None
           ) -> Inputs:
  """A causal LM call's embeddings [B, T, H] and arguments (see
  `llama.Llama.__call__`) -> `Inputs`: the soft prompt in front, the
  positions and the attention mask."""
  if prefix_kv is not None and cache is not None:
    raise ValueError('prefix_kv with a cache: pass it to init_cache.')
  mask = default_mask(input_ids, attention_mask)
  x, mask = prepend_prompt(embeddings, mask, prompt)
  num_prompt = x.shape[1] - input_ids.shape[1]
  num_prefix = 0 if prefix_kv is None else prefix_kv.shape[-2]
  positions = token_positions(mask, positions, segment_ids, cache,
                              num_prompt, num_prefix)
  keep, key_mask = keep_mask(mask, positions, segment_ids, cache, num_prefix,
                             sliding_window)
  return Inputs(x, num_prompt, positions, keep, key_mask)


def next_cache(cache: Cache, inp: Inputs,
               new_layers: Sequence[dict[str, Array]]) -> Cache:
  """The cache after a call that wrote `inp.x`'s P + T positions."""
  return {'index': cache['index'] + inp.x.shape[1], 'mask': inp.key_mask,
          'layers': tuple(new_layers)}


def build(module: type[nn.Module], block: type[nn.Module], family: str,
          config: Any, dtype: Any, remat: str, attention: str,
          scan_layers: bool = False) -> nn.Module:
  """`module(config, dtype, remat, attention, scan_layers)` once `remat`
  (one of `remat.POLICIES`, on every `block`) and `attention` (one of
  `attention.CAUSAL_IMPLEMENTATIONS`; 'chunked': `attend` a block of
  queries at a time; the fused kernels are T5's and BERT's so far) are
  checked; `scan_layers`: see `causal_stack.blocks`."""
  remat_lib.wrap(block, remat)  # checks the name
  attention_lib.reference_only(attention, family)
  return module(config, dtype, remat, attention, bool(scan_layers))


def _boxed_init(model: Any, rng: jax.Array) -> Any:
  return model.init(rng, jnp.ones((1, 1), jnp.int32))['params']


def init_params(model: Any, rng: jax.Array) -> dict[str, Any]:
  """Fresh fp32 params (plain arrays) of a causal LM module."""
  return nn.unbox(jax.jit(lambda r: _boxed_init(model, r))(rng))


def param_axes(model: Any) -> Any:
  """The params tree with a PartitionSpec of logical names per leaf."""
  return nn.get_partition_spec(
      jax.eval_shape(lambda r: _boxed_init(model, r),
                     jax.random.PRNGKey(0)))


def output_logits(model: Any, params: Any, x: Array,
                  rng: jax.Array | None = None) -> Array:
  """The output layer of causal LM `model` (its `HEAD` module, over the
  same params) on hidden states x [..., H] (`model.apply(..., head=False)`)
  -> logits [..., V] in the model's dtype, constrained like the model's own
  (batch, and vocab by the rules). `rng`: dropout of an adapted output
  kernel (None: deterministic)."""
  head = model.HEAD(model.config, model.dtype)
  if rng is None:
    logits = head.apply({'params': params}, x)
  else:
    logits = head.apply({'params': params}, x, False,
                        rngs={'dropout': rng})
  return layers.constrain(logits, ('batch',) + (None,) * (x.ndim - 2) +
                          ('vocab',))
