"""Rematerialisation (activation checkpointing) of transformer blocks.

    Block = remat.wrap(Block, 'dots', static_argnums=(5,))
    body = remat.checkpoint(body, 'dots')  # a scan's body over layers

The backward pass of a block needs its forward intermediates. Without remat
every block keeps them all until its gradient is taken, so the activations
of the whole stack are live at once; with remat a block keeps only what the
policy saves and recomputes the rest in the backward pass:

  none:  no remat (everything saved; fastest, most memory).
  block: only the block's inputs saved; the whole block recomputed (about
    one more forward pass per step; the least memory).
  dots:  the outputs of matmuls without batch dimensions saved (the dense
    projections: q, k, v, o, the MLP's), the rest (attention scores and
    probabilities, norms, activations) recomputed. Between the two in both
    memory and time; `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`.

Values and gradients are the same under every policy (the same operations
run; only when they run changes). Every model family applies `wrap` to its
block class, and `layer_scan` applies `checkpoint` to its loop body (one
block), so `model.remat` means the same thing in each.
"""
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

POLICIES = ('none', 'block', 'dots')


def _saveable(policy: str) -> Callable[..., bool] | None:
  """What `policy` saves: None (nothing but the inputs) for 'block'."""
  if policy not in POLICIES:
    raise ValueError(f'model.remat={policy!r}: use one of {POLICIES}.')
  if policy == 'dots':
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return None


def wrap(block: type[nn.Module], policy: str,
         static_argnums: Sequence[int] = ()) -> type[nn.Module]:
  """`block` (a module class) rematerialised by `policy` (one of POLICIES).

  Args:
    block: the transformer block class.
    policy: 'none' returns `block` itself.
    static_argnums: positions of `block.__call__`'s non-array arguments
      (Python bools such as `deterministic`), counting `self` as 0; they
      must be passed positionally.
  """
  saveable = _saveable(policy)
  if policy == 'none':
    return block
  return nn.remat(block, policy=saveable,
                  static_argnums=tuple(static_argnums))


def checkpoint(fn: Callable[..., Any], policy: str) -> Callable[..., Any]:
  """`fn`, a pure function of arrays (the body of a scan over layers),
  rematerialised by `policy` (one of POLICIES); 'none' returns `fn`."""
  saveable = _saveable(policy)
  if policy == 'none':
    return fn
  # prevent_cse=False: inside a scan the loop already keeps the recomputation
  # apart from the forward pass (jax.checkpoint's advice for scans).
  return jax.checkpoint(fn, policy=saveable, prevent_cse=False)
