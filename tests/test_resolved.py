"""A config is resolved once (`flaxlora.resolved`): the model path located
and its config.json read once per run (a folder, or a hub id found in a
planted hub cache), the resolved facts recorded in summary.json, and a bad
path a one-line error naming the field; the data files checked there once
and read through the resolved paths."""
import json
import pathlib

from huggingface_hub import constants
import jax
import pytest

import config_reads
from flaxlora import build
from flaxlora import errors
from flaxlora import models
from flaxlora import resolved
from flaxlora import trainer
from flaxlora import workdir as workdir_lib
from flaxlora.data import sources
from flaxlora.data import task_data
from flaxlora.models import hf_io


TSV = 'sentence\tlabel\n' + 'good great \t1\nbad sad \t0\n' * 20


def _checkpoint_config(folder: pathlib.Path):
  """The shortened BERT runlocal config on a checkpoint saved in `folder`
  (the runlocal model's own init)."""
  config = config_reads.shorten(
      config_reads.get_config('bert_sentiment_lora', 'runlocal'))
  model, params, _, _ = build.model_and_params(resolved.resolve(config),
                                               jax.random.PRNGKey(0))
  models.save(folder, model, params)
  return config


def test_a_checkpoint_run_resolves_once_and_records_it(tmp_path,
                                                       monkeypatch):
  config = _checkpoint_config(tmp_path / 'ckpt')
  monkeypatch.chdir(tmp_path)
  config.model.path = 'ckpt'  # relative: recorded as given
  located, reads = [], []
  resolve, read_text = hf_io.resolve, pathlib.Path.read_text

  def counted_resolve(path):
    located.append(path)
    return resolve(path)

  def counted_read_text(self, *args, **kwargs):
    if self.name == hf_io.CONFIG_FILE and self.parent.name == 'ckpt':
      reads.append(self)
    return read_text(self, *args, **kwargs)

  monkeypatch.setattr(hf_io, 'resolve', counted_resolve)
  monkeypatch.setattr(pathlib.Path, 'read_text', counted_read_text)
  summary = trainer.train_and_evaluate(config, tmp_path / 'run')
  # (abstract_params and sharded.load each resolved it and read its
  # config.json before.)
  assert located == ['ckpt'] and len(reads) == 1
  want = {'model_path': 'ckpt', 'source': 'folder', 'model_type': 'bert',
          'family': 'bert', 'method': 'lora', 'tokenizer': 'words',
          'dtype': 'float32', 'base_dtype': 'float32',
          'mesh': {'data': jax.device_count(), 'fsdp': 1, 'tensor': 1},
          'data': {'source': 'generated'}}
  assert summary['resolved'] == want
  on_disk = workdir_lib.read_summary(tmp_path / 'run')['resolved']
  assert on_disk == want and str(tmp_path) not in json.dumps(on_disk)


