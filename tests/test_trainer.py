"""The trainer's parts: schedules, the train step (accumulation, adapter-only
grads), checkpoints (last N + best), workdir bookkeeping, and clear errors
for bad input that leave the workdir untouched."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax.sharding import PartitionSpec as P

from configs import bert_sentiment_lora
from configs import bert_sentiment_prompt
from configs import bert_sentiment_qlora
from configs import bert_squad_lora
from flaxlora import build
from flaxlora import checkpoint
from flaxlora import claim
from flaxlora import export
from flaxlora import optimizers
from flaxlora import progress
from flaxlora import resolved
from flaxlora import sharding
from flaxlora import steps
from flaxlora import trainer
from flaxlora import workdir as workdir_lib
from flaxlora.models import layers
from flaxlora.peft import lora
from flaxlora.peft.qlora import nf4


def _opt(**kw):
  opt = bert_sentiment_lora.get_config().optimizer
  opt.update(kw)
  return opt


def test_schedule_warms_up_then_decays():
  lr = optimizers.schedule(_opt(lr=1.0, warmup_steps=10,
                                 schedule='linear'), 110)
  np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)],
                             [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
  cosine = optimizers.schedule(_opt(lr=1.0, warmup_steps=0,
                                     schedule='cosine'), 100)
  np.testing.assert_allclose([cosine(0), cosine(50), cosine(100)],
                             [1.0, 0.5, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match='warmup_steps=-1 must be >= 0'):
    optimizers.schedule(_opt(warmup_steps=-1), 100)
  with pytest.raises(ValueError, match="schedule='cosin'"):
    optimizers.schedule(_opt(schedule='cosin', warmup_steps=0), 100)
  with pytest.raises(ValueError, match="optimizer.name='sgd'"):
    optimizers.factory(_opt(name='sgd', warmup_steps=0), 100)


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
    state = steps.create(jax.random.PRNGKey(1),
                               jax.tree.map(jnp.copy, adapter), tx)
    step = steps.jit_train_step(loss_fn, method, tx, accum)
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
    state = steps.create(jax.random.PRNGKey(1),
                               jax.tree.map(jnp.copy, adapter), tx)
    steps.jit_train_step(loss_fn, method, tx, 3)(state, base, batch)


def test_loss_is_the_weighted_mean_over_real_rows():
  base, method, adapter, loss_fn, batch = _toy()
  tx = optax.sgd(0.0)
  state = steps.create(jax.random.PRNGKey(1),
                             jax.tree.map(jnp.copy, adapter), tx)
  _, metrics = steps.jit_train_step(loss_fn, method, tx)(
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
  state = steps.create(jax.random.PRNGKey(0), adapter, tx)
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
  assert isinstance(restored, steps.TrainState)
  assert isinstance(restored.adapter, tuple)
  assert type(restored.opt_state) is type(state.opt_state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  by_f1 = checkpoint.Checkpointer(tmp_path / 'ck2', best_metric='f1')
  with pytest.raises(ValueError, match="best_metric='f1' is not among"):
    by_f1.save(9, state, {'epoch': 0, 'index': 9}, metrics={'accuracy': 1.0,
                                                            'loss': 0.1})


def test_workdir_refuses_another_config_and_names_the_keys(tmp_path):
  config = bert_sentiment_lora.get_config('runlocal')
  claim.prepare(tmp_path, config)
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "split": "train"}\n')
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  other = bert_sentiment_lora.get_config('runlocal')
  other.optimizer.lr = 0.5  # compatible: not named
  other.train.seed = 3
  with pytest.raises(ValueError, match=r'1 incompatible keys: train\.seed: '
                     r'0 -> 3\).*--overwrite'):
    trainer.train_and_evaluate(other, tmp_path)
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
  claim.prepare(tmp_path, other, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['config.json']
  assert json.loads((tmp_path / 'config.json').read_text())['train'][
      'seed'] == 3


def test_a_run_written_before_a_key_was_added_continues_under_its_value(
    tmp_path):
  config = bert_sentiment_lora.get_config('runlocal')
  claim.prepare(tmp_path, config)
  written = json.loads((tmp_path / 'config.json').read_text())
  assert written['model'].pop('pooling') == 'cls'  # added in a later version
  (tmp_path / 'config.json').write_text(json.dumps(written))
  assert claim.changes(tmp_path, config, 0, None) == []
  config.model.pooling = 'mean'
  with pytest.raises(ValueError, match=r"model\.pooling: 'cls' -> 'mean'"):
    claim.changes(tmp_path, config, 0, None)


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
  # (a NaN lr is refused before the run starts; 1e30 diverges at step 2)
  config.optimizer.update(lr=1e30, warmup_steps=0, clip_norm=0.0)
  config.train.update(steps=6, checkpoint_every=1, log_every=1,
                      eval_every=0)
  with pytest.raises(progress.NonFiniteLossError,
                     match=r'loss is (nan|-?inf) at step 2.*last good '
                     r'checkpoint is step 1.*optimizer\.lr=1e\+29'):
    trainer.train_and_evaluate(config, tmp_path)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()
                if p.name.isdigit()) == ['1']
  assert not (tmp_path / 'summary.json').exists()
  records = workdir_lib.read_metrics(tmp_path)
  assert [r['step'] for r in records] == [1]


# ------------------------------------- methods, optimizers and the mesh ---


def _adafactor_steps(tx, params, grads, jit_kw=None):
  """Two updates of `tx` (jitted with `jit_kw` shardings when given)."""
  jit_kw = jit_kw or {}
  state = jax.jit(tx.init, out_shardings=jit_kw.get('state'))(params)
  update = jax.jit(tx.update, out_shardings=jit_kw.get('update'))
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_adafactor_options_and_its_state_on_a_sharded_mesh():
  mesh = sharding.make_mesh({'fsdp': 2, 'tensor': 4})
  rules = sharding.resolve_rules()
  rng = np.random.default_rng(0)
  # [256, 128] is factored: v_row and v_col are 1-D, not its shape.
  params = {'w': jnp.asarray(rng.normal(size=(256, 128)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(128,)), jnp.float32)}
  axes = {'w': P('embed', 'mlp'), 'b': P('mlp')}
  shardings = sharding.named_shardings(params, axes, mesh, rules)
  params = jax.device_put(params, shardings)
  grads = [jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), params)
           for i in range(2)]
  opt = _opt(name='adafactor', lr=0.1, schedule='constant', warmup_steps=0,
             clip_norm=0.0, weight_decay=0.0)
  opt.update(dict(adafactor_decay_rate=0.5, adafactor_parameter_scale=False))
  tx = optimizers.factory(opt, 10)()
  opt_shardings = sharding.optimizer_shardings(tx, params, shardings, mesh)
  ours, state = _adafactor_steps(tx, params, grads, dict(
      state=opt_shardings, update=(shardings, opt_shardings)))
  factored = state[0]
  assert factored.v_row['w'].ndim == factored.v_col['w'].ndim == 1
  assert factored.v_row['w'].sharding.is_fully_replicated
  assert factored.v['b'].sharding.spec == P('tensor')
  # The config's options reach optax (the decay rate shows from step 2).
  want, _ = _adafactor_steps(optax.adafactor(
      0.1, decay_rate=0.5, multiply_by_parameter_scale=False), params, grads)
  default, _ = _adafactor_steps(optax.adafactor(0.1), params, grads)
  np.testing.assert_allclose(ours['w'], want['w'], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(ours['w']) - np.asarray(default['w'])).max() > 1e-3


def _resolved(config, mesh):
  config.sharding_rules.vocab = None  # replicated: 2 does not divide it
  return resolved.resolve(config, mesh=mesh)


def test_model_and_method_prepares_the_base_and_gives_adapter_axes():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  rules = sharding.resolve_rules({'vocab': None})
  # Prompt tuning + trained head copies: the prompt is replicated, the
  # copies follow their base params.
  prompt = _resolved(bert_sentiment_prompt.get_config('runlocal'), mesh)
  assert prompt.rules == rules
  b = build.model_and_method(prompt)
  adapter = jax.eval_shape(b.method.init, b.adapter_rng, b.base)
  axes = b.method.logical_axes(b.base_axes, adapter)
  assert axes[0] == {'prompt': P('prompt', None)}
  assert axes[1]['pooler'] == b.base_axes['pooler']
  # The base is the seed's (train.seed 0), untouched by the method.
  _, again, _, _ = build.model_and_params(
      prompt, jax.random.fold_in(jax.random.PRNGKey(0), build.BASE_FOLD))
  for x, y in zip(jax.tree.leaves(b.base), jax.tree.leaves(again)):
    np.testing.assert_array_equal(x, y)
  # QLoRA: kernels quantised once and sharded like the kernels; the heads
  # kept; LoRA axes from the unquantised kernels.
  q = build.model_and_method(
      _resolved(bert_sentiment_qlora.get_config('runlocal'), mesh))
  query = q.base['encoder']['layer_0']['attention']['query']['kernel']
  assert nf4.is_nf4(query)
  assert query.codes.sharding.spec == P('fsdp', 'tensor')
  assert not nf4.is_nf4(q.base['classifier']['kernel'])
  adapter = jax.eval_shape(q.method.init, q.adapter_rng, q.base)
  axes = q.method.logical_axes(q.base_axes, adapter)
  assert axes[0]['encoder']['layer_0']['attention']['query']['kernel'] == {
      'a': P('embed', 'lora_rank'), 'b': P('lora_rank', 'heads')}
  assert axes[1]['classifier'] == q.base_axes['classifier']
  shardings = sharding.named_shardings(adapter, axes, mesh, rules)
  assert shardings[0]['encoder']['layer_0']['attention']['query'][
      'kernel']['a'].spec == P('fsdp', None)
