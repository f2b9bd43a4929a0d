"""The trainer's parts: schedules, the train step (accumulation, adapter-only
grads), checkpoints (last N + best), workdir bookkeeping, and clear errors
for bad input that leave the workdir untouched."""
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import bert_sentiment_lora
from configs import bert_squad_lora
from flaxlora import checkpoint
from flaxlora import export
from flaxlora import train_state
from flaxlora import trainer
from flaxlora import workdir as workdir_lib
from flaxlora.models import layers
from flaxlora.peft import base as peft_base
from flaxlora.peft import lora


def _opt(**kw):
  opt = bert_sentiment_lora.get_config().optimizer
  opt.update(kw)
  return opt


def test_schedule_warms_up_then_decays():
  lr = train_state.schedule(_opt(lr=1.0, warmup_steps=10,
                                 schedule='linear'), 110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  cosine = train_state.schedule(_opt(lr=1.0, warmup_steps=0,
                                     schedule='cosine'), 100)
  np.testing.assert_allclose([cosine(0), cosine(50), cosine(100)],
                             [1.0, 0.5, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match='warmup_steps=-1 must be >= 0'):
    train_state.schedule(_opt(warmup_steps=-1), 100)
  with pytest.raises(ValueError, match="schedule='cosin'"):
    train_state.schedule(_opt(schedule='cosin', warmup_steps=0), 100)
  with pytest.raises(ValueError, match="optimizer.name='sgd'"):
    train_state.optimizer(_opt(name='sgd', warmup_steps=0), 100)


def _toy():
  """A LoRA-adapted dense layer + a weighted squared-error loss."""
  rng = np.random.default_rng(0)
  base = {'dense': {'kernel': jnp.asarray(rng.normal(size=(6, 4)),
                                          jnp.float32)}}
  method = lora.lora(rank=2, targets=r'dense/kernel')
  adapter = method.init(jax.random.PRNGKey(0), base)
  adapter = jax.tree.map(lambda x: x + 0.1, adapter)  # B != 0

  def loss_fn(params, kwargs, batch, rng):
    del kwargs, rng
    y = layers.dot(batch['x'], params['dense']['kernel'], dtype=jnp.float32)
    err = ((y - batch['y']) ** 2).sum(-1)
    return (err * batch['weight']).sum(), batch['weight'].sum()

  batch = {'x': jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
           'y': jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
           'weight': jnp.asarray([1, 1, 1, 0, 1, 1, 0, 1], jnp.float32)}
  return base, method, adapter, loss_fn, batch


def test_accumulation_equals_one_big_batch():
  base, method, adapter, loss_fn, batch = _toy()
  tx = optax.adamw(1e-2)
  results = []
  for accum in (1, 2, 4):
    # The step donates its state: give each run its own buffers.
    state = train_state.create(jax.random.PRNGKey(1),
                               jax.tree.map(jnp.copy, adapter), tx)
    step = train_state.jit_train_step(loss_fn, method, tx, accum)
    new_state, metrics = step(state, base, batch)
    results.append((new_state.adapter, float(metrics['loss']),
                    float(metrics['weight'])))
  for adapter_k, loss_k, weight_k in results[1:]:
    assert weight_k == results[0][2] == 6.0
    np.testing.assert_allclose(loss_k, results[0][1], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 adapter_k, results[0][0])
  # The step changed the adapter (and only the adapter is in the state).
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                       results[0][0], adapter)
  assert min(jax.tree.leaves(moved)) > 0
  with pytest.raises(ValueError, match='grad_accum_steps=3'):
    state = train_state.create(jax.random.PRNGKey(1),
                               jax.tree.map(jnp.copy, adapter), tx)
    train_state.jit_train_step(loss_fn, method, tx, 3)(state, base, batch)


def test_loss_is_the_weighted_mean_over_real_rows():
  base, method, adapter, loss_fn, batch = _toy()
  tx = optax.sgd(0.0)
  state = train_state.create(jax.random.PRNGKey(1),
                             jax.tree.map(jnp.copy, adapter), tx)
  _, metrics = train_state.jit_train_step(loss_fn, method, tx)(
      state, base, batch)
  params, _ = method.apply(base, adapter)
  merged = base['dense']['kernel'] + params['dense']['kernel'].scale * (
      adapter['dense']['kernel']['a'] @ adapter['dense']['kernel']['b'])
  err = ((np.asarray(batch['x']) @ np.asarray(merged) -
          np.asarray(batch['y'])) ** 2).sum(-1)
  real = np.asarray(batch['weight']) > 0
  np.testing.assert_allclose(float(metrics['loss']), err[real].mean(),
                             rtol=1e-5)


def test_checkpoints_keep_last_n_and_best(tmp_path):
  adapter = ({'x': {'a': jnp.ones((3, 2)), 'b': jnp.zeros((2, 4))}},
             {'head': jnp.arange(3.0)})
  tx = optax.adamw(1e-3)
  state = train_state.create(jax.random.PRNGKey(0), adapter, tx)
  ckpt = checkpoint.Checkpointer(tmp_path / 'ck', keep=2,
                                 best_metric='accuracy')
  scores = {2: 0.5, 4: 0.9, 6: 0.7, 8: 0.6}
  for step in range(1, 9):
    state = state._replace(step=jnp.asarray(step, jnp.int32))
    metrics = ({'accuracy': scores[step], 'loss': 1.0} if step in scores
               else None)
    ckpt.save(step, state, {'epoch': 0, 'index': step}, metrics=metrics)
  assert ckpt.all_steps() == [4, 7, 8]  # best (4) + the last two
  assert ckpt.best_step() == 4
  reopened = checkpoint.Checkpointer(tmp_path / 'ck', keep=2,
                                     best_metric='accuracy')
  step, restored, data_state = reopened.restore_latest(state)
  assert step == 8 and data_state == {'epoch': 0, 'index': 8}
  assert isinstance(restored, train_state.TrainState)
  assert isinstance(restored.adapter, tuple)
  assert type(restored.opt_state) is type(state.opt_state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  by_f1 = checkpoint.Checkpointer(tmp_path / 'ck2', best_metric='f1')
  with pytest.raises(ValueError, match="best_metric='f1' is not among"):
    by_f1.save(9, state, {'epoch': 0, 'index': 9}, metrics={'accuracy': 1.0,
                                                            'loss': 0.1})


def test_workdir_refuses_another_config_and_names_the_keys(tmp_path):
  config = bert_sentiment_lora.get_config('runlocal')
  workdir_lib.prepare(tmp_path, config)
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "split": "train"}\n')
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  other = bert_sentiment_lora.get_config('runlocal')
  other.optimizer.lr = 0.5
  other.train.seed = 3
  with pytest.raises(ValueError, match=r'(?s)2 differing keys.*optimizer\.lr: '
                     r'0\.01 -> 0\.5.*train\.seed: 0 -> 3.*--overwrite'):
    trainer.train_and_evaluate(other, tmp_path)
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
  workdir_lib.prepare(tmp_path, other, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json']
  assert json.loads((tmp_path / 'config.json').read_text())['train'][
      'seed'] == 3


def test_metrics_log_drops_steps_after_the_resumed_checkpoint(tmp_path):
  log = workdir_lib.MetricsLog(tmp_path, 0)
  for step in (10, 20, 30):
    log.log(step, 'train', {'loss': 1.0 / step, 'grad': np.float32(2.0)})
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 40, "spl')  # killed mid-write
  resumed = workdir_lib.MetricsLog(tmp_path, 20)
  assert [r['step'] for r in resumed.records] == [10, 20]
  resumed.log(30, 'eval', {'accuracy': 0.5})
  records = workdir_lib.read_metrics(tmp_path)
  assert [(r['step'], r['split']) for r in records] == [
      (10, 'train'), (20, 'train'), (30, 'eval')]
  assert [p.name for p in workdir_lib.plot(tmp_path)] == ['loss.png',
                                                         'eval.png']


def test_adapter_export_round_trip(tmp_path):
  adapter = ({'enc': {'q': {'a': np.ones((3, 2), np.float32),
                            'b': np.zeros((2, 3), np.float32)}}},
             {'head': {'kernel': np.arange(6.0, dtype=np.float32)}})
  folder = export.save_adapter(tmp_path / 'adapter', adapter,
                               {'peft': {'rank': 2}})
  assert sorted(export.adapter_tensors(adapter)) == [
      '0/enc/q/a', '0/enc/q/b', '1/head/kernel']
  loaded = export.load_adapter(folder, adapter)
  jax.tree.map(np.testing.assert_array_equal, loaded, adapter)
  assert export.read_spec(folder) == {'peft': {'rank': 2}}
  with pytest.raises(ValueError, match='has shape'):
    export.load_adapter(folder, ({'enc': {'q': {'a': np.ones((4, 2)),
                                                'b': np.ones((2, 3))}}},
                                 adapter[1]))


# ---------------------------------------------------------------- bad input --


def _files_config(tmp_path, train_text, eval_text=None, suffix='.tsv'):
  config = bert_sentiment_lora.get_config('runlocal')
  train, dev = tmp_path / f'train{suffix}', tmp_path / f'dev{suffix}'
  train.write_text(train_text)
  dev.write_text(eval_text if eval_text is not None else train_text)
  config.data.update(source='files', train_file=str(train),
                     eval_file=str(dev))
  return config


GOOD_TSV = 'sentence\tlabel\n' + 'good great \t1\nbad sad \t0\n' * 20


@pytest.mark.parametrize('text, match', [
    ('sentence\tlabel\ngood \t1\nbad\tsad \t0\n', r'train\.tsv:3: 3 fields'),
    ('sentence\tlabel\ngood \t1\nbad \t7\n',
     r"train\.tsv:3: label '7' is not in the label set"),
    ('sentence\tlabel\n', r'train\.tsv.* holds no examples'),
])
def test_bad_training_files_fail_clearly_and_leave_no_workdir(
    tmp_path, text, match):
  config = _files_config(tmp_path, text)
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=match):
    trainer.train_and_evaluate(config, workdir)
  assert not workdir.exists()


def test_missing_file_and_bad_lengths(tmp_path):
  config = _files_config(tmp_path, GOOD_TSV)
  config.data.eval_file = str(tmp_path / 'nope.tsv')
  with pytest.raises(FileNotFoundError, match=r"data.eval_file=.*nope\.tsv"
                     r".* does not exist"):
    trainer.train_and_evaluate(config, tmp_path / 'run')
  config = _files_config(tmp_path, GOOD_TSV)
  config.data.max_length = 2
  with pytest.raises(ValueError, match='max_length=2 cannot fit'):
    trainer.train_and_evaluate(config, tmp_path / 'run')
  config = _files_config(tmp_path, GOOD_TSV)
  config.train.batch_size = 64
  with pytest.raises(ValueError, match='fewer than train.batch_size=64'):
    trainer.train_and_evaluate(config, tmp_path / 'run')
  local = bert_sentiment_lora.get_config('local_data')
  local.data.train_file = '/nonexistent/shared/data/sst2/train.tsv'
  with pytest.raises(FileNotFoundError, match=r'\.\./shared/data'):
    trainer.train_and_evaluate(local, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


def test_malformed_json_and_squad_spans(tmp_path):
  config = bert_squad_lora.get_config('runlocal')
  squad = {'data': [{'title': 't', 'paragraphs': [{
      'context': 'kiwi is red .', 'qas': [{
          'id': 'q1', 'question': 'what is kiwi ?',
          'answers': [{'text': 'red', 'answer_start': 40}]}]}]}]}
  path = tmp_path / 'squad.json'
  path.write_text(json.dumps(squad, indent=1))
  config.data.update(source='files', train_file=str(path),
                     eval_file=str(path))
  with pytest.raises(ValueError, match=r"squad\.json:\d+ \(question id q1\):"
                     r" answer 'red' spans .* outside its context"):
    trainer.train_and_evaluate(config, tmp_path / 'run')
  path.write_text('{"data": [\n  {"title": "t",, }\n]}')
  with pytest.raises(ValueError, match=r'squad\.json:2: malformed JSON'):
    trainer.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = bert_sentiment_lora.get_config('runlocal')
  config.optimizer.update(lr=math.nan, warmup_steps=0, clip_norm=0.0)
  config.train.update(steps=6, checkpoint_every=1, log_every=1,
                      eval_every=0)
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'loss is nan at step 2.*last good checkpoint '
                     r'is step 1'):
    trainer.train_and_evaluate(config, tmp_path)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['1']
  assert not (tmp_path / 'summary.json').exists()
  records = workdir_lib.read_metrics(tmp_path)
  assert [r['step'] for r in records] == [1]
