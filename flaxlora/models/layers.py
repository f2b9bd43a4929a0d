"""Building blocks shared by the T5 and BERT models.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`)
so that `flaxlora.sharding` can map them to mesh axes by rules.

The single dense op, `dot`, is the only place where a kernel meets an
activation. A PEFT method may put an *adapted kernel* in place of a plain
kernel array in the params tree (for example `flaxlora.peft.lora.LoraKernel`):
any pytree node that implements the `AdaptedKernel` protocol below. The
models stay PEFT-agnostic: they only call `dot`.

Logical axis names used by the models (the one vocabulary `sharding` maps):
  vocab, embed, mlp, heads (the joined N*D dimension), relpos_buckets,
  relpos_heads, positions, token_types, classes. Adapters add lora_rank and
  prompt. Activations are constrained by the same table (`constrain`):
  batch, and heads / mlp / vocab on their last dimensions.
"""
import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, Protocol, Sequence
from typing import runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxlora import sharding
from flaxlora.models import dropout as dropout_lib

Array = jax.Array
Initializer = Callable[..., Array]


@runtime_checkable
class AdaptedKernel(Protocol):
  """What a PEFT method puts in the params tree in place of a kernel [I, O].

  Attributes:
    shape: (I, O), the shape of the kernel it stands for.
    size: I * O, the scalars of that kernel (for parameter counts).
    needs_rng: whether `dot` draws random numbers (dropout) when training.
  """
  shape: tuple[int, int]
  size: int
  needs_rng: bool

  def dot(self, x: Array, *, dtype: jnp.dtype,
          dropout_rng: Array | None = None) -> Array:
    """[..., I] -> [..., O] in compute dtype `dtype`."""


class WrapsKernel:
  """`shape` and `size` of an adapted kernel that keeps the kernel it
  stands for as its field `w` [I, O] (LoRA, IA3, multi-adapter)."""

  @property
  def shape(self) -> tuple[int, int]:
    return tuple(self.w.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.w.shape))


def is_adapted_kernel(value: Any) -> bool:
  """True for an adapted kernel node (not for plain arrays)."""
  return (not isinstance(value, (jax.Array, np.ndarray)) and
          isinstance(value, AdaptedKernel))


def _unbox(value: Any) -> Any:
  if isinstance(value, nn.meta.AxisMetadata):
    return value.unbox()
  return value


def param(module: nn.Module, name: str, init: Initializer,
          shape: Sequence[int], axes: Sequence[str | None]) -> Any:
  """Returns the fp32 parameter `name` of `module`, created with logical axes.

  When the params passed to `apply` already hold a value at this path, that
  value is returned as it is: an array, or an adapted kernel placed there by a
  PEFT method (which flax's own shape check would reject).
  """
  if module.has_variable('params', name):
    value = _unbox(module.get_variable('params', name))
    value_shape = getattr(value, 'shape', None)
    if value_shape is not None and tuple(value_shape) != tuple(shape):
      raise ValueError(
          f'parameter {"/".join(module.path)}/{name} has shape '
          f'{tuple(value_shape)}, but the model config needs {tuple(shape)}; '
          'check that the params belong to this config.')
    return value
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)),
                      tuple(shape), jnp.float32)


# (mesh, rules) while a step is traced under `activation_sharding`.
_ACTIVATIONS = contextvars.ContextVar('flaxlora_activation_sharding',
                                      default=None)


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh,
                        rules: sharding.Rules) -> Iterator[None]:
  """Inside the block, `constrain` places activations over `mesh` by
  `rules`: trace (jit) a step in it. Outside, `constrain` does nothing, so
  a plain `model.apply` runs anywhere."""
  token = _ACTIVATIONS.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVATIONS.reset(token)


