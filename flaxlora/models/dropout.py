"""Inverted dropout with a mask from a counter-based hash, cheap on CPU.

    y = dropout.dropout(x, 0.1, rng)    # or layers.Dropout(0.1) in a model

The models' `layers.Dropout` and the adapters' own dropout (LoRA's on the
low-rank branch) both draw their masks here.
"""
import jax
import jax.numpy as jnp

Array = jax.Array


def _hash(x: Array) -> Array:
  """A 32-bit integer mixer (lowbias32: xor-shift-multiply), elementwise."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def dropout(x: Array, rate: float, rng: Array) -> Array:
  """Inverted dropout whose mask comes from a cheap counter-based hash.

  Why not `jax.random.bernoulli`: 32 threefry bits per element cost ~20x
  more on CPU than everything else dropout does. One jax.random draw seeds
  two rounds of an integer hash of the element index; each 32-bit hash
  gives two 16-bit uniforms, so the rate is within 2**-16 of `rate` (the
  division below keeps the layer unbiased). Statistically fine for dropout
  masks; not a general-purpose random number generator.

  Args:
    x: any shape.
    rate: probability of zeroing an element, in [0, 1).
    rng: a jax.random key.

  Returns:
    x with elements zeroed at `rate`, the rest scaled by 1 / (1 - rate').
  """
  seed = jax.random.bits(rng, (2,), jnp.uint32)
  words = (x.size + 1) // 2
  h = _hash(_hash(jax.lax.iota(jnp.uint32, words) + seed[0]) ^ seed[1])
  halves = jax.lax.bitcast_convert_type(h, jnp.uint16).reshape(-1)
  threshold = round(rate * 65536)
  keep = (halves[:x.size] >= threshold).reshape(x.shape)
  keep_prob = 1.0 - threshold / 65536
  return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype),
                   jnp.zeros((), x.dtype))
