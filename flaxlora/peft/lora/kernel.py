"""LoRA's kernel node and construction (rsLoRA, DoRA, PiSSA included).

    method = lora.lora(rank=8, alpha=16, targets='t5')
    adapter = method.init(rng, base)  # {path: {'a': [in, R], 'b': [R, out]}}
    params, kw = method.apply(base, adapter)
    logits = model.apply({'params': params}, *inputs, **kw)

`apply` replaces each targeted kernel W [in, out] by a `LoraKernel` pytree
node; the models' single dense op (`layers.dot`) calls its `dot`, which
computes `x W + scale * (dropout(x) A) B` without ever forming the dense
`W + scale A B` (that exists only in `merge`). Gradients taken w.r.t. the
adapter alone reach A, B (and DoRA's magnitude) and nothing else.

Initialisation follows PEFT 0.21: 'default' draws A like torch's
`kaiming_uniform_(a=sqrt(5))` on PEFT's [R, in] lora_A, i.e.
U(-1/sqrt(in), 1/sqrt(in)), and B = 0, so the output equals the base at init;
'gaussian' draws A ~ N(0, std=1/R), B = 0; 'pissa' takes A, B from the top-R
SVD of W and trains over the residual base W - scale A B, which the method's
`prepare_base` hook computes (see `pissa`).
"""
import dataclasses
import math
from typing import Any, Iterable, Mapping

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from flaxlora.models import dropout as dropout_lib
from flaxlora.models import layers
from flaxlora.peft import base as peft_base
from flaxlora.peft.lora import dora
from flaxlora.peft.lora import pissa

Array = jax.Array

# Per-family default targets: PEFT 0.21's
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING over flaxlora's paths
# (T5 q, v; BERT query, value; Llama, Mistral, Qwen2 q_proj, v_proj; GPT-2
# the fused c_attn).
TARGETS = {
    't5': r'.*/(q|v)/kernel',
    'bert': r'.*/attention/(query|value)/kernel',
    'llama': r'.*/self_attn/(q|v)_proj/kernel',
    'gpt2': r'.*/attn/c_attn/kernel',
}
INITS = ('default', 'gaussian', 'pissa')


