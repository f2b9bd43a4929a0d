"""T5 encoder-decoder (v1.0 and v1.1 / Flan) in Flax linen.

    model = t5.build(t5.T5Config(...), dtype=jnp.bfloat16)
    params = t5.init(model, jax.random.PRNGKey(0))
    logits = model.apply({'params': params}, input_ids, attention_mask,
                         decoder_input_ids)                     # [B, T, V]

Variants: v1.0 (ReLU FFN, output layer tied to `shared`, decoder output
scaled by d_model**-0.5) and v1.1 / Flan (gated-GELU FFN, untied `lm_head`, no
scaling). As in the reference, attention scores are not scaled by 1/sqrt(D)
and the relative position bias is computed once per stack (its table lives in
`relpos_bias`) and shared by all blocks.

Incremental decoding uses the flax 'cache' collection:

    cache = model.apply({'params': p}, encoded, max_length,
                        method='init_cache', mutable=['cache'])[1]['cache']
    logits, v = model.apply({'params': p, 'cache': cache}, ids, index,
                            attention_mask, method='decode_step',
                            mutable=['cache'])

`init_cache` computes the cross-attention keys/values once (at
decoder/block_i/cross_attention/{key,value}, [B, N, S, D]) and zero
self-attention buffers (decoder/block_i/attention/{key,value}, [B, N, L, D]),
and for a tied output layer the table transposed (output_table, [H, V]);
each `decode_step` writes position `index` of the self-attention buffers.
With a decoder key/value prefix (`prefix_kv`, prefix tuning) the buffers
hold P + L positions, the prefix first, and step `index` writes P + index.
`flaxlora.models.decoding` drives this inside one jitted loop.

`T5Config` and the Hugging Face config/checkpoint names live in `t5_hf`; this
module re-exports them so that `t5` is the family module of
`flaxlora.models`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxlora.models import attention
from flaxlora.models import layers
from flaxlora.models import remat as remat_lib
from flaxlora.models import t5_hf

Array = jax.Array
T5Config = t5_hf.T5Config  # the architecture; fields follow HF's T5Config
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
  config: T5Config
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
  config: T5Config
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
  """The encoder (`decoder=False`) or decoder stack, sharing `embed`."""
  config: T5Config
  decoder: bool
  embed: nn.Module
  dtype: Any = jnp.float32
  remat: str = 'none'
  attention_impl: str = 'reference'

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


class T5(nn.Module):
  """T5 encoder-decoder with an LM head. See the module docstring.

  Attributes:
    config: the architecture.
    dtype: compute dtype.
    remat: rematerialisation of every block (`remat.POLICIES`).
    attention_impl: one of `attention.IMPLEMENTATIONS`.
  """
  config: T5Config
  dtype: Any = jnp.float32
  remat: str = 'none'
  attention_impl: str = 'reference'

  def setup(self):
    c = self.config
    self.shared = layers.Embed(c.vocab_size, c.d_model, dtype=self.dtype,
                               embedding_init=_init(1.0))
    self.encoder = Stack(c, False, self.shared, self.dtype, self.remat,
                         self.attention_impl)
    self.decoder = Stack(c, True, self.shared, self.dtype, self.remat,
                         self.attention_impl)
    if not c.tie_word_embeddings:
      self.lm_head = layers.Dense(c.vocab_size, axes=('embed', 'vocab'),
                                  dtype=self.dtype, kernel_init=_init(1.0))

  def __call__(self, input_ids, attention_mask, decoder_input_ids,
               decoder_attention_mask=None, deterministic=True, prompt=None,
               prefix_kv=None, packing=None):
    """-> logits [B, T, V] for source ids [B, S] and decoder ids [B, T].

    prompt: a soft prompt for the encoder (see `encode`).
    prefix_kv: {'encoder': [L, 2, P, N*D], 'decoder': [L', 2, P', N*D]},
      either optional: per block, self-attention keys/values of P earlier
      positions (prefix tuning; see `flaxlora.models.attention`).
    packing: packed rows (`flaxlora.models.seq2seq_packing.pack`):
      {'encoder_segment_ids', 'encoder_positions' [B, S],
      'decoder_segment_ids', 'decoder_positions' [B, T]}; no attention
      crosses a segment and relative positions restart in each.
    """
    enc_seg = dec_seg = None
    if packing is not None:
      enc_seg = (packing['encoder_segment_ids'],
                 packing['encoder_positions'], None)
      dec_seg = (packing['decoder_segment_ids'],
                 packing['decoder_positions'],
                 packing['encoder_segment_ids'])
    encoded = self.encode(input_ids, attention_mask, deterministic, prompt,
                          prefix_kv, enc_seg)
    return self.decode(decoder_input_ids, encoded,
                       source_mask(attention_mask, prompt),
                       decoder_attention_mask, deterministic, prefix_kv,
                       dec_seg)

  def encode(self, input_ids, attention_mask, deterministic=True,
             prompt=None, prefix_kv=None, segments=None):
    """[B, S] ids and mask -> [B, S, H] (or [B, P + S, H] with a prompt).

    prompt: optional soft prompt [P, H] or [B, P, H] prepended to the
      embedded source (prompt tuning); pair it with `source_mask`.
    prefix_kv: reads its 'encoder' entry, if any (see `__call__`).
    """
    if prompt is not None:
      prompt = jnp.broadcast_to(prompt, (input_ids.shape[0],) +
                                prompt.shape[-2:])
    return self.encoder(input_ids, source_mask(attention_mask, prompt),
                        deterministic=deterministic, prompt=prompt,
                        prefix_kv=(prefix_kv or {}).get('encoder'),
                        segments=segments)

  def decode(self, decoder_input_ids, encoded, attention_mask,
             decoder_attention_mask=None, deterministic=True, prefix_kv=None,
             segments=None):
    """ids [B, T], encoded [B, S, H], source mask [B, S] -> [B, T, V].

    prefix_kv: reads its 'decoder' entry, if any (see `__call__`).
    segments: packed rows (see `Stack.__call__`).
    """
    if decoder_attention_mask is None:
      decoder_attention_mask = jnp.ones_like(decoder_input_ids)
    x = self.decoder(decoder_input_ids, decoder_attention_mask, encoded,
                     attention_mask, deterministic,
                     prefix_kv=(prefix_kv or {}).get('decoder'),
                     segments=segments)
    return self.logits(x)

  def logits(self, x: Array) -> Array:
    """Final decoder states [B, T, H] -> [B, T, V]."""
    if self.config.scale_decoder_outputs:
      x = x * self.config.d_model**-0.5
    if self.config.tie_word_embeddings:
      if self.has_variable('cache', 'output_table'):  # decoding
        table = self.get_variable('cache', 'output_table')
        return layers.dot(x, table, dtype=self.dtype)
      logits = self.shared.attend(x)
    else:
      logits = self.lm_head(x)
    return layers.constrain(logits, ('batch', None, 'vocab'))

  def init_cache(self, encoded: Array, max_length: int, prefix_kv=None):
    """Fills the 'cache' collection (call with mutable=['cache']).

    prefix_kv: its 'decoder' entry, if any, is put in front of the
    self-attention buffers (see `Stack.init_cache`).

    A tied output layer also gets its table transposed once, [H, V] in the
    compute dtype at 'output_table': each decode step multiplies a few rows
    by the whole table, and XLA:CPU runs that product ~1.4x faster with the
    vocabulary minor (measured on [8, 512] x 32128). Inside the decode loop
    XLA would fold a transpose back into the product, so it is made here.
    """
    self.decoder.init_cache(encoded, max_length,
                            (prefix_kv or {}).get('decoder'))
    if self.config.tie_word_embeddings:
      table = jnp.transpose(self.shared.embedding).astype(self.dtype)
      self.put_variable('cache', 'output_table', table)

  def decode_step(self, ids, index, attention_mask, deterministic=True):
    """ids [B, 1] at decoder position `index` -> logits [B, 1, V]."""
    x = self.decoder.step(ids, index, attention_mask, deterministic)
    return self.logits(x)


def source_mask(attention_mask: Array, prompt: Array | None) -> Array:
  """The encoder mask [B, S] extended by P ones when a prompt is prepended."""
  if prompt is None:
    return attention_mask
  attention_mask = jnp.asarray(attention_mask)
  ones = jnp.ones((attention_mask.shape[0], prompt.shape[-2]),
                  attention_mask.dtype)
  return jnp.concatenate([ones, attention_mask], axis=1)


_check_attention = attention.check_implementation


def build(config: T5Config, *, dtype: Any = jnp.float32,
          remat: str = 'none', attention: str = 'reference') -> T5:
  """A T5 module; `remat` is one of `remat.POLICIES`, `attention` of
  `attention.IMPLEMENTATIONS`."""
  remat_lib.wrap(Block, remat)  # checks the name
  _check_attention(attention)
  return T5(config, dtype, remat, attention)


def _dummy_inputs():
  ids = jnp.ones((1, 1), jnp.int32)
  return ids, ids, ids


def init(model: T5, rng: Array) -> dict[str, Any]:
  """Fresh fp32 params (plain arrays) for `model`."""
  variables = jax.jit(model.init)(rng, *_dummy_inputs())
  return nn.meta.unbox(variables['params'])


def logical_axes(model: T5) -> dict[str, Any]:
  """The params tree with a `PartitionSpec` of logical axis names per leaf."""
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            *_dummy_inputs())
  return nn.get_partition_spec(abstract)['params']


MODULE = T5
MODEL_TYPES = ('t5',)

HF_IGNORE = t5_hf.HF_IGNORE
config_from_hf = t5_hf.config_from_hf
config_to_hf = t5_hf.config_to_hf
hf_class_missing = lambda model: ''  # every flaxlora T5 is a transformers one
hf_rules = t5_hf.hf_rules
