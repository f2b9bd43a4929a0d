"""T5's layers: the feed-forward (`Mlp`), the pre-norm residual `Block`,
and the encoder or decoder `Stack` with its relative position bias and
attention masks (unpacked, packed and one cached decoding step).

The relative position bias is computed once per stack (its table lives in
`relpos_bias`) and shared by all blocks; as in the reference, attention
scores are not scaled by 1/sqrt(D). `t5.T5` puts two stacks around one
shared embedding. With `scan_layers` a stack's call (training, evaluation)
runs its blocks as one scan (`layer_scan`); init and the cached decoding
steps stay unrolled, over the same per-block params.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxlora.models import attention
from flaxlora.models import layer_scan
from flaxlora.models import layers
from flaxlora.models import remat as remat_lib
from flaxlora.models import t5_hf

Array = jax.Array
_NEG = float(np.finfo(np.float32).min)
BTH = ('batch', None, None)  # logical axes of [B, T, H] states


def relative_position_bucket(relative_position: Array, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> Array:
  """T5's bucket of `key_position - query_position` (int array, any shape).

  Half the buckets hold exact small distances, the rest log-spaced distances
  up to `max_distance`; bidirectional buckets split by sign first.
  """
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(buckets.dtype) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  # The float32 log, then truncation, reproduces the reference's buckets.
  safe = jnp.maximum(distance, 1).astype(jnp.float32)
  large = max_exact + (jnp.log(safe / max_exact) /
                       np.log(max_distance / max_exact) *
                       (num_buckets - max_exact)).astype(buckets.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, large)


def _init(std: float) -> layers.Initializer:
  return nn.initializers.normal(std)


class Mlp(nn.Module):
  """T5's feed-forward: ReLU (v1.0) or gated tanh-GELU (v1.1)."""
  config: t5_hf.T5Config
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    dense = lambda n, axes, std: layers.Dense(  # pylint: disable=g-long-lambda
        n, axes=axes, dtype=self.dtype, kernel_init=_init(std))
    if c.feed_forward_proj == 'gated-gelu':
      self.wi_0 = dense(c.d_ff, ('embed', 'mlp'), c.d_model**-0.5)
      self.wi_1 = dense(c.d_ff, ('embed', 'mlp'), c.d_model**-0.5)
    else:
      self.wi = dense(c.d_ff, ('embed', 'mlp'), c.d_model**-0.5)
    self.wo = dense(c.d_model, ('mlp', 'embed'), c.d_ff**-0.5)
    self.dropout = layers.Dropout(c.dropout_rate)

  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """[B, T, H] -> [B, T, H]."""
    if self.config.feed_forward_proj == 'gated-gelu':
      h = (layers.gelu(self.wi_0(x, deterministic), approximate=True) *
           self.wi_1(x, deterministic))
    else:
      h = jax.nn.relu(self.wi(x, deterministic))
    h = layers.constrain(h, ('batch', None, 'mlp'))  # [B, T, F]
    h = self.dropout(h, deterministic=deterministic)
    return self.wo(h, deterministic)


class Block(nn.Module):
  """Pre-norm residual block: self-attention, [cross-attention], MLP."""
  config: t5_hf.T5Config
  decoder: bool
  dtype: Any = jnp.float32
  attention_impl: str = 'reference'  # attention.IMPLEMENTATIONS

  def setup(self):
    c = self.config
    norm = lambda: layers.RMSNorm(c.layer_norm_epsilon, dtype=self.dtype)
    self.attention = attention.T5Attention(c, self.dtype, self.attention_impl)
    self.attention_norm = norm()
    if self.decoder:
      self.cross_attention = attention.T5Attention(c, self.dtype,
                                                   self.attention_impl)
      self.cross_attention_norm = norm()
    self.mlp = Mlp(c, self.dtype)
    self.mlp_norm = norm()
    self.dropout = layers.Dropout(c.dropout_rate)

  def _residual(self, x, y, deterministic):
    return x + self.dropout(y, deterministic=deterministic)

  def __call__(self, x, self_bias, encoded=None, cross_bias=None,
               deterministic=True, index=None, prefix=None):
    """x [B, T, H] -> [B, T, H]; with `index`, one cached step (T = 1).

    `prefix` [2, P, N*D]: self-attention keys/values before x's own.
    """
    h = self.attention_norm(x)
    if index is None:
      h = self.attention(h, h, self_bias, deterministic, prefix)
    else:
      h = self.attention.cached(h, self_bias, index, deterministic)
    x = self._residual(x, h, deterministic)
    if self.decoder:
      h = self.cross_attention_norm(x)
      if index is None:
        h = self.cross_attention(h, encoded, cross_bias, deterministic)
      else:
        h = self.cross_attention.cached(h, cross_bias, None, deterministic)
      x = self._residual(x, h, deterministic)
    h = self.mlp(self.mlp_norm(x), deterministic)
    return layers.constrain(self._residual(x, h, deterministic), BTH)


