"""Hugging Face PEFT `IA3` folders for flaxlora's IA3, both ways.

    folder.save_ia3('out/', model, base, adapter, method)
    # torch: peft.PeftModel.from_pretrained(hf_model, 'out/')
    kwargs, adapter, copies = folder.read_ia3('out/', model, base)
    method, adapter = ia3.load('out/', model, base)  # composed

A folder holds `adapter_config.json` (PEFT's IA3Config: target_modules,
feedforward_modules, modules_to_save) and `adapter_model.safetensors` with
one vector per targeted Linear, 'base_model.model.<module>.ia3_l': [out, 1]
when it scales the output, [1, in] when it scales the input (feedforward),
plus modules to save (trained head copies, `trainable`) written whole.
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
from flaxlora.peft import method_parts
from flaxlora.peft import peft_names
from flaxlora.peft.ia3 import kernel

SUFFIX = '.ia3_l'
PREFIX = hf_folder.PREFIX
# adapter_config.json fields flaxlora reads, and those it accepts only at
# PEFT's default (anything else is refused).
KNOWN = ('peft_type', 'peft_version', 'task_type', 'revision',
         'base_model_name_or_path', 'auto_mapping', 'inference_mode',
         'target_modules', 'feedforward_modules', 'modules_to_save',
         'exclude_modules', 'init_ia3_weights')
DEFAULTS = {'fan_in_fan_out': (False,)}


def _split(method: peft_base.PeftMethod, adapter: Any):
  """(Ia3Config, ia3 adapter, {path: trained copy}) of a method."""
  return method_parts.one_with_copies(
      method, adapter, kernel.Ia3Config, 'save_ia3', 'ia3()')


def _module_names(modules: list[str], ff_modules: set[str],
                  keys: list[str], to_save: list[str] | None
                  ) -> tuple[list[str], list[str]]:
  """PEFT's (target_modules, feedforward_modules), short where possible.

  PEFT wants feedforward_modules to be a subset of target_modules (as
  strings), and tests `module.endswith(entry)` for it (no dot boundary), so
  the feedforward names are kept short only when that test picks exactly
  `ff_modules` among the targets.
  """
  ff_names = peft_names.compact_target_modules(ff_modules, keys, to_save)
  if any(any(m.endswith(s) for s in ff_names) != (m in ff_modules)
         for m in modules):
    ff_names = sorted(ff_modules)
  other = peft_names.compact_target_modules(
      set(modules) - ff_modules, keys, to_save)
  return sorted(set(other) | set(ff_names)), ff_names


def save_ia3(folder: str | os.PathLike, model: Any, base: Mapping[str, Any],
             adapter: Any, method: peft_base.PeftMethod, *,
             base_model_name_or_path: str | None = None) -> pathlib.Path:
  """Writes a PEFT IA3 folder that `peft.PeftModel.from_pretrained` loads.

  Args:
    folder: destination; replaced atomically.
    model: the flaxlora model (names come from its family's hf_rules).
    base: the base params (modules to save are written whole).
    adapter: the trained adapter of `method`.
    method: `ia3.ia3(...)`, optionally chained with `trainable.trainable(...)`.
    base_model_name_or_path: what PEFT's one-liners load as the base (see
      `peft_names.base_model_reference`).
  """
  config, ia3_adapter, copies = _split(method, adapter)
  rules = hf_folder.linear_rules(model)
  _, feedforward = config.resolve(base)
  tensors, modules, ff_modules = {}, [], set()
  for path, scale in peft_base.flatten(ia3_adapter).items():
    module = hf_folder.linear_module(rules.get(path), path)
    modules.append(module)
    vector = np.asarray(scale, np.float32)
    if peft_base.first_match(feedforward, path) is not None:
      ff_modules.add(module)
      tensors[PREFIX + module + SUFFIX] = vector[None, :]   # [1, in]
    else:
      tensors[PREFIX + module + SUFFIX] = vector[:, None]   # [out, 1]
  owners = sorted({rules[p].key.rsplit('.', 1)[0] for p in copies})
  tensors.update(hf_folder.module_tensors(owners, rules, base, copies))
  keys = [r.key for r in rules.values()]
  to_save = peft_names.compact_modules_to_save(owners, keys)
  target_names, ff_names = _module_names(modules, ff_modules, keys,
                                         to_save)
  family = models.family_of_model(model)
  peft_config = {
      'peft_type': 'IA3',
      'task_type': hf_folder.TASK_TYPES.get(
          (family.MODEL_TYPES[0], getattr(model, 'head', None))),
      'base_model_name_or_path': peft_names.resolve_pkg(
          base_model_name_or_path),
      'target_modules': target_names, 'feedforward_modules': ff_names,
      'modules_to_save': to_save, 'fan_in_fan_out': False,
      'init_ia3_weights': True, 'inference_mode': True,
  }
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  return hf_folder.write_folder(pathlib.Path(folder), peft_config, tensors)


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
  if config.get('peft_type') != 'IA3':
    raise ValueError(f'{file}: peft_type {config.get("peft_type")!r}; '
                     'ia3.load reads IA3 adapters only (any kind: '
                     'folders.load).')
  for key, value in config.items():
    if key in KNOWN:
      continue
    if key not in DEFAULTS:
      raise ValueError(f'{file}: unknown field {key!r}; flaxlora does not '
                       'know what it changes, so it refuses the adapter.')
    if value not in DEFAULTS[key]:
      raise ValueError(f'{file}: {key}={value!r} is not supported (only '
                       f'{DEFAULTS[key][0]!r}).')
  return config


def _group(tensors: Mapping[str, np.ndarray], source: str):
  """({module: ia3_l tensor}, {key: tensor} of modules to save)."""
  vectors, saved = {}, {}
  for key, value in tensors.items():
    if not key.startswith(PREFIX):
      raise ValueError(f'{source}: tensor {key!r} lacks the {PREFIX!r} '
                       'prefix PEFT writes.')
    key = key[len(PREFIX):].replace('.modules_to_save.default', '')
    if key.endswith(SUFFIX):
      vectors[key[:-len(SUFFIX)]] = value
    else:
      saved[key] = value
  return vectors, saved


def _vector(module: str, value: np.ndarray, w_shape, source: str
            ) -> tuple[np.ndarray, bool]:
  """(l, feedforward) from a PEFT ia3_l tensor: [1, in] or [out, 1]."""
  if value.shape == (1, w_shape[0]) and value.shape != (w_shape[1], 1):
    return np.asarray(value[0], np.float32), True
  if value.shape == (w_shape[1], 1):
    return np.asarray(value[:, 0], np.float32), False
  raise ValueError(f'{source}: tensor {PREFIX + module + SUFFIX!r} has shape '
                   f'{value.shape}; the base Linear ({w_shape[1]}, '
                   f'{w_shape[0]}) [out, in] needs (1, {w_shape[0]}) or '
                   f'({w_shape[1]}, 1); was it made for another model?')


def read_ia3(folder: str | os.PathLike, model: Any, base: Mapping[str, Any]
             ) -> tuple[dict[str, Any], Any, dict[str, Any]]:
  """Reads a PEFT IA3 folder for `model`: (ia3 kwargs, adapter, copies).

  Which layers scale their input comes from each vector's shape and is
  checked against feedforward_modules (PEFT's `endswith` test). `copies`
  maps the flax paths of the modules to save to their weights ({} when
  there are none); `ia3.load` chains them as a `trainable`.
  """
  folder = pathlib.Path(folder)
  config = _read_config(folder)
  source = str(folder / hf_folder.WEIGHTS_FILE)
  vectors, saved = _group(hf_io.read_safetensors(
      folder / hf_folder.WEIGHTS_FILE), source)
  if not vectors:
    raise ValueError(f'{source}: no {SUFFIX[1:]} tensors.')
  family = models.family_of_model(model)
  keys = {m + '.weight' for m in vectors} | set(saved)
  by_key = {r.key: r for r in family.hf_rules(model, keys=keys)}
  ff_names = config.get('feedforward_modules') or []
  entries, ff_paths = {}, []
  for module, value in sorted(vectors.items()):
    rule = by_key.get(module + '.weight')
    if rule is None or not rule.transpose:
      raise ValueError(f'{source}: module {module!r} is not a Linear layer '
                       f'of this {type(model).__name__}; another base model?')
    path = '/'.join(rule.path)
    w_shape = tuple(peft_base.get(base, path).shape)
    entries[path], ff = _vector(module, value, w_shape, source)
    if ff != _is_feedforward(ff_names, module):
      raise ValueError(f'{source}: {module} has a {value.shape} vector, '
                       f'but feedforward_modules {ff_names} say it '
                       f'{"does not scale" if ff else "scales"} its input.')
    if ff:
      ff_paths.append(path)
  kwargs = dict(targets=[re.escape(p) for p in entries],
                feedforward=[re.escape(p) for p in ff_paths])
  adapter = jax.tree.map(jnp.asarray, peft_base.unflatten(entries))
  copies = (hf_folder.saved_copies(saved, by_key, base, source,
                                   type(model).__name__) if saved else {})
  return kwargs, adapter, copies


def _is_feedforward(names: Any, module: str) -> bool:
  """PEFT's `_check_target_module_feedforward`: a str is a fullmatch regex,
  a list entries matched by `endswith`."""
  if isinstance(names, str):
    return re.fullmatch(names, module) is not None
  return any(module.endswith(name) for name in names)
