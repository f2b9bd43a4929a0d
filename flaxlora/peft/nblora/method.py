"""NB-LoRA: low-rank updates with every singular value explicitly bounded.

Norm-Bounded Low-Rank Adaptation (Wang, Dvijotham, Manchester, arXiv
2501.19050): a rank-R update of a kernel whose singular values are bounded
one by one, so that a chosen unitarily invariant norm of the update never
exceeds `bound`. The map from the free parameters is unconstrained, smooth
and complete (it reaches every rank-R matrix within the bounds).

    method = nblora.nblora(rank=8, bound=1.0, norm='frobenius')
    adapter = method.init(rng, base)  # {path: {'x_in', 'x_out', 'v'}}
    params, kw = method.apply(base, adapter)

The paper's parameterisation (its NB-LoRA construction and the Schatten-p
corollary), in its notation: W [m, n] acts as W x (m the output side); the
free parameters are A~ [r, m], B~ [r, n] and v [r]:

    [A'; B'] = Cayley([A~'; B~'])   ONE Cayley map of the stacked [m + n, r]
    s = delta * softmax(v / eta) ** (1 / p)      (Schatten-p bound delta)
    W = 2 A' diag(s) B

where Cayley([X; Y]) = [(I - Z)(I + Z)^-1; -2 Y (I + Z)^-1] with
Z = X - X' + Y'Y (X the top r x r block; I + Z is always invertible: one
r x r solve; the map of Wang & Manchester's direct parameterisation of
Lipschitz networks). P = [A'; B'] has orthonormal columns (A A' + B B' = I),
so each column's unit norm is split between A' and B'. Bound: with
J = diag(I, -I), [[0, W], [W', 0]] = P S P' - J P S P' J, so by Weyl
sigma_i(W) <= s_(i) (sorted) and every unitarily invariant norm of W is at
most that of diag(s); sum_i s_i^p = delta^p then gives ||W||_{S_p} <= delta
for p = 1 ('nuclear'), 2 ('frobenius') and infinity ('spectral': s = delta,
v has no effect). Completeness: A' = U cos(theta), B' = V sin(theta) (U, V
orthonormal) gives W = U diag(s sin 2 theta) V', any sigma_i <= s_i; the
bound itself at theta = pi / 4. The softmax lets one direction take the
whole budget, so the whole rank-r Schatten ball is reached, not a cube in it.

Here a kernel is w [in, out] acting as x w (in = n, out = m), so x_out
[out, R] is A~', x_in [in, R] is B~', and the update is

    [p_out; p_in] = cayley([x_out; x_in])   (p_out' p_out + p_in' p_in = I)
    update = (2 p_in * s) @ p_out'          =: a [in, R] @ b [R, out]

Choices this module makes where the paper leaves them open (each checked in
tests/test_nblora.py):
  * init: the paper's A~ = 0 (the update starts at 0). The square block X
    of the stacked Cayley map is the top R x R block of [A~'; B~'], so it
    comes from A~', the output side (W [m, n] acts as W x, A~ [r, m]);
    here x_out's first R rows (PyTorch's weight is [out, in] = [m, n]).
    With x_out = 0 the top block (I - Z)(I + Z)^-1 of p_out vanishes only
    if Z = x_in' x_in = I: x_in is a random orthonormal frame (QR of a
    Gaussian; the update is 0 up to the float32 rounding of its
    orthonormality, ~1e-8), p_out = 0, p_in = -x_in; v = 0 (every
    s_i = s0 = delta R^(-1/p)). Differentiating there gives the starting
    Jacobian: the update moves by s0 x_in [dZ' | 2 dx_out[R:]'] with
    dZ = dX - dX' + dx_in' x_in + x_in' dx_in, dX = dx_out[:R]: in
    span(x_in), driven by the output factor as LoRA's by b = 0; the first
    R output columns through the square block's skew part and x_in's
    symmetric part, the others by 2 dx_out; v not at first order
    (test_the_starting_jacobian_is_the_derived_one);
  * eta is the `temperature` argument, default 1.0; s is computed as
    delta * exp(log_softmax(v / eta) / p) so that its gradient stays finite
    when a softmax entry underflows (test_bounds_spend_the_whole_budget);
  * the bound is per kernel: each targeted kernel's update has norm <=
    `bound` (test_singular_values_respect_the_bound,
    test_the_parameterisation_reaches_the_bound), or with `relative`
    <= `bound` x the Frobenius norm of its base kernel (MiniLM's
    targeted kernels have 17 to 55, so an absolute bound of 1 caps each
    update at 2-6% of its kernel; test_a_relative_bound_scales_with_the_
    kernel). Frobenius for every `norm`: a reduction, no SVD per step.

Compute is factored: `apply` puts a `lora.LoraKernel(w, a, b, 1)` in place of
each targeted kernel, so a layer computes x w + ((x a) b) and the dense
update is never formed in the train step (the Cayley map costs an R x R
solve and an [R, in + out] x [in + out, R] product per kernel). The export
writes exactly these factors as a plain PEFT LoRA folder (lora_alpha = r,
scale 1): the served model is the same.
"""
import dataclasses
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp

from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft.lora import form as lora_form

Array = jax.Array
# 1 / p of each Schatten-p norm (p = infinity for 'spectral').
EXPONENT = {'spectral': 0.0, 'frobenius': 0.5, 'nuclear': 1.0}
NORMS = tuple(EXPONENT)
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class NbLoraConfig:
  """NB-LoRA hyperparameters.

  Attributes:
    rank: R.
    bound: delta, the largest allowed `norm` of each kernel's update (>= 0).
    norm: one of NORMS (Schatten p = infinity, 2, 1).
    targets: regexes over "/"-joined kernel paths, or None for the preset.
    dropout: dropout on the layer input of the update branch.
    temperature: eta, the softmax temperature of the bounds s (> 0).
    relative: delta is `bound` x the Frobenius norm of each base kernel
      (so one bound suits kernels of any size); False: `bound` itself.
  """
  rank: int = 8
  bound: float = 1.0
  norm: str = 'frobenius'
  targets: tuple[str, ...] | None = None
  dropout: float = 0.0
  temperature: float = 1.0
  relative: bool = False

  def paths(self, base: Mapping[str, Any]) -> list[str]:
    """The validated kernel paths (LoRA's target rules and rank check)."""
    return lora.make_config(self.rank, targets=self.targets).paths(base)


def cayley(x: Array) -> Array:
  """[n, R] (n >= R) -> [n, R] with orthonormal columns, smooth in x.

  x = [X; Y] (X [R, R]) -> [(I - Z)(I + Z)^-1; -2 Y (I + Z)^-1] with
  Z = X - X' + Y'Y; I + Z has symmetric part I + Y'Y > 0, so it is always
  invertible.
  """
  r = x.shape[1]
  x = jnp.asarray(x, jnp.float32)
  y, z = x[:r], x[r:]
  eye = jnp.eye(r, dtype=jnp.float32)
  m = y - y.T + jnp.matmul(z.T, z, precision=_HI)            # [R, R]
  # (I - M)(I + M)^-1 and Z (I + M)^-1 from one solve with (I + M)'.
  inv_t = jnp.linalg.solve((eye + m).T, jnp.concatenate(
      [(eye - m).T, -2.0 * z.T], axis=1))                     # [R, n]
  return inv_t.T


def delta(config: NbLoraConfig, w: Array) -> Array:
  """The bound of the update of kernel `w` [in, out] (a scalar)."""
  if not config.relative:
    return jnp.float32(config.bound)
  w = jnp.asarray(w, jnp.float32)
  return config.bound * jnp.sqrt(jnp.sum(w * w))


def bounds(config: NbLoraConfig, v: Array, limit: Array | float | None = None
           ) -> Array:
  """[R] -> [R] bounds s = delta softmax(v / eta)^(1/p), sum s^p = delta^p.

  delta is `limit` (a kernel's `delta`), `config.bound` when None. In log
  space, so the gradient stays finite when a softmax entry underflows.
  """
  log_share = jax.nn.log_softmax(
      jnp.asarray(v, jnp.float32) / config.temperature)
  limit = config.bound if limit is None else limit
  return limit * jnp.exp(EXPONENT[config.norm] * log_share)


def frames(leaf: Mapping[str, Array]) -> tuple[Array, Array]:
  """(p_in [in, R], p_out [out, R]), jointly orthonormal columns:
  [p_out; p_in] = cayley([x_out; x_in])."""
  n_out = leaf['x_out'].shape[0]
  p = cayley(jnp.concatenate([jnp.asarray(leaf['x_out'], jnp.float32),
                              jnp.asarray(leaf['x_in'], jnp.float32)]))
  return p[n_out:], p[:n_out]


def factors(config: NbLoraConfig, leaf: Mapping[str, Array],
            limit: Array | float | None = None) -> tuple[Array, Array]:
  """(a [in, R], b [R, out]): update = a @ b = 2 p_in diag(s) p_out'
  (s from `bounds`, with delta `limit`)."""
  p_in, p_out = frames(leaf)
  return 2.0 * p_in * bounds(config, leaf['v'], limit), p_out.T


def make_config(rank: int = 8, bound: float = 1.0, norm: str = 'frobenius',
                targets: str | Iterable[str] | None = None,
                dropout: float = 0.0, temperature: float = 1.0,
                relative: bool = False) -> NbLoraConfig:
  """Validates arguments into an `NbLoraConfig`; see `nblora`."""
  checked = lora.make_config(rank, targets=targets, dropout=dropout)
  if norm not in NORMS:
    raise ValueError(f'nblora norm must be one of {NORMS}, got {norm!r}.')
  if not bound >= 0:
    raise ValueError(f'nblora bound must be >= 0 (0: no update), got '
                     f'{bound!r}.')
  if not temperature > 0:
    raise ValueError(f'nblora temperature must be > 0, got {temperature!r}.')
  return NbLoraConfig(checked.rank, float(bound), norm, checked.targets,
                      checked.dropout, float(temperature), bool(relative))


