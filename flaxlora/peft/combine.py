"""Combining LoRA adapters into one (PEFT's `add_weighted_adapter`).

    method, adapter = combine.combine(
        [(method_a, adapter_a), (method_b, adapter_b)], weights=[0.7, 0.3],
        combination_type='svd', svd_rank=8)
    params = merge.merge(base, adapter, method)  # or method.apply(base, ...)

Pure functions over adapters; no base params needed. Each input is a
(`lora.lora(...)` method, adapter) pair with its own rank, alpha, rsLoRA and
target set. The result is a plain `lora.lora` method with scale 1 at every
path (alpha = R, rank_pattern/alpha_pattern where ranks differ): each input's
scale alpha/R (alpha/sqrt(R) for rsLoRA) and weight are folded into the new
factors, as PEFT 0.21.2 does. Per targeted kernel, with w_i the weights,
s_i the scales and A_i [in, R_i], B_i [R_i, out] the factors:

  linear:  A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i,
           B = sum_i sqrt|w_i s_i| B_i (same R; NOT sum_i w_i s_i A_i B_i:
           cross terms remain, as in PEFT).
  cat:     A = [w_1 s_1 A_1, w_2 s_2 A_2, ...], B = [B_1; B_2; ...];
           R = sum_i R_i and A B = sum_i w_i s_i A_i B_i exactly.
  svd:     D = sum_i w_i s_i A_i B_i [in, out], truncated to `svd_rank`
           (default: the largest rank of any input): A = U_R, B = S_R V_R^T.
  ties, dare_linear, dare_ties, magnitude_prune: the merge of that name
           (see `merge_tensors`) applied to the A_i and to the B_i separately
           with the linear weights above (same R), as PEFT does.
  ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: the merge
           applied to the task vectors D_i = s_i A_i B_i [in, out] with
           weights w_i, then the truncated SVD of `svd`.

A kernel that only some inputs adapt is combined from those inputs alone
(PEFT skips the others; for every type this equals treating the missing
adapters as zero). The new targets are the union of the inputs' adapted
paths. `cat` gives each path the sum of the ranks present there (PEFT pads
every path to the global sum with zeros: same update); that sum may exceed
min(in, out), which `apply` and `merge` accept but `method.init` refuses.
As in PEFT, a single input is always combined `linear` (a rescaling), and
the new method takes its dropout from the first input.

Deliberate differences from PEFT 0.21.2: rsLoRA inputs give scale 1 (PEFT
keeps use_rslora with alpha = R, so its combined update is sqrt(R) times too
large: huggingface/peft#3449); DoRA inputs are refused (their magnitudes
cannot be combined; PEFT silently builds a wrong adapter, peft#3761);
density must lie in (0, 1] and svd_clamp in [0, 1].
"""
import math
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from flaxlora.peft import base as peft_base
from flaxlora.peft import lora

Array = jax.Array

MERGES = ('linear', 'ties', 'dare_linear', 'dare_ties', 'magnitude_prune')
COMBINATION_TYPES = ('linear', 'cat', 'svd') + MERGES[1:] + tuple(
    f'{m}_svd' for m in MERGES[1:])
MAJORITY_SIGN_METHODS = ('total', 'frequency')

_HIGHEST = jax.lax.Precision.HIGHEST

# ------------------------------------------ merges of stacked task tensors ---


def prune_magnitude(x: Array, density: float) -> Array:
  """Keeps the int(density * x.size) entries of largest |x|, zeros the rest."""
  if density >= 1:
    return x
  k = int(density * x.size)
  if k == 0:
    return jnp.zeros_like(x)
  _, keep = jax.lax.top_k(jnp.abs(x).reshape(-1), k)
  mask = jnp.zeros(x.size, x.dtype).at[keep].set(1)
  return x * mask.reshape(x.shape)


def prune_random(rng: Array, x: Array, density: float) -> Array:
  """DARE: keeps each entry with probability `density`, rescaled 1/density."""
  if density >= 1:
    return x
  keep = jax.random.bernoulli(rng, density, x.shape)
  return jnp.where(keep, x / density, jnp.zeros_like(x))


def majority_sign_mask(stack: Array, method: str = 'total') -> Array:
  """[K, ...] -> bool [K, ...]: entries whose sign is the elected sign.

  'total' elects the sign of the sum over K, 'frequency' the more frequent
  sign; ties elect +. Zeros never agree.
  """
  sign = jnp.sign(stack)
  votes = stack.sum(0) if method == 'total' else sign.sum(0)
  return sign == jnp.where(votes >= 0, 1, -1).astype(sign.dtype)


