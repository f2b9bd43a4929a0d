"""Many LoRA adapters on one base: each row of a batch names its adapter.

    bank = multi.stack([(method_1, adapter_1), (method_2, adapter_2)], base)
    ids = jnp.array([0, 1, -1, 0])          # [B]; -1: the base model
    params, kw = multi.apply(base, bank, ids)
    logits = model.apply({'params': params}, input_ids, mask, **kw)

A *bank* holds K adapter slots, stacked per targeted kernel and zero-padded
to one rank R: {path: {'a': [K, in, R], 'b': [K, R, out], 'scale': [K]}}.
A slot whose adapter does not target a path has zero factors there, so it
computes that kernel's base product. Modules to save (a chained
`base.trainable` of Dense kernels and biases, such as a classifier head)
become per-slot differences from the base: 'delta' [K, in, out] and
'bias_delta' [K, out] at the kernel's path.

`apply` swaps each banked kernel W for a `MultiLoraKernel`, whose `dot`
computes, for row b with slot k = ids[b],

    y[b] = x[b] W + scale[k] (x[b] a[k]) b[k]  (+ x[b] delta[k] + bias_delta[k])

by gathering each row's factors (Punica's BGMV shape) when rows hold
several tokens, and by one-hot products (x @ all K * R columns, those of
other slots zeroed, @ [K * R, out]) when each row is one token, as in a
decode step. Measured with `experiments.bench_multi` (x W plus the low-rank
term of one 512 -> 512 kernel, 64 rows over K = 8 adapters at R = 16): on
an Intel Xeon with AVX-512, T = 1 took 0.63 ms gathered and 0.29 ms one-hot
against 0.14 ms for x W alone, and T = 64 took 8.1 ms gathered and 9.8 ms
one-hot. On a loaded 2-core AMD EPYC, interleaved, as multiples of x W:

                       gather      one-hot K*R   ragged_dot (skyrl-tx)
    T = 64 (encoder)   1.02, 1.33  1.17, 1.70    1.45, 3.43
    T = 1 (decode)     3.0, 1.58   4.4, 1.17     4.4, 1.68

(ragged_dot: rows sorted by adapter, one group each.) A mixed batch then
gains over one call per adapter what
batching gains the base model itself. On that CPU 8 calls of 8 rows took
1.7-1.9x one call of 64 for T5 generate and 0.75-0.86x for BERT (64 x 128
tokens of activations outgrow the caches): the 4x of memory-bound
accelerators is out of reach there, and the benchmark reports this ceiling
next to its ratio.

The bank's shapes (K, R, the banked paths) are the only thing a jitted
caller compiles for: `put` replaces a slot's values and new ids pick other
slots, both without recompiling.
"""
from typing import Any, Mapping, Sequence

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from flaxlora.models import layers
from flaxlora.peft import base as peft_base
from flaxlora.peft.lora import kernel as lora_kernel
from flaxlora.peft import method_parts
from flaxlora.peft import trainable

Array = jax.Array
Bank = dict[str, dict[str, Array]]
BASE_ROW = -1  # the id of a row that runs the base model


