"""The final adapter in flaxlora's own format, and as a PEFT folder.

flaxlora's format is a folder with

  adapter.safetensors  every adapter leaf, named by its "/"-joined pytree
                       path ('0/encoder/block_0/attention/q/kernel/a'; the
                       leading number is the position in a `chain`)
  method.json          the config's peft section, model family and source

so an adapter can be reloaded onto the same base with `load_adapter` and the
method rebuilt from `method.json`. `save_peft` additionally writes a folder
Hugging Face PEFT loads: a PROMPT_TUNING folder for prompt tuning
(`flaxlora.peft.prompt_io`), a LORA folder otherwise (`flaxlora.peft.peft_io`;
a QLoRA adapter is written against the dequantised base).
"""
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
from safetensors import numpy as st_numpy

from flaxlora.peft import base as peft_base
from flaxlora.peft import nf4
from flaxlora.peft import prompt

ADAPTER_FILE = 'adapter.safetensors'
METHOD_FILE = 'method.json'


def _name(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def adapter_tensors(adapter: Any) -> dict[str, np.ndarray]:
  """{path: numpy array} of every adapter leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(adapter)[0]
  return {_name(path): np.asarray(leaf) for path, leaf in leaves}


def save_adapter(folder: str | os.PathLike, adapter: Any,
                 spec: Mapping[str, Any]) -> pathlib.Path:
  """Writes `folder` (replaced atomically: a temporary folder renamed)."""
  folder = pathlib.Path(folder)
  folder.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=folder.parent,
                                      prefix=f'.{folder.name}.'))
  try:
    tmp.chmod(0o755)  # mkdtemp makes a 0700 folder
    st_numpy.save_file(adapter_tensors(adapter), str(tmp / ADAPTER_FILE),
                       metadata={'format': 'flaxlora'})
    (tmp / METHOD_FILE).write_text(json.dumps(dict(spec), indent=2,
                                              sort_keys=True, default=str))
    if folder.exists():
      old = folder.with_name(f'.{folder.name}.old')
      shutil.rmtree(old, ignore_errors=True)
      os.replace(folder, old)
      os.replace(tmp, folder)
      shutil.rmtree(old)
    else:
      os.replace(tmp, folder)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return folder


def load_adapter(folder: str | os.PathLike, like: Any) -> Any:
  """The adapter saved in `folder`, structured like `like` (e.g. from
  `jax.eval_shape(method.init, rng, base)`)."""
  folder = pathlib.Path(folder)
  path = folder / ADAPTER_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist; is {folder} a flaxlora '
                            'adapter folder?')
  tensors = st_numpy.load_file(str(path))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  values = []
  for key_path, leaf in leaves:
    name = _name(key_path)
    if name not in tensors:
      raise ValueError(f'{path} lacks {name}; was it saved for another '
                       'method or model?')
    if tensors[name].shape != tuple(leaf.shape):
      raise ValueError(f'{path}: {name} has shape {tensors[name].shape}, '
                       f'expected {tuple(leaf.shape)}.')
    values.append(tensors.pop(name))
  if tensors:
    raise ValueError(f'{path} holds tensors the method does not use: '
                     f'{sorted(tensors)[:5]}.')
  return jax.tree_util.tree_unflatten(treedef, values)


def read_spec(folder: str | os.PathLike) -> dict[str, Any]:
  return json.loads((pathlib.Path(folder) / METHOD_FILE).read_text())


def is_prompt_method(method: peft_base.PeftMethod) -> bool:
  """True when `method` has a prompt tuning part (its PEFT folder is a
  PROMPT_TUNING one, which needs no base params)."""
  return any(isinstance(c, prompt.PromptConfig)
             for c in peft_base.configs(method))


def save_peft(folder: str | os.PathLike, model: Any, base: Any, adapter: Any,
              method: peft_base.PeftMethod, *,
              base_model_name_or_path: str | None = None) -> pathlib.Path:
  """Writes `adapter` as a Hugging Face PEFT folder.

  Args:
    folder: destination.
    model: the flaxlora model the adapter was trained for.
    base: its base params as host arrays (`distributed.to_host`, a
      collective, so gather them on every process first); NF4 kernels are
      dequantised. Not read (may be None) when `is_prompt_method(method)`.
    adapter: the adapter (host arrays).
    method: the PEFT method that made it.
    base_model_name_or_path: recorded for PEFT (the base checkpoint).
  """
  # The PEFT writers import the model families; only a run's end needs them.
  # pylint: disable=g-import-not-at-top
  if is_prompt_method(method):
    from flaxlora.peft import prompt_io
    return prompt_io.save_prompt(
        folder, model, adapter, method,
        base_model_name_or_path=base_model_name_or_path)
  if base is None:
    raise ValueError('export.save_peft: a LoRA adapter needs the base params '
                     '(modules to save are written whole); pass base=.')
  from flaxlora.peft import peft_io
  return peft_io.save_peft(folder, model, nf4.dequantize_params(base),
                           adapter, method,
                           base_model_name_or_path=base_model_name_or_path)
