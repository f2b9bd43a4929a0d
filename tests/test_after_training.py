"""After training (issue #16): experiments.evaluate / predict, per-example
predictions, SQuAD's official scoring rules, TensorBoard scalars, the
result line, and the small pieces (overrides, .json arrays, CPU-host
settings on accelerators, bf16 peaks)."""
import collections
import json
import pathlib
import re
import string
import struct
import sys
import types

import numpy as np
import pytest

from configs import bert_sentiment_lora
from configs import bert_squad_lora
from experiments import cli
from experiments import peaks
from flaxlora import evaluation
from flaxlora import host_memory
from flaxlora import metric_writers
from flaxlora import predict
from flaxlora import predictions_io
from flaxlora import trainer
from flaxlora import workdir as workdir_lib
from flaxlora.data import sources
from flaxlora.data import synthetic
from flaxlora.inspect import runs


@pytest.fixture(scope='module')
def sst(tmp_path_factory):
  """A finished 12-step runlocal classification run (evals at 6 and 12)."""
  config = bert_sentiment_lora.get_config('runlocal')
  config.unlock()
  config.train.update(steps=12, eval_every=6, log_every=3,
                      checkpoint_every=6)
  config.mesh.update(data=2, fsdp=4)  # evaluated below on data=8
  workdir = tmp_path_factory.mktemp('sst')
  summary = trainer.train_and_evaluate(config, workdir)
  return workdir, summary


