"""DoRA's weight decomposition (Liu et al. 2024), as PEFT computes it.

A DoRA layer with base kernel W [in, out], LoRA factors A [in, R], B [R, out],
scale s and magnitude m [out] computes

    y = m / ||W + s A B||_col * (x W + s (x A) B)

where ||.||_col is the L2 norm over the input dimension for each output unit
(PEFT's `weight_norm` over dim 1 of its [out, in] weight). Following PEFT
(and section 4.3 of the paper) the norm is treated as a constant: no gradient
flows through it.

The norm is computed from the factors without forming W + s A B:
  ||W_j + s (AB)_j||^2 = ||W_j||^2 + 2 s <A^T W, B>_j + s^2 <(A^T A) B, B>_j.
"""
import jax
import jax.numpy as jnp

Array = jax.Array


def column_norm(w: Array, a: Array, b: Array, scale: float) -> Array:
  """||W + s A B|| over the input dim, in fp32, without the dense sum.

  Args:
    w: [in, out] base kernel.
    a: [in, R].
    b: [R, out].
    scale: s.

  Returns:
    [out] norms, with stopped gradient (PEFT detaches them).
  """
  w, a, b = (jnp.asarray(t, jnp.float32) for t in (w, a, b))
  hi = jax.lax.Precision.HIGHEST
  w_sq = jnp.sum(jnp.square(w), axis=0)                        # [out]
  cross = jnp.sum(jnp.matmul(a.T, w, precision=hi) * b, axis=0)  # [out]
  gram = jnp.matmul(a.T, a, precision=hi)                        # [R, R]
  lora_sq = jnp.sum(jnp.matmul(gram, b, precision=hi) * b, axis=0)
  sq = w_sq + 2.0 * scale * cross + scale * scale * lora_sq
  return jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(sq, 0.0)))


def dense_column_norm(w: Array, a: Array, b: Array, scale: float) -> Array:
  """The same norm from the dense W + s A B (merging, tests)."""
  dense = (jnp.asarray(w, jnp.float32) + scale * jnp.matmul(
      jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
      precision=jax.lax.Precision.HIGHEST))
  return jnp.linalg.norm(dense, axis=0)


def combine(base_out: Array, dropped_base_out: Array | None, lora_out: Array,
            magnitude: Array, norm: Array) -> Array:
  """DoRA's output from its pieces, all in fp32.

  Args:
    base_out: [..., out] x W.
    dropped_base_out: [..., out] dropout(x) W when LoRA dropout is active,
      else None. PEFT then computes x W + (g - 1) dropout(x) W + g s ...
    lora_out: [..., out] s (dropout(x) A) B.
    magnitude: [out] m.
    norm: [out] ||W + s A B||_col.

  Returns:
    [..., out] fp32.
  """
  g = magnitude.astype(jnp.float32) / norm
  if dropped_base_out is None:
    return g * (base_out + lora_out)
  return base_out + (g - 1.0) * dropped_base_out + g * lora_out
