"""4-bit NormalFloat (NF4) quantisation of frozen kernels, as in QLoRA.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs":
  * a kernel is cut into blocks of 64 values; each block is divided by its
    absolute maximum and every value is rounded to the nearest of the 16 NF4
    levels (quantiles of a standard normal, rescaled to [-1, 1], with an exact
    zero), stored as 4-bit codes packed two per byte;
  * double quantisation: the fp32 block absmaxes are centred by their mean
    and quantised again, in blocks of 256, to 8-bit codes of bitsandbytes'
    signed dynamic map (an 8-bit float format: sign, a run of zeros as
    exponent, the rest as fraction), with one fp32 scale per 256 blocks.

Layout of `Nf4Kernel` for a kernel [I, O] (kernels are [in, out]): blocks run
along the input dimension, which is the row-major order of the torch weight
[O, I], so for I % 64 == 0 the codes equal bitsandbytes' on that weight.
  codes        uint8 [Ip/2, O]   Ip = I rounded up to a multiple of 64; row
                                  2k in the high nibble, row 2k+1 in the low.
  scale_codes  uint8 [Ip/64, O]  8-bit codes of the centred block absmaxes.
  scale_scales fp32  [ceil(O*Ip/64 / 256)]  second-level absmax, over the
                                  block absmaxes in [O, Ip/64] row-major order.
  scale_offset fp32  []          mean of the block absmaxes.
About 4.13 bits per weight: 0.129x the fp32 bytes.

`Nf4Kernel` is a pytree node with the adapted-kernel protocol of
`flaxlora.models.layers` (`dot`, `needs_rng`, `shape`): it dequantises on the
fly inside the jitted step, so it jits, shards and checkpoints like any other
params pytree, and LoRA (`lora.LoraKernel`) can sit on top of it.
"""
import functools
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

BLOCK = 64  # values per first-level block
SCALE_BLOCK = 256  # block absmaxes per second-level block

# The 16 NF4 levels (QLoRA appendix; bitsandbytes' table). `normal_levels()`
# rebuilds them from the normal quantiles; tests check both agree.
LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0
], np.float32)

# By default every 2-D kernel is quantised; embeddings, norms, biases and
# task heads stay fp32 (heads are usually trained, and tiny).
DEFAULT_INCLUDE = r'.*/kernel'
DEFAULT_EXCLUDE = r'(classifier|qa_outputs|pooler|lm_head)/.*'


def dynamic_levels() -> np.ndarray:
  """The 256 sorted levels of the signed 8-bit dynamic map, in [-1, 1].

  For each "exponent" e = 0..6 the fraction range [0.1, 1] is cut into 2**e
  bins whose midpoints, times 10**(e-6), are levels of both signs; plus 0 and
  1. So small magnitudes get few levels and large ones many (2*127 + 2).
  """
  values = [0.0, 1.0]
  for e in range(7):
    edges = np.linspace(0.1, 1.0, 2**e + 1)
    mids = (edges[:-1] + edges[1:]) / 2 * 10.0**(e - 6)
    values += list(mids) + list(-mids)
  return np.sort(np.array(values, np.float32))


DYNAMIC = dynamic_levels()


def _nearest(x: jax.Array, levels: np.ndarray) -> jax.Array:
  """Index of the nearest of sorted `levels` for each value of x (uint8)."""
  mids = jnp.asarray((levels[1:] + levels[:-1]) / 2)
  return jnp.searchsorted(mids, x, side='left').astype(jnp.uint8)


