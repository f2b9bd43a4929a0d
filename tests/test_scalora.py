"""ScaLoRA: the accumulated update grows high-rank and the effective weights
are base + acc + s A B at every step; restarts and AdamW moments against a
numpy computation; free and invalid scalings; the rank-R export; a run
SIGKILLed mid-way resumes bitwise."""
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import bert_sentiment_lora
from flaxlora import evaluation
from flaxlora import optimizers
from flaxlora import steps
from flaxlora import trainer
from flaxlora.peft import base as peft_base
from flaxlora.peft import describe
from flaxlora.peft import hf_folder
from flaxlora.peft import lora
from flaxlora.peft import merge
from flaxlora.peft import method_parts
from flaxlora.peft import scalora
from flaxlora.peft import trainable

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
    merged = merge.merge(base, state.adapter, method)['layer']['kernel']
    np.testing.assert_allclose(merged, expected, atol=1e-5)
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


def _reference_theta(a, b, g_kernel):
  """Least-squares (u, v) of the module docstring from the dense G."""
  x = [SCALE**2 * np.outer(a[:, i], a[:, i] @ g_kernel) for i in range(RANK)]
  y = [SCALE**2 * np.outer(g_kernel @ b[i], b[i]) for i in range(RANK)]
  design = np.stack([t.ravel() for t in x + y], axis=1)
  return np.linalg.lstsq(design, g_kernel.ravel(), rcond=None)[0]


def _reference_restart(leaf, g_kernel):
  """The restart's scales computed from the dense gradient G with numpy."""
  theta = _reference_theta(leaf['a'], leaf['b'], g_kernel)
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
  adapter, opt_state, new_grads, _ = method.before_update(
      state.adapter, state.opt_state, grads, base, jnp.int32(0))
  new = _leaf(adapter)
  np.testing.assert_allclose(new['a'], leaf['a'] * alpha, rtol=2e-4)
  np.testing.assert_allclose(new['b'], beta[:, None] * leaf['b'], rtol=2e-4)
  assert np.abs(alpha * beta - 1).max() > 1e-2  # a real restart
  # The model is unchanged by the restart.
  np.testing.assert_allclose(_effective(method, base, adapter),
                             _effective(method, base, state.adapter),
                             atol=1e-5)
  g = grads['layer']['kernel']
  ng = new_grads['layer']['kernel']
  np.testing.assert_allclose(ng['a'], np.asarray(g['a']) * beta, rtol=2e-4)
  np.testing.assert_allclose(ng['b'], alpha[:, None] * np.asarray(g['b']),
                             rtol=2e-4)
  old_adam = _adam(state.opt_state)
  new_adam = _adam(opt_state)
  for name, power in (('mu', 1), ('nu', 2)):
    old = getattr(old_adam, name)['layer']['kernel']
    out = getattr(new_adam, name)['layer']['kernel']
    np.testing.assert_allclose(out['a'], np.asarray(old['a']) * beta**power,
                               rtol=4e-4)
    np.testing.assert_allclose(
        out['b'], alpha[:, None]**power * np.asarray(old['b']), rtol=4e-4)
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


def test_free_and_invalid_scalings():
  rng = np.random.RandomState(2569)
  a, b, g = rng.randn(12, RANK), rng.randn(RANK, 10), rng.randn(12, 10)
  # B = 0 (LoRA's init): the Y terms vanish, beta is free and stays 1,
  # alpha is the least-squares optimum over the X terms alone.
  alpha, beta, kind = _scales_kind(a, 0 * b, g)
  np.testing.assert_array_equal(beta, 1.0)
  u = _reference_theta(a, 0 * b, g)[:RANK]
  np.testing.assert_allclose(alpha, np.sqrt(u), rtol=1e-4)
  assert np.abs(alpha - 1).min() > 0.1 and kind == 0
  # Neither system has a positive solution: the kernel is not restarted,
  # adapter, moments and gradients stay as they are.
  a, b, g = _case('none')
  method = scalora.scalora(rank=RANK, alpha=4.0, targets=PATH)
  leaf, grad = _node(a, b, g)
  adapter, grads = {'layer': {'kernel': leaf}}, {'layer': {'kernel': grad}}
  tx = method.optimizer(lambda m: optax.adamw(1e-2 * m))
  opt_state = tx.update(grads, tx.init(adapter), adapter)[1]
  out = method.before_update(adapter, opt_state, grads, None, jnp.int32(0))
  for got, want in zip(jax.tree.leaves(out[:3]),
                       jax.tree.leaves((adapter, opt_state, grads))):
    np.testing.assert_array_equal(got, want)
  assert float(out[3]['restart_none']) == 1.0