@struct.dataclass
class MultiLoraKernel(layers.WrapsKernel):
  """A kernel W [in, out] with a different low-rank update per batch row.

  Attributes:
    w: [in, out] base kernel (an array, or an adapted kernel such as NF4
      that has `matmul`).
    ids: [B] int slot of each row; BASE_ROW (any negative) for the base.
    a: [K, in, R], or None when only modules to save are banked here.
    b: [K, R, out], or None with `a`.
    scale: [K] alpha / R of each slot's adapter (0 for an empty slot).
    delta: [K, in, out] trained copy minus w, or None.
    bias_delta: [K, out] trained bias minus the base bias, or None.
  """
  w: Any
  ids: Array
  a: Array | None = None
  b: Array | None = None
  scale: Array | None = None
  delta: Array | None = None
  bias_delta: Array | None = None

  @property
  def needs_rng(self) -> bool:
    return False  # serving only: no LoRA dropout

  def dot(self, x: Array, *, dtype: jnp.dtype,
          dropout_rng: Array | None = None) -> Array:
    """x [B', ..., in] -> [B', ..., out] in `dtype`, row b by its slot.

    B' = B * m rows (m beams per batch item, beams adjacent) use ids
    repeated m times.
    """
    del dropout_rng
    if isinstance(self.w, (jax.Array, np.ndarray)):
      y = layers.matmul(x, self.w, dtype=dtype)
    else:
      y = self.w.matmul(x, dtype)
    slot, keep = _rows(self.ids, x.shape[0])              # [B'], [B']
    rows = x.reshape(x.shape[0], -1, x.shape[-1])          # [B', T, in]
    extra = jnp.zeros(rows.shape[:2] + (y.shape[-1],), jnp.float32)
    if self.a is not None:
      scale = jnp.where(keep, self.scale[slot], 0.0)       # [B']
      low_rank = one_hot_low_rank if rows.shape[1] == 1 else gathered_low_rank
      extra += low_rank(rows, self.a, self.b, slot, scale, dtype)
    if self.delta is not None:
      delta = self.delta[slot] * keep[:, None, None]       # [B', in, out]
      extra += layers.einsum('bti,bio->bto', rows, delta, dtype=dtype)
    if self.bias_delta is not None:
      extra += (self.bias_delta[slot] * keep[:, None])[:, None, :]
    return (y + extra.reshape(y.shape)).astype(dtype)


def gathered_low_rank(x: Array, a: Array, b: Array, slot: Array,
                      scale: Array, dtype: jnp.dtype) -> Array:
  """scale[r] (x[r] a[slot[r]]) b[slot[r]] with each row's factors gathered.

  x [B, T, in], a [K, in, R], b [K, R, out], slot and scale [B] ->
  [B, T, out] in fp32.
  """
  h = layers.einsum('bti,bir->btr', x, a[slot], dtype=dtype)
  h = h * scale[:, None, None]
  return layers.einsum('btr,bro->bto', h, b[slot], dtype=dtype)


def one_hot_low_rank(x: Array, a: Array, b: Array, slot: Array,
                     scale: Array, dtype: jnp.dtype) -> Array:
  """`gathered_low_rank` as two plain products over all K * R columns, each
  row's own R of them kept (the others times 0): no per-row copy of the
  factors, the better form when rows are few tokens long (decoding)."""
  k, d_in, r = a.shape
  h = layers.matmul(x, jnp.moveaxis(a, 0, 1).reshape(d_in, k * r),
                    dtype=dtype)                          # [B, T, K * R]
  mask = jax.nn.one_hot(slot, k, dtype=h.dtype) * scale[:, None]  # [B, K]
  h = h * jnp.repeat(mask, r, axis=1)[:, None, :]
  return layers.matmul(h, b.reshape(k * r, -1), dtype=dtype)


