"""T5 encoder-decoder (v1.0 and v1.1 / Flan) in Flax linen.

    model = t5.build(t5.T5Config(...), dtype=jnp.bfloat16)
    params = t5.init(model, jax.random.PRNGKey(0))
    logits = model.apply({'params': params}, input_ids, attention_mask,
                         decoder_input_ids)                     # [B, T, V]

Variants: v1.0 (ReLU FFN, output layer tied to `shared`, decoder output
scaled by d_model**-0.5) and v1.1 / Flan (gated-GELU FFN, untied `lm_head`, no
scaling). The encoder and decoder stacks, their blocks and relative position
bias are `t5_stack`'s.

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

from flaxlora.models import attention
from flaxlora.models import layers
from flaxlora.models import remat as remat_lib
from flaxlora.models import t5_hf
from flaxlora.models import t5_stack

Array = jax.Array
T5Config = t5_hf.T5Config  # the architecture; fields follow HF's T5Config


class T5(nn.Module):
  """T5 encoder-decoder with an LM head. See the module docstring.

  Attributes:
    config: the architecture.
    dtype: compute dtype.
    remat: rematerialisation of every block (`remat.POLICIES`).
    attention_impl: one of `attention.IMPLEMENTATIONS`.
    scan_layers: each stack's blocks as one scan (`layer_scan`) in
      `__call__`, `encode` and `decode`; the cached decoding steps stay
      unrolled.
  """
  config: T5Config
  dtype: Any = jnp.float32
  remat: str = 'none'
  attention_impl: str = 'reference'
  scan_layers: bool = False

  def setup(self):
    c = self.config
    self.shared = layers.Embed(c.vocab_size, c.d_model, dtype=self.dtype,
                               embedding_init=nn.initializers.normal(1.0))
    self.encoder = t5_stack.Stack(c, False, self.shared, self.dtype,
                                  self.remat, self.attention_impl,
                                  self.scan_layers)
    self.decoder = t5_stack.Stack(c, True, self.shared, self.dtype,
                                  self.remat, self.attention_impl,
                                  self.scan_layers)
    if not c.tie_word_embeddings:
      self.lm_head = layers.Dense(
          c.vocab_size, axes=('embed', 'vocab'), dtype=self.dtype,
          kernel_init=nn.initializers.normal(1.0))

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
    segments: packed rows (see `t5_stack.Stack.__call__`).
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
    self-attention buffers (see `t5_stack.Stack.init_cache`).

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
          remat: str = 'none', attention: str = 'reference',
          scan_layers: bool = False) -> T5:
  """A T5 module; `remat` is one of `remat.POLICIES`, `attention` of
  `attention.IMPLEMENTATIONS`, `scan_layers` scans each stack's blocks."""
  remat_lib.wrap(t5_stack.Block, remat)  # checks the name
  _check_attention(attention)
  return T5(config, dtype, remat, attention, bool(scan_layers))


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
