"""IA3's kernel node and construction (Liu et al. 2022, "(IA)^3").

    method = ia3.ia3()                    # the family's preset targets
    adapter = method.init(rng, base)      # {kernel path: l}, all ones
    params, kw = method.apply(base, adapter)

IA3 learns one vector per targeted layer that rescales activations, as
Hugging Face PEFT 0.21's `IA3` does (its names in parentheses):
  * attention keys and values (target_modules): the layer's output is
    scaled, `(x W + b) * l`, l [out]; `apply` puts an `Ia3Kernel` in place of
    W (computing `(x W) * l`, never `W * l`) and `b * l` in place of b.
  * feed-forward layers (feedforward_modules): the layer's *input* is scaled,
    `(x * l) W + b`, l [in]. PEFT's presets, followed here, put this on the
    FFN output layer, so l scales the FFN's inner activation (T5 `wo`; BERT
    `output.dense`, which PEFT's suffix match also finds in each attention
    block's output projection, `attention.output.dense`).
Vectors start at one (init_ia3_weights=True), so the model starts as the
base. `folder` reads and writes PEFT IA3 folders.
"""
import dataclasses
from typing import Any, Iterable, Mapping

from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from flaxlora.models import layers
from flaxlora.peft import base as peft_base

Array = jax.Array

# PEFT 0.21's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING
# over flaxlora's paths: T5 'k', 'v', 'wo'; BERT 'key', 'value',
# 'output.dense'; Llama and Mistral 'k_proj', 'v_proj', 'down_proj' (PEFT's
# Qwen2 entry has 'q_proj' for 'k_proj': pass targets= for it); GPT-2
# 'c_attn', 'mlp.c_proj'. The feedforward ones scale their input.
TARGETS = {
    't5': r'.*/(k|v|mlp/wo)/kernel',
    'bert': r'.*/(attention/(key|value|output)|mlp/output)/kernel',
    'llama': r'.*/(self_attn/(k|v)_proj|mlp/down_proj)/kernel',
    'gpt2': r'.*/(attn/c_attn|mlp/c_proj)/kernel',
}
FEEDFORWARD = {
    't5': r'.*/mlp/wo/kernel',
    'bert': r'.*/(attention|mlp)/output/kernel',
    'llama': r'.*/mlp/down_proj/kernel',
    'gpt2': r'.*/mlp/c_proj/kernel',
}


@struct.dataclass
class Ia3Kernel(layers.WrapsKernel):
  """A kernel W [in, out] whose input or output is scaled; see `layers.dot`.

  Attributes:
    w: [in, out] frozen base kernel (an array or another adapted kernel).
    scale: l, [in] when `feedforward`, else [out].
    feedforward: scale the input (x * l) W instead of the output (x W) * l.
  """
  w: Any
  scale: Array
  feedforward: bool = struct.field(pytree_node=False)

  @property
  def needs_rng(self) -> bool:
    return False

  def dot(self, x: Array, *, dtype: jnp.dtype,
          dropout_rng: Array | None = None) -> Array:
    """[..., in] -> [..., out] in `dtype`; products accumulate in fp32."""
    del dropout_rng
    scale = self.scale.astype(jnp.float32)
    if self.feedforward:
      return _product(x.astype(jnp.float32) * scale, self.w,
                      dtype).astype(dtype)
    return (_product(x, self.w, dtype).astype(jnp.float32) *
            scale).astype(dtype)

  def merged(self) -> Array:
    """The dense fp32 kernel this node computes with."""
    w = jnp.asarray(self.w, jnp.float32)
    scale = jnp.asarray(self.scale, jnp.float32)
    return w * (scale[:, None] if self.feedforward else scale[None, :])