def _mask_bias(mask: Array) -> Array:
  """Boolean mask (True = attend) -> additive fp32 bias."""
  return jnp.where(mask, 0.0, _NEG).astype(jnp.float32)


class Stack(nn.Module):
  """The encoder (`decoder=False`) or decoder stack, sharing `embed`;
  `scan_layers`: `__call__` scans its blocks (see the module docstring)."""
  config: t5_hf.T5Config
  decoder: bool
  embed: nn.Module
  dtype: Any = jnp.float32
  remat: str = 'none'
  attention_impl: str = 'reference'
  scan_layers: bool = False

  def setup(self):
    c = self.config
    self.relpos_bias = layers.Embed(
        c.relative_attention_num_buckets, c.num_heads,
        axes=('relpos_buckets', 'relpos_heads'), dtype=jnp.float32,
        embedding_init=_init(c.d_model**-0.5))
    depth = c.num_decoder_layers if self.decoder else c.num_layers
    # `deterministic` (argument 5 of Block.__call__) is a Python bool.
    block = remat_lib.wrap(Block, self.remat, static_argnums=(5,))
    for i in range(depth):
      setattr(self, f'block_{i}', block(c, self.decoder, self.dtype,
                                        self.attention_impl))
    self.depth = depth
    self.final_norm = layers.RMSNorm(c.layer_norm_epsilon, dtype=self.dtype)
    self.dropout = layers.Dropout(c.dropout_rate)

  def _blocks(self):
    return [getattr(self, f'block_{i}') for i in range(self.depth)]

  def position_bias(self, query_pos: Array, key_pos: Array) -> Array:
    """[Tq], [Tk] positions -> [1, N, Tq, Tk] fp32 bias; [B, Tq], [B, Tk]
    (packed rows) -> [B, N, Tq, Tk]."""
    c = self.config
    buckets = relative_position_bucket(
        key_pos[..., None, :] - query_pos[..., :, None],
        bidirectional=not self.decoder,
        num_buckets=c.relative_attention_num_buckets,
        max_distance=c.relative_attention_max_distance)
    bias = jnp.moveaxis(self.relpos_bias(buckets), -1, -3)
    return bias if bias.ndim == 4 else bias[None]

  def __call__(self, ids, mask, encoded=None, encoder_mask=None,
               deterministic=True, prompt=None, prefix_kv=None,
               segments=None):
    """ids [B, T], mask [B, T] (1 = token) -> [B, T, H].

    The decoder also takes encoded [B, S, H] and encoder_mask [B, S].
    `prompt` [B, P, H] is prepended to the embedded ids (prompt tuning); the
    mask must then cover P + T positions. `prefix_kv` [depth, 2, P', N*D]:
    per block, self-attention keys/values of P' positions before the input
    (see `attention`): the input's positions start at P'. `segments`
    (packed rows, see `packing`): (segment ids [B, T], positions [B, T],
    the encoder's segment ids [B, S] for the decoder, else None).
    """
    x = self.embed(ids)
    if prompt is not None:
      x = jnp.concatenate([prompt.astype(x.dtype), x], axis=1)
    x = layers.constrain(self.dropout(x, deterministic=deterministic), BTH)
    if segments is not None:
      if prompt is not None or prefix_kv is not None:
        raise ValueError('packed rows (segment ids) with a soft prompt or '
                         'prefix: those read one example per row.')
      self_bias, cross_bias = self._packed_biases(mask, encoder_mask,
                                                  *segments)
    else:
      self_bias, cross_bias = self._biases(mask, encoder_mask, x.shape[1],
                                           attention.prefix_length(prefix_kv))
    if self.scan_layers and not self.is_initializing():
      x = layer_scan.blocks(
          self, Block(self.config, self.decoder, self.dtype,
                      self.attention_impl, parent=None),
          [f'block_{i}' for i in range(self.depth)], x,
          (self_bias, encoded, cross_bias), deterministic, prefix_kv)
    else:
      for i, block in enumerate(self._blocks()):
        x = block(x, self_bias, encoded, cross_bias, deterministic, None,
                  None if prefix_kv is None else prefix_kv[i])
    return self.dropout(self.final_norm(x), deterministic=deterministic)

  def _biases(self, mask, encoder_mask, length, num_prefix):
    """Self- and cross-attention biases of unpacked rows."""
    key_pos = jnp.arange(num_prefix + length)
    pos = key_pos[num_prefix:]
    keep = attention.key_mask(mask, num_prefix)[:, None, None, :].astype(bool)
    if self.decoder:
      keep = keep & (key_pos[None, :] <= pos[:, None])[None, None]
    self_bias = self.position_bias(pos, key_pos) + _mask_bias(keep)
    cross_bias = None
    if self.decoder:
      cross_bias = _mask_bias(encoder_mask[:, None, None, :].astype(bool))
    return self_bias, cross_bias

  def _packed_biases(self, mask, encoder_mask, segment_ids, positions,
                     encoder_segment_ids):
    """Biases of packed rows: attention within a segment only, relative
    positions from each segment's own `positions` [B, T]."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
    keep = same & mask[:, None, :].astype(bool)
    if self.decoder:
      t = segment_ids.shape[1]
      keep = keep & (jnp.arange(t)[None, :] <= jnp.arange(t)[:, None])
    self_bias = (self.position_bias(positions, positions) +
                 _mask_bias(keep[:, None]))
    cross_bias = None
    if self.decoder:
      cross = ((segment_ids[:, :, None] == encoder_segment_ids[:, None, :]) &
               encoder_mask[:, None, :].astype(bool))  # [B, T, S]
      cross_bias = _mask_bias(cross[:, None])
    return self_bias, cross_bias

  def init_cache(self, encoded: Array, max_length: int, prefix_kv=None):
    """Decoder caches; `prefix_kv` [depth, 2, P, N*D] fills positions 0..P-1
    of the self-attention buffers, and decoding continues at P."""
    for i, block in enumerate(self._blocks()):
      block.attention.init_cache(
          None, encoded.shape[0], max_length,
          None if prefix_kv is None else prefix_kv[i])
      block.cross_attention.init_cache(encoded, 0, 0)
    self.put_variable('cache', 'prefix_length',
                      jnp.int32(attention.prefix_length(prefix_kv)))

  def step(self, ids, index, encoder_mask, deterministic=True):
    """One decoder position: ids [B, 1] at `index` -> [B, 1, H]."""
    x = self.dropout(self.embed(ids), deterministic=deterministic)
    length = self.block_0.attention.get_variable('cache', 'key').shape[2]
    index = index + self.get_variable('cache', 'prefix_length')
    key_pos = jnp.arange(length)
    keep = (key_pos <= index)[None, None, None, :]
    self_bias = (self.position_bias(jnp.reshape(index, (1,)), key_pos) +
                 _mask_bias(keep))
    cross_bias = _mask_bias(encoder_mask[:, None, None, :].astype(bool))
    for block in self._blocks():
      x = block(x, self_bias, None, cross_bias, deterministic, index)
    return self.dropout(self.final_norm(x), deterministic=deterministic)
