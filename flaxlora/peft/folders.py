"""Reads any Hugging Face PEFT folder flaxlora knows, by its `peft_type`.

  method, adapter = folders.load('path/to/peft', model, base)

The inverse of the methods' `export` hooks: LoRA (and DoRA, rsLoRA, the
rank-r exports of PiSSA, NB-LoRA and ScaLoRA), IA3, prompt tuning and prefix
tuning folders, each with its modules to save.
"""
import json
import os
import pathlib
from typing import Any, Callable, Mapping

from flaxlora.peft import base as peft_base
from flaxlora.peft import ia3_io
from flaxlora.peft import peft_io
from flaxlora.peft import prefix_io
from flaxlora.peft import prompt_io

Loader = Callable[[pathlib.Path, Any, Mapping[str, Any]],
                  tuple[peft_base.PeftMethod, Any]]
# peft_type -> (folder, model, base) -> (method, adapter).
LOADERS: dict[str, Loader] = {
    'LORA': peft_io.load_peft,
    'IA3': ia3_io.load_ia3,
    'PROMPT_TUNING': lambda folder, model, base: prompt_io.load_prompt(
        folder, model),
    'PREFIX_TUNING': lambda folder, model, base: prefix_io.load_prefix(
        folder, model),
}


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
  """The folder's adapter_config.json."""
  path = pathlib.Path(folder) / peft_io.CONFIG_FILE
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
  """(method, adapter) of the PEFT folder for `model` over `base`."""
  kind = peft_type(folder)
  if kind not in LOADERS:
    raise ValueError(f'{pathlib.Path(folder) / peft_io.CONFIG_FILE}: '
                     f'peft_type {kind!r} is not one flaxlora reads; it reads '
                     f'{sorted(LOADERS)}.')
  return LOADERS[kind](pathlib.Path(folder), model, base)
