"""The final adapter in flaxlora's own format, and as a PEFT folder.

flaxlora's format is a folder with

  adapter.safetensors  every adapter leaf, named by its "/"-joined pytree
                       path ('0/encoder/block_0/attention/q/kernel/a'; the
                       leading number is the position in a `chain`)
  method.json          the config's peft section, model family and source

so an adapter can be reloaded onto the same base with `load_adapter` and the
method rebuilt from `method.json`. `save_peft` additionally writes a folder
Hugging Face PEFT loads (`flaxlora.peft.peft_io`).
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