def _rows(ids: Array, rows: int) -> tuple[Array, Array]:
  """Per-row slot (0 for base rows) and whether it is adapted, [rows]."""
  if rows % ids.shape[0]:
    raise ValueError(f'multi: {rows} activation rows do not split into the '
                     f'{ids.shape[0]} rows of adapter_ids; pass one id per '
                     'batch item.')
  ids = jnp.repeat(ids, rows // ids.shape[0])  # beams follow their item
  keep = ids >= 0
  return jnp.where(keep, ids, 0), keep


def empty(base: Mapping[str, Any], slots: int, rank: int,
          lora_paths: Sequence[str], copy_paths: Sequence[str] = ()
          ) -> Bank:
  """A bank of `slots` empty slots (every row of it computes the base).

  Args:
    base: the base params (arrays or ShapeDtypeStructs).
    slots: K, how many adapters the bank holds at once.
    rank: R, the largest rank it holds (smaller ranks are zero-padded).
    lora_paths: kernel paths that get LoRA factors.
    copy_paths: Dense kernel and bias paths ('.../kernel', '.../bias') that
      get per-slot trained copies (modules to save).
  """
  bank = {}
  for path in lora_paths:
    d_in, d_out = _kernel(base, path).shape
    bank[path] = {'a': jnp.zeros((slots, d_in, rank)),
                  'b': jnp.zeros((slots, rank, d_out)),
                  'scale': jnp.zeros((slots,))}
  for path in copy_paths:
    kernel_path, leaf = _kernel_path(path)
    d_in, d_out = _kernel(base, kernel_path).shape
    entry = bank.setdefault(kernel_path, {})
    if leaf == 'kernel':
      entry['delta'] = jnp.zeros((slots, d_in, d_out))
    else:
      entry['bias_delta'] = jnp.zeros((slots, d_out))
  return bank


def _kernel(base: Mapping[str, Any], path: str) -> Any:
  try:
    w = peft_base.get(base, path)
  except (KeyError, TypeError) as e:
    raise ValueError(f'multi: {path} is not a parameter of the base; was '
                     'the adapter made for another model?') from e
  if len(getattr(w, 'shape', ())) != 2:
    raise ValueError(f'multi: {path} is not a 2-D kernel.')
  return w


def _kernel_path(path: str) -> tuple[str, str]:
  """'x/bias' or 'x/kernel' -> ('x/kernel', 'bias' | 'kernel')."""
  owner, _, leaf = path.rpartition('/')
  if leaf not in ('kernel', 'bias'):
    raise ValueError(
        f'multi: trained copy {path} is not a Dense kernel or bias; a bank '
        'holds per-adapter copies of Dense layers only (e.g. a classifier '
        'head). Merge this adapter (merge.merge) and serve it alone.')
  return f'{owner}/kernel' if owner else 'kernel', leaf


def parts(method: peft_base.PeftMethod, adapter: Any
          ) -> tuple[dict[str, tuple[Any, Any]], dict[str, Any]]:
  """({kernel path: (a [in, R], b [R, out], scale)}, {path: copy}) of one
  LoRA adapter, optionally chained with `base.trainable`."""
  factors, copies = {}, {}
  for config, sub in method_parts.parts(method, adapter):
    if isinstance(config, trainable.TrainableConfig):
      copies.update(peft_base.flatten(sub))
      continue
    if not isinstance(config, lora_kernel.LoraConfig):
      raise ValueError(f'multi: a bank holds LoRA adapters (with trainable '
                       f'copies); {type(config).__name__} has no slot form.')
    if config.use_dora:
      raise ValueError('multi: DoRA adapters are not banked (their norm is '
                       'per kernel); merge one with merge.merge instead.')
    for path, leaf in peft_base.flatten(sub, is_leaf=lora_kernel.is_lora_node
                                        ).items():
      factors[path] = (leaf['a'], leaf['b'], config.scale_for(path))
  return factors, copies


def put(bank: Bank, slot: int, method: peft_base.PeftMethod, adapter: Any,
        base: Mapping[str, Any]) -> Bank:
  """The bank with `slot` holding (method, adapter); shapes unchanged.

  Paths the adapter does not target get zeros in this slot. Raises
  ValueError (naming the capacity to raise) when the adapter needs a path
  or a rank the bank was not built with.
  """
  factors, copies = parts(method, adapter)
  _check_fits(bank, slot, factors, copies)
  new = {}
  for path, entry in bank.items():
    new[path] = dict(entry)
    if 'a' in entry:
      a, b, scale = _padded(factors.get(path), entry['a'].shape[1:],
                            entry['b'].shape[1:])
      new[path]['a'] = entry['a'].at[slot].set(a)
      new[path]['b'] = entry['b'].at[slot].set(b)
      new[path]['scale'] = entry['scale'].at[slot].set(scale)
    owner = path[:-len('kernel')]
    for key, leaf in (('delta', 'kernel'), ('bias_delta', 'bias')):
      if key in entry:
        value = copies.get(owner + leaf)
        diff = (jnp.zeros(entry[key].shape[1:]) if value is None else
                jnp.asarray(value, jnp.float32) -
                jnp.asarray(peft_base.get(base, owner + leaf), jnp.float32))
        new[path][key] = entry[key].at[slot].set(diff)
  return new


def _padded(factor, a_shape, b_shape):
  """a [in, R'] and b [R', out] zero-padded to `a_shape`, `b_shape`."""
  if factor is None:
    return jnp.zeros(a_shape), jnp.zeros(b_shape), 0.0
  a, b, scale = factor
  pad = a_shape[1] - a.shape[1]
  return (jnp.pad(jnp.asarray(a, jnp.float32), ((0, 0), (0, pad))),
          jnp.pad(jnp.asarray(b, jnp.float32), ((0, pad), (0, 0))), scale)


def num_slots(bank: Bank) -> int:
  """K, the adapters a bank holds at once."""
  return jax.tree.leaves(bank)[0].shape[0]


def _check_fits(bank: Bank, slot: int, factors, copies) -> None:
  slots = num_slots(bank)
  if not 0 <= slot < slots:
    raise ValueError(f'multi: slot {slot} is outside the bank\'s {slots} '
                     'slots; build it with more (stack(..., slots=)).')
  for path, (a, _, _) in factors.items():
    entry = bank.get(path, {})
    if 'a' not in entry:
      raise ValueError(f'multi: the adapter targets {path}, which the bank '
                       'does not hold; build it with that path (stack(..., '
                       'lora_paths=)).')
    if a.shape[1] > entry['a'].shape[2]:
      raise ValueError(f'multi: the adapter has rank {a.shape[1]} at {path}, '
                       f'the bank holds rank {entry["a"].shape[2]}; build it '
                       'with stack(..., rank=) at least that.')
  for path in copies:
    kernel_path, leaf = _kernel_path(path)
    key = 'delta' if leaf == 'kernel' else 'bias_delta'
    if key not in bank.get(kernel_path, {}):
      raise ValueError(f'multi: the adapter trains {path}, which the bank '
                       'does not hold; build it with stack(..., '
                       'copy_paths=).')


def stack(adapters: Sequence[tuple[peft_base.PeftMethod, Any]],
          base: Mapping[str, Any], *, slots: int | None = None,
          rank: int | None = None, lora_paths: Sequence[str] = (),
          copy_paths: Sequence[str] = ()) -> Bank:
  """A bank holding `adapters` in slots 0, 1, ... (the rest empty).

  Args:
    adapters: [(method, adapter)]: LoRA, optionally chained with
      `base.trainable` (Dense kernels and biases).
    base: the base params.
    slots: K (default: len(adapters)); more leaves room to `put` adapters
      later without recompiling.
    rank: R (default: the largest rank of `adapters`).
    lora_paths, copy_paths: paths banked beyond those `adapters` use, so
      later adapters fit the same shapes.
  """
  if not adapters and not (slots and rank and (lora_paths or copy_paths)):
    raise ValueError('multi.stack: give adapters, or slots, rank and paths '
                     'for an empty bank.')
  split = [parts(m, a) for m, a in adapters]
  ranks = [a.shape[1] for f, _ in split for a, _, _ in f.values()]
  lora_set = set(lora_paths).union(*[f for f, _ in split])
  copy_set = set(copy_paths).union(*[c for _, c in split])
  bank = empty(base, slots or len(adapters), rank or max(ranks, default=1),
               sorted(lora_set), sorted(copy_set))
  for slot, (method, adapter) in enumerate(adapters):
    bank = put(bank, slot, method, adapter, base)
  return bank


def apply(base: Mapping[str, Any], bank: Bank, adapter_ids: Array
          ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(params, {}) in which each banked kernel is a `MultiLoraKernel`.

  Args:
    base: the base params.
    bank: from `stack` (or `empty` + `put`).
    adapter_ids: [B] int slot per batch row; BASE_ROW (-1) runs the base.
  """
  ids = jnp.asarray(adapter_ids, jnp.int32)
  if ids.ndim != 1:
    raise ValueError(f'multi.apply: adapter_ids must be [B], got shape '
                     f'{ids.shape}.')
  nodes = {path: MultiLoraKernel(_kernel(base, path), ids, **entry)
           for path, entry in bank.items()}
  return peft_base.replace(base, nodes), {}


def row_ids(names: Sequence[str | None], slots: Sequence[str]) -> np.ndarray:
  """[B] int32 slot ids of per-row adapter names (None: the base)."""
  index = {name: i for i, name in enumerate(slots)}
  unknown = sorted({n for n in names if n is not None and n not in index})
  if unknown:
    raise ValueError(f'multi: adapters {unknown} are not in the bank; it '
                     f'holds {list(slots)}.')
  return np.array([BASE_ROW if n is None else index[n] for n in names],
                  np.int32)
