"""PEFT LoRA folders for methods whose update has plain LoRA factors.

A method whose trained update is (or is approximated by) scale * A B writes
a PEFT LORA folder through `export(config_type, as_lora)`: the method's part
(also inside a chain, next to `trainable` copies) is swapped for the
equivalent `lora.lora` method and adapter, and `folder.save_peft` writes
the whole chain as it writes LoRA. PiSSA's `PISSA_EXPORT` writes a plain
LoRA of rank 2R over the original base.

    EXPORT = form.export(NbLoraConfig, as_lora)
    # as_lora(config, sub_adapter, base) -> (lora method, lora adapter)
"""
import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from flaxlora.peft import base as peft_base
from flaxlora.peft.lora import folder as lora_folder
from flaxlora.peft.lora import kernel
from flaxlora.peft.lora import pissa

# as_lora(config, adapter, base) -> (LoRA method, LoRA adapter).
AsLora = Callable[[Any, Any, Any], tuple[peft_base.PeftMethod, Any]]


def equivalent(method: peft_base.PeftMethod, adapter: Any, config_type: type,
               as_lora: AsLora, base: Any) -> tuple[peft_base.PeftMethod, Any]:
  """(method, adapter) with each `config_type` part replaced by its LoRA."""
  if isinstance(method.config, peft_base.ChainConfig):
    pairs = [equivalent(m, a, config_type, as_lora, base)
             for m, a in zip(method.config.methods, adapter)]
    return (peft_base.chain(*(m for m, _ in pairs)),
            tuple(a for _, a in pairs))
  if isinstance(method.config, config_type):
    return as_lora(method.config, adapter, base)
  return method, adapter


def export(config_type: type, as_lora: AsLora) -> peft_base.Export:
  """An `Export` writing the LoRA form of `config_type` parts (reads the
  base for modules to save, as LoRA's does)."""

  def write(folder, model, base, adapter, method, **kwargs):
    lora_method, lora_adapter = equivalent(method, adapter, config_type,
                                           as_lora, base)
    return lora_folder.save_peft(folder, model, base, lora_adapter,
                                 lora_method, **kwargs)

  return peft_base.Export(write, needs_base=True)


def pissa_as_lora(base: Mapping[str, Any], adapter: Any,
                  method: peft_base.PeftMethod) -> tuple[Any, Any, Any]:
  """(original base, adapter, method) of the plain LoRA that computes what
  the PiSSA `method` does over `base` (prepared or not): each PiSSA part
  becomes rank 2R with A' = [A, A0], B' = [B; -B0] over W; other chained
  parts (`trainable` copies) are kept as they are."""
  prepared = method.prepare_base(base)

  def convert(m, sub):
    if isinstance(m.config, peft_base.ChainConfig):
      pairs = [convert(p, a) for p, a in zip(m.config.methods, sub)]
      return (m._replace(config=peft_base.ChainConfig(
          tuple(p for p, _ in pairs))), tuple(a for _, a in pairs))
    if not (isinstance(m.config, kernel.LoraConfig) and
            m.config.init == 'pissa'):
      return m, sub
    stacked = {}
    for path, leaf in peft_base.flatten(sub, is_leaf=kernel.is_lora_node
                                        ).items():
      node = peft_base.get(prepared, path)
      stacked[path] = dict(leaf, a=jnp.concatenate([leaf['a'], node.a0], 1),
                           b=jnp.concatenate([leaf['b'], -node.b0], 0))
    return (m._replace(config=_doubled(m.config)),
            peft_base.unflatten(stacked))

  method, adapter = convert(method, adapter)
  return jax.tree.map(pissa.original, prepared,
                      is_leaf=pissa.is_pissa), adapter, method


def _doubled(config: Any) -> Any:
  """The LoraConfig of rank 2R with the same scale (PEFT: r, rank_pattern
  and alpha, alpha_pattern x 2; alpha x sqrt(2) for rsLoRA)."""
  factor = math.sqrt(2.0) if config.use_rslora else 2.0
  return dataclasses.replace(
      config, rank=2 * config.rank, alpha=factor * config.alpha,
      rank_pattern=tuple((k, 2 * r) for k, r in config.rank_pattern),
      alpha_pattern=tuple((k, factor * a) for k, a in config.alpha_pattern),
      init='default')


def _write_pissa(folder, model, base, adapter, method, **kwargs):
  return lora_folder.save_peft(folder, model,
                               *pissa_as_lora(base, adapter, method), **kwargs)


# A LORA folder over the ORIGINAL base (rank 2R): users load it on the
# checkpoint they started from, not on the residual.
PISSA_EXPORT = peft_base.Export(_write_pissa, needs_base=True)