def _product(x: Array, w: Any, dtype: jnp.dtype) -> Array:
  if layers.is_adapted_kernel(w):  # e.g. an NF4 base
    return w.dot(x, dtype=dtype)
  return layers.matmul(x, w, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Ia3Config:
  """IA3 hyperparameters (PEFT's names in parentheses).

  Attributes:
    targets: regexes over "/"-joined kernel paths (target_modules), or None
      for the preset in `TARGETS` that matches the params.
    feedforward: regexes picking the targets whose input is scaled
      (feedforward_modules), or None for the preset of the targets' family.
  """
  targets: tuple[str, ...] | None
  feedforward: tuple[str, ...] | None

  def resolve(self, base: Mapping[str, Any]
              ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(targets, feedforward) regexes for `base`, presets resolved."""
    family = None
    if self.targets is None or self.feedforward is None:
      family = _family(base)
    targets = (TARGETS[family],) if self.targets is None else self.targets
    feedforward = ((FEEDFORWARD[family],) if self.feedforward is None
                   else self.feedforward)
    return targets, feedforward


def _family(base: Mapping[str, Any]) -> str:
  paths = sorted(peft_base.flatten(base))
  hits = [name for name, regex in TARGETS.items()
          if any(peft_base.first_match([regex], p) for p in paths)]
  if len(hits) != 1:
    raise ValueError(
        f'ia3: a preset (targets or feedforward None) needs params that '
        f'match exactly one preset of ia3.TARGETS {TARGETS}, but '
        f'{len(hits)} match; pass targets= and feedforward= (regexes over '
        f'paths like {paths[:3]}).')
  return hits[0]


def _patterns(value: Any, what: str) -> tuple[str, ...] | None:
  """None or '' -> None (the preset); a family name -> its preset; else
  regexes ('()' for feedforward: no layer scales its input)."""
  if value is None or value == '':
    return None
  presets = TARGETS if what == 'targets' else FEEDFORWARD
  if isinstance(value, str) and value in presets:
    return (presets[value],)
  if what == 'feedforward' and not isinstance(value, str) and not value:
    return ()
  return peft_base.as_patterns(value, f'ia3 {what}')


def targeted(config: Ia3Config, base: Mapping[str, Any]
             ) -> dict[str, bool]:
  """{kernel path: is feedforward} of every targeted kernel of `base`."""
  targets, feedforward = config.resolve(base)
  paths = peft_base.select(base, targets, what='ia3 targets', ndim=2)
  out = {p: peft_base.first_match(feedforward, p) is not None for p in paths}
  if config.feedforward and not any(out.values()):
    raise ValueError(
        f'ia3 feedforward {list(config.feedforward)} matched none of the '
        f'targeted kernels {paths[:4]}...; feedforward picks among targets '
        '(PEFT: feedforward_modules is a subset of target_modules).')
  return out


def make_config(targets: str | Iterable[str] | None = None,
                feedforward: str | Iterable[str] | None = None) -> Ia3Config:
  """Validates arguments into an `Ia3Config`; see `ia3.ia3`."""
  return Ia3Config(_patterns(targets, 'targets'),
                   _patterns(feedforward, 'feedforward'))


def init(config: Ia3Config, rng: Array, base: Mapping[str, Any]
         ) -> dict[str, Any]:
  """The adapter: {kernel path: l fp32}, ones (the model starts as the
  base)."""
  del rng
  flat = peft_base.flatten(base)
  return peft_base.unflatten({
      path: jnp.ones((flat[path].shape[0 if ff else 1],), jnp.float32)
      for path, ff in targeted(config, base).items()})


def scaled_params(config: Ia3Config, base: Mapping[str, Any],
                  adapter: Mapping[str, Any]) -> dict[str, Any]:
  """`base` with each targeted kernel an `Ia3Kernel` and the bias of each
  output-scaled layer multiplied by its vector."""
  _, feedforward = config.resolve(base)
  flat = peft_base.flatten(base)
  updates = {}
  for path, scale in peft_base.flatten(adapter).items():
    if path not in flat:
      raise ValueError(f'ia3 adapter path {path} is not a parameter of the '
                       'base; was the adapter made for another model?')
    ff = peft_base.first_match(feedforward, path) is not None
    updates[path] = Ia3Kernel(flat[path], scale, ff)
    bias = path.rsplit('/', 1)[0] + '/bias'
    if not ff and bias in flat:
      updates[bias] = flat[bias] * scale.astype(flat[bias].dtype)
  return peft_base.replace(base, updates)


def adapter_logical_axes(config: Ia3Config):
  """Each vector takes the kernel axis it scales (input or output)."""

  def logical_axes(base_axes, adapter):
    _, feedforward = config.resolve(base_axes)
    flat_axes = peft_base.flatten(
        base_axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    out = {}
    for path in peft_base.flatten(adapter):
      spec = flat_axes[path]
      ff = peft_base.first_match(feedforward, path) is not None
      out[path] = PartitionSpec(spec[0] if ff else spec[1])
    return peft_base.unflatten(out)

  return logical_axes
