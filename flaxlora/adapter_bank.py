"""Loads adapter folders into one `multi` bank for a base model.

    names, bank = adapter_bank.load({'sst2': 'runs/sst2/adapter',  # flaxlora
                                     'mnli': 'hub_copies/mnli_lora'},  # PEFT
                                    model, base, slots=16, rank=16)
    ids = multi.row_ids(['sst2', None, 'mnli'], names)  # None: the base

A folder is either Hugging Face PEFT's (`adapter_config.json`, read with
`peft.lora.load`) or flaxlora's own (`method.json` + `adapter.safetensors`
from a finished run, see `flaxlora.export`). Each must be a LoRA adapter,
optionally with modules to save of Dense layers (a classifier head).
It lives in the run layer: a run's folder is rebuilt from its recorded
config (`build.peft_method`).
"""
import os
import pathlib
from typing import Any, Mapping

import jax
import ml_collections

from flaxlora import build
from flaxlora import export
from flaxlora.peft import base as peft_base
from flaxlora.peft import hf_folder
from flaxlora.peft import lora
from flaxlora.peft import multi


def read(folder: str | os.PathLike, model, base: Mapping[str, Any]
         ) -> tuple[peft_base.PeftMethod, Any]:
  """(method, adapter) of a PEFT or flaxlora adapter folder."""
  folder = pathlib.Path(folder)
  if (folder / hf_folder.CONFIG_FILE).is_file():
    return lora.load(folder, model, base)
  if not (folder / export.METHOD_FILE).is_file():
    raise FileNotFoundError(
        f'{folder} has neither {hf_folder.CONFIG_FILE} (a PEFT folder) nor '
        f'{export.METHOD_FILE} (a flaxlora run\'s adapter folder); pass one '
        'of those.')
  spec = export.read_spec(folder)
  pooling = spec.get('pooling', 'cls')
  if pooling != getattr(model, 'pooling', 'cls'):
    raise ValueError(
        f'{folder / export.METHOD_FILE}: trained with model.pooling='
        f'{pooling!r}, but the model pools {model.pooling!r}; build the '
        f'serving model with pooling={pooling!r}.')
  method = build.peft_method(ml_collections.ConfigDict(spec['peft']),
                             spec['family'])
  like = jax.eval_shape(method.init, jax.random.PRNGKey(0), base)
  return method, export.load_adapter(folder, like)


def load(folders: Mapping[str, str | os.PathLike], model,
         base: Mapping[str, Any], **stack_kwargs
         ) -> tuple[tuple[str, ...], multi.Bank]:
  """(slot names, bank) with folders[name] in slot i, in the given order.

  `stack_kwargs` go to `multi.stack` (slots, rank, lora_paths, copy_paths):
  capacity beyond these adapters for later `multi.put` calls.
  """
  names = tuple(folders)
  adapters = [read(folders[name], model, base) for name in names]
  return names, multi.stack(adapters, base, **stack_kwargs)