def _events(workdir):
  """{tag: [(step, value)]} of the TensorBoard event files (TFRecords of
  Event protos, read without TensorFlow)."""
  # pylint: disable-next=g-import-not-at-top
  from tensorboardX.proto import event_pb2
  scalars = collections.defaultdict(list)
  for path in pathlib.Path(workdir).glob('events.out.tfevents.*'):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack('<Q', data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      for value in event.summary.value:
        scalars[value.tag].append((event.step, value.simple_value))
  return scalars


def test_run_writes_predictions_tensorboard_and_result_line(sst, capsys):
  workdir, summary = sst
  rows = predictions_io.read(workdir)
  assert len(rows) == 64 and set(rows[0]) >= {'id', 'input', 'prediction',
                                              'reference', 'probabilities'}
  accuracy = np.mean([r['prediction'] == r['reference'] for r in rows])
  assert accuracy == pytest.approx(summary['eval_accuracy'])
  scalars = _events(workdir)
  assert [s for s, _ in scalars['train/loss']] == [1, 3, 6, 9, 12]
  assert {'train/grad_norm', 'train/lr', 'train/steps_per_s',
          'eval/accuracy', 'eval/loss'} <= set(scalars)
  assert scalars['eval/accuracy'][-1] == (12, pytest.approx(
      summary['eval_accuracy']))
  line = workdir_lib.result_line(summary, workdir, 3.0, True)
  assert line.startswith('flaxlora: done, step 12: eval loss ')
  assert f'adapter {workdir / "adapter"}, PEFT folder {workdir / "peft"}' in (
      line)
  assert 'best accuracy' in line and 'at step' in line


def test_evaluate_final_best_and_step_on_another_mesh(sst):
  workdir, summary = sst
  config = evaluation.override(runs.read_config(workdir),
                               ['mesh.data=8', 'mesh.fsdp=1'])
  loaded = evaluation.load(workdir, config)
  assert dict(loaded.run.mesh.shape) == {'data': 8, 'fsdp': 1, 'tensor': 1}
  out = workdir / 'eval' / 'x'
  result = evaluation.evaluate(loaded, out)
  assert result['metrics']['accuracy'] == pytest.approx(
      summary['eval_accuracy'])
  assert result['metrics']['loss'] == pytest.approx(summary['eval_loss'],
                                                    rel=1e-5)
  assert json.loads((out / 'metrics.json').read_text())['step'] == 12
  again, trained = predictions_io.read(out), predictions_io.read(workdir)
  assert [r['prediction'] for r in again] == [r['prediction'] for r in trained]
  np.testing.assert_allclose([r['probabilities']['1'] for r in again],
                             [r['probabilities']['1'] for r in trained],
                             atol=1e-5)
  best = evaluation.load(workdir, config, 'best')
  assert best.step == summary['best_step']
  six = evaluation.evaluate(evaluation.load(workdir, config, 6),
                            workdir / 'eval' / 'six')
  evals = [r for r in workdir_lib.read_metrics(workdir)
           if r['split'] == 'eval']
  assert six['metrics']['loss'] == pytest.approx(evals[0]['loss'], rel=1e-5)
  assert six['metrics']['loss'] != pytest.approx(summary['eval_loss'])
  with pytest.raises(ValueError, match=r'--step=5: .* holds steps'):
    evaluation.load(workdir, config, 5)


def test_evaluate_on_another_file_reads_only_it(sst, tmp_path):
  workdir, _ = sst
  rows = ['sentence\tlabel', 'good nice great\t1', 'awful bad sad\t0']
  path = tmp_path / 'test.tsv'
  path.write_text('\n'.join(rows) + '\n')
  config = evaluation.override(runs.read_config(workdir),
                               [f'data.eval_file={path}'])
  assert config.data.source == 'files'
  loaded = evaluation.load(workdir, config)
  assert loaded.run.data.train is None
  assert evaluation.default_name(config, loaded) == 'test_final'
  result = evaluation.evaluate(loaded, tmp_path / 'out')
  assert result['examples'] == 2
  got = predictions_io.read(tmp_path / 'out')
  assert [r['reference'] for r in got] == ['1', '0']
  assert [r['input'] for r in got] == ['good nice great', 'awful bad sad']


def test_predict_matches_the_eval_predictions(sst):
  workdir, _ = sst
  config = runs.read_config(workdir)
  loaded = evaluation.load(workdir, config)
  rows = predictions_io.read(workdir)[:3]
  got = predict.predict(loaded.run, loaded.adapter,
                        [{'text': r['input'], 'id': r['id']} for r in rows])
  for want, row in zip(rows, got):
    assert 'reference' not in row and row['id'] == want['id']
    assert row['prediction'] == want['prediction']
    np.testing.assert_allclose(list(row['probabilities'].values()),
                               list(want['probabilities'].values()),
                               atol=1e-5)
  with pytest.raises(ValueError, match=r"input 1: no field 'text'"):
    predict.predict(loaded.run, loaded.adapter, [{'question': 'x'}])


def test_override_casts_and_refuses_unknown_fields():
  config = bert_sentiment_lora.get_config('runlocal')
  got = evaluation.override(config, ['train.eval_batch_size=8',
                                     'log.wandb=true', 'data.buckets=(8,)'])
  assert got.train.eval_batch_size == 8 and got.log.wandb is True
  assert tuple(got.data.buckets) == (8,)
  with pytest.raises(ValueError, match=r'--config.train.nope=1: the run '
                     r'config has no field'):
    evaluation.override(config, ['train.nope=1'])
  assert cli.split_overrides(['p', '--workdir=w', '--config.a.b=1',
                              '--config.c', '2']) == (
                                  ['p', '--workdir=w'], ['a.b=1', 'c=2'])


# SQuAD v1.1's official scoring rules, written from the published
# definition: normalise (lower case, drop punctuation, drop the articles
# a/an/the, collapse whitespace); exact match and token-overlap F1, each the
# maximum over a question's gold answers, averaged as percentages.
def _normalize(text):
  text = ''.join(c for c in text.lower() if c not in set(string.punctuation))
  return ' '.join(re.sub(r'\b(a|an|the)\b', ' ', text).split())


def _f1(prediction, gold):
  p, g = _normalize(prediction).split(), _normalize(gold).split()
  same = sum((collections.Counter(p) & collections.Counter(g)).values())
  if not same:
    return 0.0
  precision, recall = same / len(p), same / len(g)
  return 2 * precision * recall / (precision + recall)


def _official_v11(dataset, predictions):
  exact = f1 = total = 0
  for article in dataset['data']:
    for paragraph in article['paragraphs']:
      for qa in paragraph['qas']:
        total += 1
        golds = [a['text'] for a in qa['answers']]
        if qa['id'] not in predictions:
          continue
        answer = predictions[qa['id']]
        exact += max(float(_normalize(answer) == _normalize(g))
                     for g in golds)
        f1 += max(_f1(answer, g) for g in golds)
  return {'exact_match': 100 * exact / total, 'f1': 100 * f1 / total}


def test_official_rules_normalise_as_published():
  got = _official_v11(
      {'data': [{'paragraphs': [{'qas': [
          {'id': 'a', 'answers': [{'text': 'The Cat!'}]},
          {'id': 'b', 'answers': [{'text': 'red fox'}, {'text': 'fox'}]}]}]}]},
      {'a': 'cat', 'b': 'a red dog'})
  assert got == {'exact_match': 50.0, 'f1': pytest.approx(75.0)}


def _squad_file(path, records, extra_answer=False):
  data = []
  for r in records:
    answers = [{'text': a['text'], 'answer_start': a['start']}
               for a in r['answers']]
    if extra_answer:  # a second gold answer: the whole context
      answers.append({'text': r['context'], 'answer_start': 0})
    data.append({'title': r['id'], 'paragraphs': [{
        'context': r['context'],
        'qas': [{'id': r['id'], 'question': r['question'],
                 'answers': answers}]}]})
  path.write_text(json.dumps({'version': '1.1', 'data': data}))
  return json.loads(path.read_text())


def test_squad_predictions_score_like_the_official_script(tmp_path):
  train = synthetic.generate('lookup', 256, seed=0, split='train')
  dev = synthetic.generate('lookup', 24, seed=0, split='eval')
  _squad_file(tmp_path / 'train.json', train)
  dataset = _squad_file(tmp_path / 'dev.json', dev, extra_answer=True)
  config = bert_squad_lora.get_config('runlocal')
  config.unlock()
  config.data.update(source='files', train_file=str(tmp_path / 'train.json'),
                     eval_file=str(tmp_path / 'dev.json'))
  config.train.update(steps=15, eval_every=0, log_every=15,
                      checkpoint_every=0)
  summary = trainer.train_and_evaluate(config, tmp_path / 'run')
  answers = json.loads((tmp_path / 'run' / 'squad_predictions.json'
                        ).read_text())
  assert sorted(answers) == sorted(r['id'] for r in dev)
  official = _official_v11(dataset, answers)
  assert summary['eval_exact_match'] == pytest.approx(official['exact_match'])
  assert summary['eval_f1'] == pytest.approx(official['f1'])
  assert 0 < official['f1'] and official['f1'] != official['exact_match']
  rows = predictions_io.read(tmp_path / 'run')
  for row, record in zip(rows, dev):
    assert record['context'][row['start']:row['end']] == row['prediction']


class _FakeWandb(types.ModuleType):
  """Records what metric_writers asks of wandb."""

  def __init__(self):
    super().__init__('wandb')
    self.calls = []

  def init(self, **kwargs):
    self.calls.append(('init', kwargs))
    return self

  def log(self, values, step):
    self.calls.append(('log', step, values))

  def finish(self):
    self.calls.append(('finish',))


def test_wandb_offline_and_main_process_only(tmp_path, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, 'wandb', fake)
  config = evaluation.override(bert_sentiment_lora.get_config('runlocal'),
                               ['log.wandb=True', 'log.tensorboard=False'])
  assert metric_writers.create(config, tmp_path, is_main=False) is None
  writer = metric_writers.create(config, tmp_path, is_main=True)
  writer.write(5, 'eval', {'step': 5, 'split': 'eval', 'accuracy': 0.5,
                           'loss': float('nan')})
  writer.close()
  (_, init), log, finish = fake.calls
  assert init['mode'] == 'offline' and init['dir'] == str(tmp_path)
  assert log == ('log', 5, {'eval/accuracy': 0.5}) and finish == ('finish',)


def test_json_arrays_are_read_and_bad_ones_named(tmp_path):
  path = tmp_path / 'rows.json'
  path.write_text(json.dumps([{'sentence': 'a', 'label': 1},
                              {'sentence': 'b', 'label': 0}], indent=1))
  records = sources.read_classification(path, labels=('0', '1'))
  assert [(r['text'], r['label']) for r in records] == [('a', 1), ('b', 0)]
  assert records[1]['origin'] == f'{path}[1]'
  path.write_text('[{"sentence": "a", "label": 1}, 3]')
  with pytest.raises(ValueError, match=r'element 1 of the array is a JSON '
                     'int'):
    sources.read_rows(path)


def test_cpu_host_settings_are_noops_on_accelerators(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert not host_memory.cpu_only()
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert host_memory.cpu_only()
  monkeypatch.setattr(host_memory, 'cpu_only', lambda: False)
  def refuse(*args):
    raise AssertionError('touched glibc or jax.config on an accelerator')
  monkeypatch.setattr(host_memory, 'glibc', refuse)
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax.config, 'update', refuse)
  assert host_memory.keep_freed_memory() is False
  assert 'not applied' in host_memory.cpu_settings(True, 4)


def test_bf16_peaks():
  assert peaks.bf16_peak('NVIDIA H100 80GB HBM3') == 989e12
  assert peaks.bf16_peak('NVIDIA H100 PCIe') == 756e12
  assert peaks.bf16_peak('TPU v5 lite') == 197e12
  assert peaks.bf16_peak('TPU v5') == 459e12
  assert peaks.bf16_peak('cpu') is None
  assert peaks.fraction(989e12, 2.0, 'NVIDIA H200', devices=1) == 0.5
  assert peaks.fraction(989e12, 1.0, 'NVIDIA H200', devices=2) == 0.5
  assert peaks.fraction(1.0, 1.0, 'cpu') is None


def test_mean_pooled_run_keeps_its_adapter_and_serves(tmp_path, capsys):
  config = bert_sentiment_lora.get_config('runlocal')
  config.unlock()
  config.train.update(steps=6, eval_every=6, checkpoint_every=6)
  config.model.pooling = 'mean'
  summary = trainer.train_and_evaluate(config, tmp_path)
  out = capsys.readouterr().out
  assert "no PEFT folder: pooling='mean' has no Hugging Face class" in out
  assert not (tmp_path / 'peft').exists()
  assert (tmp_path / 'adapter').is_dir()
  assert 'PEFT folder' not in out.splitlines()[-1]
  # Served from the workdir with the run's pooling, as evaluated.
  loaded = evaluation.load(tmp_path, runs.read_config(tmp_path))
  assert loaded.run.model.pooling == 'mean'
  rows = predictions_io.read(tmp_path)
  got = predict.predict(loaded.run, loaded.adapter,
                        [{'text': r['input']} for r in rows])
  assert [r['prediction'] for r in got] == [r['prediction'] for r in rows]
  accuracy = np.mean([r['prediction'] == r['reference'] for r in rows])
  assert accuracy == pytest.approx(summary['eval_accuracy'])
