"""A Llama-shaped causal LM: Llama 2/3, Mistral, Qwen2, SmolLM2.

    model = llama.build(llama.LlamaConfig(...), dtype=jnp.bfloat16)
    params = llama.init(model, jax.random.PRNGKey(0))
    logits = model.apply({'params': params}, input_ids, attention_mask)
    cache = llama.init_cache(model, batch, max_length)
    logits, cache = model.apply({'params': params}, ids, mask, cache=cache)

Pre-norm blocks of RMSNorm, grouped-query self-attention with rotary
position embeddings (RoPE, optionally Llama 3 scaled) and a SwiGLU MLP;
an output layer tied to the embedding or not; optional q/k/v biases
(Qwen2). Every dense op is a `layers.Dense`, so every PEFT method applies.
Masks, positions, packing and the cache are `causal`'s (see there).

The param tree follows Hugging Face's module names:

  embed_tokens/embedding [V, H]; norm/scale; lm_head/kernel [H, V] (untied)
  layers_{i}/input_layernorm, post_attention_layernorm
  layers_{i}/self_attn/{q_proj [H, N*D], k_proj, v_proj [H, K*D],
    o_proj [N*D, H]}, layers_{i}/mlp/{gate_proj, up_proj [H, F],
    down_proj [F, H]}

`LlamaConfig` and the Hugging Face names live in `llama_hf`; this module
re-exports them so that `llama` is the family module of `flaxlora.models`.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlora.models import causal
from flaxlora.models import causal_stack
from flaxlora.models import layers
from flaxlora.models import llama_hf

Array = jax.Array
LlamaConfig = llama_hf.LlamaConfig


def rope_tables(config: LlamaConfig, positions: Array) -> tuple[Array,
                                                                 Array]:
  """positions [B, T] -> cos, sin [B, 1, T, D] (fp32)."""
  freqs = positions.astype(jnp.float32)[..., None] * config.inv_freq()
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, None]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates x [B, N, T, D] by its positions' angles (HF's half layout)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype))


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE."""
  config: LlamaConfig
  dtype: Any = jnp.float32
  attention: str = 'reference'  # attention.CAUSAL_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x, rope, keep, deterministic=True, prefix=None,
               buffers=None, index=None):
    """x [B, T, H] -> ([B, T, H], new buffers or None).

    rope: (cos, sin) [B, 1, T, D]; keep [B, 1, T, S]; prefix [2, P, K*D]
    (no cache); buffers: this layer's cache, written at `index`.
    """
    c = self.config
    n, k, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    qkv_bias = c.qkv_bias or c.attention_bias

    def dense(features, axes, bias, name):
      return layers.Dense(features, axes, use_bias=bias, dtype=self.dtype,
                          name=name)

    q = dense(n * d, ('embed', 'heads'), qkv_bias, 'q_proj')(x, deterministic)
    kx = dense(k * d, ('embed', 'kv_heads'), qkv_bias, 'k_proj')(
        x, deterministic)
    v = dense(k * d, ('embed', 'kv_heads'), qkv_bias, 'v_proj')(
        x, deterministic)
    q = apply_rope(causal.split_heads(q, n), *rope)  # [B, N, T, D]
    kx = apply_rope(causal.split_heads(kx, k), *rope)  # [B, K, T, D]
    kx, v, buffers = causal.keys_values(kx, causal.split_heads(v, k), prefix,
                                        buffers, index)
    out = causal.attend(q, kx, v, keep, dtype=self.dtype,
                        dropout=layers.Dropout(c.attention_dropout),
                        deterministic=deterministic,
                        chunked=self.attention == 'chunked')
    out = dense(c.hidden_size, ('heads', 'embed'), c.attention_bias,
                'o_proj')(causal.merge_heads(out), deterministic)
    return out, buffers


