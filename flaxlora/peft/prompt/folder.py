"""Hugging Face PEFT `PROMPT_TUNING` folders for flaxlora's prompt tuning.

    folder.save_prompt('out/', model, adapter, method)
    kwargs, adapter, copies = folder.read_prompt('out/', model)
    method, adapter = prompt.load('out/', model)  # composed

A PEFT prompt tuning folder holds `adapter_config.json` and
`adapter_model.safetensors` with the soft prompt under 'prompt_embeddings'
[P * num_transformer_submodules, H], plus any "modules to save" (trained head
copies, flaxlora's `trainable`) as 'base_model.<transformers name>'.

PEFT sets num_transformer_submodules = 2 for encoder-decoder models (T5), so
its T5 files hold [2P, H]; only the first P rows are ever used (prepended to
the encoder input). `save_prompt` writes the same layout with the unused
second half zero; `read_prompt` takes the first P rows.

Placement: for T5 both frameworks prepend the prompt to the encoder input,
and for the causal LMs (task_type CAUSAL_LM, [P, H]) to the token
embeddings, so a prompt gives the same outputs in either (see `core` for
left-padded rows). For BERT flaxlora inserts it after
[CLS] and PEFT before it (see `core`): the files round-trip exactly, but a
BERT prompt trained in one framework is placed differently by the other.
"""
import json
import os
import pathlib
from typing import Any

import numpy as np
from safetensors import numpy as st_numpy

from flaxlora import atomic
from flaxlora import models
from flaxlora.peft import base as peft_base
from flaxlora.peft import method_parts
from flaxlora.peft import peft_names
from flaxlora.peft import trainable
from flaxlora.peft.prompt import core

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PROMPT_KEY = 'prompt_embeddings'
PREFIX = 'base_model.'  # PEFT's prefix of modules_to_save tensors

# flaxlora model -> PEFT task_type.
_BERT_TASKS = {None: 'FEATURE_EXTRACTION', 'classification': 'SEQ_CLS',
               'qa': 'QUESTION_ANS'}


def _family(model: Any) -> tuple[str, Any]:
  family = models.family_of_model(model)
  names = [k for k, v in models.FAMILIES.items() if v is family]
  return names[0], family


def model_facts(model: Any) -> dict[str, Any]:
  """task_type, token_dim, layers, heads and submodules of `model`."""
  name, _ = _family(model)
  c = model.config
  if name == 't5':
    return dict(task_type='SEQ_2_SEQ_LM', token_dim=c.d_model,
                num_layers=c.num_layers, num_attention_heads=c.num_heads,
                num_transformer_submodules=2)
  if name == 'gpt2':
    return dict(task_type='CAUSAL_LM', token_dim=c.n_embd,
                num_layers=c.n_layer, num_attention_heads=c.n_head,
                num_transformer_submodules=1)
  if name == 'llama':
    return dict(task_type='CAUSAL_LM', token_dim=c.hidden_size,
                num_layers=c.num_hidden_layers,
                num_attention_heads=c.num_attention_heads,
                num_transformer_submodules=1)
  return dict(task_type=_BERT_TASKS[model.head], token_dim=c.hidden_size,
              num_layers=c.num_hidden_layers,
              num_attention_heads=c.num_attention_heads,
              num_transformer_submodules=1)


def _split(method: peft_base.PeftMethod, adapter: Any
           ) -> tuple[np.ndarray, dict[str, Any]]:
  """(prompt [P, H], {path: trained copy}) from a prompt (+ trainable)."""
  prompt, copies = None, {}
  for config, sub in method_parts.parts(method, adapter):
    if isinstance(config, core.PromptConfig):
      prompt = np.asarray(sub['prompt'], np.float32)
    elif isinstance(config, trainable.TrainableConfig):
      copies.update(peft_base.flatten(sub))
    else:
      raise ValueError(
          f'save_prompt writes prompt tuning (+ trainable copies) only; the '
          f'method also has {type(config).__name__}. Save LoRA adapters with '
          'lora.folder.save_peft.')
  if prompt is None:
    raise ValueError('save_prompt: the method has no prompt_tuning part.')
  return prompt, copies


def rules_by_path(model: Any) -> dict[str, Any]:
  _, family = _family(model)
  return {'/'.join(r.path): r for r in family.hf_rules(model)}


def save_prompt(folder: str | os.PathLike, model: Any, adapter: Any,
                method: peft_base.PeftMethod, *,
                base_model_name_or_path: str | None = None) -> pathlib.Path:
  """Writes a PEFT PROMPT_TUNING folder that `PeftModel.from_pretrained` reads.

  Args:
    folder: destination (created; its two files are replaced atomically).
    model: the flaxlora model the adapter was trained for.
    adapter: the adapter of `method`.
    method: prompt_tuning, or a chain of it with `trainable` head copies.
    base_model_name_or_path: the base checkpoint PEFT's one-liners load (a
      hub id or folder, e.g. from `peft_names.base_model_reference`); a 'pkg:'
      path is resolved to its folder.
  """
  prompt, copies = _split(method, adapter)
  facts = model_facts(model)
  p, h = prompt.shape
  if h != facts['token_dim']:
    raise ValueError(f'save_prompt: prompt width {h} is not the model '
                     f'hidden size {facts["token_dim"]}.')
  rows = [prompt] + [np.zeros_like(prompt)] * (
      facts['num_transformer_submodules'] - 1)
  tensors, modules = copies_tensors(model, copies, 'save_prompt')
  tensors[PROMPT_KEY] = np.ascontiguousarray(np.concatenate(rows))
  config = dict(facts, peft_type='PROMPT_TUNING', num_virtual_tokens=p,
                prompt_tuning_init='RANDOM', prompt_tuning_init_text=None,
                tokenizer_name_or_path=None, tokenizer_kwargs=None,
                base_model_name_or_path=peft_names.resolve_pkg(
                    base_model_name_or_path),
                revision=None, inference_mode=True, auto_mapping=None,
                modules_to_save=modules)
  return write_folder(folder, config, tensors)


