"""IA3's factory and folder loader.

    method = ia3.ia3()                    # the family's preset targets
    method, adapter = ia3.load('path/to/peft', model, base)
"""
import os
from typing import Any, Iterable, Mapping

from flaxlora.peft import base as peft_base
from flaxlora.peft import trainable
from flaxlora.peft.ia3 import folder as ia3_folder
from flaxlora.peft.ia3 import kernel

# An IA3 folder; modules to save are written whole, so it reads the base.
EXPORT = peft_base.Export(ia3_folder.save_ia3, needs_base=True)


def ia3(targets: str | Iterable[str] | None = None,
        feedforward: str | Iterable[str] | None = None
        ) -> peft_base.PeftMethod:
  """IA3: learned vectors scaling keys, values and FFN inner activations.

  Args:
    targets: regexes over kernel paths, a family name of `kernel.TARGETS`
      ('t5', 'bert', 'llama', 'gpt2'), or None / '' for the preset matching
      the params (PEFT's).
    feedforward: regexes picking the targets whose input is scaled, a family
      name of `kernel.FEEDFORWARD`, None / '' for the preset of the params'
      family, or () for none.

  Returns:
    PeftMethod; adapter {kernel path: l fp32} (ones); apply swaps each
    targeted kernel for an `Ia3Kernel` (and scales the bias of an
    output-scaled layer).
  """
  config = kernel.make_config(targets, feedforward)

  def init_fn(rng, base):
    return kernel.init(config, rng, base)

  def apply_fn(base, adapter):
    return kernel.scaled_params(config, base, adapter), {}

  return peft_base.PeftMethod(init_fn, apply_fn, config,
                              logical_axes=kernel.adapter_logical_axes(config),
                              export=EXPORT)


def load(folder: str | os.PathLike, model: Any, base: Mapping[str, Any]
         ) -> tuple[peft_base.PeftMethod, Any]:
  """(method, adapter) of a PEFT IA3 folder for `model` over `base`, chained
  with `trainable` when the folder holds modules to save."""
  kwargs, adapter, copies = ia3_folder.read_ia3(folder, model, base)
  return trainable.with_copies(ia3(**kwargs), adapter, copies)