# ------------------------------------------- the scalar fallback, L, eta ---


def _case(kind):
  """(a [in, 2], b [2, out], G [in, out]) whose restart is `kind`: random
  (column); a random draw whose column system has a negative entry
  (scalar); correlated factors, X and Y nearly parallel (none)."""
  if kind != 'none':
    rng = np.random.RandomState({'column': 0, 'scalar': 2569}[kind])
    return rng.randn(12, RANK), rng.randn(RANK, 10), rng.randn(12, 10)
  rng, e = np.random.RandomState(209), np.eye(10)
  a = np.stack([e[0], e[0] + 0.3 * e[2]], 1) + 0.05 * rng.randn(10, RANK)
  b = np.stack([e[0], 0.5 * e[1]]) + 0.05 * rng.randn(RANK, 10)
  return a, b, np.eye(10) + 0.05 * rng.randn(10, 10)


def _reference(a, b, g, l_eta=1.0):
  """(column theta [2R], scalar [u, v]): numpy least squares of G / (L eta)
  over the dense terms X_i, Y_i (column) or X = sum X_i, Y = sum Y_i."""
  x = [SCALE**2 * np.outer(a[:, i], a[:, i] @ g) for i in range(RANK)]
  y = [SCALE**2 * np.outer(g @ b[i], b[i]) for i in range(RANK)]
  fit = lambda terms: np.linalg.lstsq(  # pylint: disable=g-long-lambda
      np.stack([t.ravel() for t in terms], 1), g.ravel() / l_eta,
      rcond=None)[0]
  return fit(x + y), fit([sum(x), sum(y)])


def _kind(a, b, g, l_eta=1.0):
  column, scalar = _reference(a, b, g, l_eta)
  return 0 if column.min() > 0 else 1 if scalar.min() > 0 else 2


def _scales_kind(a, b, g, l_eta=1.0):
  g_a, g_b = SCALE * g @ b.T, SCALE * a.T @ g
  out = scalora.scaling(*(jnp.asarray(t, jnp.float32)
                                  for t in (a, b, g_a, g_b)), SCALE, l_eta)
  return [np.asarray(t) for t in out]


def _node(a, b, g):
  """A kernel's adapter leaf and its gradients (acc zero)."""
  cast = lambda t: jnp.asarray(t, jnp.float32)
  zero = jnp.zeros((a.shape[0], b.shape[1]), jnp.float32)
  return ({'a': cast(a), 'b': cast(b), 'acc': zero},
          {'a': cast(SCALE * g @ b.T), 'b': cast(SCALE * a.T @ g),
           'acc': zero})


def test_scalar_optimum_matches_numpy_and_changes_the_step():
  a, b, g = _case('scalar')
  column, scalar = _reference(a, b, g, 3.0)
  assert column.min() < 0 < scalar.min()  # no column scaling exists
  alpha, beta, kind = _scales_kind(a, b, g, 3.0)
  assert kind == 1
  np.testing.assert_allclose(alpha, np.sqrt(scalar[0]), rtol=1e-4)
  np.testing.assert_allclose(beta, np.sqrt(scalar[1]), rtol=1e-4)
  # The closed form from inner products of the factors and gradients.
  x, y = SCALE**2 * a @ a.T @ g, SCALE**2 * g @ b.T @ b
  gram = np.array([[np.sum(x * x), np.sum(x * y)],
                   [np.sum(x * y), np.sum(y * y)]])
  h = [np.sum((SCALE * a.T @ g)**2), np.sum((SCALE * g @ b.T)**2)]
  np.testing.assert_allclose(np.linalg.solve(gram, h) / 3.0, scalar,
                             rtol=1e-6)
  # The restarted step differs from the plain LoRA step (and the model
  # before it is the same).
  method = scalora.scalora(rank=RANK, alpha=4.0, targets=PATH)
  leaf, grad = _node(a, b, g)
  adapter, grads = {'layer': {'kernel': leaf}}, {'layer': {'kernel': grad}}
  tx = method.optimizer(lambda m: optax.adamw(1e-2 * m))
  opt_state = tx.update(grads, tx.init(adapter), adapter)[1]
  base = {'layer': {'kernel': jnp.zeros((12, 10))}}
  restarted = method.before_update(adapter, opt_state, grads, base,
                                   jnp.int32(0))
  assert float(restarted[3]['restart_scalar']) == 1.0
  np.testing.assert_allclose(_effective(method, base, restarted[0]),
                             _effective(method, base, adapter), atol=1e-5)
  moved = []
  for ad, state, gr in ((adapter, opt_state, grads), restarted[:3]):
    updates, _ = tx.update(gr, state, ad)
    moved.append(_effective(method, base, optax.apply_updates(ad, updates)))
  assert np.abs(moved[0] - moved[1]).max() > 1e-3