def disjoint_merge(weighted: Array, mask: Array) -> Array:
  """[K, ...] -> [...]: the mean over K of the entries that `mask` keeps."""
  kept = jnp.sum(mask, axis=0).astype(weighted.dtype)
  return jnp.sum(weighted * mask, axis=0) / jnp.maximum(kept, 1.0)


def merge_tensors(kind: str, tensors: Sequence[Array], weights: Sequence[float],
                  density: float | None = None,
                  majority_sign_method: str = 'total',
                  rng: Array | None = None) -> Array:
  """Merges K same-shaped task tensors into one (PEFT's `merge_utils`).

  Args:
    kind: one of MERGES. 'linear': sum_i w_i t_i. 'magnitude_prune': the
      same after keeping each t_i's top-density entries by magnitude. 'ties':
      that pruning, a sign elected from the unweighted pruned t_i, then the
      mean of the weighted entries agreeing with it. 'dare_linear' /
      'dare_ties': like 'linear' / 'ties' with DARE's random pruning.
    tensors: K arrays of one shape.
    weights: K floats.
    density: fraction of entries kept, in (0, 1]; pruning kinds only.
    majority_sign_method: 'total' or 'frequency' (ties kinds).
    rng: PRNG key for the dare kinds.
  """
  if kind.startswith('dare'):
    rngs = jax.random.split(rng, len(tensors))
    tensors = [prune_random(r, t, density) for r, t in zip(rngs, tensors)]
  elif kind in ('ties', 'magnitude_prune'):
    tensors = [prune_magnitude(t, density) for t in tensors]
  stack = jnp.stack(tensors)                                 # [K, ...]
  w = jnp.asarray(weights, stack.dtype).reshape((-1,) + (1,) *
                                                (stack.ndim - 1))
  if kind.endswith('ties'):
    return disjoint_merge(stack * w,
                          majority_sign_mask(stack, majority_sign_method))
  return jnp.sum(stack * w, axis=0)


# ------------------------------------------- combining one kernel's LoRA ---


class Entry(NamedTuple):
  """One input's LoRA at one kernel: update = weight * scale * a @ b."""
  a: Array  # [in, R]
  b: Array  # [R, out]
  scale: float
  weight: float


def combine_cat(entries: Sequence[Entry]) -> tuple[Array, Array]:
  """a [in, sum R_i], b [sum R_i, out] with a @ b = sum w_i s_i a_i b_i."""
  a = jnp.concatenate([e.a * (e.weight * e.scale) for e in entries], axis=1)
  return a, jnp.concatenate([e.b for e in entries], axis=0)


def combine_factors(kind: str, entries: Sequence[Entry], **merge_kw
                    ) -> tuple[Array, Array]:
  """Merges the a's and the b's separately with weights sqrt|w s|.

  The sign of w s goes to the a side only, so a @ b keeps it. `merge_kw`
  (density, majority_sign_method, rng) goes to `merge_tensors`.
  """
  ws = [e.weight * e.scale for e in entries]
  w_b = [math.sqrt(abs(x)) for x in ws]
  w_a = [r if x >= 0 else -r for r, x in zip(w_b, ws)]
  rng = merge_kw.pop('rng', None)
  rng_a, rng_b = (None, None) if rng is None else jax.random.split(rng)
  a = merge_tensors(kind, [e.a for e in entries], w_a, rng=rng_a, **merge_kw)
  b = merge_tensors(kind, [e.b for e in entries], w_b, rng=rng_b, **merge_kw)
  return a, b


def truncated_svd(delta: Array, rank: int, clamp: float | None = None
                  ) -> tuple[Array, Array]:
  """delta [in, out] -> a [in, R] = U_R, b [R, out] = S_R V_R^T.

  `clamp` (a quantile in [0, 1]) clips a and b to +-that quantile of their
  pooled entries, as PEFT's svd_clamp. PEFT's lora_B = U S is our b^T.
  """
  u, s, vh = jnp.linalg.svd(delta, full_matrices=False)
  a, b = u[:, :rank], s[:rank, None] * vh[:rank]
  if clamp is not None:
    hi = jnp.quantile(jnp.concatenate([a.reshape(-1), b.reshape(-1)]), clamp)
    a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
  return a, b


