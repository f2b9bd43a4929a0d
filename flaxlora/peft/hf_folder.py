"""What every Hugging Face PEFT folder shares, whatever its method.

File names, the tensor prefix, task types, the torch Linear name of a flax
kernel (from the model family's `hf_rules`), modules-to-save tensors both
ways, and the atomic write of a folder's two files.
"""
import json
import pathlib
from typing import Any, Mapping

import numpy as np
from safetensors import numpy as st_numpy

from flaxlora import atomic
from flaxlora import models
from flaxlora.models import hf_io
from flaxlora.peft import base as peft_base

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
TASK_TYPES = {('t5', None): 'SEQ_2_SEQ_LM', ('bert', 'classification'):
              'SEQ_CLS', ('bert', 'qa'): 'QUESTION_ANS',
              ('bert', None): 'FEATURE_EXTRACTION',
              ('llama', None): 'CAUSAL_LM', ('gpt2', None): 'CAUSAL_LM'}


def linear_rules(model) -> dict[str, hf_io.Rule]:
  """Flax path -> Rule for every parameter, from the family's hf_rules."""
  family = models.family_of_model(model)
  return {'/'.join(r.path): r for r in family.hf_rules(model)}


def linear_module(rule: hf_io.Rule | None, path: str) -> str:
  """The torch Linear module name of the kernel at `path` (LoRA, IA3)."""
  if rule is None:
    raise ValueError(f'{path} has no Hugging Face name in the model '
                     "family's hf_rules; PEFT cannot name its adapter.")
  if not (rule.key.endswith('.weight') and (rule.transpose or
                                             is_conv1d(rule, path))):
    raise ValueError(f'{path} is stored as {rule.key!r}, not a torch Linear '
                     'weight; PEFT adapts Linear layers only.')
  return rule.key[:-len('.weight')]


def is_conv1d(rule: hf_io.Rule, path: str) -> bool:
  """Whether the kernel at `path` is a transformers Conv1D weight (GPT-2:
  stored [in, out] like flax, so not transposed); PEFT adapts it as a
  Linear with fan_in_fan_out, with the same lora_A / lora_B tensors."""
  return path.endswith('/kernel') and not rule.transpose


def module_tensors(modules: list[str], rules: Mapping[str, hf_io.Rule],
                   base: Mapping[str, Any], copies: Mapping[str, Any]
                   ) -> dict[str, np.ndarray]:
  """PEFT tensors of whole modules to save: trained copies, else base."""
  tensors = {}
  for path, rule in rules.items():
    if rule.key.rsplit('.', 1)[0] in modules:
      value = np.asarray(copies.get(path, peft_base.get(base, path)),
                         np.float32)
      tensors[PREFIX + rule.key] = value.T if rule.transpose else value
  return tensors


def write_folder(folder: pathlib.Path, config: dict[str, Any],
                 tensors: dict[str, np.ndarray]) -> pathlib.Path:
  """Writes both files into a staging folder swapped in atomically."""
  with atomic.folder(folder) as staging:
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')
    st_numpy.save_file(tensors, str(staging / WEIGHTS_FILE),
                       metadata={'format': 'pt'})
  return folder


def saved_copies(saved: Mapping[str, np.ndarray],
                 by_key: Mapping[str, hf_io.Rule], base: Mapping[str, Any],
                 source: str, model_name: str) -> dict[str, np.ndarray]:
  """{flax path: fp32 value} of PEFT's modules-to-save tensors."""
  copies = {}
  for key, value in saved.items():
    rule = by_key.get(key)
    if rule is None:
      raise ValueError(f'{source}: saved module tensor {key!r} is not a '
                       f'parameter of this {model_name}.')
    path = '/'.join(rule.path)
    value = np.asarray(value, np.float32)
    value = value.T if rule.transpose else value
    want = tuple(peft_base.get(base, path).shape)
    if value.shape != want:
      raise ValueError(f'{source}: tensor {PREFIX + key!r} has shape '
                       f'{np.shape(saved[key])}; the base needs {want} for '
                       f'{path}.')
    copies[path] = value
  return copies