def copies_tensors(model: Any, copies: dict[str, Any], what: str
                   ) -> tuple[dict[str, np.ndarray], list[str] | None]:
  """PEFT tensors ('base_model.<name>') and modules_to_save of trained
  copies {flax path: value} (`what` names the caller in errors)."""
  rules, owners, tensors = rules_by_path(model), set(), {}
  for path, value in sorted(copies.items()):
    if path not in rules:
      raise ValueError(f'{what}: trained copy {path} has no transformers '
                       'name in this model family.')
    rule = rules[path]
    value = np.asarray(value, np.float32)
    tensors[PREFIX + rule.key] = np.ascontiguousarray(
        value.T if rule.transpose else value)
    owners.add(rule.key.rsplit('.', 1)[0])
  return tensors, peft_names.compact_modules_to_save(
      owners, [r.key for r in rules.values()])


def write_folder(folder: str | os.PathLike, config: dict[str, Any],
                 tensors: dict[str, np.ndarray]) -> pathlib.Path:
  """Writes a prompt-learning folder's two files, swapped in atomically."""
  folder = pathlib.Path(folder)
  with atomic.folder(folder) as staging:
    (staging / CONFIG_FILE).write_text(
        json.dumps(config, indent=2, sort_keys=True) + '\n')
    st_numpy.save_file(tensors, str(staging / WEIGHTS_FILE),
                       metadata={'format': 'pt'})
  return folder


def read_folder(folder: pathlib.Path
                ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(adapter_config.json, {name: tensor}) of a PEFT folder."""
  config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
  for file in (config_file, weights_file):
    if not file.is_file():
      raise FileNotFoundError(f'{file} is missing: a PEFT adapter folder '
                              f'holds {CONFIG_FILE} and {WEIGHTS_FILE}.')
  try:
    config = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{config_file}, line {e.lineno}: not valid JSON '
                     f'({e.msg}).') from e
  return config, st_numpy.load_file(str(weights_file))


def read_prompt(folder: str | os.PathLike, model: Any
                ) -> tuple[dict[str, Any], dict[str, np.ndarray],
                           dict[str, np.ndarray]]:
  """Reads a PEFT PROMPT_TUNING folder (written by PEFT or `save_prompt`).

  Returns:
    (kwargs, adapter, copies): prompt_tuning's arguments {'num_tokens': P},
    its adapter {'prompt': [P, H]}, and {flax path: weight} of the modules
    to save ({} when there are none).
  """
  folder = pathlib.Path(folder)
  config, tensors = read_folder(folder)
  kind = config.get('peft_type')
  if kind != 'PROMPT_TUNING':
    raise ValueError(f'{folder / CONFIG_FILE}: peft_type {kind!r} is not '
                     "PROMPT_TUNING; read any kind with folders.load.")
  facts = model_facts(model)
  p = int(config['num_virtual_tokens'])
  subs = config.get('num_transformer_submodules') or facts[
      'num_transformer_submodules']
  if PROMPT_KEY not in tensors:
    raise ValueError(f'{folder / WEIGHTS_FILE} has no {PROMPT_KEY!r} tensor.')
  table = tensors.pop(PROMPT_KEY)
  if table.shape != (p * subs, facts['token_dim']):
    raise ValueError(
        f'{folder / WEIGHTS_FILE}: {PROMPT_KEY!r} has shape {table.shape}, '
        f'but num_virtual_tokens={p} x num_transformer_submodules={subs} and '
        f'this model\'s hidden size {facts["token_dim"]} need '
        f'{(p * subs, facts["token_dim"])}; was it made for another model?')
  adapter = {'prompt': np.asarray(table[:p], np.float32)}
  return ({'num_tokens': p}, adapter,
          copies_from(tensors, model, folder / WEIGHTS_FILE))


def copies_from(tensors: dict[str, Any], model: Any, source: Any
                ) -> dict[str, np.ndarray]:
  """{flax path: value} of a prompt-learning folder's modules-to-save
  tensors (every tensor left in `tensors`)."""
  by_key = {r.key: r for r in rules_by_path(model).values()}
  copies = {}
  for key, value in sorted(tensors.items()):
    rule = by_key.get(key[len(PREFIX):]) if key.startswith(PREFIX) else None
    if rule is None:
      raise ValueError(f'{source}: tensor {key!r} is not a prompt or a '
                       'module of this model; was it made for another '
                       'model?')
    value = np.asarray(value, np.float32)
    copies['/'.join(rule.path)] = value.T if rule.transpose else value
  return copies
