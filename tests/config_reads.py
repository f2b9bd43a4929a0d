"""Which config fields code reads: `track(config)` records every leaf read.

    with config_reads.track(config) as reads:
      trainer.train_and_evaluate(config, workdir)
    reads  # {'optimizer.lr', 'train.steps', ...}

A read is `config.a.b`, `config['a']['b']`, `.get`, `.items()`/`.values()`
of a section (a section passed on as keyword arguments, e.g. `peft`, reads
every key it passes) and `section.to_dict()` of a section below the root.
`to_dict()` of the root config itself (what config.json is written from)
reads nothing: writing a field down is not using it.

Also: `leaves(config)` (every dotted leaf), `runlocal_run(name, workdir)`
(one tracked, shortened runlocal run per config, cached per process, shared
by test_config_reads and test_config_effects), `method_reads(config)`
(what building a variant's PEFT method reads) and `data_reads(config)`
(what loading a real variant's data reads, with the file and hub readers
replaced by generated records).
"""
import contextlib
import functools
import importlib
import pathlib
import tempfile
from typing import Any, Iterator

import ml_collections

ConfigDict = ml_collections.ConfigDict
CONFIGS = ('t5_lora', 't5_prompt_tuning', 't5_qlora', 'bert_sentiment_lora',
           'bert_sentiment_prompt', 'bert_sentiment_qlora', 'bert_squad_lora',
           'bert_sentiment_compare', 'llama_lora', 'gpt2_lora')


def leaves(config: ConfigDict, prefix: str = '') -> set[str]:
  """Dotted names of every non-section value (an empty section is a leaf)."""
  out = set()
  for key in config.keys():
    value = config._fields[key]  # pylint: disable=protected-access
    name = f'{prefix}{key}'
    if isinstance(value, ConfigDict) and value.keys():
      out |= leaves(value, name + '.')
    else:
      out.add(name)
  return out


def _sections(config: ConfigDict, prefix: str = '') -> dict[int, str]:
  paths = {id(config): prefix}
  for key in config.keys():
    value = config._fields[key]  # pylint: disable=protected-access
    if isinstance(value, ConfigDict):
      paths.update(_sections(value, f'{prefix}{key}.'))
  return paths


@contextlib.contextmanager
def track(config: ConfigDict) -> Iterator[set[str]]:
  """Records the dotted leaves of `config` read inside the block."""
  paths = _sections(config)
  reads = set()
  quiet = []  # non-empty while the root's to_dict runs
  getitem, to_dict = ConfigDict.__getitem__, ConfigDict.to_dict

  def tracked_getitem(self, key):
    value = getitem(self, key)
    prefix = paths.get(id(self))
    if (prefix is not None and not quiet and isinstance(key, str) and
        (not isinstance(value, ConfigDict) or not value.keys())):
      reads.add(prefix + key)
    return value

  def tracked_to_dict(self, *args, **kwargs):
    root = id(self) == id(config)
    quiet.extend([root] if root else [])
    try:
      return to_dict(self, *args, **kwargs)
    finally:
      if root:
        quiet.pop()

  ConfigDict.__getitem__ = tracked_getitem
  ConfigDict.to_dict = tracked_to_dict
  try:
    yield reads
  finally:
    ConfigDict.__getitem__, ConfigDict.to_dict = getitem, to_dict


def get_config(name: str, variant: str | None) -> ConfigDict:
  return importlib.import_module(f'configs.{name}').get_config(variant)


def shorten(config: ConfigDict) -> ConfigDict:
  """The runlocal config cut to 3 steps that still log, eval and save."""
  config.train.update(steps=3, epochs=0.0, log_every=2, eval_every=3,
                      checkpoint_every=2)
  config.data.generated.update(num_train=64, num_eval=8)
  config.train.batch_size = min(config.train.batch_size, 16)
  return config


@functools.lru_cache(maxsize=None)
def runlocal_run(name: str) -> tuple[frozenset, dict, str]:
  """(fields read, summary, workdir) of `name`'s shortened runlocal run."""
  from flaxlora import trainer  # pylint: disable=g-import-not-at-top
  config = shorten(get_config(name, 'runlocal'))
  workdir = pathlib.Path(tempfile.mkdtemp(prefix=f'reads_{name}_'))
  with track(config) as reads:
    summary = trainer.train_and_evaluate(config, workdir)
  return frozenset(reads), summary, str(workdir)


def method_reads(config: ConfigDict) -> set[str]:
  """Fields read by building the config's PEFT method (what a run of a
  variant whose peft section differs from the runlocal run's reads)."""
  from flaxlora import build  # pylint: disable=g-import-not-at-top
  with track(config) as reads:
    build.peft_method(config.peft, config.model.family)
  return reads


def _fake_records(kind: str, n: int, seed: int) -> list[dict[str, Any]]:
  from flaxlora.data import synthetic  # pylint: disable=g-import-not-at-top
  generated = {'classification': 'majority', 'squad': 'lookup',
               'seq2seq': 'copy'}[kind]
  return synthetic.generate(generated, n, seed=seed, min_len=3, max_len=6,
                            split='train')


def data_reads(config: ConfigDict, monkeypatch: Any) -> set[str]:
  """Fields read by loading `config`'s data (`task_data.load`) from each
  of `data.source` 'files' and 'hub' (what a user switches to by flag), with
  the hub and file readers returning generated records of the right kind:
  nothing is downloaded or opened."""
  # pylint: disable=g-import-not-at-top
  from flaxlora.data import byte_tokenizer
  from flaxlora.data import sources
  from flaxlora.data import synthetic
  from flaxlora.data import task_data
  # pylint: enable=g-import-not-at-top
  kind = task_data.record_kind(config)
  n = 16 + int(config.data.get('eval_from_train', 0))
  fake = lambda *a, **k: _fake_records(kind, n, 0)  # pylint: disable=g-long-lambda
  for reader in ('load_hub', 'read_classification', 'read_squad',
                 'read_seq2seq'):
    monkeypatch.setattr(sources, reader, fake)
  monkeypatch.setattr(task_data, '_check_file', lambda path, option: path)
  config.tokenizer = 'bytes' if config.model.family != 'bert' else 'words'
  if 'chat_template' in config.data:  # the byte tokenizer has none
    config.data.chat_template = False
  tokenizer = (byte_tokenizer.ByteTokenizer() if config.tokenizer == 'bytes'
               else synthetic.words_tokenizer())
  reads = set()
  for source in ('files', 'hub'):
    config.data.source = source
    with track(config) as read:
      task_data.load(config, tokenizer)
    reads |= read
  return reads - {'tokenizer', 'data.source'}


def sharding_defaults() -> list[tuple[str, Any]]:
  """(logical axis, default mesh axes) of flaxlora.sharding.RULES."""
  from flaxlora import sharding  # pylint: disable=g-import-not-at-top
  return list(sharding.RULES)
