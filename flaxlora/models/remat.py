"""Rematerialisation (activation checkpointing) of transformer blocks.

    Block = remat.wrap(Block, 'dots', static_argnums=(5,))

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
block class, so `model.remat` means the same thing in each.
"""
from typing import Sequence

import flax.linen as nn
import jax

POLICIES = ('none', 'block', 'dots')


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
  if policy not in POLICIES:
    raise ValueError(f'model.remat={policy!r}: use one of {POLICIES}.')
  if policy == 'none':
    return block
  saveable = (None if policy == 'block' else
              jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  return nn.remat(block, policy=saveable,
                  static_argnums=tuple(static_argnums))