def test_resolved_fields_follow_the_config(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for name in ('train.tsv', 'dev.tsv'):
    (tmp_path / name).write_text(TSV)
  config = config_reads.get_config('bert_sentiment_lora', 'runlocal')
  config.model.base_dtype = 'bfloat16'
  config.peft.targets = ''  # the family's preset
  config.mesh.update(data=2, fsdp=-1)
  config.data.update(source='files', train_file='train.tsv',
                     eval_file='dev.tsv')
  r = resolved.resolve(config)
  assert r.local is None and r.spec['model_type'] == 'bert'
  assert r.peft['targets'] == 'bert' and r.method == 'lora'
  record = r.record()
  assert record['model_path'] == 'model.init' and record['source'] == 'init'
  assert record['base_dtype'] == 'bfloat16'
  assert record['mesh'] == {'data': 2, 'fsdp': jax.device_count() // 2,
                            'tensor': 1}
  assert record['data'] == {'source': 'files', 'train_file': 'train.tsv',
                            'eval_file': 'dev.tsv'}
  assert r.files == {'train_file': pathlib.Path('train.tsv'),
                     'eval_file': pathlib.Path('dev.tsv')}
  # The family is checked against the checkpoint's config.json, once.
  _checkpoint_config(tmp_path / 'bert')
  config.model.update(path=str(tmp_path / 'bert'), family='t5')
  with pytest.raises(errors.UserError, match="holds a 'bert' model, not "
                     "model.family='t5'; fix model.family"):
    resolved.resolve(config)


@pytest.mark.parametrize('path, names', [
    ('{tmp}/missing', 'does not exist'),
    ('pkg:no_such_pkg/model', "package 'no_such_pkg' is not installed"),
    ('{tmp}', 'config.json is missing'),
    ('no-such-owner/no-such-model', 'could not get'),  # HF_HUB_OFFLINE
])
def test_a_bad_model_path_is_one_line_naming_the_field(tmp_path, path,
                                                      names):
  config = config_reads.get_config('bert_sentiment_lora', 'runlocal')
  config.model.path = path.format(tmp=tmp_path)
  with pytest.raises(errors.UserError) as caught:
    resolved.resolve(config)
  message = str(caught.value)
  assert '\n' not in message and names in message
  assert message.startswith(
      f'--config.model.path={config.model.path!r}: ')
  assert message.endswith("Set --config.model.path to a checkpoint folder, "
                          "a 'pkg:' path, a .gguf file or a hub id.")


def test_a_hub_id_is_found_in_the_cache_once_and_its_revision_recorded(
    tmp_path, monkeypatch):
  repo, commit = tmp_path / 'hub' / 'models--someone--tiny-bert', 'c0ffee' * 6
  config = _checkpoint_config(repo / 'snapshots' / commit)
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text(commit)
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
  config.model.path = 'someone/tiny-bert'
  r = resolved.resolve(config)
  assert r.record()['source'] == 'hub'
  assert r.record()['revision'] == commit
  assert r.record()['model_path'] == 'someone/tiny-bert'
  located = []
  monkeypatch.setattr(hf_io, 'resolve', located.append)  # no second look
  model, params, _, _ = build.model_and_params(r, jax.random.PRNGKey(1))
  assert not located and model.config.hidden_size == 32
  assert jax.tree.leaves(params)


def _files_config(train_file: str, eval_file: str):
  config = config_reads.shorten(
      config_reads.get_config('bert_sentiment_lora', 'runlocal'))
  config.data.update(source='files', train_file=train_file,
                     eval_file=eval_file)
  return config


def test_a_run_reads_its_data_files_through_the_resolved_paths(
    tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))  # '~' is tmp_path
  (tmp_path / 'train.tsv').write_text(TSV)
  (tmp_path / 'dev.tsv').write_text(TSV.replace('great', 'fine'))
  config = _files_config('~/train.tsv', '~/dev.tsv')
  resolutions, read = [], []
  data_files, read_classification = (task_data.data_files,
                                     sources.read_classification)

  def counted_data_files(*args, **kwargs):
    resolutions.append(args)
    return data_files(*args, **kwargs)

  def counted_read(path, **kwargs):
    read.append(path)
    return read_classification(path, **kwargs)

  monkeypatch.setattr(task_data, 'data_files', counted_data_files)
  monkeypatch.setattr(sources, 'read_classification', counted_read)
  summary = trainer.train_and_evaluate(config, tmp_path / 'run')
  assert len(resolutions) == 1  # once, in resolved.resolve
  assert read == [tmp_path / 'train.tsv', tmp_path / 'dev.tsv']
  assert summary['resolved']['data'] == {
      'source': 'files', 'train_file': '~/train.tsv', 'eval_file': '~/dev.tsv'}
  # Evaluation reads (and checks) the eval file alone.
  config.data.train_file = str(tmp_path / 'gone.tsv')
  r = resolved.resolve(config, reads=('eval',))
  assert r.files == {'eval_file': tmp_path / 'dev.tsv'}
  assert not resolved.resolve(config, reads=()).files  # predict, inspect


@pytest.mark.parametrize('field', ['train_file', 'eval_file'])
def test_a_missing_data_file_fails_at_resolve_before_the_model(
    tmp_path, monkeypatch, field):
  (tmp_path / 'train.tsv').write_text(TSV)
  config = _files_config(str(tmp_path / 'train.tsv'), str(tmp_path / 'dev.tsv'))
  config.data[field] = missing = str(tmp_path / 'none.tsv')
  built = []
  for name in ('tokenizer', 'abstract_params', 'model_and_method'):
    monkeypatch.setattr(build, name, lambda *a, n=name, **k: built.append(n))
  with pytest.raises(FileNotFoundError) as caught:
    trainer.train_and_evaluate(config, tmp_path / 'run')
  message = str(caught.value)
  assert '\n' not in message and not built
  assert message == (f'data.{field}={missing!r} does not exist. Fix the '
                     f'path (--config.data.{field}=...).')
  assert not (tmp_path / 'run').exists()
  # The same line from resolve itself: the check lives there.
  with pytest.raises(FileNotFoundError, match=f'data.{field}='):
    resolved.resolve(config)
