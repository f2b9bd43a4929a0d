"""Causal LMs a chunk at a time: model.loss_chunk (the output layer and
loss over chunks of positions, `tasks.chunked_ce`) and
model.attention='chunked' (a block of queries at a time,
`causal.attend`). Loss and gradient equal the whole path (the reference,
kept); the compiled step holds fewer temporaries; runs train through the
config fields."""
import dataclasses
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import config_reads
from flaxlora import optimizers
from flaxlora import run_setup
from flaxlora import tasks
from flaxlora.models import causal
from flaxlora.models import gpt2
from flaxlora.models import llama
from flaxlora.peft.lora import method as lora_method

B, T = 3, 10
FAMILIES = {
    'llama': (llama, llama.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8)),
    'llama-tied': (llama, llama.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, tie_word_embeddings=True)),
    'gpt2': (gpt2, gpt2.GPT2Config(vocab_size=96, n_positions=32, n_embd=32,
                                   n_layer=2, n_head=4)),
}


def _task(model, chunk):
  config = ml_collections.ConfigDict(dict(
      task='causal_lm', model=dict(loss_chunk=chunk),
      data=dict(metric='rouge')))
  return tasks.make(config, model)


def _batch():
  ids = jax.random.randint(jax.random.PRNGKey(1), (B, T), 1, 96)
  mask = jnp.ones((B, T), jnp.int32).at[0, :3].set(0)  # left padding
  loss_mask = jnp.zeros((B, T), jnp.int32).at[:, 4:].set(1)
  return {'input_ids': ids, 'attention_mask': mask, 'loss_mask': loss_mask,
          'weight': jnp.array([1.0, 1.0, 0.5])}


def _loss_and_grad(family, chunk, attention='reference', packed=False):
  """(mean loss, its gradient w.r.t. a LoRA adapter on every kernel,
  lm_head's included) of a tiny model."""
  module, config = FAMILIES[family]
  model = module.build(config, attention=attention)
  base = module.init(model, jax.random.PRNGKey(0))
  method = lora_method.lora(rank=4, alpha=8.0, targets=r".*kernel")
  adapter = method.init(jax.random.PRNGKey(2), base)
  # A random non-zero B, so that every factor gets a gradient.
  leaves, tree = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  adapter = jax.tree.unflatten(tree, [
      x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  task, batch = _task(model, chunk), _batch()
  if packed:  # two segments per row, positions restarting at each
    batch['segment_ids'] = jnp.array([[1] * 6 + [2] * 4] * B)
    batch['positions'] = jnp.array([list(range(6)) + list(range(4))] * B)

  def loss(adapter):
    params, kwargs = method.apply(base, adapter)
    total, weight = task.loss(params, kwargs, batch, None)
    return total / weight

  return jax.value_and_grad(loss)(adapter)


@pytest.mark.parametrize('family', sorted(FAMILIES))
@pytest.mark.parametrize('chunk', [4, 16])
def test_chunked_loss_and_gradient_equal_the_whole_logits(family, chunk):
  whole, whole_grad = _loss_and_grad(family, 0)
  chunked, chunked_grad = _loss_and_grad(family, chunk)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(chunked_grad), jax.tree.leaves(whole_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The chunked head is differentiated: lm_head's adapter gets a gradient.
  heads = [np.abs(x).max() for path, x in
           jax.tree_util.tree_leaves_with_path(chunked_grad)
           if 'lm_head' in jax.tree_util.keystr(path)]
  assert len(heads) == (2 if family == 'llama' else 0)
  assert all(h > 1e-4 for h in heads), heads


def test_chunked_ce_equals_optax_and_pads_the_last_chunk():
  hidden = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 5))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (5, 11))
  labels = jax.random.randint(jax.random.PRNGKey(2), (2, 7), 0, 11)
  head = lambda x, i: x @ kernel
  expected = optax.softmax_cross_entropy_with_integer_labels(
      hidden @ kernel, labels)
  got = tasks.chunked_ce(head, hidden, labels, 3)  # 7 = 3 + 3 + 1 (+2 pad)
  assert got.shape == (2, 7)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  seen = []
  tasks.chunked_ce(lambda x, i: seen.append(x.shape) or x @ kernel, hidden,
                   labels, 3)
  assert seen == [(2, 3, 5)]  # traced once: one chunk's logits at a time