def test_fallback_exactly_when_the_column_system_is_invalid():
  cases = [_case(k) for k in ('column', 'scalar', 'none')]
  for seed in (*range(30), 187, 400, 1203):  # 187..1203: column invalid
    rng = np.random.RandomState(seed)
    cases.append((rng.randn(12, RANK), rng.randn(RANK, 10),
                  rng.randn(12, 10)))
  kinds = []
  for a, b, g in cases:
    for l_eta in (1.0, 0.2):
      alpha, beta, kind = _scales_kind(a, b, g, l_eta)
      assert kind == _kind(a, b, g, l_eta), (kind, l_eta)
      kinds.append(int(kind))
      if kind == 2:
        np.testing.assert_array_equal(np.concatenate([alpha, beta]), 1.0)
      elif kind == 1:
        assert np.ptp(alpha) == 0 == np.ptp(beta)
  assert set(kinds) == {0, 1, 2}


def test_no_restart_changes_the_model_and_the_metrics_count_kinds():
  kinds = ('column', 'scalar', 'none')
  nodes = {k: _node(*_case(k)) for k in kinds}
  base = {k: {'kernel': jax.random.normal(jax.random.PRNGKey(i),
                                          nodes[k][0]['acc'].shape)}
          for i, k in enumerate(kinds)}
  method = scalora.scalora(rank=RANK, alpha=4.0,
                           targets=[f'{k}/kernel' for k in kinds])
  adapter = {k: {'kernel': n[0]} for k, n in nodes.items()}
  grads = {k: {'kernel': n[1]} for k, n in nodes.items()}
  tx = method.optimizer(lambda m: optax.adamw(1e-2 * m))
  opt_state = tx.update(grads, tx.init(adapter), adapter)[1]
  new, _, _, metrics = method.before_update(adapter, opt_state, grads, base,
                                            jnp.int32(0))
  assert {k: float(v) for k, v in metrics.items()} == pytest.approx(
      {f'restart_{k}': 1 / 3 for k in kinds})
  x = jax.random.normal(jax.random.PRNGKey(5), (4, 12))
  before, _ = method.apply(base, adapter)
  after, _ = method.apply(base, new)
  for k in kinds:
    w0, w1 = (np.asarray(p[k]['kernel'].merged()) for p in (before, after))
    np.testing.assert_allclose(w1, w0, atol=1e-5)
    if k != 'none':
      inputs = x[:, :w0.shape[0]]
      np.testing.assert_allclose(inputs @ w1, inputs @ w0, atol=1e-4)
      assert np.abs(np.asarray(new[k]['kernel']['acc'])).max() > 1e-2
  for name in ('a', 'b', 'acc'):  # 'none': nothing moved
    np.testing.assert_array_equal(new['none']['kernel'][name],
                                  adapter['none']['kernel'][name])


def test_lipschitz_divides_the_squares_and_follows_the_rate():
  a, b, g = _case('column')
  alpha1, beta1, _ = _scales_kind(a, b, g, 1.0)
  alpha4, beta4, _ = _scales_kind(a, b, g, 4.0)
  np.testing.assert_allclose(alpha4**2 * 4, alpha1**2, rtol=1e-4)
  np.testing.assert_allclose(beta4**2 * 4, beta1**2, rtol=1e-4)
  config = bert_sentiment_lora.get_config('runlocal').optimizer
  config.update(lr=0.1, warmup_steps=4, schedule='linear')
  make_tx = optimizers.factory(config, 20)
  leaf, grad = _node(a, b, g)
  adapter, grads = {'layer': {'kernel': leaf}}, {'layer': {'kernel': grad}}
  base = {'layer': {'kernel': jnp.zeros((12, 10))}}
  for rate, eta in (('scheduled', make_tx.schedule), ('peak', lambda t: 0.1)):
    method = scalora.scalora(rank=RANK, alpha=4.0, targets=PATH,
                             lipschitz=30.0, lipschitz_rate=rate)
    tx = method.optimizer(make_tx)
    state = tx.init(adapter)
    for step in range(3):
      got = method.before_update(adapter, state, grads, base,
                                 jnp.int32(step))[0]['layer']['kernel']
      want = _scales_kind(a, b, g, 30.0 * float(eta(step)))[0]
      if step or rate == 'peak':
        np.testing.assert_allclose(got['a'], a * want, rtol=1e-4)
      else:  # rate 0 at the schedule's first step: no valid scaling
        np.testing.assert_array_equal(got['a'], leaf['a'])
      state = tx.update(grads, state, adapter)[1]
  method = scalora.scalora(rank=RANK, alpha=4.0, targets=PATH,
                           lipschitz=1.0)
  tx = method.optimizer(lambda m: optax.adamw(1e-3))  # no .schedule
  with pytest.raises(ValueError, match='optimizers.factory'):
    method.before_update(adapter, tx.init(adapter), grads, base,
                         jnp.int32(0))