@flax.struct.dataclass
class Nf4Kernel:
  """An NF4-quantised frozen kernel [I, O]; see the module docstring."""
  codes: jax.Array
  scale_codes: jax.Array
  scale_scales: jax.Array
  scale_offset: jax.Array
  shape: tuple[int, int] = flax.struct.field(pytree_node=False)

  needs_rng = False

  @property
  def ndim(self) -> int:
    return 2

  @property
  def size(self) -> int:
    return self.shape[0] * self.shape[1]

  def block_absmax(self) -> jax.Array:
    """[Ip/64, O] fp32 block absmaxes, undoing the double quantisation."""
    nb, o = self.scale_codes.shape
    flat = self.scale_codes.T.reshape(-1)  # [O*nb] in bitsandbytes' order
    pad = self.scale_scales.shape[0] * SCALE_BLOCK - flat.shape[0]
    flat = jnp.pad(flat, (0, pad)).reshape(-1, SCALE_BLOCK)
    values = jnp.asarray(DYNAMIC)[flat] * self.scale_scales[:, None]
    values = values.reshape(-1)[:o * nb].reshape(o, nb).T
    return values + self.scale_offset

  def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """[I, O] kernel in `dtype` (scaled in fp32, then cast)."""
    return _dequantize(self, jnp.dtype(dtype))

  def astype(self, dtype: jnp.dtype) -> jax.Array:
    """The dequantised [I, O] kernel: code that casts a plain kernel before
    a matmul (as `lora.LoraKernel.dot` does) works on NF4 unchanged."""
    return self.dequantize(dtype)

  def __jax_array__(self) -> jax.Array:
    # `jnp.asarray(kernel)` (merges, DoRA's column norm) sees fp32 values.
    return self.dequantize(jnp.float32)

  def matmul(self, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """[..., I] -> fp32 [..., O]: x @ dequant(W), products in `dtype`.

    The dequantised kernel is recomputed in the backward pass instead of
    being kept from the forward one, so a train step never holds the fp32
    (or bf16) copies of all kernels at once (custom VJP; no gradient flows
    into the integer codes).
    """
    return _matmul(x, self, jnp.dtype(dtype), jnp.dtype(x.dtype))

  def dot(self, x: jax.Array, *, dtype: jnp.dtype,
          dropout_rng: jax.Array | None = None) -> jax.Array:
    """[..., I] -> [..., O] in `dtype`: x @ dequant(W), fp32 accumulation."""
    del dropout_rng  # a frozen base has no dropout of its own
    return self.matmul(x, dtype).astype(dtype)

  def nbytes(self) -> int:
    """Bytes of the stored arrays (what a device holds for this kernel)."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for a in (self.codes, self.scale_codes, self.scale_scales,
                         self.scale_offset))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(kernel: Nf4Kernel, dtype: jnp.dtype) -> jax.Array:
  half, o = kernel.codes.shape
  high = kernel.codes >> 4
  low = kernel.codes & 0xF
  idx = jnp.stack([high, low], axis=1).reshape(2 * half, o)  # [Ip, O]
  values = jnp.asarray(LEVELS)[idx].reshape(-1, BLOCK, o)
  values = values * kernel.block_absmax()[:, None, :]
  return values.reshape(2 * half, o)[:kernel.shape[0]].astype(dtype)


def _dequantize_after(kernel: Nf4Kernel, dtype: jnp.dtype,
                      t: jax.Array) -> jax.Array:
  """dequant(kernel), made to depend on `t` (adding 0 from one element).

  Without the dependency XLA may schedule every layer's dequantisation at
  the start of the step (they depend on parameters only) and hold all the
  dequantised kernels at once; with it, each waits for its layer's input
  (forward) or output gradient (backward), and its buffer is reused.
  (`lax.optimization_barrier` does not survive XLA:CPU's pipeline.)
  """
  # On the codes, not the result: XLA would otherwise share the common
  # dequant(kernel) between the forward and backward passes.
  zero = (jnp.sum(t.reshape(-1)[:1]) * 0).astype(jnp.uint8)
  return kernel.replace(codes=kernel.codes + zero).dequantize(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x, kernel, dtype, x_dtype):
  del x_dtype
  return jnp.matmul(x.astype(dtype), _dequantize_after(kernel, dtype, x),
                    preferred_element_type=jnp.float32)


def _matmul_fwd(x, kernel, dtype, x_dtype):
  # Residuals: the codes only; the dequantised kernel is recomputed below.
  return _matmul(x, kernel, dtype, x_dtype), kernel


def _matmul_bwd(dtype, x_dtype, kernel, g):
  w = _dequantize_after(kernel, dtype, g)
  dx = jnp.matmul(g.astype(dtype), w.T, preferred_element_type=jnp.float32)
  return dx.astype(x_dtype), None  # no gradient for the frozen codes


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.jit
def quantize(kernel: jax.Array) -> Nf4Kernel:
  """Quantises a 2-D kernel [I, O] to NF4 with double-quantised scales.

  Jitted (shapes are static); it also runs inside another `jax.jit` with
  out_shardings, so a sharded kernel is quantised shard-wise in place.
  """
  if getattr(kernel, 'ndim', None) != 2:
    raise ValueError(f'nf4.quantize needs a 2-D kernel [in, out]; got shape '
                     f'{getattr(kernel, "shape", None)}.')
  i, o = kernel.shape
  ip = -(-i // BLOCK) * BLOCK
  w = jnp.pad(jnp.asarray(kernel, jnp.float32), ((0, ip - i), (0, 0)))
  blocks = w.reshape(ip // BLOCK, BLOCK, o)  # [Ip/64, 64, O]
  absmax = jnp.max(jnp.abs(blocks), axis=1)  # [Ip/64, O]
  safe = jnp.where(absmax == 0, 1.0, absmax)
  idx = _nearest(blocks / safe[:, None, :], LEVELS).reshape(ip, o)
  codes = (idx[0::2] << 4) | idx[1::2]  # [Ip/2, O]

  offset = jnp.mean(absmax)
  flat = (absmax - offset).T.reshape(-1)  # [O*Ip/64] bitsandbytes' order
  n = flat.shape[0]
  nblocks2 = -(-n // SCALE_BLOCK)
  padded = jnp.pad(flat, (0, nblocks2 * SCALE_BLOCK - n)).reshape(
      nblocks2, SCALE_BLOCK)
  absmax2 = jnp.max(jnp.abs(padded), axis=1)
  safe2 = jnp.where(absmax2 == 0, 1.0, absmax2)
  q2 = _nearest(padded / safe2[:, None], DYNAMIC).reshape(-1)[:n]
  scale_codes = q2.reshape(o, ip // BLOCK).T
  return Nf4Kernel(codes=codes, scale_codes=scale_codes,
                   scale_scales=absmax2.astype(jnp.float32),
                   scale_offset=offset.astype(jnp.float32),
                   shape=(int(i), int(o)))


def _path(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k)))
                  for k in key_path)


def is_nf4(value: Any) -> bool:
  return isinstance(value, Nf4Kernel)


def quantize_params(params: Any, include: str = DEFAULT_INCLUDE,
                    exclude: str = DEFAULT_EXCLUDE) -> Any:
  """Replaces every 2-D param whose path fullmatches `include` (and not
  `exclude`) by its `Nf4Kernel`; everything else is kept as it is.

  Paths are '/'-joined, e.g. 'encoder/block_0/attention/q/kernel'. Kernels
  that are already `Nf4Kernel`s count as matches and stay as they are, so
  quantising twice is a no-op.

  Raises:
    ValueError: nothing matches (the error shows sample paths).
  """
  paths, hits = [], []

  def convert(key_path, leaf):
    path = _path(key_path)
    paths.append(path)
    if not (re.fullmatch(include, path) and not re.fullmatch(exclude, path)):
      return leaf
    if is_nf4(leaf):
      hits.append(path)
      return leaf
    if getattr(leaf, 'ndim', 0) != 2:
      return leaf
    hits.append(path)
    return quantize(leaf)

  out = jax.tree_util.tree_map_with_path(convert, params, is_leaf=is_nf4)
  if not hits:
    raise ValueError(f'nf4 include={include!r} (exclude={exclude!r}) matched '
                     f'no 2-D param; paths look like {paths[:3]}.')
  return out


def dequantize_params(params: Any) -> Any:
  """The inverse of `quantize_params` (up to quantisation error): fp32."""
  return jax.tree.map(lambda v: v.dequantize() if is_nf4(v) else v, params,
                      is_leaf=is_nf4)


def logical_axes(kernel_axes: PartitionSpec, kernel: Nf4Kernel) -> Nf4Kernel:
  """Logical axes of an `Nf4Kernel`'s leaves from its kernel's (in, out) axes.

  Codes keep both axes; block scales keep only `out` (there may be fewer
  input blocks than devices); the second-level scales are replicated.
  """
  in_axis, out_axis = tuple(kernel_axes)
  return Nf4Kernel(codes=PartitionSpec(in_axis, out_axis),
                   scale_codes=PartitionSpec(None, out_axis),
                   scale_scales=PartitionSpec(None),
                   scale_offset=PartitionSpec(), shape=kernel.shape)


def params_logical_axes(axes: Any, quantized: Any) -> Any:
  """Maps a params axes tree (PartitionSpec leaves) onto `quantized`."""
  def one(spec, value):
    return logical_axes(spec, value) if is_nf4(value) else spec
  return jax.tree.map(one, axes, quantized, is_leaf=lambda v: isinstance(
      v, PartitionSpec))


def nbytes(params: Any) -> int:
  """Bytes of all arrays of a params tree (quantised kernels included)."""
  leaves = jax.tree.leaves(params)
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
             for a in leaves)
