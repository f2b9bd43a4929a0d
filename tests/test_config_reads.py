"""No config field that nothing reads.

Each config's `runlocal` run (shortened, `config_reads.runlocal_run`) is
tracked field by field; every leaf of every variant of that config must be
read by that run, by building the variant's PEFT method (a variant with
another method, e.g. bert_sentiment_compare's method=nblora) or by loading
the variant's data from `data.source` 'files' or 'hub' (the fields of a
source a user can switch to by flag).
A field kept "for later" fails here: remove it until code reads it.
"""
import pytest

import config_reads
import test_configs


def _covered(leaf: str, reads: set[str]) -> bool:
  # An empty section (e.g. model.init of a hub variant) is covered by a
  # read of any field below it in another variant.
  return leaf in reads or any(r.startswith(leaf + '.') for r in reads)


def test_tracking_sees_reads_but_not_config_json():
  config = config_reads.get_config('bert_sentiment_lora', 'runlocal')
  with config_reads.track(config) as reads:
    config.to_dict()  # what config.json is written from
    assert config.optimizer.lr and config['train']['steps']
    config.data.get('max_length')
    dict(config.peft.items())
    config.model.init.to_dict()
  assert {'optimizer.lr', 'train.steps', 'data.max_length',
          'peft.method', 'peft.rank', 'model.init.vocab_size'} <= reads
  assert 'optimizer.b1' not in reads and 'train.seed' not in reads


@pytest.mark.parametrize('name', config_reads.CONFIGS)
def test_every_field_of_every_variant_is_read(name, monkeypatch):
  run_reads = config_reads.runlocal_run(name)[0]
  unread = {}
  for variant in test_configs.VARIANTS[name]:
    parts = variant.split(',') if variant else []
    real = ','.join(p for p in parts if p != 'runlocal') or None
    reads = set(run_reads)
    for data_variant in {variant or None, real}:
      reads |= config_reads.data_reads(
          config_reads.get_config(name, data_variant), monkeypatch)
    config = config_reads.get_config(name, variant or None)
    reads |= config_reads.method_reads(config)
    for leaf in config_reads.leaves(config):
      if not _covered(leaf, reads):
        unread.setdefault(leaf, []).append(variant or '<default>')
  assert not unread, (
      f'configs/{name}.py sets fields that no code reads (field: variants): '
      f'{unread}. Remove them from the config (configs/common.py or '
      f'configs/{name}.py), or make the code that should use them read them.')


@pytest.mark.parametrize('name', config_reads.CONFIGS)
def test_every_method_of_every_config_reads_the_peft_fields_it_keeps(name):
  """`--config.peft.method=M` on any config: the fields written for the
  config's own method are dropped (`settle_peft`), M builds, and it reads
  every peft field that is left (none is ignored)."""
  # pylint: disable=g-import-not-at-top
  from flaxlora import build
  from flaxlora.peft import registry
  # pylint: enable=g-import-not-at-top
  for method in registry.names():
    config = config_reads.get_config(name, 'runlocal')
    if method == 'trainable':  # needs peft.patterns, which no config sets
      continue
    config.peft.method = method
    settled = build.settle_peft(config, {'peft.method'})
    reads = config_reads.method_reads(settled)
    kept = {f'peft.{k}' for k in settled.peft.keys()}
    assert kept <= reads, (name, method, kept - reads)
