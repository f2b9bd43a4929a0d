"""What the trainer does, not which files it writes: the loss falls for each
task, clipping bounds the update, k micro-batches make the update of one
batch k times the size, dropout uses the step's rng, and best_mode='min'
picks the lowest eval."""
import json
import pathlib
import tempfile

import jax
import numpy as np
import optax
import pytest

import config_reads
from flaxlora import optimizers
from flaxlora import run_setup
from flaxlora import steps
from flaxlora import trainer


def _run(name, **changes):
  config = config_reads.shorten(config_reads.get_config(name, 'runlocal'))
  for key, value in changes.items():
    section, field = key.split('.')
    config[section][field] = value
  return run_setup.setup(config, pathlib.Path(tempfile.mkdtemp()))


def _batch(run, loader):
  return run_setup.device_batch(run, next(loader))


def _steps(run, tx, num_steps, accum=1, clip_norm=0.0, adapter=None):
  """(adapter after `num_steps` trainer steps, the losses)."""
  state, shardings = run_setup.init_state(run, tx)
  if adapter is not None:
    state = state._replace(adapter=adapter, opt_state=tx.init(adapter))
  step = steps.jit_train_step(run.task.loss, run.method, tx, accum,
                              shardings, clip_norm=clip_norm)
  loader = run_setup.loader(run, train=True)
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, run.base, _batch(run, loader))
    losses.append(float(metrics['loss']))
  return jax.device_get(state.adapter), losses


@pytest.mark.parametrize('name,num_steps', [('bert_sentiment_lora', 80),
                                            ('bert_squad_lora', 30),
                                            ('t5_lora', 30)])
def test_loss_falls_for_each_task(name, num_steps):
  run = _run(name, **{'train.steps': num_steps})
  tx = optimizers.optimizer(run.config.optimizer, num_steps, run.method)
  _, losses = _steps(run, tx, num_steps)
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < 0.8 * first, (name, losses)


def _moved(a, b):
  return np.sqrt(sum(float(np.sum((np.asarray(x, np.float64) - y) ** 2))
                     for x, y in zip(jax.tree.leaves(a),
                                     jax.tree.leaves(b))))


def test_clipping_bounds_the_update():
  run = _run('bert_sentiment_lora', **{'peft.dropout': 0.0})
  sgd = optax.sgd(1.0)
  start = jax.device_get(run_setup.init_state(run, sgd)[0].adapter)
  free, _ = _steps(run, sgd, 1, adapter=start)
  clipped, _ = _steps(run, sgd, 1, adapter=start, clip_norm=1e-3)
  grad_norm = _moved(free, start)  # sgd(1): the update is the gradient
  assert grad_norm > 1e-2
  np.testing.assert_allclose(_moved(clipped, start), 1e-3, rtol=1e-4)
  # Same direction: clipping only scales.
  scale = 1e-3 / grad_norm
  for c, f, s in zip(*map(jax.tree.leaves, (clipped, free, start))):
    np.testing.assert_allclose(c - s, scale * (f - s), atol=1e-7)


def test_accumulation_of_k_micro_batches_equals_one_batch_of_k_times():
  run = _run('bert_sentiment_lora', **{'peft.dropout': 0.0})
  sgd = optax.sgd(1.0)
  start = jax.device_get(run_setup.init_state(run, sgd)[0].adapter)
  one, loss_one = _steps(run, sgd, 1, adapter=start)
  moved = _moved(one, start)
  assert moved > 1e-3
  for k in (2, 4):
    accumulated, loss_k = _steps(run, sgd, 1, accum=k, adapter=start)
    np.testing.assert_allclose(loss_k, loss_one, rtol=1e-6)
    # fp32 sums in another order: equal to rounding (1e-6 of the update).
    assert _moved(accumulated, one) < 1e-6 * moved, k


def test_dropout_changes_the_loss_with_the_rng_and_only_with_it():
  run = _run('bert_sentiment_lora', **{'model.dropout': 0.3,
                                       'peft.dropout': 0.0})
  tx = optax.sgd(0.0)
  state, _ = run_setup.init_state(run, tx)
  batch = _batch(run, run_setup.loader(run, train=True))
  params, kwargs = run.method.apply(run.base, state.adapter)
  loss = jax.jit(lambda rng: run.task.loss(params, kwargs, batch, rng)[0])
  a, b = (float(loss(jax.random.PRNGKey(s))) for s in (1, 2))
  assert a != b
  assert float(loss(jax.random.PRNGKey(1))) == a
  # No rng (eval): deterministic and equal to a model without dropout.
  plain = float(run.task.loss(params, kwargs, batch, None)[0])
  off = _run('bert_sentiment_lora', **{'model.dropout': 0.0,
                                       'peft.dropout': 0.0})
  off_params, off_kwargs = off.method.apply(off.base, state.adapter)
  np.testing.assert_allclose(
      float(off.task.loss(off_params, off_kwargs, batch, None)[0]), plain,
      rtol=1e-6)
  assert abs(a - plain) > 1e-4 * abs(plain)


@pytest.mark.parametrize('mode', ['min', 'max'])
def test_best_mode_picks_the_lowest_or_highest_eval(mode, tmp_path):
  config = config_reads.shorten(config_reads.get_config(
      'bert_sentiment_lora', 'runlocal'))
  config.train.update(steps=4, eval_every=1)
  config.checkpoint.update(best_metric='loss', best_mode=mode, keep=1)
  summary = trainer.train_and_evaluate(config, tmp_path)
  evals = [json.loads(line) for line in
           (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  evals = {r['step']: r['loss'] for r in evals if r['split'] == 'eval'}
  assert len(set(evals.values())) == 4, evals
  pick = min if mode == 'min' else max
  best = pick(evals, key=evals.get)
  assert summary['best_step'] == best and summary['best_loss'] == evals[best]
  kept = {int(p.name) for p in (tmp_path / 'checkpoints').iterdir()
          if p.name.isdigit()}
  assert best in kept, kept
