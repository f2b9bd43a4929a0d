"""QLoRA (Dettmers et al. 2023): LoRA over an NF4-quantised frozen base.

    method = qlora.qlora(rank=8, alpha=16, targets='t5')
    base = method.prepare_base(base)          # once: kernels -> Nf4Kernel
    adapter = method.init(rng, base)
    params, kw = method.apply(base, adapter)  # in the step: dequantises

The frozen base kernels selected by `quantize` (every '.../kernel' by
default; embeddings, norms, biases and the task heads matched by `keep` stay
fp32) become `nf4.Nf4Kernel` pytree nodes, about 0.13x their fp32 bytes.
Targeted kernels then become `lora.LoraKernel(w=Nf4Kernel, ...)`, whose
`dot` computes x @ dequant(W) + scale * (x @ A) @ B; untargeted quantised
kernels compute x @ dequant(W). Gradients reach only A and B.

The method's `prepare_base` hook is an optimisation, not a requirement:
`apply` quantises any plain kernel it should, so a raw base gives exactly the
same outputs (the training numerics everywhere, e.g. in evaluation), only
without the memory saving. The method's config is a `QloraConfig`, a
`lora.LoraConfig` subclass, so LoRA tools (`describe`, the analyses) treat
it as the LoRA it trains. Its PEFT export is LoRA's, written against the
dequantised base.
"""
import dataclasses
import pathlib
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp

from flaxlora import models
from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft.lora import folder as lora_folder
from flaxlora.peft.qlora import nf4


@dataclasses.dataclass(frozen=True)
class QloraConfig(lora.LoraConfig):
  """LoRA hyperparameters plus what to quantise.

  Attributes:
    quantize: regex (re.fullmatch over '/'-joined paths) of the 2-D params
      to store in NF4.
    keep: regex of params to keep in fp32 even when `quantize` matches.
  """
  quantize: str = nf4.DEFAULT_INCLUDE
  keep: str = nf4.DEFAULT_EXCLUDE

  def prepare_base(self, base: Mapping[str, Any]) -> Any:
    """The base with its selected kernels quantised (idempotent)."""
    return nf4.quantize_params(base, self.quantize, self.keep)


def qlora(rank: int = 8, alpha: float = 16.0,
          targets: str | Iterable[str] | None = None, dropout: float = 0.0,
          rank_pattern: Mapping[str, int] | None = None,
          alpha_pattern: Mapping[str, float] | None = None,
          use_rslora: bool = False, init: str = 'default',
          use_dora: bool = False, quantize: str = nf4.DEFAULT_INCLUDE,
          keep: str = nf4.DEFAULT_EXCLUDE,
          loraplus_ratio: float = 1.0) -> peft_base.PeftMethod:
  """LoRA on an NF4 base as a `PeftMethod`.

  Args:
    rank, alpha, targets, dropout, rank_pattern, alpha_pattern, use_rslora,
      init, use_dora, loraplus_ratio: as in `lora.lora` ('pissa' excepted);
      DoRA's magnitude and column norms use the dequantised kernels.
    quantize: regex of the 2-D params stored in NF4 (default: all kernels).
    keep: regex of params never quantised (default: the task heads, pooler
      and untied lm_head).

  Returns:
    A PeftMethod with a `QloraConfig`; the adapter is LoRA's.
  """
  if init == 'pissa':
    raise ValueError("qlora init='pissa' is not supported: its residual base "
                     'W - sAB would have to be quantised again (LoftQ); use '
                     "init='default' or 'gaussian'.")
  lora_method = lora.lora(rank, alpha, targets, dropout, rank_pattern,
                          alpha_pattern, use_rslora, init, use_dora,
                          loraplus_ratio)
  peft_base.as_patterns([quantize, keep], 'qlora quantize/keep')
  config = QloraConfig(**dataclasses.asdict(lora_method.config),
                       quantize=quantize, keep=keep)

  def apply_fn(base, adapter):
    quantized = config.prepare_base(base)
    return quantized_lora(config, quantized, adapter), {}

  return lora_method._replace(apply=apply_fn, config=config,
                              prepare_base=config.prepare_base,
                              prepared_axes=nf4.params_logical_axes,
                              export=EXPORT)


def _write_peft(folder, model, base, adapter, method, **kwargs):
  return lora_folder.save_peft(folder, model, nf4.dequantize_params(base),
                               adapter, method, **kwargs)


# LoRA's folder, written against the dequantised base: PEFT loads it onto
# the fp32 base (or a bitsandbytes 4-bit one); only the base differs, by the
# NF4 error.
EXPORT = peft_base.Export(_write_peft, needs_base=True)


def quantized_lora(config: lora.LoraConfig, base: Mapping[str, Any],
                   adapter: Any) -> dict[str, Any]:
  """`base` with each adapted kernel replaced by a LoraKernel over its NF4.

  `lora.kernels` validates the adapter against the kernel shapes but refuses
  a kernel that is already an adapted node (it has `dot`); it is therefore
  given shape stand-ins, and the Nf4Kernels are put back into the nodes.
  """
  flat = peft_base.flatten(adapter, is_leaf=lora.is_lora_node)
  stand_ins = {p: jax.ShapeDtypeStruct(peft_base.get(base, p).shape,
                                       jnp.float32)
               for p in flat if nf4.is_nf4(peft_base.get(base, p))}
  nodes = lora.kernels(config, peft_base.replace(base, stand_ins), adapter)
  nodes = {p: n.replace(w=peft_base.get(base, p)) if p in stand_ins else n
           for p, n in nodes.items()}
  return peft_base.replace(base, nodes)


def merge(base: Mapping[str, Any], adapter: Any,
          method: peft_base.PeftMethod) -> dict[str, Any]:
  """Dense fp32 params computing what the QLoRA model computes.

  Every LoRA kernel becomes dequant(W) + scale A B, every other NF4 kernel
  dequant(W): the quantisation error stays (it is what was trained on).
  """
  params, kwargs = method.apply(base, adapter)
  if kwargs:
    raise ValueError(f'qlora.merge: the method also passes model kwargs '
                     f'{sorted(kwargs)}, which cannot be merged into weights.')

  def dense(node):
    if isinstance(node, lora.LoraKernel):
      return node.merged()
    if nf4.is_nf4(node):
      return node.dequantize(jnp.float32)
    return node

  return jax.tree.map(
      dense, params,
      is_leaf=lambda n: isinstance(n, lora.LoraKernel) or nf4.is_nf4(n))


def save_merged(folder: str | pathlib.Path, model: Any,
                base: Mapping[str, Any], adapter: Any,
                method: peft_base.PeftMethod, tokenizer: Any = None
                ) -> pathlib.Path:
  """Writes the dequantised, merged model as a plain Hugging Face folder."""
  return models.save(folder, model, merge(base, adapter, method), tokenizer)