@struct.dataclass
class LoraKernel(layers.WrapsKernel):
  """A kernel W [in, out] with a low-rank update; see `layers.dot`.

  Attributes:
    w: [in, out] frozen base kernel.
    a: [in, R].
    b: [R, out].
    scale: alpha / R (or alpha / sqrt(R) for rsLoRA).
    dropout_rate: LoRA dropout on the input of A.
    magnitude: [out] DoRA magnitude, or None for plain LoRA.
  """
  w: Array
  a: Array
  b: Array
  scale: float = struct.field(pytree_node=False)
  dropout_rate: float = struct.field(pytree_node=False, default=0.0)
  magnitude: Array | None = None

  @property
  def needs_rng(self) -> bool:
    return self.dropout_rate > 0.0

  def dot(self, x: Array, *, dtype: jnp.dtype,
          dropout_rng: Array | None = None) -> Array:
    """[..., in] -> [..., out] in `dtype`; products accumulate in fp32."""

    def mm(u, v):
      if not isinstance(v, (jax.Array, np.ndarray)):  # e.g. an NF4 base
        return v.matmul(u, dtype)  # dequantised on the fly, not stored
      return layers.matmul(u, v, dtype=dtype)

    y = mm(x, self.w)
    dropped = dropout_rng is not None and self.dropout_rate > 0.0
    xd = (dropout_lib.dropout(x, self.dropout_rate, dropout_rng) if dropped
          else x)
    # The scale multiplies the narrow [..., R] product, not the wide output:
    # the backward pass then scales R columns, not `out` of them.
    lora_out = mm(self.scale * mm(xd, self.a), self.b)
    if self.magnitude is None:
      return (y + lora_out).astype(dtype)
    norm = dora.column_norm(self.w, self.a, self.b, self.scale)
    dropped_base = mm(xd, self.w) if dropped else None
    return dora.combine(y, dropped_base, lora_out, self.magnitude,
                        norm).astype(dtype)

  def merged(self) -> Array:
    """The dense fp32 kernel this node computes with (no dropout)."""
    w = jnp.asarray(self.w, jnp.float32)
    dense = w + self.scale * jnp.matmul(
        jnp.asarray(self.a, jnp.float32), jnp.asarray(self.b, jnp.float32),
        precision=jax.lax.Precision.HIGHEST)
    if self.magnitude is None:
      return dense
    norm = jnp.linalg.norm(dense, axis=0)
    return dense * (self.magnitude / norm)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyperparameters (PEFT's names in parentheses).

  Attributes:
    rank: R (r).
    alpha: (lora_alpha).
    targets: regexes over "/"-joined kernel paths (target_modules), or None
      for the preset in `TARGETS` that matches the params.
    dropout: (lora_dropout).
    rank_pattern: ((regex, R), ...); the first regex that fullmatches a path
      sets its rank.
    alpha_pattern: ((regex, alpha), ...), likewise.
    use_rslora: scale alpha / sqrt(R) instead of alpha / R.
    init: one of INITS (init_lora_weights).
    use_dora: weight-decomposed LoRA.
    loraplus_ratio: LoRA+ (Hayou et al. 2024): B's learning rate is this
      many times A's (1.0: plain LoRA); see `loraplus`.
  """
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] | None = None
  dropout: float = 0.0
  rank_pattern: tuple[tuple[str, int], ...] = ()
  alpha_pattern: tuple[tuple[str, float], ...] = ()
  use_rslora: bool = False
  init: str = 'default'
  use_dora: bool = False
  loraplus_ratio: float = 1.0

  def rank_for(self, path: str) -> int:
    pattern = peft_base.first_match(dict(self.rank_pattern), path)
    return self.rank if pattern is None else dict(self.rank_pattern)[pattern]

  def alpha_for(self, path: str) -> float:
    pattern = peft_base.first_match(dict(self.alpha_pattern), path)
    return self.alpha if pattern is None else dict(self.alpha_pattern)[pattern]

  def scale_for(self, path: str) -> float:
    rank = self.rank_for(path)
    denominator = math.sqrt(rank) if self.use_rslora else rank
    return self.alpha_for(path) / denominator

  def paths(self, base: Mapping[str, Any]) -> list[str]:
    """The kernel paths of `base` this config adapts (validated)."""
    targets = self.targets or _preset(base)
    paths = peft_base.select(base, targets, what='lora targets', ndim=2)
    for path in paths:
      if not path.endswith('/kernel') and path != 'kernel':
        raise ValueError(
            f'lora targets {list(targets)} matched {path}; LoRA adapts dense '
            'kernels only (paths ending in /kernel), narrow the regex.')
    for name, pattern_items in (('rank_pattern', self.rank_pattern),
                                ('alpha_pattern', self.alpha_pattern)):
      for pattern, _ in pattern_items:
        if not any(peft_base.first_match([pattern], p) for p in paths):
          raise ValueError(
              f'lora {name} regex {pattern!r} matches none of the targeted '
              f'kernels, e.g. {paths[:3]}; fix or remove it.')
    for path in paths:
      rank, shape = self.rank_for(path), peft_base.get(base, path).shape
      if rank > min(shape):
        raise ValueError(
            f'lora rank {rank} for {path} exceeds min{tuple(shape)} = '
            f'{min(shape)}; lower rank (or set rank_pattern for this path).')
    return paths


def _preset(base: Mapping[str, Any]) -> tuple[str, ...]:
  paths = sorted(peft_base.flatten(base))
  hits = [name for name, regex in TARGETS.items()
          if any(peft_base.first_match([regex], p) for p in paths)]
  if len(hits) != 1:
    raise ValueError(
        f'lora: targets=None needs params that match exactly one preset of '
        f'lora.TARGETS {TARGETS}, but {len(hits)} match; pass targets= '
        f'(regexes over paths like {paths[:3]}).')
  return (TARGETS[hits[0]],)


def _check_rank(rank: Any, what: str) -> int:
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    raise ValueError(f'lora {what} must be a positive int, got {rank!r}.')
  return rank


def make_config(rank: int = 8, alpha: float = 16.0,
                targets: str | Iterable[str] | None = None,
                dropout: float = 0.0,
                rank_pattern: Mapping[str, int] | None = None,
                alpha_pattern: Mapping[str, float] | None = None,
                use_rslora: bool = False, init: str = 'default',
                use_dora: bool = False,
                loraplus_ratio: float = 1.0) -> LoraConfig:
  """Validates arguments into a `LoraConfig`; see `lora` for their meaning."""
  _check_rank(rank, 'rank')
  rank_pattern = dict(rank_pattern or {})
  for pattern, r in rank_pattern.items():
    _check_rank(r, f'rank_pattern[{pattern!r}]')
  alpha_pattern = dict(alpha_pattern or {})
  peft_base.as_patterns(list(rank_pattern) or ['.*'], 'lora rank_pattern')
  peft_base.as_patterns(list(alpha_pattern) or ['.*'], 'lora alpha_pattern')
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'lora dropout must be in [0, 1), got {dropout!r}.')
  if init not in INITS:
    raise ValueError(f'lora init must be one of {INITS}, got {init!r}.')
  if not loraplus_ratio > 0:
    raise ValueError(f'lora loraplus_ratio must be > 0 (1.0: plain LoRA), '
                     f'got {loraplus_ratio!r}.')
  if isinstance(targets, str) and targets in TARGETS:
    targets = TARGETS[targets]
  if targets is not None:
    targets = peft_base.as_patterns(targets, 'lora targets')
  return LoraConfig(rank, float(alpha), targets, float(dropout),
                    tuple(rank_pattern.items()),
                    tuple((k, float(v)) for k, v in alpha_pattern.items()),
                    bool(use_rslora), init, bool(use_dora),
                    float(loraplus_ratio))


def _init_leaf(rng: Array, w: Any, rank: int, scale: float, init: str,
               use_dora: bool) -> dict[str, Array]:
  """{'a': [in, R], 'b': [R, out] (+ 'magnitude' [out])} for kernel `w`."""
  fan_in, fan_out = w.shape
  if init == 'pissa':  # W's top-R part (a prepared kernel keeps it)
    a, b = pissa.factors(w, rank, scale)
    w = pissa.original(w)
  else:
    if init == 'gaussian':
      a = jax.random.normal(rng, (fan_in, rank), jnp.float32) / rank
    else:
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(rng, (fan_in, rank), jnp.float32, -bound, bound)
    b = jnp.zeros((rank, fan_out), jnp.float32)
  leaf = {'a': a, 'b': b}
  if use_dora:
    # ||W + s A B|| equals ||W|| at init: B = 0, or (PiSSA) the base is the
    # residual W - s A B.
    leaf['magnitude'] = jnp.linalg.norm(jnp.asarray(w, jnp.float32), axis=0)
  return leaf


def is_lora_node(node: Any) -> bool:
  return isinstance(node, Mapping) and 'a' in node and 'b' in node


def init(config: LoraConfig, rng: Array, base: Mapping[str, Any]
         ) -> dict[str, Any]:
  """The adapter of `config` over `base`: {path: {'a', 'b'(, 'magnitude')}}."""
  paths = config.paths(base)
  rngs = jax.random.split(rng, len(paths))
  return peft_base.unflatten({
      path: _init_leaf(r, peft_base.get(base, path), config.rank_for(path),
                       config.scale_for(path), config.init, config.use_dora)
      for path, r in zip(paths, rngs)})


def apply(config: LoraConfig, base: Mapping[str, Any], adapter: Any
          ) -> dict[str, Any]:
  """`base` with each adapted kernel replaced by its `LoraKernel`."""
  if config.init == 'pissa':  # W_res (computed here if not prepared)
    base = pissa.residual_base(config, base)
  return peft_base.replace(base, kernels(config, base, adapter))


def kernels(config: LoraConfig, base: Mapping[str, Any],
            adapter: Mapping[str, Any]) -> dict[str, LoraKernel]:
  """{path: LoraKernel} for each adapted kernel of `base`."""
  out = {}
  for path, leaf in peft_base.flatten(adapter, is_leaf=is_lora_node).items():
    if not is_lora_node(leaf):
      raise ValueError(f'lora adapter entry {path} is not a '
                       "{'a', 'b'} dict; build adapters with method.init.")
    try:
      w = peft_base.get(base, path)
    except (KeyError, TypeError) as e:
      raise ValueError(f'lora adapter has {path}, which the params lack; '
                       'was it made for another model?') from e
    if layers.is_adapted_kernel(w):
      raise ValueError(f'{path} is already adapted by an earlier chained '
                       'method; target each kernel once.')
    rank = config.rank_for(path)
    if tuple(leaf['a'].shape) != (w.shape[0], rank) or tuple(
        leaf['b'].shape) != (rank, w.shape[1]):
      raise ValueError(
          f'lora adapter {path}: a {tuple(leaf["a"].shape)}, b '
          f'{tuple(leaf["b"].shape)} do not fit kernel {tuple(w.shape)} at '
          f'rank {rank}; was the adapter made with another config?')
    out[path] = LoraKernel(w, leaf['a'], leaf['b'], config.scale_for(path),
                           config.dropout, leaf.get('magnitude'))
  return out


def adapter_logical_axes(base_axes: Mapping[str, Any], adapter: Any) -> Any:
  """Logical axis names for every adapter leaf (for the sharding rules).

  A LoRA entry inherits the axis it shares with its base kernel:
  kernel (in_axis, out_axis) -> a (in_axis, 'lora_rank'),
  b ('lora_rank', out_axis), magnitude (out_axis,). A fully trained copy
  (`trainable`) takes its base leaf's axes. Chains (tuples) map elementwise.

  Args:
    base_axes: the params tree with a tuple of names (or a PartitionSpec of
      names) at each leaf.
    adapter: an adapter of any LoRA/trainable combination.
  """
  if isinstance(adapter, (tuple, list)):
    return type(adapter)(adapter_logical_axes(base_axes, a) for a in adapter)
  flat_axes = peft_base.flatten(base_axes)
  out = {}
  for path, leaf in peft_base.flatten(adapter, is_leaf=is_lora_node).items():
    if path not in flat_axes:
      raise ValueError(f'adapter path {path} has no logical axes in the base '
                       'axes tree; pass the axes of the same model.')
    axes = flat_axes[path]
    if not is_lora_node(leaf):
      out[path] = axes
      continue
    spec = isinstance(axes, jax.sharding.PartitionSpec)
    in_axis, out_axis = tuple(axes)
    names = {'a': (in_axis, 'lora_rank'), 'b': ('lora_rank', out_axis)}
    if 'magnitude' in leaf:
      names['magnitude'] = (out_axis,)
    out[path] = {k: jax.sharding.PartitionSpec(*v) if spec else v
                 for k, v in names.items()}
  return peft_base.unflatten(out)
