"""LoRA's Hugging Face PEFT folders: write, read, and merged export.

    folder.save_peft('/tmp/adapter', model, base, adapter, method,
                     base_model_name_or_path=peft_names.base_model_reference(
                         'google-t5/t5-small'))
    # torch: peft.PeftModel.from_pretrained(hf_model, '/tmp/adapter'), or
    # peft.AutoPeftModelForSeq2SeqLM.from_pretrained('/tmp/adapter')
    kwargs, adapter, copies = folder.read_peft('/tmp/adapter', model, base)
    method, adapter = lora.load('/tmp/adapter', model, base)  # composed
    folder.save_merged('/tmp/merged', model, base, adapter, method)

A folder holds `adapter_config.json` (PEFT's LoraConfig fields) and
`adapter_model.safetensors` with PEFT's names, e.g.
'base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight'
[R, in], '...lora_B.weight' [out, R], DoRA's '...lora_magnitude_vector' [out],
and modules to save as plain '...classifier.weight'. Flax paths map to those
module names through the model family's `hf_rules` (Rule.path -> Rule.key).
The config names modules as PEFT users write them: `target_modules` and
`modules_to_save` as the shortest suffixes that select exactly the same
modules under PEFT's matching (['query', 'value'], ['classifier', 'pooler']),
and `base_model_name_or_path` as something transformers can load.
"""
import json
import os
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flaxlora import models
from flaxlora.models import hf_io
from flaxlora.peft import base as peft_base
from flaxlora.peft import hf_folder
from flaxlora.peft import merge
from flaxlora.peft import method_parts
from flaxlora.peft import peft_names
from flaxlora.peft.lora import kernel

PREFIX = hf_folder.PREFIX
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
    # PEFT sets fan_in_fan_out by the layer (True only on Conv1D) itself.
    'bias': ('none',), 'fan_in_fan_out': (False, True), 'lora_bias': (False,),
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

