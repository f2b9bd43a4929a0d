"""Attention pieces shared by the models: heads, key/value prefixes, and
T5's attention module.

A *key/value prefix* is what prefix tuning (Li & Liang 2021) feeds a
self-attention layer: P extra keys and values [2, P, N*D] (in the joined
heads layout that the k/v projections produce), the same for every item of
the batch, placed before the layer's own keys and values. The models treat
a prefix like a cache of P earlier positions: every query attends to all P
of them (the key mask gets P ones in front) and the input's own positions
start at P (BERT's absolute position embeddings, T5's relative buckets),
which is how transformers runs a model given that many past key/values.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlora.models import layers

Array = jax.Array
# `model.attention`: the models' own softmax(q k^T + bias) v ('reference',
# the one with attention-probability dropout) or
# `jax.nn.dot_product_attention` with XLA's or cuDNN's kernel.
IMPLEMENTATIONS = ('reference', 'xla', 'cudnn')
# Logical axes of [B, N, T, D] heads and [B, N, T, S] attention scores.
BHTD = ('batch', 'heads', None, None)


def heads(x: Array, num_heads: int) -> Array:
  """[B, T, N*D] -> [B, N, T, D] (heads first: plain batched products)."""
  x = x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)
  return jnp.swapaxes(x, -2, -3)


def prepend_kv(k: Array, v: Array, prefix: Array | None, num_heads: int
               ) -> tuple[Array, Array]:
  """Keys and values with a prefix in front.

  Args:
    k: [B, N, S, D] keys.
    v: [B, N, S, D] values.
    prefix: [2, P, N*D] prefix keys and values, or None (no change).
    num_heads: N.

  Returns:
    k, v: each [B, N, P + S, D].
  """
  if prefix is None:
    return k, v

  def join(x, p):
    p = heads(p[None].astype(x.dtype), num_heads)  # [1, N, P, D]
    p = jnp.broadcast_to(p, (x.shape[0],) + p.shape[1:])
    return jnp.concatenate([p, x], axis=2)

  return join(k, prefix[0]), join(v, prefix[1])


def check_implementation(name: str) -> None:
  """Refuses an unknown `model.attention`, and 'cudnn' off GPUs."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention={name!r}: use one of '
                     f'{IMPLEMENTATIONS}.')
  if name == 'cudnn' and jax.default_backend() != 'gpu':
    raise ValueError("model.attention='cudnn' runs on NVIDIA GPUs only, "
                     f'not on {jax.default_backend()!r}; use \'xla\'.')


# What the causal families (llama, gpt2) run: their own attention, whole
# or a block of queries at a time (`causal.attend`).
CAUSAL_IMPLEMENTATIONS = ('reference', 'chunked')


def reference_only(name: str, family: str) -> None:
  """Refuses a fused `model.attention` for a causal family (it has none
  yet): only CAUSAL_IMPLEMENTATIONS."""
  if name not in CAUSAL_IMPLEMENTATIONS:
    raise ValueError(f'model.attention={name!r}: {family} runs its own '
                     f'attention only; use one of {CAUSAL_IMPLEMENTATIONS}.')


def fused(q: Array, k: Array, v: Array, *, bias: Array | None,
          mask: Array | None, scale: float, implementation: str,
          dropout_rate: float, deterministic: bool) -> Array:
  """softmax(scale q k^T + bias, masked) v by `jax.nn.dot_product_attention`.

  Args:
    q: [B, N, T, D] queries.
    k: [B, N, S, D] keys; v likewise (the dtype of q).
    bias: additive, broadcastable to [B, N, T, S], or None.
    mask: bool (True = attend), broadcastable to [B, N, T, S], or None.
    scale: multiplies q k^T.
    implementation: 'xla' or 'cudnn'.
    dropout_rate: the model's attention-probability dropout: refused when
      training with it (the fused kernels have none).
    deterministic: whether dropout is off.

  Returns:
    [B, N, T, D].
  """
  if dropout_rate > 0 and not deterministic:
    raise ValueError(f'model.attention={implementation!r} has no dropout on '
                     f'attention probabilities (rate {dropout_rate}); set '
                     "model.dropout=0 or model.attention='reference'.")
  swap = lambda x: jnp.swapaxes(x, 1, 2)  # [B, N, T, D] <-> [B, T, N, D]
  out = jax.nn.dot_product_attention(
      swap(q), swap(k.astype(q.dtype)), swap(v.astype(q.dtype)), bias=bias,
      mask=mask, scale=scale, implementation=implementation)
  return swap(out)


def prefix_length(prefix: Array | None) -> int:
  """P of a prefix [L, 2, P, N*D] (0 for None)."""
  return 0 if prefix is None else prefix.shape[-2]