def constrain(x: Array, axes: Sequence[str | None]) -> Array:
  """`x` sharded by logical `axes` (one per dimension, None: whole), under
  `activation_sharding`; `x` itself outside it.

  Without a constraint XLA may follow a kernel's sharding (`embed` over
  fsdp) into an activation and keep whole-batch copies on every device;
  with it each device holds its own rows. Mesh axes that do not divide a
  dimension are left out (a batch smaller than the mesh stays whole).
  """
  context = _ACTIVATIONS.get()
  if context is None:
    return x
  mesh, rules = context
  spec = sharding.logical_to_spec(axes, rules, shape=x.shape, mesh=mesh,
                                  drop_indivisible=True)
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.NamedSharding(mesh, spec))


def _letters(n: int) -> str:
  return 'abcdefgh'[:n]


def einsum(spec: str, a: Array, b: Array, *, dtype: jnp.dtype) -> Array:
  """Two-operand `jnp.einsum(spec, a, b)` in compute dtype `dtype`.

  Products accumulate in fp32 and the result is fp32. In fp32 this is a
  plain einsum. In a narrower dtype (bf16) the operands are cast to it and
  the backward pass keeps that policy: the incoming gradient is cast to
  `dtype` and both gradient products also accumulate in fp32 (JAX's own
  transpose would multiply an fp32 gradient by a bf16 operand, which runs
  as a slow fp32 product on CPU). `spec` must be explicit ("ab,bc->ac"),
  each index in at most two of its three terms and none summed within one
  operand.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32),
                      preferred_element_type=jnp.float32)
  return _mixed_einsum(spec, a.astype(dtype), b.astype(dtype))


def _einsum_f32(spec: str, a: Array, b: Array) -> Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mixed_einsum(spec: str, a: Array, b: Array) -> Array:
  return _einsum_f32(spec, a, b)


def _mixed_einsum_fwd(spec, a, b):
  return _einsum_f32(spec, a, b), (a, b)


def _mixed_einsum_bwd(spec, saved, grad):
  a, b = saved
  inputs, out = spec.split('->')
  lhs, rhs = inputs.split(',')
  grad = grad.astype(a.dtype)
  grad_a = _einsum_f32(f'{out},{rhs}->{lhs}', grad, b)
  grad_b = _einsum_f32(f'{lhs},{out}->{rhs}', a, grad)
  return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def matmul(x: Array, kernel: Array, *, dtype: jnp.dtype) -> Array:
  """[..., in] @ [in, out] in compute dtype `dtype` -> fp32 [..., out].

  See `einsum` for the precision policy of both passes.
  """
  batch = _letters(x.ndim - 1)
  return einsum(f'{batch}i,io->{batch}o', x, kernel, dtype=dtype)


def dot(x: Array, kernel: Any, *, dtype: jnp.dtype,
        dropout_rng: Array | None = None) -> Array:
  """`x @ kernel` in compute dtype `dtype`, accumulating in fp32.

  Args:
    x: [..., in] activations.
    kernel: [in, out] array, or an adapted kernel (see module docstring).
    dtype: compute dtype; with bf16, inputs are cast to bf16 and the product
      accumulates in fp32 before the result is cast back to bf16.
    dropout_rng: rng for an adapted kernel's own dropout; None when
      deterministic.

  Returns:
    [..., out] in `dtype`.
  """
  if is_adapted_kernel(kernel):
    return kernel.dot(x, dtype=dtype, dropout_rng=dropout_rng)
  return matmul(x, kernel, dtype=dtype).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x: Array, approximate: bool = False) -> Array:
  """GELU, x * Phi(x) (erf) or its tanh approximation; backward keeps only x.

  Autodiff of `jax.nn.gelu` saves several activation-sized intermediates of
  the formula for the backward pass; between a layer's two FFN products that
  traffic costs more than the arithmetic. Here the backward recomputes the
  derivative from x. Values equal `jax.nn.gelu(x, approximate)`.

  Args:
    x: any shape, any float dtype (the derivative is computed in fp32).
    approximate: the tanh approximation (HF's gelu_new, T5 v1.1's gated
      GELU) instead of the exact erf form (BERT's gelu).
  """
  return jax.nn.gelu(x, approximate=approximate)


def _gelu_fwd(x, approximate):
  return gelu(x, approximate), x


def _gelu_bwd(approximate, x, grad):
  x = x.astype(jnp.float32)
  if approximate:
    c = np.float32(np.sqrt(2.0 / np.pi))
    t = jnp.tanh(c * (x + np.float32(0.044715) * x**3))
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (
        1.0 + np.float32(3 * 0.044715) * x * x)
  else:
    cdf = 0.5 * jax.lax.erfc(-x * np.float32(np.sqrt(0.5)))
    pdf = jnp.exp(-0.5 * x * x) * np.float32(1 / np.sqrt(2 * np.pi))
    slope = cdf + x * pdf
  return ((grad.astype(jnp.float32) * slope).astype(grad.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class Dropout(nn.Module):
  """`dropout.dropout` as a module: draws its key from the 'dropout' rng
  stream.

  Attributes:
    rate: probability of zeroing an element.
  """
  rate: float

  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    return dropout_lib.dropout(x, self.rate, self.make_rng('dropout'))


class Dense(nn.Module):
  """A dense layer, kernel [in, out] with logical axes `axes`.

  Attributes:
    features: output size.
    axes: logical names of the kernel's (in, out) dimensions; the bias takes
      the second.
    use_bias: whether to add a bias.
    dtype: compute dtype (params stay fp32).
    kernel_init: initializer of the kernel.
  """
  features: int
  axes: tuple[str, str]
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    kernel = param(self, 'kernel', self.kernel_init,
                   (x.shape[-1], self.features), self.axes)
    rng = None
    if (not deterministic and is_adapted_kernel(kernel) and
        kernel.needs_rng):
      rng = self.make_rng('dropout')
    y = dot(x, kernel, dtype=self.dtype, dropout_rng=rng)
    if self.use_bias:
      bias = param(self, 'bias', nn.initializers.zeros, (self.features,),
                   (self.axes[1],))
      y = y + bias.astype(self.dtype)
    return y


class Embed(nn.Module):
  """An embedding table [num_embeddings, features].

  Attributes:
    num_embeddings: table size (V for words).
    features: H.
    axes: logical names of the table's two dimensions.
    dtype: compute dtype of the looked-up vectors.
    embedding_init: initializer of the table.
  """
  num_embeddings: int
  features: int
  axes: tuple[str, str] = ('vocab', 'embed')
  dtype: jnp.dtype = jnp.float32
  embedding_init: Initializer = nn.initializers.normal(1.0)

  def setup(self):
    self.embedding = param(self, 'embedding', self.embedding_init,
                           (self.num_embeddings, self.features), self.axes)

  def __call__(self, ids: Array) -> Array:
    """[B, T] int ids -> [B, T, H]."""
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """[B, T, H] -> [B, T, V] logits against the table (tied output layer)."""
    batch = _letters(x.ndim - 1)
    return einsum(f'{batch}h,vh->{batch}v', x, self.embedding,
                  dtype=self.dtype).astype(self.dtype)


class RMSNorm(nn.Module):
  """T5's layer norm: scale only, no mean subtraction, computed in fp32."""
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = param(self, 'scale', nn.initializers.ones, (x.shape[-1],),
                  ('embed',))
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(variance + self.eps)
    return (y * scale).astype(self.dtype)


class LayerNorm(nn.Module):
  """BERT's layer norm (scale and bias), computed in fp32."""
  eps: float = 1e-12
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = param(self, 'scale', nn.initializers.ones, (features,), ('embed',))
    bias = param(self, 'bias', nn.initializers.zeros, (features,), ('embed',))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(variance + self.eps)
    return (y * scale + bias).astype(self.dtype)


def num_params(params: Any) -> int:
  """Scalars of a params tree; an adapted kernel (e.g. NF4) counts as the
  [in, out] kernel it stands for."""
  leaves = jax.tree.leaves(params, is_leaf=is_adapted_kernel)
  return int(sum(x.size if is_adapted_kernel(x) else np.size(x)
                 for x in leaves))