def _init_leaf(rng: Array, shape: tuple[int, int], rank: int
               ) -> dict[str, Array]:
  """x_out = 0, x_in orthonormal, v = 0: the update starts at 0."""
  fan_in, fan_out = shape
  frame, _ = jnp.linalg.qr(jax.random.normal(rng, (fan_in, rank)))
  return {'x_in': frame.astype(jnp.float32),
          'x_out': jnp.zeros((fan_out, rank), jnp.float32),
          'v': jnp.zeros((rank,), jnp.float32)}


def kernels(config: NbLoraConfig, base: Mapping[str, Any],
            adapter: Mapping[str, Any]) -> dict[str, lora.LoraKernel]:
  """{path: LoraKernel(w, a, b, scale 1)} for each adapted kernel."""
  out = {}
  for path, leaf in peft_base.flatten(adapter, is_leaf=_is_node).items():
    w = peft_base.get(base, path)
    expected = {'x_in': (w.shape[0], config.rank),
                'x_out': (w.shape[1], config.rank), 'v': (config.rank,)}
    shapes = {k: tuple(leaf[k].shape) for k in expected if k in leaf}
    if shapes != expected:
      raise ValueError(f'nblora adapter {path} has shapes {shapes}, kernel '
                       f'{tuple(w.shape)} at rank {config.rank} needs '
                       f'{expected}; was it made with another config?')
    a, b = factors(config, leaf, delta(config, w))
    out[path] = lora.LoraKernel(w, a, b, 1.0, config.dropout)
  return out


def _is_node(node: Any) -> bool:
  return isinstance(node, Mapping) and 'v' in node and 'x_in' in node


def logical_axes(base_axes: Any, adapter: Any) -> Any:
  """x_in (in_axis, 'lora_rank'), x_out (out_axis, 'lora_rank'), v."""
  flat_axes = peft_base.flatten(base_axes)
  out = {}
  for path in peft_base.flatten(adapter, is_leaf=_is_node):
    axes = flat_axes[path]
    spec = isinstance(axes, jax.sharding.PartitionSpec)
    in_axis, out_axis = tuple(axes)
    names = {'x_in': (in_axis, 'lora_rank'), 'x_out': (out_axis, 'lora_rank'),
             'v': ('lora_rank',)}
    out[path] = {k: jax.sharding.PartitionSpec(*v) if spec else v
                 for k, v in names.items()}
  return peft_base.unflatten(out)


def as_lora(config: NbLoraConfig, adapter: Any, base: Any
            ) -> tuple[peft_base.PeftMethod, dict[str, Any]]:
  """The same update as a plain LoRA method (scale 1) and its adapter."""
  flat = peft_base.flatten(adapter, is_leaf=_is_node)
  factor = {p: dict(zip(('a', 'b'), factors(
      config, leaf, delta(config, peft_base.get(base, p)))))
            for p, leaf in flat.items()}
  method = lora.lora(rank=config.rank, alpha=float(config.rank),
                     targets=[_exact(p) for p in flat],
                     dropout=config.dropout)
  return method, peft_base.unflatten(factor)


def _exact(path: str) -> str:
  return ''.join('\\' + c if c in '.^$*+?{}[]|()\\' else c for c in path)


def nblora(rank: int = 8, bound: float = 1.0, norm: str = 'frobenius',
           targets: str | Iterable[str] | None = None,
           dropout: float = 0.0, temperature: float = 1.0,
           relative: bool = False) -> peft_base.PeftMethod:
  """NB-LoRA as a `PeftMethod` (see the module docstring).

  Args:
    rank: R of every targeted kernel's update.
    bound: delta; the configured `norm` of each kernel's update is at most
      this (0: the model is the base, whatever the adapter holds).
    norm: 'spectral', 'frobenius' or 'nuclear'.
    targets: regexes over kernel paths, a key of `lora.TARGETS`, or None.
    dropout: dropout on the input of the update branch while training.
    temperature: eta in s = delta softmax(v / eta)^(1/p) (> 0).
    relative: the bound of each kernel's update is `bound` x its base
      kernel's Frobenius norm (MiniLM's targeted kernels: 17 to 55, so
      bound=1.0 without it allows 2-6% of a kernel); False: `bound`.

  Returns:
    A PeftMethod whose adapter maps each targeted kernel path to
    {'x_in': [in, R], 'x_out': [out, R], 'v': [R]}.
  """
  config = make_config(rank, bound, norm, targets, dropout, temperature,
                       relative)

  def init(rng, base):
    paths = config.paths(base)
    rngs = jax.random.split(rng, len(paths))
    return peft_base.unflatten({
        p: _init_leaf(r, tuple(peft_base.get(base, p).shape), config.rank)
        for p, r in zip(paths, rngs)})

  def apply(base, adapter):
    return peft_base.replace(base, kernels(config, base, adapter)), {}

  return peft_base.PeftMethod(
      init, apply, config, logical_axes=logical_axes,
      export=lora_form.export(NbLoraConfig, as_lora))
