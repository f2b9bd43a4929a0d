"""PEFT LoRA folders for methods whose update has plain LoRA factors.

A method whose trained update is (or is approximated by) scale * A B writes
a PEFT LORA folder through `export(config_type, as_lora)`: the method's part
(also inside a chain, next to `trainable` copies) is swapped for the
equivalent `lora.lora` method and adapter, and `peft_io.save_peft` writes
the whole chain as it writes LoRA.

    EXPORT = lora_form.export(NbLoraConfig, as_lora)
    # as_lora(config, sub_adapter) -> (lora method, lora adapter)
"""
from typing import Any, Callable

from flaxlora.peft import base as peft_base

AsLora = Callable[[Any, Any], tuple[peft_base.PeftMethod, Any]]


def equivalent(method: peft_base.PeftMethod, adapter: Any, config_type: type,
               as_lora: AsLora) -> tuple[peft_base.PeftMethod, Any]:
  """(method, adapter) with each `config_type` part replaced by its LoRA."""
  if isinstance(method.config, peft_base.ChainConfig):
    pairs = [equivalent(m, a, config_type, as_lora)
             for m, a in zip(method.config.methods, adapter)]
    return (peft_base.chain(*(m for m, _ in pairs)),
            tuple(a for _, a in pairs))
  if isinstance(method.config, config_type):
    return as_lora(method.config, adapter)
  return method, adapter


def export(config_type: type, as_lora: AsLora) -> peft_base.Export:
  """An `Export` writing the LoRA form of `config_type` parts (reads the
  base for modules to save, as LoRA's does)."""

  def write(folder, model, base, adapter, method, **kwargs):
    from flaxlora.peft import peft_io  # pylint: disable=g-import-not-at-top
    lora_method, lora_adapter = equivalent(method, adapter, config_type,
                                           as_lora)
    return peft_io.save_peft(folder, model, base, lora_adapter, lora_method,
                             **kwargs)

  return peft_base.Export(write, needs_base=True)
