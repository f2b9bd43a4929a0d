"""NB-LoRA: low-rank updates with every singular value explicitly bounded.

Norm-Bounded Low-Rank Adaptation (Wang, Dvijotham, Manchester, arXiv
2501.19050) parameterises a rank-R update of a kernel W [in, out] so that
each singular value is below a prescribed bound, which then bounds any
unitarily invariant norm of the update; the map from the free parameters is
unconstrained (any real values), smooth and complete (it reaches every
rank-R matrix inside the bounds).

    method = nblora.nblora(rank=8, bound=1.0, norm='frobenius')
    adapter = method.init(rng, base)  # {path: {'x_in', 'x_out', 'd'}}
    params, kw = method.apply(base, adapter)

The parameterisation used here (see `factors`):

    U = cayley(x_in) [in, R],  V = cayley(x_out) [out, R]   (U'U = V'V = I)
    s = gamma * tanh(d)  [R]
    update = U diag(s) V'

where `cayley` is the Cayley transform of a tall matrix X = [Y; Z]
(Y [R, R], Z [n - R, R]): with M = Y - Y' + Z'Z,
U = [(I - M)(I + M)^-1; -2 Z (I + M)^-1] has orthonormal columns for every
X (I + M has symmetric part I + Z'Z > 0, so it is always invertible: one
R x R solve per side). The singular values of the update are |s_i| < gamma
exactly, and the sign of s_i absorbs the column signs the Cayley map cannot
produce. Choices this module makes (the paper leaves them to the user):
  * every singular value gets the same bound gamma, set from the configured
    norm so that the norm of the update stays below `bound`:
    'spectral' gamma = bound, 'frobenius' gamma = bound / sqrt(R),
    'nuclear' gamma = bound / R (a singular-value vector with all |s_i| <
    gamma has exactly these norms below `bound`, and all |s_i| -> gamma
    reaches it);
  * s = gamma tanh(d) (smooth, odd, onto (-gamma, gamma));
  * init: d = 0 (update 0: the model starts at the base, and, unlike LoRA's
    B = 0, the gradient w.r.t. d is not zero), x_in, x_out ~ N(0, 1/n) so
    U, V start as random orthonormal frames.

Compute is factored: `apply` puts a `lora.LoraKernel(w, U diag(s), V', 1)`
in place of each targeted kernel, so a layer computes x W + ((x U) s) V'
and the dense update is never formed in the train step. The export writes
exactly these factors as a plain PEFT LoRA folder (lora_alpha = r, scale 1):
the served model is the same.
"""
import dataclasses
import math
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp

from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft import lora_form

Array = jax.Array
NORMS = ('spectral', 'frobenius', 'nuclear')
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class NbLoraConfig:
  """NB-LoRA hyperparameters.

  Attributes:
    rank: R.
    bound: the largest allowed `norm` of each kernel's update (>= 0).
    norm: one of NORMS.
    targets: regexes over "/"-joined kernel paths, or None for the preset.
    dropout: dropout on the layer input of the update branch.
  """
  rank: int = 8
  bound: float = 1.0
  norm: str = 'frobenius'
  targets: tuple[str, ...] | None = None
  dropout: float = 0.0

  @property
  def gamma(self) -> float:
    """The bound on every singular value (see the module docstring)."""
    divisor = {'spectral': 1.0, 'frobenius': math.sqrt(self.rank),
               'nuclear': float(self.rank)}[self.norm]
    return self.bound / divisor

  def paths(self, base: Mapping[str, Any]) -> list[str]:
    """The validated kernel paths (LoRA's target rules and rank check)."""
    return lora.make_config(self.rank, targets=self.targets).paths(base)


def cayley(x: Array) -> Array:
  """[n, R] (n >= R) -> [n, R] with orthonormal columns, smooth in x."""
  n, r = x.shape
  x = jnp.asarray(x, jnp.float32)
  y, z = x[:r], x[r:]
  eye = jnp.eye(r, dtype=jnp.float32)
  m = y - y.T + jnp.matmul(z.T, z, precision=_HI)            # [R, R]
  # (I - M)(I + M)^-1 and Z (I + M)^-1 from one solve with (I + M)'.
  inv_t = jnp.linalg.solve((eye + m).T, jnp.concatenate(
      [(eye - m).T, -2.0 * z.T], axis=1))                     # [R, n]
  return inv_t.T


def singular_values(config: NbLoraConfig, d: Array) -> Array:
  """[R] signed singular values gamma * tanh(d) of the update."""
  return config.gamma * jnp.tanh(jnp.asarray(d, jnp.float32))


def factors(config: NbLoraConfig, leaf: Mapping[str, Array]
            ) -> tuple[Array, Array]:
  """(a [in, R], b [R, out]) with update = a @ b = U diag(s) V'."""
  u, v = cayley(leaf['x_in']), cayley(leaf['x_out'])
  s = singular_values(config, leaf['d'])
  return u * s, v.T


