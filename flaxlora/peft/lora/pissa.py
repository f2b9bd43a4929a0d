"""PiSSA (Meng et al. 2024): LoRA trained over the residual of W's top-R SVD.

    method = lora.lora(rank=8, alpha=16, targets='t5', init='pissa')
    base = method.prepare_base(base)          # once: kernels -> PissaKernel
    adapter = method.init(rng, base)          # A0, B0 of the original W
    params, kw = method.apply(base, adapter)  # W_res + scale A B

With W = U S V^T, init sets A0 = U_R sqrt(S_R / scale) [in, R] and
B0 = sqrt(S_R / scale) V_R^T [R, out], so scale A0 B0 is W's top-R part, and
the frozen base becomes the residual W_res = W - scale A0 B0: at init the
model computes exactly what W did. The method's `prepare_base` replaces each
targeted kernel by a `PissaKernel` that keeps W_res together with A0 and B0,
so `init` gives the same A0, B0 whichever it sees: a prepared base (it reads
them) or the original one (it takes the same top-R SVD that `prepare_base`
takes). `apply` prepares a raw kernel on the fly (an SVD per call; the
trainer prepares the base once), so it computes the same on either base.

The PEFT export (`form.PISSA_EXPORT`; PEFT's own conversion,
`path_initial_model_for_weight_conversion`) is a plain LoRA of rank 2R over
the ORIGINAL weights:
W + scale (A B - A0 B0) = W_res + scale A B, with A' = [A, A0] [in, 2R] and
B' = [B; -B0] [2R, out]; r, rank_pattern double and alpha (alpha_pattern)
doubles (x sqrt(2) for rsLoRA), so the scale is unchanged.
"""
from typing import Any, Mapping

from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from flaxlora.models import layers
from flaxlora.peft import base as peft_base

Array = jax.Array


@struct.dataclass
class PissaKernel(layers.WrapsKernel):
  """A prepared PiSSA base kernel: acts as W_res, remembers W's top-R part.

  Attributes:
    w: [in, out] the residual W_res = W - scale A0 B0, in W's dtype.
    a0: [in, R] fp32, the adapter's initial A.
    b0: [R, out] fp32, the adapter's initial B.
    scale: the LoRA scale the factors were split with.
  """
  w: Array
  a0: Array
  b0: Array
  scale: float = struct.field(pytree_node=False)

  needs_rng = False

  def dot(self, x: Array, *, dtype: jnp.dtype,
          dropout_rng: Array | None = None) -> Array:
    """[..., in] -> [..., out]: x W_res (the base without its adapter)."""
    del dropout_rng
    return layers.matmul(x, self.w, dtype=dtype).astype(dtype)

  def original(self) -> Array:
    """[in, out] fp32 W = W_res + scale A0 B0."""
    return jnp.asarray(self.w, jnp.float32) + self.scale * jnp.matmul(
        self.a0, self.b0, precision=jax.lax.Precision.HIGHEST)


def is_pissa(node: Any) -> bool:
  return isinstance(node, PissaKernel)


def factors(w: Any, rank: int, scale: float) -> tuple[Array, Array]:
  """(A0 [in, R], B0 [R, out]) fp32: a PissaKernel's own, else W's top-R
  SVD split so that scale A0 B0 = U_R S_R V_R^T."""
  if is_pissa(w):
    if w.a0.shape[1] != rank or w.scale != scale:
      raise ValueError(f'the prepared PiSSA kernel has rank {w.a0.shape[1]} '
                       f'and scale {w.scale}, the method {rank} and {scale}; '
                       'prepare the original base with this method.')
    return w.a0, w.b0
  u, s, vh = jnp.linalg.svd(jnp.asarray(w, jnp.float32), full_matrices=False)
  root = jnp.sqrt(s[:rank] / scale)                        # [R]
  return u[:, :rank] * root, root[:, None] * vh[:rank]


def original(w: Any) -> Any:
  """W of a kernel: a PissaKernel's reconstruction, else `w` itself."""
  return w.original() if is_pissa(w) else w


def prepare(config: Any, base: Mapping[str, Any]) -> dict[str, Any]:
  """`base` with each kernel `config` (a LoraConfig) targets as a
  PissaKernel (idempotent: prepared kernels are kept)."""
  updates = {}
  for path in config.paths(base):
    w = peft_base.get(base, path)
    if is_pissa(w):
      continue
    scale = config.scale_for(path)
    a0, b0 = factors(w, config.rank_for(path), scale)
    top = scale * jnp.matmul(a0, b0, precision=jax.lax.Precision.HIGHEST)
    residual = (jnp.asarray(w, jnp.float32) - top).astype(w.dtype)
    updates[path] = PissaKernel(residual, a0, b0, scale)
  return peft_base.replace(base, updates) if updates else dict(base)


def residual_base(config: Any, base: Mapping[str, Any]) -> dict[str, Any]:
  """The base LoRA's `apply` adapts: targeted kernels as W_res arrays."""
  prepared = prepare(config, base)
  return peft_base.replace(prepared, {
      p: v.w for p, v in _kernels(prepared).items()})


def prepared_axes(base_axes: Any, prepared: Any) -> Any:
  """Logical axes of a prepared base: a PissaKernel's residual keeps its
  kernel's (in, out) axes, a0 (in, 'lora_rank'), b0 ('lora_rank', out)."""

  def one(spec, value):
    if not is_pissa(value):
      return spec
    in_axis, out_axis = tuple(spec)
    return PissaKernel(PartitionSpec(in_axis, out_axis),
                       PartitionSpec(in_axis, 'lora_rank'),
                       PartitionSpec('lora_rank', out_axis), value.scale)

  return jax.tree.map(one, base_axes, prepared,
                      is_leaf=lambda v: isinstance(v, PartitionSpec))


def _kernels(base: Mapping[str, Any]) -> dict[str, PissaKernel]:
  return {p: v for p, v in peft_base.flatten(base).items() if is_pissa(v)}
