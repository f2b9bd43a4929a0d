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
from flaxlora.peft import lora
from flaxlora.peft import merge
from flaxlora.peft import nblora
from flaxlora.peft import peft_io
from flaxlora.peft import trainable

NORM = {'spectral': lambda s: s.max(),
        'frobenius': lambda s: np.sqrt(np.sum(s**2)),
        'nuclear': np.sum}
BASE = {'layer': {'kernel': jnp.ones((24, 16))}}


def _update(method, adapter):
  node = nblora.kernels(method.config, BASE, adapter)['layer/kernel']
  return np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)


def _random(method, std, seed=0):
  adapter = method.init(jax.random.PRNGKey(seed), BASE)
  leaves, tree = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [std * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


@pytest.mark.parametrize('norm', nblora.NORMS)
def test_every_norm_stays_below_the_bound_and_reaches_it(norm):
  method = nblora.nblora(rank=4, bound=1.5, norm=norm, targets='layer/kernel')
  for seed in range(5):
    s = np.linalg.svd(_update(method, _random(method, 4.0, seed)),
                      compute_uv=False)
    assert np.sum(s > 1e-6) <= 4
    assert NORM[norm](s) <= 1.5 * (1 + 1e-5)
  # Large |d| reaches matrices within 1% of the bound.
  adapter = _random(method, 1.0)
  adapter['layer']['kernel']['d'] = jnp.full((4,), 4.0)
  s = np.linalg.svd(_update(method, adapter), compute_uv=False)
  assert 0.99 * 1.5 <= NORM[norm](s) <= 1.5 * (1 + 1e-5)


def test_cayley_is_orthonormal_and_the_update_starts_at_zero():
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (20, 5))
  u = np.asarray(nblora.cayley(x), np.float64)
  np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-5)
  method = nblora.nblora(rank=4, targets='layer/kernel')
  assert not np.any(_update(method, method.init(jax.random.PRNGKey(0), BASE)))


def test_a_large_step_stays_within_the_bound_where_lora_does_not():
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 24))
  y = 10.0 * jax.random.normal(jax.random.PRNGKey(1), (8, 16))

  def step(method, adapter):
    def loss(ad):
      params, _ = method.apply(BASE, ad)
      out = params['layer']['kernel'].dot(x, dtype=jnp.float32)
      return jnp.sum((out - y)**2)
    tx = optax.sgd(100.0)
    updates, _ = tx.update(jax.grad(loss)(adapter), tx.init(adapter))
    return optax.apply_updates(adapter, updates)

  plain = lora.lora(rank=4, alpha=4.0, targets='layer/kernel')
  ad = step(plain, plain.init(jax.random.PRNGKey(0), BASE))['layer']['kernel']
  lora_norm = np.linalg.norm(np.asarray(ad['a']) @ np.asarray(ad['b']), 2)
  bounded = nblora.nblora(rank=4, bound=1.0, norm='spectral',
                          targets='layer/kernel')
  ad = step(bounded, bounded.init(jax.random.PRNGKey(0), BASE))
  s = np.linalg.svd(_update(bounded, ad), compute_uv=False)
  assert lora_norm > 10.0
  assert 0.1 < s.max() <= 1.0 * (1 + 1e-5)


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
  config = json.loads((tmp_path / 'a' / peft_io.CONFIG_FILE).read_text())
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
  adapter = jax.tree.map(lambda t: t + 2.0, method.init(
      jax.random.PRNGKey(0), base))
  params, _ = method.apply(base, adapter)
  assert helpers.max_diff(_logits(model, params), _logits(model, base)) == 0


def test_runlocal_through_the_trainer(tmp_path):
  config = bert_sentiment_lora.get_config('runlocal')
  config.peft = dict(method='nblora', rank=4, bound=1.0, norm='frobenius',
                     targets='', dropout=0.0,
                     trainable=config.peft.trainable)
  config.train.update(steps=3, eval_every=0, log_every=1, checkpoint_every=0)
  config.eval.max_examples = 16
  summary = trainer.train_and_evaluate(config, tmp_path)
  assert summary['step'] == 3
  peft_config = json.loads((tmp_path / 'peft' / peft_io.CONFIG_FILE)
                           .read_text())
  assert (peft_config['peft_type'], peft_config['r']) == ('LORA', 4)
