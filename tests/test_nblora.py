"""NB-LoRA: singular-value bounds, factored = merged, PEFT export, trainer."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from configs import bert_sentiment_lora
from flaxlora import export
from flaxlora import models
from flaxlora import trainer
from flaxlora.peft import base as peft_base
from flaxlora.peft import hf_folder
from flaxlora.peft import lora
from flaxlora.peft import merge
from flaxlora.peft import nblora
from flaxlora.peft import trainable

NORM = {'spectral': lambda s: s.max(),
        'frobenius': lambda s: np.sqrt(np.sum(s**2)),
        'nuclear': np.sum}
BASE = {'layer': {'kernel': jnp.ones((24, 16))}}  # in 24, out 16


def _update(method, adapter):
  node = nblora.kernels(method.config, BASE, adapter)['layer/kernel']
  return np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)


def _factored(method, adapter):
  """The update a @ b, traceable (for gradients)."""
  node = nblora.kernels(method.config, BASE, adapter)['layer/kernel']
  return node.a @ node.b


def _random(method, std, seed=0):
  adapter = method.init(jax.random.PRNGKey(seed), BASE)
  leaves, tree = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [std * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def _uncayley(q):
  """Free x with nblora.cayley(x) = q (q [n, R], orthonormal columns)."""
  r = q.shape[1]
  eye = np.eye(r)
  z = np.linalg.solve(eye + q[:r], eye - q[:r])
  y = -0.5 * q[r:] @ (eye + z)
  return np.concatenate([0.5 * (z - y.T @ y), y])


@pytest.mark.parametrize('norm', nblora.NORMS)
@pytest.mark.parametrize('temperature', [1.0, 0.3])
def test_singular_values_respect_the_bound(norm, temperature):
  method = nblora.nblora(rank=4, bound=1.5, norm=norm,
                         temperature=temperature, targets='layer/kernel')
  for seed in range(5):
    adapter = _random(method, 4.0, seed)
    s = np.linalg.svd(_update(method, adapter), compute_uv=False)
    caps = np.sort(np.asarray(nblora.bounds(
        method.config, adapter['layer']['kernel']['v'])))[::-1]
    assert np.sum(s > 1e-6) <= 4
    assert np.all(s[:4] <= caps * (1 + 1e-5))  # each sigma_i <= s_(i)
    assert NORM[norm](s) <= 1.5 * (1 + 1e-5)


@pytest.mark.parametrize('norm', nblora.NORMS)
@pytest.mark.parametrize('v', [[0.0] * 4, [30.0, 0.0, 0.0, 0.0]])
def test_the_parameterisation_reaches_the_bound(norm, v):
  # An even split of each column between the two frames: singular values s.
  r = 4
  q = np.concatenate([np.eye(16)[:, :r], np.eye(24)[:, :r]]) / np.sqrt(2)
  x = _uncayley(q)
  np.testing.assert_allclose(nblora.cayley(x), q, atol=1e-5)
  method = nblora.nblora(rank=r, bound=1.5, norm=norm, targets='layer/kernel')
  adapter = {'layer': {'kernel': {'x_out': x[:16], 'x_in': x[16:],
                                  'v': jnp.asarray(v)}}}
  s = np.linalg.svd(_update(method, adapter), compute_uv=False)
  assert 0.99 * 1.5 <= NORM[norm](s) <= 1.5 * (1 + 1e-5)
  if v[0]:  # The whole budget in one direction: rank 1 at the bound.
    assert s[0] >= 0.99 * 1.5


@pytest.mark.parametrize('norm', nblora.NORMS)
def test_bounds_spend_the_whole_budget(norm):
  v = jax.random.normal(jax.random.PRNGKey(0), (6,))
  shares = []
  for temperature in (1.0, 0.25):
    config = nblora.make_config(6, 2.0, norm, temperature=temperature)
    s = np.asarray(nblora.bounds(config, v), np.float64)
    assert NORM[norm](s) == pytest.approx(2.0, rel=1e-5)
    shares.append(s)
  spread = np.abs(shares[0] - shares[1]).max()
  assert spread == 0 if norm == 'spectral' else spread > 1e-2
  config = nblora.make_config(6, 2.0, norm)
  grad = jax.grad(lambda v: nblora.bounds(config, v)[0])(
      jnp.array([-1e4, 0, 0, 0, 0, 0]))
  assert np.all(np.isfinite(grad))


def test_cayley_is_semi_orthogonal_and_the_update_starts_at_zero():
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (20, 5))
  u = np.asarray(nblora.cayley(x), np.float64)
  np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-5)
  method = nblora.nblora(rank=4, targets='layer/kernel')
  adapter = method.init(jax.random.PRNGKey(0), BASE)
  leaf = adapter['layer']['kernel']
  p_in, p_out = map(np.asarray, nblora.frames(leaf))
  np.testing.assert_allclose(p_in.T @ p_in + p_out.T @ p_out, np.eye(4),
                             atol=1e-5)
  # Zero up to the float32 rounding of x_in's orthonormality.
  assert np.abs(_update(method, adapter)).max() < 1e-6
  x_in = np.asarray(leaf['x_in'])
  np.testing.assert_allclose(x_in.T @ x_in, np.eye(4), atol=1e-5)
  # Unlike a zero-initialised pair, the update moves at the first step.
  probe = jax.random.normal(jax.random.PRNGKey(1), (24, 16))
  grad = jax.grad(lambda ad: jnp.sum(probe * _factored(method, ad)))(adapter)
  assert np.abs(np.asarray(grad['layer']['kernel']['x_out'])).max() > 1e-3


@pytest.mark.parametrize('norm', nblora.NORMS)
def test_a_large_step_stays_within_the_bound_where_lora_does_not(norm):
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 24))
  y = 10.0 * jax.random.normal(jax.random.PRNGKey(1), (8, 16))

  def step(method):  # One Adam step at lr 1 (every entry moves by ~1).
    def loss(ad):
      params, _ = method.apply(BASE, ad)
      out = params['layer']['kernel'].dot(x, dtype=jnp.float32)
      return jnp.sum((out - y)**2)
    adapter = method.init(jax.random.PRNGKey(0), BASE)
    tx = optax.adam(1.0)
    updates, _ = tx.update(jax.grad(loss)(adapter), tx.init(adapter))
    return optax.apply_updates(adapter, updates)

  plain = lora.lora(rank=4, alpha=4.0, targets='layer/kernel')
  ad = step(plain)['layer']['kernel']
  lora_s = np.linalg.svd(np.asarray(ad['a']) @ np.asarray(ad['b']),
                         compute_uv=False)
  bounded = nblora.nblora(rank=4, bound=1.0, norm=norm,
                          targets='layer/kernel')
  s = np.linalg.svd(_update(bounded, step(bounded)), compute_uv=False)
  assert NORM[norm](lora_s) > 3.0
  assert 0.3 < NORM[norm](s) <= 1.0 * (1 + 1e-5)


@pytest.fixture(scope='module')
def bert(tmp_path_factory):
  folder, _ = helpers.save_tiny_bert(tmp_path_factory.mktemp('bert'),
                                     head='classification')
  model, base, _ = models.load(folder)
  return folder, model, base


def _logits(model, params):
  return np.asarray(model.apply({'params': params}, *helpers.batch()))


def test_factored_equals_merged_and_peft_export(bert, tmp_path):
  torch = pytest.importorskip('torch')
  peft = pytest.importorskip('peft')
  transformers = pytest.importorskip('transformers')
  folder, model, base = bert
  method = peft_base.chain(nblora.nblora(rank=4, bound=3.0, targets='bert'),
                           trainable.trainable(r'classifier/.*'))
  adapter = method.init(jax.random.PRNGKey(0), base)
  adapter = jax.tree.map(lambda t: t + 0.5 * jax.random.normal(
      jax.random.PRNGKey(3), t.shape), adapter)
  params, _ = method.apply(base, adapter)
  ours = _logits(model, params)
  merged = _logits(model, merge.merge(base, adapter, method))
  assert helpers.max_diff(ours, merged) < 1e-5
  assert helpers.max_diff(ours, _logits(model, base)) > 1e-2
  export.save_peft(tmp_path / 'a', model, base, adapter, method)
  config = json.loads((tmp_path / 'a' / hf_folder.CONFIG_FILE).read_text())
  assert (config['peft_type'], config['r'], config['lora_alpha']) == (
      'LORA', 4, 4.0)
  hf = transformers.BertForSequenceClassification.from_pretrained(
      str(folder)).eval()
  with torch.no_grad():
    theirs = helpers.torch_outputs(
        peft.PeftModel.from_pretrained(hf, str(tmp_path / 'a')).eval(),
        *helpers.batch())['logits']
  assert helpers.max_diff(ours, theirs) < 1e-4


def test_bound_zero_is_the_base(bert):
  _, model, base = bert
  method = nblora.nblora(rank=4, bound=0.0, targets='bert')
  adapter = jax.tree.map(lambda t: t + 0.5 * jax.random.normal(
      jax.random.PRNGKey(3), t.shape), method.init(jax.random.PRNGKey(0), base))
  params, _ = method.apply(base, adapter)
  assert helpers.max_diff(_logits(model, params), _logits(model, base)) == 0
  # The same adapter under a positive bound moves the model.
  moved, _ = nblora.nblora(rank=4, bound=3.0, targets='bert').apply(
      base, adapter)
  assert helpers.max_diff(_logits(model, moved), _logits(model, base)) > 5e-4


def test_runlocal_through_the_trainer(tmp_path):
  config = bert_sentiment_lora.get_config('runlocal')
  config.peft = dict(method='nblora', rank=4, bound=1.0, norm='frobenius',
                     targets='', dropout=0.0,
                     trainable=config.peft.trainable)
  config.train.update(steps=3, eval_every=0, log_every=1, checkpoint_every=0)
  config.eval.max_examples = 16
  summary = trainer.train_and_evaluate(config, tmp_path)
  assert summary['step'] == 3
  peft_config = json.loads((tmp_path / 'peft' / hf_folder.CONFIG_FILE)
                           .read_text())
  assert (peft_config['peft_type'], peft_config['r']) == ('LORA', 4)


@pytest.mark.parametrize('norm', nblora.NORMS)
def test_the_starting_jacobian_is_the_derived_one(norm):
  """The square block of the stacked Cayley map is x_out's first R rows
  (the output side, the paper's A~ on top), so at the init (x_out = 0,
  x_in orthonormal, v = 0: Z = I, p_out = 0, p_in = -x_in) the update moves
  to first order by s0 x_in [dZ' | 2 dx_out[R:]'] with
  dZ = dX - dX' + dx_in' x_in + x_in' dx_in, dX = dx_out[:R]:
  the first R output columns by the square block's skew part and x_in's
  symmetric part, the others by 2 dx_out, all in span(x_in); v not at all.
  """
  r = 4
  method = nblora.nblora(rank=r, bound=1.5, norm=norm, targets='layer/kernel')
  leaf = method.init(jax.random.PRNGKey(0), BASE)['layer']['kernel']
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  tangent = {k: jax.random.normal(key, leaf[k].shape)
             for k, key in zip(('x_in', 'x_out', 'v'), keys)}
  update = lambda node: _factored(method, {'layer': {'kernel': node}})
  _, moved = jax.jvp(update, (leaf,), (tangent,))
  s0 = 1.5 * r**-nblora.EXPONENT[norm]
  x_in, d_in, d_out = (np.asarray(t, np.float64) for t in (
      leaf['x_in'], tangent['x_in'], tangent['x_out']))
  d_z = d_out[:r] - d_out[:r].T + d_in.T @ x_in + x_in.T @ d_in
  want = s0 * x_in @ np.concatenate([d_z.T, 2 * d_out[r:].T], axis=1)
  np.testing.assert_allclose(moved, want, atol=1e-5 * np.abs(want).max())
  # v and x_in alone: only the square block's columns move, and v not.
  only = lambda **t: jax.jvp(update, (leaf,), ({**jax.tree.map(  # pylint: disable=g-long-lambda
      jnp.zeros_like, leaf), **t},))[1]
  assert np.abs(only(v=tangent['v'])).max() < 1e-6
  moved_in = np.asarray(only(x_in=tangent['x_in']))
  assert np.abs(moved_in[:, r:]).max() < 1e-6 < np.abs(moved_in[:, :r]).max()


@pytest.mark.parametrize('norm', nblora.NORMS)
def test_a_relative_bound_scales_with_the_kernel(norm):
  w = 3.0 * jax.random.normal(jax.random.PRNGKey(7), (24, 16))
  base = {'layer': {'kernel': w}}
  limit = 0.1 * float(jnp.linalg.norm(w))  # Frobenius, ~59 here
  relative = nblora.nblora(rank=4, bound=0.1, norm=norm, relative=True,
                           targets='layer/kernel')
  plain = nblora.nblora(rank=4, bound=0.1, norm=norm, targets='layer/kernel')
  r = 4
  q = np.concatenate([np.eye(16)[:, :r], np.eye(24)[:, :r]]) / np.sqrt(2)
  x = _uncayley(q)  # at the bound (test_the_parameterisation_reaches_...)
  adapter = {'layer': {'kernel': {'x_out': x[:16], 'x_in': x[16:],
                                  'v': jnp.asarray([30.0, 0, 0, 0])}}}
  for method, bound in ((relative, limit), (plain, 0.1)):
    node = nblora.kernels(method.config, base, adapter)['layer/kernel']
    s = np.linalg.svd(np.asarray(node.a, np.float64) @ np.asarray(node.b),
                      compute_uv=False)
    assert 0.99 * bound <= NORM[norm](s) <= bound * (1 + 1e-5)
  # The PEFT export writes the same (relative) update.
  lora_method, factors = nblora.as_lora(relative.config, adapter, base)
  merged = lora_method.apply(base, factors)[0]['layer']['kernel'].merged()
  node = nblora.kernels(relative.config, base, adapter)['layer/kernel']
  np.testing.assert_allclose(merged - w, node.a @ node.b, atol=1e-4)
