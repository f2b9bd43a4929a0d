"""Hugging Face PEFT `PREFIX_TUNING` folders for flaxlora's prefix tuning.

    folder.save_prefix('out/', model, adapter, method)
    # torch: peft.PeftModel.from_pretrained(hf_model, 'out/')
    kwargs, adapter, copies = folder.read_prefix('out/', model)
    method, adapter = prefix.load('out/', model)  # composed

A folder holds `adapter_config.json` (PrefixTuningConfig: num_virtual_tokens,
num_layers, token_dim, num_attention_heads, prefix_projection, ...) and
`adapter_model.safetensors` with the prefix table under 'prompt_embeddings'
[P, 2 * L * W] (PEFT's layout; see `core`), plus modules to save as
'base_model.<transformers name>'. A table trained through the MLP is saved
as the table the MLP computes, which is what PEFT saves too (and all it
loads in inference mode), so a loaded folder has projection=False.
"""
import os
import pathlib
from typing import Any

import numpy as np

from flaxlora.peft import base as peft_base
from flaxlora.peft import method_parts
from flaxlora.peft import peft_names
from flaxlora.peft.prefix import core
from flaxlora.peft.prompt import folder as prompt_folder

TABLE_KEY = 'prompt_embeddings'


def _split(method: peft_base.PeftMethod, adapter: Any):
  """(PrefixConfig, prefix adapter, {path: trained copy})."""
  return method_parts.one_with_copies(
      method, adapter, core.PrefixConfig, 'save_prefix',
      'prefix_tuning()')


def _facts(model: Any) -> dict[str, Any]:
  """PEFT's sizes for `model`; refuses models whose keys are not W = H wide
  (PEFT views each key as token_dim // num_attention_heads per head), but
  for Llama-shaped models, where PEFT (for grouped-query attention) sizes
  the prefix by the key/value heads: token_dim = K * D, num_attention_heads
  = K."""
  facts = prompt_folder.model_facts(model)
  c = model.config
  if hasattr(c, 'num_key_value_heads'):
    return dict(facts, token_dim=c.num_key_value_heads * c.head_dim,
                num_attention_heads=c.num_key_value_heads)
  width = (c.num_heads * c.d_kv if hasattr(c, 'd_kv') else
           facts['token_dim'])
  if width != facts['token_dim']:
    raise ValueError(
        f'prefix tuning: this model\'s keys are {width} wide but its hidden '
        f'size is {facts["token_dim"]}; PEFT sizes prefixes by the hidden '
        'size, so no PEFT folder can hold them.')
  return facts


def save_prefix(folder: str | os.PathLike, model: Any, adapter: Any,
                method: peft_base.PeftMethod, *,
                base_model_name_or_path: str | None = None) -> pathlib.Path:
  """Writes a PEFT PREFIX_TUNING folder (`PeftModel.from_pretrained`).

  Args:
    folder: destination (its two files are replaced atomically).
    model: the flaxlora model the adapter was trained for.
    adapter: the adapter of `method`.
    method: prefix_tuning, or a chain of it with `trainable` head copies.
    base_model_name_or_path: the base checkpoint PEFT's one-liners load
      (see `peft_names.base_model_reference`).
  """
  config, sub, copies = _split(method, adapter)
  facts = _facts(model)
  values = np.asarray(core.table(config, sub), np.float32)
  want = 2 * facts['num_layers'] * facts['token_dim']
  if values.shape != (config.num_tokens, want):
    raise ValueError(f'save_prefix: the prefix table is {values.shape}, but '
                     f'this model needs ({config.num_tokens}, {want}); was '
                     'the adapter made for another model?')
  tensors, modules = prompt_folder.copies_tensors(model, copies, 'save_prefix')
  tensors[TABLE_KEY] = np.ascontiguousarray(values)
  peft_config = dict(
      facts, peft_type='PREFIX_TUNING', num_virtual_tokens=config.num_tokens,
      prefix_projection=config.projection,
      encoder_hidden_size=config.hidden or facts['token_dim'],
      init_weights='zero' if config.init == 'zero' else None,
      base_model_name_or_path=peft_names.resolve_pkg(
          base_model_name_or_path),
      revision=None, inference_mode=True, auto_mapping=None,
      modules_to_save=modules)
  return prompt_folder.write_folder(folder, peft_config, tensors)


def read_prefix(folder: str | os.PathLike, model: Any
                ) -> tuple[dict[str, Any], dict[str, np.ndarray],
                           dict[str, np.ndarray]]:
  """Reads a PEFT PREFIX_TUNING folder (written by PEFT or `save_prefix`).

  Returns:
    (kwargs, adapter, copies): prefix_tuning's arguments {'num_tokens': P},
    its adapter {'prefix': table}, and {flax path: weight} of the modules to
    save ({} when there are none).
  """
  folder = pathlib.Path(folder)
  config, tensors = prompt_folder.read_folder(folder)
  source = folder / prompt_folder.WEIGHTS_FILE
  if config.get('peft_type') != 'PREFIX_TUNING':
    raise ValueError(f'{folder / prompt_folder.CONFIG_FILE}: peft_type '
                     f'{config.get("peft_type")!r} is not PREFIX_TUNING.')
  facts = _facts(model)
  for key in ('num_layers', 'token_dim', 'num_attention_heads'):
    if config.get(key) != facts[key]:
      raise ValueError(
          f'{folder / prompt_folder.CONFIG_FILE}: {key}={config.get(key)}, but '
          f'this {type(model).__name__} has {facts[key]}; was the prefix '
          'made for another model?')
  p = int(config['num_virtual_tokens'])
  want = (p, 2 * facts['num_layers'] * facts['token_dim'])
  if TABLE_KEY not in tensors:
    raise ValueError(f'{source} has no {TABLE_KEY!r} tensor.')
  values = tensors.pop(TABLE_KEY)
  if values.shape != want:
    raise ValueError(f'{source}: {TABLE_KEY!r} has shape {values.shape}; '
                     f'num_virtual_tokens={p} and this model need {want}.')
  adapter = {'prefix': np.asarray(values, np.float32)}
  return ({'num_tokens': p}, adapter,
          prompt_folder.copies_from(tensors, model, source))