class Mlp(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    c = self.config
    dense = lambda n, axes, name: layers.Dense(  # pylint: disable=g-long-lambda
        n, axes, use_bias=c.mlp_bias, dtype=self.dtype, name=name)
    h = (jax.nn.silu(dense(c.intermediate_size, ('embed', 'mlp'),
                           'gate_proj')(x, deterministic)) *
         dense(c.intermediate_size, ('embed', 'mlp'), 'up_proj')(
             x, deterministic))
    return dense(c.hidden_size, ('mlp', 'embed'), 'down_proj')(
        h, deterministic)


class Block(nn.Module):
  """x + attn(norm(x)), then x + mlp(norm(x))."""
  config: LlamaConfig
  dtype: Any = jnp.float32
  attention: str = 'reference'

  @nn.compact
  def __call__(self, x, rope, keep, deterministic=True, prefix=None,
               buffers=None, index=None):
    c = self.config
    norm = lambda name: layers.RMSNorm(c.rms_norm_eps, self.dtype, name=name)
    h, buffers = Attention(c, self.dtype, self.attention,
                           name='self_attn')(
        norm('input_layernorm')(x), rope, keep, deterministic, prefix,
        buffers, index)
    x = x + h
    x = x + Mlp(c, self.dtype, name='mlp')(
        norm('post_attention_layernorm')(x), deterministic)
    return x, buffers


class Llama(nn.Module):
  """The causal LM; see the module docstring and `causal`. `remat`: one of
  `remat.POLICIES`, on every block; `scan_layers`: see
  `causal_stack.blocks`."""
  config: LlamaConfig
  dtype: Any = jnp.float32
  remat: str = 'none'
  attention: str = 'reference'  # attention.CAUSAL_IMPLEMENTATIONS
  scan_layers: bool = False

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               positions: Array | None = None,
               segment_ids: Array | None = None, deterministic: bool = True,
               cache: causal.Cache | None = None, prompt: Array | None = None,
               prefix_kv: Array | None = None, head: bool = True):
    """Logits [B, T, V] (in `dtype`) for input_ids [B, T].

    Args:
      input_ids: [B, T] token ids.
      attention_mask: [B, T], 1 for tokens, 0 for padding (None: all 1).
      positions: [B, T] (None: cumsum(mask) - 1, after the cache's real
        slots or a prefix's P).
      segment_ids: [B, T] packed rows: attention stays within a segment.
      deterministic: False enables dropout (rngs={'dropout': ...}).
      cache: a `causal` cache; then returns (logits, new cache).
      prompt: soft prompt [P, H] or [B, P, H] before the tokens (prompt
        tuning); the logits leave out its P positions.
      prefix_kv: [L, 2, P, K*D] keys/values before the tokens in every
        layer (prefix tuning); with a cache, put them in the cache instead
        (`init_cache`).
      head: False: the final hidden states [B, T, H] instead (no cache), for
        `causal.output_logits` by chunks (the loss's `model.loss_chunk`).
    """
    c = self.config
    embed = layers.Embed(c.vocab_size, c.hidden_size, ('vocab', 'embed'),
                         self.dtype, nn.initializers.normal(0.02),
                         name='embed_tokens')
    inp = causal.inputs(embed(input_ids), input_ids, attention_mask,
                        positions, segment_ids, cache, prompt, prefix_kv,
                        c.sliding_window)
    rope = rope_tables(c, inp.positions)
    x, new_layers = causal_stack.blocks(
        self, Block, [f'layers_{i}' for i in range(c.num_hidden_layers)],
        inp.x, (rope, inp.keep), deterministic, cache, prefix_kv)
    x = layers.RMSNorm(c.rms_norm_eps, self.dtype, name='norm')(x)
    x = x[:, inp.num_prompt:]
    if not head and cache is None:
      return x
    logits = (embed.attend(x) if c.tie_word_embeddings else
              _lm_head(c, self.dtype)(x, deterministic))
    logits = layers.constrain(logits, ('batch', None, 'vocab'))
    if cache is None:
      return logits
    return logits, causal.next_cache(cache, inp, new_layers)


def _lm_head(c: LlamaConfig, dtype: Any) -> layers.Dense:
  """The untied output layer (a submodule of the caller)."""
  return layers.Dense(c.vocab_size, ('embed', 'vocab'), dtype=dtype,
                      name='lm_head')


class Head(nn.Module):
  """`Llama`'s output layer alone, over the same params (the tied
  embedding or lm_head): hidden states [..., H] -> logits [..., V]."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    c = self.config
    if c.tie_word_embeddings:
      return layers.Embed(c.vocab_size, c.hidden_size, ('vocab', 'embed'),
                          self.dtype, name='embed_tokens').attend(x)
    return _lm_head(c, self.dtype)(x, deterministic)


Llama.HEAD = Head


def build(config: LlamaConfig, *, dtype: Any = jnp.float32,
          remat: str = 'none', attention: str = 'reference',
          scan_layers: bool = False) -> Llama:
  """A Llama module; see `causal.build`."""
  return causal.build(Llama, Block, 'llama', config, dtype, remat, attention,
                      scan_layers)


# Fresh fp32 params, and their logical axes: shared by the causal families.
init = causal.init_params
logical_axes = causal.param_axes


def init_cache(model: Llama, batch: int, max_length: int,
               prefix_kv: Array | None = None) -> causal.Cache:
  """An empty cache of `max_length` slots (see `causal.empty_cache`)."""
  c = model.config
  return causal.empty_cache(
      batch, max_length, num_layers=c.num_hidden_layers,
      kv_heads=c.num_key_value_heads, head_dim=c.head_dim, dtype=model.dtype,
      prefix_kv=prefix_kv)


MODULE = Llama
MODEL_TYPES = llama_hf.MODEL_TYPES

HF_IGNORE = llama_hf.HF_IGNORE
config_from_hf = llama_hf.config_from_hf
config_to_hf = llama_hf.config_to_hf
hf_class_missing = lambda model: ''  # every config is a transformers model
hf_rules = llama_hf.hf_rules
