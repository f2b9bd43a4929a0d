"""The final adapter in flaxlora's own format, and as a PEFT folder.

flaxlora's format is a folder with

  adapter.safetensors  every adapter leaf, named by its "/"-joined pytree
                       path ('0/encoder/block_0/attention/q/kernel/a'; the
                       leading number is the position in a `chain`)
  method.json          the config's peft section, model family, source and
                       pooling (BERT classifiers' `model.pooling`)

so an adapter can be reloaded onto the same base with `load_adapter` and the
method rebuilt from `method.json`. `save_peft` additionally writes a folder
Hugging Face PEFT loads, as the method's `export` hook says (LoRA: a LORA
folder, prompt tuning: a PROMPT_TUNING folder, QLoRA: LoRA's folder against
the dequantised base), or says why the method has none.
"""
import json
import os
import pathlib
from typing import Any, Mapping

import jax
import numpy as np
from safetensors import numpy as st_numpy

from flaxlora import atomic
from flaxlora import models
from flaxlora.peft import base as peft_base

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
  """Writes `folder` (replaced atomically: a staging folder renamed)."""
  with atomic.folder(folder) as staging:
    st_numpy.save_file(adapter_tensors(adapter), str(staging / ADAPTER_FILE),
                       metadata={'format': 'flaxlora'})
    (staging / METHOD_FILE).write_text(json.dumps(dict(spec), indent=2,
                                                  sort_keys=True,
                                                  default=str))
  return pathlib.Path(folder)


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


def peft_missing(model: Any, method: peft_base.PeftMethod) -> str:
  """Why `save_peft` cannot write this adapter (the method has no PEFT form,
  or transformers has no class for the model), or '' when it can."""
  if method.export.write is None:
    return method.export.reason
  return models.hf_class_missing(model)


def save_peft(folder: str | os.PathLike, model: Any, base: Any, adapter: Any,
              method: peft_base.PeftMethod, *,
              base_model_name_or_path: str | None = None) -> pathlib.Path:
  """Writes `adapter` as a Hugging Face PEFT folder, as `method.export` says.

  Args:
    folder: destination (replaced atomically).
    model: the flaxlora model the adapter was trained for.
    base: host copies of the base params (`distributed.to_host`, a
      collective, so gather them on every process first) when
      `method.export.needs_base`; otherwise not read (may be None).
    adapter: the adapter (host arrays).
    method: the PEFT method that made it.
    base_model_name_or_path: recorded for PEFT (the base checkpoint).

  Raises:
    ValueError: the method has no PEFT form or transformers no class for
      the model (the error says why), or it needs the base and `base` is
      None.
  """
  how = method.export
  if missing := peft_missing(model, method):
    raise ValueError(f'this adapter cannot be written as a PEFT folder: '
                     f'{missing}.')
  if how.needs_base and base is None:
    raise ValueError('export.save_peft: this method writes base params '
                     '(modules to save); pass base=.')
  return how.write(folder, model, base, adapter, method,
                   base_model_name_or_path=base_model_name_or_path)