def test_no_restart_before_the_warmup_ends():
  a, b, g = _case('column')
  leaf, grad = _node(a, b, g)
  adapter, grads = {'layer': {'kernel': leaf}}, {'layer': {'kernel': grad}}
  method = scalora.scalora(rank=RANK, alpha=4.0, targets=PATH,
                           restart_warmup=2, merge_every=2)
  tx = method.optimizer(lambda m: optax.adamw(1e-2 * m))
  state = tx.init(adapter)
  restarted = []
  for step in range(5):
    out = method.before_update(adapter, state, grads, None, jnp.int32(step))
    restarted.append(float(out[3]['restart_column']))
    assert float(out[3]['restart_none']) == 1.0 - restarted[-1]
  assert restarted == [0, 0, 1, 0, 1]


def test_best_rank_r_lora_export(capsys):
  base, method, batch, tx, state = _setup()
  step_fn = steps.jit_train_step(_loss, method, tx)
  for _ in range(8):
    state, _ = step_fn(state, base, batch)
  lora_method, factors = scalora.as_lora(method.config, state.adapter)
  total = scalora.total_update(method.config, PATH,
                               state.adapter['layer']['kernel'])
  u, s, vh = np.linalg.svd(total)
  best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]  # Eckart-Young
  params, _ = lora_method.apply(base, factors)
  np.testing.assert_allclose(
      params['layer']['kernel'].merged() - base['layer']['kernel'], best,
      atol=1e-5)
  error = np.linalg.norm(s[RANK:]) / np.linalg.norm(s)
  assert error > 1e-3  # the update is not rank R
  assert f'error max {error:.4f}' in capsys.readouterr().out
  assert scalora.scalora(lora_export=True).export.write is not None


def _config(steps_):
  config = bert_sentiment_lora.get_config('runlocal')
  config.peft.method = 'scalora'
  config.peft.lora_export = True
  config.train.update(steps=steps_, eval_every=0, log_every=2,
                      checkpoint_every=2)
  config.eval.max_examples = 16
  return config


