"""ScaLoRA: accumulation, restarts, moment transfer, resume, and the trainer.
"""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import bert_sentiment_lora
from flaxlora import steps
from flaxlora import trainer
from flaxlora.peft import peft_io
from flaxlora.peft import scalora

PATH = 'layer/kernel'
RANK, SCALE = 2, 2.0  # alpha 4 / rank 2


def _setup(merge_every=1):
  base = {'layer': {'kernel': jax.random.normal(jax.random.PRNGKey(0),
                                                (12, 10))}}
  method = scalora.scalora(rank=RANK, alpha=4.0, targets=PATH,
                           merge_every=merge_every)
  batch = {'x': jax.random.normal(jax.random.PRNGKey(2), (16, 12)),
           'y': jax.random.normal(jax.random.PRNGKey(3), (16, 10))}
  tx = method.optimizer(lambda m: optax.adamw(1e-2 * m, weight_decay=0.01))
  state = steps.create(jax.random.PRNGKey(0),
                       method.init(jax.random.PRNGKey(1), base), tx)
  return base, method, batch, tx, state


def _loss(params, kwargs, batch, rng):
  del kwargs, rng
  out = params['layer']['kernel'].dot(batch['x'], dtype=jnp.float32)
  return jnp.sum((out - batch['y'])**2), jnp.float32(batch['x'].shape[0])


def _effective(method, base, adapter):
  params, _ = method.apply(base, adapter)
  return np.asarray(params['layer']['kernel'].merged())


def _leaf(adapter):
  return {k: np.asarray(v, np.float64) for k, v in adapter['layer'][
      'kernel'].items()}


def test_accumulated_update_grows_beyond_rank_and_weights_add_up():
  base, method, batch, tx, state = _setup()
  step_fn = steps.jit_train_step(_loss, method, tx)
  ranks, losses = [], []
  for _ in range(12):
    state, metrics = step_fn(state, base, batch)
    losses.append(float(metrics['loss']))
    leaf = _leaf(state.adapter)
    # Effective weights = base + accumulated update + s A B, every step.
    expected = (np.asarray(base['layer']['kernel'], np.float64) + leaf['acc']
                + SCALE * leaf['a'] @ leaf['b'])
    np.testing.assert_allclose(_effective(method, base, state.adapter),
                               expected, atol=1e-5)
    s = np.linalg.svd(leaf['acc'], compute_uv=False)
    ranks.append(int(np.sum(s > 1e-4 * max(s[0], 1e-12))))
  assert ranks[-1] > RANK and ranks[-1] > ranks[1], ranks
  assert losses[-1] < losses[0]


def test_plain_lora_sum_of_updates_stays_rank_r():
  # The contrast the method is for: without restarts (merge_every beyond
  # the run) the accumulated update stays 0 and W_eff - W = s A B has rank R.
  base, method, batch, tx, state = _setup(merge_every=1000)
  step_fn = steps.jit_train_step(_loss, method, tx)
  for _ in range(6):
    state, _ = step_fn(state, base, batch)
  delta = _effective(method, base, state.adapter) - np.asarray(
      base['layer']['kernel'])
  assert np.linalg.matrix_rank(delta, tol=1e-5) == RANK
  assert not np.any(_leaf(state.adapter)['acc'])


def _reference_restart(leaf, g_kernel):
  """The restart computed from the dense gradient G with numpy lstsq."""
  a, b = leaf['a'], leaf['b']
  x = [SCALE**2 * np.outer(a[:, i], a[:, i] @ g_kernel) for i in range(RANK)]
  y = [SCALE**2 * np.outer(g_kernel @ b[i], b[i]) for i in range(RANK)]
  design = np.stack([t.ravel() for t in x + y], axis=1)
  theta = np.linalg.lstsq(design, g_kernel.ravel(), rcond=None)[0]
  assert np.all(theta > 0), theta  # the tested regime: every column scaled
  col = np.sqrt(theta)
  return col[:RANK], col[RANK:]