def combine_svd(kind: str, entries: Sequence[Entry], rank: int,
                clamp: float | None = None, **merge_kw
                ) -> tuple[Array, Array]:
  """Merges the task vectors s_i a_i b_i with weights w_i; truncated SVD."""
  deltas = [e.scale * jnp.matmul(e.a, e.b, precision=_HIGHEST)
            for e in entries]
  delta = merge_tensors(kind, deltas, [e.weight for e in entries],
                        **merge_kw)
  return truncated_svd(delta, rank, clamp)


# ------------------------------------------------------------ validation ---


def _check_args(pairs, weights, combination_type, density,
                majority_sign_method, svd_rank, svd_clamp, rng) -> str:
  """Validates the arguments; returns the type actually used."""
  if not pairs:
    raise ValueError('combine needs at least one (method, adapter) pair.')
  if len(weights) != len(pairs):
    raise ValueError(f'combine got {len(pairs)} adapters but {len(weights)} '
                     'weights; pass one weight per adapter.')
  if combination_type not in COMBINATION_TYPES:
    raise ValueError(f'combine: combination_type {combination_type!r} is not '
                     f'one of {COMBINATION_TYPES}.')
  kind = 'linear' if len(pairs) == 1 else combination_type  # as PEFT
  needs_density = kind.removesuffix('_svd') in MERGES[1:]
  if needs_density and (density is None or not 0 < density <= 1):
    raise ValueError(f'combine {kind!r} needs density in (0, 1] (the '
                     f'fraction of entries kept), got {density!r}.')
  if majority_sign_method not in MAJORITY_SIGN_METHODS:
    raise ValueError(f'combine: majority_sign_method must be one of '
                     f'{MAJORITY_SIGN_METHODS}, got {majority_sign_method!r}.')
  if svd_rank is not None and (isinstance(svd_rank, bool) or
                               not isinstance(svd_rank, int) or svd_rank < 1):
    raise ValueError(f'combine: svd_rank must be a positive int or None, got '
                     f'{svd_rank!r}.')
  if svd_clamp is not None and not 0 <= svd_clamp <= 1:
    raise ValueError(f'combine: svd_clamp is a quantile in [0, 1] (or None), '
                     f'got {svd_clamp!r}.')
  if kind.startswith('dare') and rng is None:
    raise ValueError(f'combine {kind!r} drops entries at random: pass rng= '
                     '(a jax.random key).')
  return kind


def _lora_config(method: Any, index: int) -> lora.LoraConfig:
  config = getattr(method, 'config', None)
  if not isinstance(config, lora.LoraConfig):
    raise ValueError(
        f'combine: adapter {index} was made by {type(config).__name__}, not '
        'lora.lora(...); pass the LoRA method itself (for a chain, its LoRA '
        'member and sub-adapter).')
  if config.use_dora:
    raise ValueError(f'combine: adapter {index} uses DoRA, whose magnitude '
                     'vectors cannot be combined; merge it into the base or '
                     'combine plain LoRA adapters.')
  return config


def _collect(pairs, weights) -> dict[str, list[Entry]]:
  """{path: [Entry of each input adapting it]}, paths sorted."""
  found, shapes = {}, {}
  for i, ((method, adapter), weight) in enumerate(zip(pairs, weights)):
    config = _lora_config(method, i)
    flat = peft_base.flatten(adapter, is_leaf=lora.is_lora_node)
    for path, leaf in flat.items():
      if not lora.is_lora_node(leaf):
        raise ValueError(f'combine: adapter {i} entry {path} is not an '
                         "{'a', 'b'} dict; pass the adapter method.init made.")
      a, b, rank = leaf['a'], leaf['b'], config.rank_for(path)
      shape = (a.shape[0], b.shape[-1])
      if a.ndim != 2 or b.shape != (rank, shape[1]) or a.shape[1] != rank:
        raise ValueError(
            f'combine: adapter {i} at {path} has a {tuple(a.shape)}, b '
            f'{tuple(b.shape)}, which do not fit its rank {rank}; pair each '
            'adapter with the method that made it.')
      if shapes.setdefault(path, shape) != shape:
        raise ValueError(
            f'combine: adapter {i} adapts {path} as a {shape} kernel, an '
            f'earlier one as {shapes[path]}; combine adapters of one model.')
      found.setdefault(path, []).append(
          Entry(a, b, config.scale_for(path), float(weight)))
  return dict(sorted(found.items()))


