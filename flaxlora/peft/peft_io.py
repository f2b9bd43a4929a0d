"""Hugging Face PEFT adapter folders: write, read, and merged export.

    peft_io.save_peft('/tmp/adapter', model, base, adapter, method)
    # torch: peft.PeftModel.from_pretrained(hf_model, '/tmp/adapter')
    method, adapter = peft_io.load_peft('/tmp/adapter', model, base)
    peft_io.save_merged('/tmp/merged', model, base, adapter, method)

A folder holds `adapter_config.json` (PEFT's LoraConfig fields) and
`adapter_model.safetensors` with PEFT's names, e.g.
'base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight'
[R, in], '...lora_B.weight' [out, R], DoRA's '...lora_magnitude_vector' [out],
and modules to save as plain '...classifier.weight'. Flax paths map to those
module names through the model family's `hf_rules` (Rule.path -> Rule.key).
"""
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Mapping

import numpy as np
from safetensors import numpy as st_numpy

from flaxlora import models
from flaxlora.models import hf_io
from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft import merge

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
_A, _B, _M = '.lora_A.weight', '.lora_B.weight', '.lora_magnitude_vector'

# adapter_config.json fields: honoured, informational, and those flaxlora
# accepts only at PEFT's default value (anything else is refused).
HONOURED = ('r', 'lora_alpha', 'target_modules', 'rank_pattern',
            'alpha_pattern', 'use_rslora', 'use_dora', 'lora_dropout',
            'modules_to_save', 'init_lora_weights')
INFORMATIONAL = ('peft_type', 'peft_version', 'task_type', 'revision',
                 'base_model_name_or_path', 'auto_mapping', 'inference_mode',
                 'megatron_core', 'qalora_group_size', 'exclude_modules')
DEFAULTS = {
    'bias': ('none',), 'fan_in_fan_out': (False,), 'lora_bias': (False,),
    'layers_to_transform': (None,), 'layers_pattern': (None,),
    'layer_replication': (None,), 'megatron_config': (None,),
    'loftq_config': ({}, None), 'use_qalora': (False, None),
    'alora_invocation_tokens': (None,), 'arrow_config': (None,),
    'corda_config': (None,), 'eva_config': (None,), 'kasa_config': (None,),
    'lora_ga_config': (None,), 'monteclora_config': (None,),
    'target_parameters': (None, []), 'trainable_token_indices': (None,),
    'use_bdlora': (None, False), 'velora_config': (None,),
    'ensure_weight_tying': (False,),
}
TASK_TYPES = {('t5', None): 'SEQ_2_SEQ_LM', ('bert', 'classification'):
              'SEQ_CLS', ('bert', 'qa'): 'QUESTION_ANS',
              ('bert', None): 'FEATURE_EXTRACTION'}


def _linear_rules(model) -> dict[str, hf_io.Rule]:
  """Flax path -> Rule for every parameter, from the family's hf_rules."""
  family = models.family_of_model(model)
  return {'/'.join(r.path): r for r in family.hf_rules(model)}


def _module(rule: hf_io.Rule, path: str) -> str:
  if not (rule.transpose and rule.key.endswith('.weight')):
    raise ValueError(f'{path} is stored as {rule.key!r}, not a torch Linear '
                     'weight; PEFT LoRA adapts Linear layers only.')
  return rule.key[:-len('.weight')]


def _split(method: peft_base.PeftMethod, adapter: Any):
  """(LoraConfig, lora adapter, trainable adapter or {}) of a method."""
  loras, copies = [], {}
  for config, sub in lora.parts(method, adapter):
    if isinstance(config, lora.LoraConfig):
      loras.append((config, sub))
    elif isinstance(config, peft_base.TrainableConfig):
      copies.update(peft_base.flatten(sub))
    else:
      raise ValueError(f'save_peft writes LoRA (+ trainable) adapters; '
                       f'{type(config).__name__} has no PEFT LoRA form.')
  if len(loras) != 1:
    raise ValueError(f'save_peft needs exactly one lora() in the method, '
                     f'found {len(loras)}.')
  return loras[0][0], loras[0][1], copies