def _split(method: peft_base.PeftMethod, adapter: Any):
  """(LoraConfig, lora adapter, trainable adapter or {}) of a method."""
  return method_parts.one_with_copies(
      method, adapter, kernel.LoraConfig, 'save_peft', 'lora()')


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
    method: `lora.lora(...)`, optionally chained with
      `trainable.trainable(...)`.
    base_model_name_or_path: the base checkpoint PEFT's one-liners load (a
      hub id or folder, e.g. from `peft_names.base_model_reference`); a
      'pkg:' path is resolved to its folder.
  """
  config, lora_adapter, copies = _split(method, adapter)
  if config.init == 'pissa':
    raise ValueError('save_peft: a PiSSA adapter belongs to the residual '
                     'base, which HF checkpoints do not hold; write it with '
                     'its method\'s export (flaxlora.export.save_peft), a '
                     'LoRA of rank 2R over the original base.')
  rules = hf_folder.linear_rules(model)
  nodes = kernel.kernels(config, base, lora_adapter)
  tensors, modules, ranks, alphas = _lora_tensors(config, nodes, rules)
  owners = sorted({rules[p].key.rsplit('.', 1)[0] for p in copies})
  tensors.update(hf_folder.module_tensors(owners, rules, base, copies))
  keys = [r.key for r in rules.values()]
  to_save = peft_names.compact_modules_to_save(owners, keys)
  family = models.family_of_model(model)
  head = getattr(model, 'head', None)
  peft_config = {
      'peft_type': 'LORA',
      'task_type': hf_folder.TASK_TYPES.get((family.MODEL_TYPES[0],
                                              head)),
      'base_model_name_or_path': peft_names.resolve_pkg(
          base_model_name_or_path),
      'r': config.rank, 'lora_alpha': config.alpha,
      'target_modules': peft_names.compact_target_modules(
          modules, keys, to_save),
      'rank_pattern': ranks, 'alpha_pattern': alphas,
      'use_rslora': config.use_rslora, 'use_dora': config.use_dora,
      'lora_dropout': config.dropout, 'modules_to_save': to_save,
      'init_lora_weights': True if config.init == 'default' else config.init,
      'bias': 'none', 'inference_mode': True,
      'fan_in_fan_out': any(hf_folder.is_conv1d(rules[p], p) for p in nodes),
  }
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  return hf_folder.write_folder(pathlib.Path(folder), peft_config, tensors)


def _lora_tensors(config: kernel.LoraConfig,
                  nodes: Mapping[str, kernel.LoraKernel],
                  rules: Mapping[str, Any]
                  ) -> tuple[dict[str, np.ndarray], list[str], dict[str, int],
                             dict[str, float]]:
  """PEFT's tensors of the LoRA kernels `nodes` ({param path: kernel node}):
  (tensors {name: [R, in] A, [out, R] B, magnitude}, their module names,
  rank_pattern, alpha_pattern: the modules whose rank or alpha differs from
  the config's own)."""
  tensors, modules, ranks, alphas = {}, [], {}, {}
  for path, node in nodes.items():
    module = hf_folder.linear_module(rules.get(path), path)
    modules.append(module)
    tensors[PREFIX + module + _A] = np.asarray(node.a, np.float32).T
    tensors[PREFIX + module + _B] = np.asarray(node.b, np.float32).T
    if node.magnitude is not None:
      tensors[PREFIX + module + _M] = np.asarray(node.magnitude, np.float32)
    if config.rank_for(path) != config.rank:
      ranks[module] = config.rank_for(path)
    if config.alpha_for(path) != config.alpha:
      alphas[module] = config.alpha_for(path)
  return tensors, modules, ranks, alphas


def save_merged(folder: str | os.PathLike, model, base: Mapping[str, Any],
                adapter: Any, method: peft_base.PeftMethod,
                tokenizer: Any = None) -> pathlib.Path:
  """Writes a plain HF checkpoint with the adapter merged (fp32)."""
  return models.save(folder, model, merge.merge(base, adapter, method),
                     tokenizer=tokenizer)


def _read_config(folder: pathlib.Path) -> dict[str, Any]:
  file = folder / hf_folder.CONFIG_FILE
  if not file.is_file():
    raise FileNotFoundError(f'{file} is missing; is {folder} a PEFT adapter '
                            'folder (save_pretrained of a PeftModel)?')
  try:
    config = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f'{file}, line {e.lineno}: not valid JSON ({e.msg}).'
                     ) from e
  if config.get('peft_type') != 'LORA':
    raise ValueError(f'{file}: peft_type {config.get("peft_type")!r}; '
                     'lora.load reads LORA adapters only.')
  for key, value in config.items():
    if key in HONOURED or key in INFORMATIONAL:
      continue
    if key not in DEFAULTS:
      raise ValueError(f'{file}: unknown field {key!r}; flaxlora does not '
                       'know what it changes, so it refuses the adapter.')
    if value not in DEFAULTS[key]:
      raise ValueError(f'{file}: {key}={value!r} is not supported (only '
                       f'{DEFAULTS[key][0]!r}).')
  init = config.get('init_lora_weights', True)
  if init not in (True, False, 'gaussian'):
    raise ValueError(f'{file}: init_lora_weights={init!r} changes the base '
                     'weights (PiSSA/OLoRA/LoftQ); convert the adapter to '
                     'plain LoRA in PEFT first.')
  return config


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any):
  """PEFT's rank_pattern/alpha_pattern lookup (first suffix regex match)."""
  for key, value in patterns.items():
    if re.match(rf'(.*\.)?({key})$', module):
      return value
  return default


def _group(tensors: Mapping[str, np.ndarray], source: str):
  """{module: {'A', 'B', 'M'}} and {key: tensor} of modules to save."""
  lora_tensors, saved = {}, {}
  for key, value in tensors.items():
    if not key.startswith(PREFIX):
      raise ValueError(f'{source}: tensor {key!r} lacks the {PREFIX!r} '
                       'prefix PEFT writes.')
    key = key[len(PREFIX):].replace('.modules_to_save.default', '')
    for suffix, part in ((_A, 'A'), (_B, 'B'), (_M, 'M')):
      if key.endswith(suffix):
        lora_tensors.setdefault(key[:-len(suffix)], {})[part] = value
        break
    else:
      saved[key] = value
  return lora_tensors, saved