def _max_rank(pairs) -> int:
  """PEFT's default svd rank: the largest r or rank_pattern value of any."""
  return max(max([m.config.rank, *dict(m.config.rank_pattern).values()])
             for m, _ in pairs)


def _check_rank(kind: str, path: str, entries, svd_rank: int) -> None:
  ranks = sorted({e.a.shape[1] for e in entries})
  if kind in MERGES and len(ranks) > 1:
    raise ValueError(
        f'combine {kind!r} needs one rank per kernel, but {path} has ranks '
        f"{ranks}; use 'cat' or 'svd' (or a *_svd type) instead.")
  size = min(entries[0].a.shape[0], entries[0].b.shape[1])
  if kind.endswith('svd') and svd_rank > size:
    raise ValueError(f'combine: svd_rank {svd_rank} exceeds min(in, out) = '
                     f'{size} of {path}; pass svd_rank <= {size}.')


# --------------------------------------------------------------- combine ---


def _combined_method(ranks: dict[str, int], dropout: float
                     ) -> peft_base.PeftMethod:
  """lora.lora over exactly `ranks`' paths, with scale 1 at each."""
  counts = {}
  for r in ranks.values():
    counts[r] = counts.get(r, 0) + 1
  rank = max(counts, key=lambda r: (counts[r], r))  # fewest patterns
  others = {re.escape(p): r for p, r in ranks.items() if r != rank}
  return lora.lora(rank=rank, alpha=rank, dropout=dropout,
                   targets=[re.escape(p) for p in ranks],
                   rank_pattern=others,
                   alpha_pattern={p: float(r) for p, r in others.items()})


def combine(adapters: Sequence[tuple[peft_base.PeftMethod, Any]],
            weights: Sequence[float], combination_type: str = 'svd', *,
            svd_rank: int | None = None, svd_clamp: float | None = None,
            density: float | None = None,
            majority_sign_method: str = 'total', rng: Array | None = None
            ) -> tuple[peft_base.PeftMethod, dict[str, Any]]:
  """A new LoRA (method, adapter) whose update combines `adapters`'.

  See the module docstring for what each type computes.

  Args:
    adapters: [(lora.lora method, its adapter)], K >= 1.
    weights: K floats (negative ones subtract).
    combination_type: one of COMBINATION_TYPES (PEFT's names).
    svd_rank: R of the *svd types; default the largest rank (r or
      rank_pattern value) of any input, as PEFT.
    svd_clamp: quantile in [0, 1] to clip the SVD factors at, or None.
    density: fraction of entries kept, in (0, 1], for the pruning types.
    majority_sign_method: 'total' or 'frequency' for the ties types.
    rng: jax PRNG key, required by the dare types.

  Returns:
    (method, adapter): a `lora.lora` method with scale 1 everywhere and an
    adapter {path: {'a': [in, R], 'b': [R, out]}} over the union of the
    inputs' paths; `merge.merge(base, adapter, method)` gives the combined
    dense kernels.
  """
  kind = _check_args(adapters, weights, combination_type, density,
                     majority_sign_method, svd_rank, svd_clamp, rng)
  merge_kw = dict(density=density, majority_sign_method=majority_sign_method)
  found = _collect(adapters, weights)
  rank = svd_rank or _max_rank(adapters)
  out = {}
  for index, (path, entries) in enumerate(found.items()):
    _check_rank(kind, path, entries, rank)
    if kind.startswith('dare'):
      merge_kw['rng'] = jax.random.fold_in(rng, index)
    if kind == 'cat':
      a, b = combine_cat(entries)
    elif kind.endswith('svd'):
      merge = 'linear' if kind == 'svd' else kind.removesuffix('_svd')
      a, b = combine_svd(merge, entries, rank, svd_clamp, **merge_kw)
    else:
      a, b = combine_factors(kind, entries, **merge_kw)
    dtype = entries[0].a.dtype
    out[path] = {'a': a.astype(dtype), 'b': b.astype(dtype)}
  ranks = {path: leaf['a'].shape[1] for path, leaf in out.items()}
  method = _combined_method(ranks, adapters[0][0].config.dropout)
  return method, peft_base.unflatten(out)