def test_trainer_run_exports_the_merged_checkpoint(tmp_path, capsys):
  """By default the run's export is the merged model: transformers loads
  it alone and its logits are the trained flaxlora model's."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  config = _config(4)
  config.peft.lora_export = False
  trainer.train_and_evaluate(config, tmp_path)
  assert 'merged Hugging Face checkpoint' in capsys.readouterr().out
  folder = tmp_path / 'peft'
  assert not (folder / hf_folder.CONFIG_FILE).exists()  # not a PEFT folder
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(folder)).eval()
  loaded = evaluation.load(tmp_path, config)
  run = loaded.run
  ids = np.array([[2, 5, 9, 11, 3]], np.int32)
  mask = np.ones_like(ids)
  merged, kw = run.method.apply(run.base, loaded.adapter)
  ours = run.model.apply({'params': merged}, ids, mask, **kw)
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
  base_logits = run.model.apply({'params': run.base}, ids, mask)
  assert np.abs(np.asarray(base_logits) - theirs).max() > 1e-3  # it trained


def test_trainer_run_exports_on_request(tmp_path, capsys):
  summary = trainer.train_and_evaluate(_config(4), tmp_path)
  assert summary['step'] == 4
  record = summary['peft_method'][0]  # the nested LoRA config, as a record
  assert record['merge_every'] == 1 and record['lora']['rank'] == 8
  assert 'scalora: rank-8 PEFT approximation' in capsys.readouterr().out
  peft_config = json.loads((tmp_path / 'peft' / hf_folder.CONFIG_FILE)
                           .read_text())
  assert peft_config['peft_type'] == 'LORA' and peft_config['r'] == 8


REPO = pathlib.Path(__file__).resolve().parents[1]
# L eta from the scheduled rate (warm-up 5 of the 8 steps), no restart at
# the first update: the rate state and the restart metrics resume too.
FLAGS = ['--config=configs/bert_sentiment_compare.py:method=scalora,runlocal',
         '--config.peft.dropout=0.2', '--config.model.dropout=0.1',
         '--config.train.steps=8', '--config.train.checkpoint_every=2',
         '--config.train.log_every=2', '--config.train.eval_every=0',
         '--config.peft.lipschitz=100.0', '--config.peft.restart_warmup=1']
# The run, SIGKILLed by itself right after it has saved checkpoint KILL_AT.
DRIVER = """
import os, signal, sys
from experiments import run
from flaxlora import checkpoint
save, kill_at = checkpoint.Checkpointer.save, int(sys.argv[1])
def save_then_die(self, step, *args, **kwargs):
  save(self, step, *args, **kwargs)
  if step == kill_at:
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save_then_die
sys.exit(run.cli(['run', *sys.argv[2:]]))
"""


def _run(workdir, kill_at=0):
  result = subprocess.run(
      [sys.executable, '-c', DRIVER, str(kill_at), f'--workdir={workdir}',
       *FLAGS], cwd=REPO, capture_output=True, text=True,
      timeout=600)
  return result.returncode, result.stdout


def test_sigkill_resume_is_bitwise(tmp_path):
  straight, killed = tmp_path / 'straight', tmp_path / 'killed'
  assert _run(straight)[0] == 0
  assert _run(killed, kill_at=4)[0] == -9  # SIGKILL
  assert not (killed / 'summary.json').exists()
  code, out = _run(killed)
  assert code == 0 and 'resuming from step 4' in out
  adapter = 'adapter/adapter.safetensors'  # a, b and acc of every kernel
  assert (straight / adapter).read_bytes() == (killed / adapter).read_bytes()
  summaries = [json.loads((w / 'summary.json').read_text())
               for w in (straight, killed)]
  assert summaries[0].pop('seconds') > 0 < summaries[1].pop('seconds')
  assert [s.pop('seconds_from') for s in summaries] == [0, 4]
  for s in summaries:  # when and where each invocation ran
    assert s.pop('date') and s.pop('hardware')
  assert summaries[0] == summaries[1]  # all but the wall time
  logs = [[json.loads(line) for line in (w / 'metrics.jsonl').read_text()
           .splitlines()] for w in (straight, killed)]
  for r in logs[0] + logs[1]:
    r.pop('steps_per_s', None)
  assert logs[0] == logs[1]
  train = [r for r in logs[0] if r['split'] == 'train']
  kinds = [[r[name] for name in scalora.METRICS] for r in train]
  assert [r['step'] for r in train] == [1, 2, 4, 6, 8]
  np.testing.assert_allclose(np.sum(kinds, 1), 1.0, rtol=1e-6)
  assert kinds[0] == [0, 0, 1]  # restart_warmup=1: none at the first
  assert max(k[0] for k in kinds[1:]) > 0  # column restarts after it


def test_trained_params_leave_out_the_accumulated_update():
  w = {'l': {'kernel': jnp.ones((6, 5))}, 'h': {'kernel': jnp.ones((5, 2))}}
  method = scalora.scalora(rank=2, targets=[r'l/kernel'])
  adapter = method.init(jax.random.PRNGKey(0), w)
  assert method_parts.trained_params(method, adapter) == 6 * 2 + 2 * 5
  assert peft_base.num_params(adapter) == 6 * 2 + 2 * 5 + 6 * 5
  plain = peft_base.chain(lora.lora(rank=2, targets=[r'l/kernel']),
                          trainable.trainable('h/.*'))
  adapter = plain.init(jax.random.PRNGKey(0), w)
  assert method_parts.trained_params(plain, adapter) == peft_base.num_params(
      adapter) == 6 * 2 + 2 * 5 + 5 * 2


def test_describe_counts_only_what_the_optimizer_moves():
  w = {'l': {'kernel': jnp.ones((6, 5))}, 'h': {'kernel': jnp.ones((5, 2))}}
  method = peft_base.chain(scalora.scalora(rank=2, targets=[r'l/kernel']),
                           trainable.trainable('h/.*'))
  shapes = jax.eval_shape(lambda: w)  # abstract, as for a large model
  got = describe.describe(shapes, method)
  assert got.trainable == 6 * 2 + 2 * 5 + 5 * 2  # a, b, the head; not acc
  assert [(r.path, r.added) for r in got.rows] == [
      ('h/kernel', 10), ('l/kernel', 6 * 2 + 2 * 5)]
  assert got.frozen == 6 * 5 + 5 * 2
  adapter = method.init(jax.random.PRNGKey(0), w)
  assert got.trainable == method_parts.trained_params(method, adapter)