def _suffixes(modules: list[str], linears: list[str]) -> list[str]:
  """PEFT's short target_modules (['q', 'v']) when they select exactly
  `modules` among all Linear modules; else the full names."""
  short = sorted({m.rsplit('.', 1)[-1] for m in modules})
  hit = {m for m in linears if any(m == s or m.endswith('.' + s)
                                   for s in short)}
  return short if hit == set(modules) else sorted(modules)


def save_peft(folder: str | os.PathLike, model, base: Mapping[str, Any],
              adapter: Any, method: peft_base.PeftMethod, *,
              base_model_name_or_path: str | None = None) -> pathlib.Path:
  """Writes a folder that `peft.PeftModel.from_pretrained` loads.

  Args:
    folder: destination; replaced atomically.
    model: the flaxlora model (names come from its family's hf_rules).
    base: the base params (fp32), for modules to save that are only partly
      trained (PEFT saves whole modules).
    adapter: the trained adapter of `method`.
    method: `lora.lora(...)`, optionally chained with `base.trainable(...)`.
    base_model_name_or_path: written to the config for PEFT's loader.
  """
  config, lora_adapter, copies = _split(method, adapter)
  if config.init == 'pissa':
    raise ValueError('save_peft: a PiSSA adapter belongs to the residual '
                     'base, which HF checkpoints do not hold; use '
                     'save_merged instead.')
  rules = _linear_rules(model)
  linears = [r.key[:-len('.weight')] for r in rules.values()
             if r.transpose and r.key.endswith('.weight')]
  tensors, modules, ranks, alphas = {}, [], {}, {}
  nodes = lora.kernels(config, base, lora_adapter)
  for path, node in nodes.items():
    module = _module(rules[path], path)
    modules.append(module)
    tensors[PREFIX + module + _A] = np.asarray(node.a, np.float32).T
    tensors[PREFIX + module + _B] = np.asarray(node.b, np.float32).T
    if node.magnitude is not None:
      tensors[PREFIX + module + _M] = np.asarray(node.magnitude, np.float32)
    if config.rank_for(path) != config.rank:
      ranks[module] = config.rank_for(path)
    if config.alpha_for(path) != config.alpha:
      alphas[module] = config.alpha_for(path)
  to_save = sorted({rules[p].key.rsplit('.', 1)[0] for p in copies})
  for path, rule in rules.items():  # whole modules, as PEFT saves them
    if rule.key.rsplit('.', 1)[0] in to_save:
      value = np.asarray(copies.get(path, peft_base.get(base, path)),
                         np.float32)
      tensors[PREFIX + rule.key] = np.ascontiguousarray(
          value.T if rule.transpose else value)
  family = models.family_of_model(model)
  head = getattr(model, 'head', None)
  peft_config = {
      'peft_type': 'LORA',
      'task_type': TASK_TYPES.get((family.MODEL_TYPES[0], head)),
      'base_model_name_or_path': base_model_name_or_path,
      'r': config.rank, 'lora_alpha': config.alpha,
      'target_modules': _suffixes(modules, linears),
      'rank_pattern': ranks, 'alpha_pattern': alphas,
      'use_rslora': config.use_rslora, 'use_dora': config.use_dora,
      'lora_dropout': config.dropout, 'modules_to_save': to_save or None,
      'init_lora_weights': True if config.init == 'default' else config.init,
      'bias': 'none', 'fan_in_fan_out': False, 'inference_mode': True,
  }
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  return _write(pathlib.Path(folder), peft_config, tensors)


def _write(folder: pathlib.Path, config: dict[str, Any],
           tensors: dict[str, np.ndarray]) -> pathlib.Path:
  """Writes into a staging folder, then swaps it in (no half-written state)."""
  folder.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{folder.name}.',
                                          dir=folder.parent))
  try:
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')
    st_numpy.save_file(tensors, str(staging / WEIGHTS_FILE),
                       metadata={'format': 'pt'})
    staging.chmod(0o755)
    old = folder.with_name(f'.{folder.name}.old')
    if folder.exists():
      shutil.rmtree(old, ignore_errors=True)
      folder.rename(old)
    staging.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return folder


def save_merged(folder: str | os.PathLike, model, base: Mapping[str, Any],
                adapter: Any, method: peft_base.PeftMethod,
                tokenizer: Any = None) -> pathlib.Path:
  """Writes a plain HF checkpoint with the adapter merged (fp32)."""
  return models.save(folder, model, merge.merge(base, adapter, method),
                     tokenizer=tokenizer)