def test_negative_loss_chunk_is_refused():
  module, config = FAMILIES['llama']
  with pytest.raises(ValueError, match='model.loss_chunk=-1'):
    _task(module.build(config), -1)


@pytest.mark.parametrize('family', sorted(FAMILIES))
@pytest.mark.parametrize('packed', [False, True])
def test_chunked_attention_equals_the_reference(family, packed, monkeypatch):
  monkeypatch.setattr(causal, 'QUERY_BLOCK', 4)  # 10 = 4 + 4 + 2 (+2 pad)
  whole, whole_grad = _loss_and_grad(family, 0, 'reference', packed)
  chunked, chunked_grad = _loss_and_grad(family, 0, 'chunked', packed)
  np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(chunked_grad), jax.tree.leaves(whole_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  if packed:  # the segments change the loss: the mask reaches the blocks
    assert abs(float(chunked) - float(_loss_and_grad(family, 0)[0])) > 1e-4


def test_chunked_attention_refuses_attention_dropout(monkeypatch):
  monkeypatch.setattr(causal, 'QUERY_BLOCK', 4)
  config = dataclasses.replace(FAMILIES['llama'][1], attention_dropout=0.1)
  model = llama.build(config, attention='chunked')
  params = llama.init(model, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match='no attention dropout'):
    model.apply({'params': params}, _batch()['input_ids'],
                deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)})
  with pytest.raises(ValueError, match="'reference', 'chunked'"):
    llama.build(config, attention='xla')


def _setup(**model):
  config = config_reads.shorten(config_reads.get_config('llama_lora',
                                                        'runlocal'))
  config.model.update(model)
  config.train.batch_size = 64  # the logits dominate the step's temps
  return config, run_setup.setup(config, pathlib.Path(tempfile.mkdtemp()))


def _train_and_compile(**model):
  """(losses of two train steps, compiled temp bytes of the step)."""
  config, run = _setup(**model)
  tx = optimizers.optimizer(config.optimizer, run.total_steps, run.method)
  state, shardings = run_setup.init_state(run, tx)
  step = run_setup.train_step_fn(run, tx, shardings)
  batches = run_setup.loader(run, train=True)
  losses, temp = [], None
  for _ in range(2):
    batch = run_setup.device_batch(run, next(batches))
    if temp is None:
      temp = step.lower(state, run.base, batch).compile().memory_analysis(
          ).temp_size_in_bytes
    state, metrics = step(state, run.base, batch)
    losses.append(float(metrics['loss']))
  return losses, temp


def test_loss_chunk_trains_through_the_config_with_fewer_temp_bytes():
  # A vocabulary large enough that the logits dominate the step.
  vocab = dict(config_reads.get_config('llama_lora', 'runlocal').model.init,
               vocab_size=8192)
  whole, whole_temp = _train_and_compile(loss_chunk=0, init=vocab)
  chunked, chunked_temp = _train_and_compile(loss_chunk=8, init=vocab)
  # The second step's loss shows the first update was the same too.
  np.testing.assert_allclose(chunked, whole, rtol=2e-5)
  assert chunked_temp * 1.5 < whole_temp, (chunked_temp, whole_temp)


def test_chunked_attention_trains_through_the_config(monkeypatch):
  monkeypatch.setattr(causal, 'QUERY_BLOCK', 4)
  whole, whole_temp = _train_and_compile(attention='reference')
  chunked, chunked_temp = _train_and_compile(attention='chunked')
  np.testing.assert_allclose(chunked, whole, rtol=2e-5)
  assert chunked_temp != whole_temp  # another program: blocks in a scan