def _lora_entry(module, parts, w_shape, source, use_dora):
  """{'a': [in, R], 'b': [R, out] (+ 'magnitude')} from PEFT tensors."""
  if 'A' not in parts or 'B' not in parts:
    raise ValueError(f'{source}: module {module!r} lacks lora_A or lora_B.')
  lora_a, lora_b = parts['A'], parts['B']                  # [R, in], [out, R]
  if (lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[1] != w_shape[0]
      or lora_b.shape[0] != w_shape[1] or lora_b.shape[1] != lora_a.shape[0]):
    raise ValueError(
        f'{source}: tensors {PREFIX + module + _A!r} {lora_a.shape} and '
        f'{PREFIX + module + _B!r} {lora_b.shape} do not fit the base kernel '
        f'({w_shape[1]}, {w_shape[0]}) [out, in]; was the adapter trained '
        'on another base model?')
  a = np.asarray(lora_a, np.float32).T
  b = np.asarray(lora_b, np.float32).T
  entry = {'a': a, 'b': b}
  if use_dora != ('M' in parts):
    raise ValueError(f'{source}: use_dora={use_dora} but module {module!r} '
                     f'{"lacks" if use_dora else "has"} {_M[1:]}.')
  if use_dora:
    if parts['M'].shape != (w_shape[1],):
      raise ValueError(f'{source}: tensor {PREFIX + module + _M!r} has shape '
                       f'{parts["M"].shape}, the base needs ({w_shape[1]},).')
    entry['magnitude'] = np.asarray(parts['M'], np.float32)
  return entry


def read_peft(folder: str | os.PathLike, model, base: Mapping[str, Any]
              ) -> tuple[dict[str, Any], Any, dict[str, Any]]:
  """Reads a PEFT LoRA folder for `model`: (lora kwargs, adapter, copies).

  Ranks come from the tensors (checked against r / rank_pattern); alphas
  follow lora_alpha / alpha_pattern with PEFT's matching rules. `copies`
  maps the flax paths of the modules to save to their weights ({} when
  there are none); `lora.load` chains them as a `trainable`.
  """
  folder = pathlib.Path(folder)
  config = _read_config(folder)
  source = str(folder / hf_folder.WEIGHTS_FILE)
  lora_tensors, saved = _group(
      hf_io.read_safetensors(folder / hf_folder.WEIGHTS_FILE), source)
  if not lora_tensors:
    raise ValueError(f'{source}: no lora_A/lora_B tensors.')
  family = models.family_of_model(model)
  keys = {m + '.weight' for m in lora_tensors} | set(saved)
  by_key = {r.key: r for r in family.hf_rules(model, keys=keys)}
  r, alpha = int(config['r']), float(config['lora_alpha'])
  entries, ranks, alphas = {}, {}, {}
  for module, parts in sorted(lora_tensors.items()):
    rule = by_key.get(module + '.weight')
    if rule is None or not rule.transpose:
      raise ValueError(f'{source}: module {module!r} is not a Linear layer '
                       f'of this {type(model).__name__}; another base model?')
    path = '/'.join(rule.path)
    w_shape = tuple(peft_base.get(base, path).shape)
    entries[path] = _lora_entry(module, parts, w_shape, source,
                                bool(config.get('use_dora')))
    rank = entries[path]['a'].shape[1]
    if rank != _pattern_value(config.get('rank_pattern') or {}, module, r):
      raise ValueError(f'{source}: {module} has rank {rank}, but r / '
                       'rank_pattern in adapter_config.json say otherwise.')
    if rank != r:
      ranks[re.escape(path)] = rank
    module_alpha = _pattern_value(config.get('alpha_pattern') or {}, module,
                                  alpha)
    if module_alpha != alpha:
      alphas[re.escape(path)] = module_alpha
  kwargs = dict(
      rank=r, alpha=alpha, targets=[re.escape(p) for p in entries],
      dropout=float(config.get('lora_dropout') or 0.0), rank_pattern=ranks,
      alpha_pattern=alphas, use_rslora=bool(config.get('use_rslora')),
      init='gaussian' if config.get('init_lora_weights') == 'gaussian'
      else 'default', use_dora=bool(config.get('use_dora')))
  adapter = jax.tree.map(jnp.asarray, peft_base.unflatten(entries))
  copies = (hf_folder.saved_copies(saved, by_key, base, source,
                                   type(model).__name__) if saved else {})
  return kwargs, adapter, copies