def key_mask(mask: Array, num_prefix: int) -> Array:
  """A token mask [B, T] -> the key mask [B, P + T] (P ones in front)."""
  if not num_prefix:
    return mask
  mask = jnp.asarray(mask)
  ones = jnp.ones((mask.shape[0], num_prefix), mask.dtype)
  return jnp.concatenate([ones, mask], axis=1)


class T5Attention(nn.Module):
  """Multi-head attention without 1/sqrt(D) scaling (T5's convention).

  Bias tensors are additive fp32 [B or 1, N or 1, T, S] and carry both the
  relative position bias and the masks.
  """
  config: Any  # t5_hf.T5Config
  dtype: Any = jnp.float32
  implementation: str = 'reference'  # one of IMPLEMENTATIONS

  def setup(self):
    c = self.config
    inner, hidden = c.num_heads * c.d_kv, c.d_model
    dense = lambda n, axes, std: layers.Dense(  # pylint: disable=g-long-lambda
        n, axes=axes, dtype=self.dtype,
        kernel_init=nn.initializers.normal(std))
    self.q = dense(inner, ('embed', 'heads'), (hidden * c.d_kv)**-0.5)
    self.k = dense(inner, ('embed', 'heads'), hidden**-0.5)
    self.v = dense(inner, ('embed', 'heads'), hidden**-0.5)
    self.o = dense(hidden, ('heads', 'embed'), inner**-0.5)
    self.dropout = layers.Dropout(c.dropout_rate)

  def project_kv(self, source: Array, deterministic: bool = True):
    """[B, S, H] -> keys and values, each [B, N, S, D]."""
    n = self.config.num_heads
    return (heads(self.k(source, deterministic), n),
            heads(self.v(source, deterministic), n))

  def _attend(self, x, k, v, bias, deterministic):
    """x [B, T, H] attends over keys and values k, v [B, N, S, D]."""
    q = heads(self.q(x, deterministic), self.config.num_heads)  # [B,N,T,D]
    q = layers.constrain(q, BHTD)
    if self.implementation == 'reference':
      scores = layers.einsum('bntd,bnsd->bnts', q, k, dtype=self.dtype) + bias
      scores = layers.constrain(scores, BHTD)  # [B, N, T, S]
      probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
      probs = self.dropout(probs, deterministic=deterministic)
      out = layers.einsum('bnts,bnsd->bntd', probs, v,
                          dtype=self.dtype).astype(self.dtype)
    else:
      out = fused(q.astype(self.dtype), k, v, bias=bias, mask=None,
                  scale=1.0, implementation=self.implementation,
                  dropout_rate=self.config.dropout_rate,
                  deterministic=deterministic)
    out = jnp.swapaxes(out, 1, 2)
    out = out.reshape(*out.shape[:2], -1)  # [B, T, N*D]
    return self.o(layers.constrain(out, ('batch', None, 'heads')),
                  deterministic)

  def __call__(self, x: Array, source: Array, bias: Array,
               deterministic: bool = True, prefix: Array | None = None
               ) -> Array:
    """x [B, T, H] attends over source [B, S, H] -> [B, T, H].

    `prefix` [2, P, N*D] puts P keys/values before the source's; `bias`
    then covers P + S keys.
    """
    k, v = self.project_kv(source, deterministic)
    k, v = prepend_kv(k, v, prefix, self.config.num_heads)
    return self._attend(x, k, v, bias, deterministic)

  def init_cache(self, source: Array | None, batch: int, length: int,
                 prefix: Array | None = None):
    """Cross-attention: keys/values of `source`; self-attention: buffers of
    P + `length` positions, the prefix [2, P, N*D] (if any) in front."""
    c = self.config
    if source is not None:
      k, v = self.project_kv(source)
    else:
      k = v = jnp.zeros((batch, c.num_heads, length, c.d_kv), self.dtype)
      k, v = prepend_kv(k, v, prefix, c.num_heads)
    self.put_variable('cache', 'key', k)
    self.put_variable('cache', 'value', v)

  def cached(self, x: Array, bias: Array, index: Array | None,
             deterministic: bool = True) -> Array:
    """Attention over cached keys/values; `index` writes x's own first.

    Args:
      x: [B, 1, H] the current position.
      bias: [B or 1, N or 1, 1, L] (self) or [B, 1, 1, S] (cross).
      index: the buffer position x's keys/values go to (prefix included);
        None for cross-attention, whose cache is read only.
      deterministic: disables dropout.
    """
    k = self.get_variable('cache', 'key')
    v = self.get_variable('cache', 'value')
    if index is not None:
      k_new, v_new = self.project_kv(x, deterministic)
      start = (0, 0, index, 0)
      k = jax.lax.dynamic_update_slice(k, k_new.astype(k.dtype), start)
      v = jax.lax.dynamic_update_slice(v, v_new.astype(v.dtype), start)
      self.put_variable('cache', 'key', k)
      self.put_variable('cache', 'value', v)
    return self._attend(x, k, v, bias, deterministic)
