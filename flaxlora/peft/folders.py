"""Reads any Hugging Face PEFT folder flaxlora knows, by its `peft_type`.

  method, adapter = folders.load('path/to/peft', model, base)

The inverse of the methods' `export` hooks: LoRA (and DoRA, rsLoRA, the
rank-r exports of PiSSA, NB-LoRA and ScaLoRA), IA3, prompt tuning and prefix
tuning folders, each with its modules to save.
"""
import json
import os
import pathlib
from typing import Any, Mapping

from flaxlora.peft import base as peft_base
from flaxlora.peft import hf_folder
from flaxlora.peft import registry


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
  """The folder's adapter_config.json."""
  path = pathlib.Path(folder) / hf_folder.CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist; pass a PEFT folder '
                            '(a run writes WORKDIR/peft).')
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}:{e.lineno}: not JSON ({e.msg}); pass a PEFT '
                     'folder.') from None


def peft_type(folder: str | os.PathLike) -> str:
  """The folder's `peft_type`."""
  return str(read_config(folder).get('peft_type'))


def load(folder: str | os.PathLike, model: Any, base: Mapping[str, Any]
         ) -> tuple[peft_base.PeftMethod, Any]:
  """(method, adapter) of the PEFT folder for `model` over `base`, read by
  the loader registered for its peft_type (`registry.loader`)."""
  kind = peft_type(folder)
  try:
    read = registry.loader(kind)
  except ValueError as e:
    raise ValueError(f'{pathlib.Path(folder) / hf_folder.CONFIG_FILE}: '
                     f'{e}') from None
  return read(pathlib.Path(folder), model, base)