def make_config(rank: int = 8, bound: float = 1.0, norm: str = 'frobenius',
                targets: str | Iterable[str] | None = None,
                dropout: float = 0.0) -> NbLoraConfig:
  """Validates arguments into an `NbLoraConfig`; see `nblora`."""
  checked = lora.make_config(rank, targets=targets, dropout=dropout)
  if norm not in NORMS:
    raise ValueError(f'nblora norm must be one of {NORMS}, got {norm!r}.')
  if not bound >= 0:
    raise ValueError(f'nblora bound must be >= 0 (0: no update), got '
                     f'{bound!r}.')
  return NbLoraConfig(checked.rank, float(bound), norm, checked.targets,
                      checked.dropout)


def _init_leaf(rng: Array, shape: tuple[int, int], rank: int
               ) -> dict[str, Array]:
  r_in, r_out = jax.random.split(rng)
  fan_in, fan_out = shape
  return {
      'x_in': jax.random.normal(r_in, (fan_in, rank)) / math.sqrt(fan_in),
      'x_out': jax.random.normal(r_out, (fan_out, rank)) / math.sqrt(fan_out),
      'd': jnp.zeros((rank,), jnp.float32)}


def kernels(config: NbLoraConfig, base: Mapping[str, Any],
            adapter: Mapping[str, Any]) -> dict[str, lora.LoraKernel]:
  """{path: LoraKernel(w, U diag(s), V', scale 1)} for each adapted kernel."""
  out = {}
  for path, leaf in peft_base.flatten(adapter, is_leaf=_is_node).items():
    w = peft_base.get(base, path)
    expected = {'x_in': (w.shape[0], config.rank),
                'x_out': (w.shape[1], config.rank), 'd': (config.rank,)}
    shapes = {k: tuple(leaf[k].shape) for k in expected if k in leaf}
    if shapes != expected:
      raise ValueError(f'nblora adapter {path} has shapes {shapes}, kernel '
                       f'{tuple(w.shape)} at rank {config.rank} needs '
                       f'{expected}; was it made with another config?')
    a, b = factors(config, leaf)
    out[path] = lora.LoraKernel(w, a, b, 1.0, config.dropout)
  return out


def _is_node(node: Any) -> bool:
  return isinstance(node, Mapping) and 'd' in node and 'x_in' in node


def logical_axes(base_axes: Any, adapter: Any) -> Any:
  """x_in (in_axis, 'lora_rank'), x_out (out_axis, 'lora_rank'), d."""
  flat_axes = peft_base.flatten(base_axes)
  out = {}
  for path in peft_base.flatten(adapter, is_leaf=_is_node):
    axes = flat_axes[path]
    spec = isinstance(axes, jax.sharding.PartitionSpec)
    in_axis, out_axis = tuple(axes)
    names = {'x_in': (in_axis, 'lora_rank'), 'x_out': (out_axis, 'lora_rank'),
             'd': ('lora_rank',)}
    out[path] = {k: jax.sharding.PartitionSpec(*v) if spec else v
                 for k, v in names.items()}
  return peft_base.unflatten(out)


def as_lora(config: NbLoraConfig, adapter: Any
            ) -> tuple[peft_base.PeftMethod, dict[str, Any]]:
  """The same update as a plain LoRA method (scale 1) and its adapter."""
  flat = peft_base.flatten(adapter, is_leaf=_is_node)
  factor = {p: dict(zip(('a', 'b'), factors(config, leaf)))
            for p, leaf in flat.items()}
  method = lora.lora(rank=config.rank, alpha=float(config.rank),
                     targets=[_exact(p) for p in flat],
                     dropout=config.dropout)
  return method, peft_base.unflatten(factor)


def _exact(path: str) -> str:
  return ''.join('\\' + c if c in '.^$*+?{}[]|()\\' else c for c in path)


def nblora(rank: int = 8, bound: float = 1.0, norm: str = 'frobenius',
           targets: str | Iterable[str] | None = None,
           dropout: float = 0.0) -> peft_base.PeftMethod:
  """NB-LoRA as a `PeftMethod` (see the module docstring).

  Args:
    rank: R of every targeted kernel's update.
    bound: the configured `norm` of each update stays below this (0: the
      model is the base, whatever the adapter holds).
    norm: 'spectral', 'frobenius' or 'nuclear'.
    targets: regexes over kernel paths, a key of `lora.TARGETS`, or None.
    dropout: dropout on the input of the update branch while training.

  Returns:
    A PeftMethod whose adapter maps each targeted kernel path to
    {'x_in': [in, R], 'x_out': [out, R], 'd': [R]}.
  """
  config = make_config(rank, bound, norm, targets, dropout)

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