def test_restart_matches_numpy_and_moments_are_transformed():
  base, method, batch, tx, state = _setup(merge_every=1000)
  step_fn = steps.jit_train_step(_loss, method, tx)
  for _ in range(3):  # B != 0 and non-trivial moments
    state, _ = step_fn(state, base, batch)
  grads = jax.grad(lambda ad: _loss(*method.apply(base, ad), batch, None)[0]
                   / 16.0)(state.adapter)
  # Dense gradient w.r.t. the effective kernel, independently of the factors.
  kernel = jnp.asarray(_effective(method, base, state.adapter))
  g_kernel = np.asarray(jax.grad(lambda k: jnp.sum(
      (batch['x'] @ k - batch['y'])**2) / 16.0)(kernel), np.float64)
  leaf = _leaf(state.adapter)
  alpha, beta = _reference_restart(leaf, g_kernel)
  adapter, opt_state, new_grads = method.before_update(
      state.adapter, state.opt_state, grads, base, jnp.int32(0))
  new = _leaf(adapter)
  np.testing.assert_allclose(new['a'], leaf['a'] * alpha, rtol=2e-3)
  np.testing.assert_allclose(new['b'], beta[:, None] * leaf['b'], rtol=2e-3)
  assert np.abs(alpha * beta - 1).max() > 1e-2  # a real restart
  # The model is unchanged by the restart.
  np.testing.assert_allclose(_effective(method, base, adapter),
                             _effective(method, base, state.adapter),
                             atol=1e-5)
  g = grads['layer']['kernel']
  ng = new_grads['layer']['kernel']
  np.testing.assert_allclose(ng['a'], np.asarray(g['a']) * beta, rtol=2e-3)
  np.testing.assert_allclose(ng['b'], alpha[:, None] * np.asarray(g['b']),
                             rtol=2e-3)
  old_adam = _adam(state.opt_state)
  new_adam = _adam(opt_state)
  for name, power in (('mu', 1), ('nu', 2)):
    old = getattr(old_adam, name)['layer']['kernel']
    out = getattr(new_adam, name)['layer']['kernel']
    np.testing.assert_allclose(out['a'], np.asarray(old['a']) * beta**power,
                               rtol=4e-3)
    np.testing.assert_allclose(
        out['b'], alpha[:, None]**power * np.asarray(old['b']), rtol=4e-3)
  assert int(new_adam.count) == int(old_adam.count)  # no optimizer reset


def _adam(opt_state):
  found = [n for n in jax.tree.leaves(
      opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
           if isinstance(n, optax.ScaleByAdamState)]
  assert len(found) == 1
  return found[0]


def test_accumulator_is_frozen_and_needs_adam():
  base, method, batch, tx, state = _setup(merge_every=1000)
  state2, _ = steps.jit_train_step(_loss, method, tx)(state, base, batch)
  assert not np.any(_leaf(state2.adapter)['acc'])  # no restart, no update
  sgd = method.optimizer(lambda m: optax.sgd(0.1))
  with pytest.raises(ValueError, match="optimizer.name='adamw'"):
    method.before_update(state.adapter, sgd.init(state.adapter),
                         state.adapter, base, jnp.int32(0))


def _config(steps_, method='scalora'):
  config = bert_sentiment_lora.get_config('runlocal')
  config.peft.method = method
  config.peft.dropout = 0.1  # the rng matters on resume
  config.train.update(steps=steps_, eval_every=0, log_every=2,
                      checkpoint_every=2)
  config.eval.max_examples = 16
  return config


def test_trainer_run_resumes_bitwise_and_exports(tmp_path, capsys):
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  summary = trainer.train_and_evaluate(_config(4), straight)
  assert summary['step'] == 4
  out = capsys.readouterr().out
  assert 'scalora: rank-8 PEFT approximation' in out
  peft_config = json.loads((straight / 'peft' / peft_io.CONFIG_FILE)
                           .read_text())
  assert peft_config['peft_type'] == 'LORA' and peft_config['r'] == 8
  # A second run restored from the first one's step-2 checkpoint.
  shutil.copytree(straight / 'checkpoints' / '2',
                  resumed / 'checkpoints' / '2')
  trainer.train_and_evaluate(_config(4), resumed)
  assert 'resuming from step 2' in capsys.readouterr().out
  adapter = 'adapter/adapter.safetensors'
  assert (straight / adapter).read_bytes() == (resumed / adapter).read_bytes()
