"""The memory features of docs/memory.md: remat, the stored base dtype,
activation sharding, fused attention and seq2seq packing; each keeps what
the model computes and changes what the compiler allocates."""
import dataclasses
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

import config_reads
from flaxlora import optimizers
from flaxlora import run_setup
from flaxlora import sharding
from flaxlora.models import bert
from flaxlora.models import decoding
from flaxlora.models import gpt2
from flaxlora.models import layers
from flaxlora.models import llama
from flaxlora.models import seq2seq_packing
from flaxlora.models import t5
from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft import merge
from flaxlora.peft import method_parts

WORKER = pathlib.Path(__file__).with_name('memory_worker.py')
TINY_T5 = t5.T5Config(
    vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
    num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, dropout_rate=0.1,
    feed_forward_proj='gated-gelu', tie_word_embeddings=False)
TINY_BERT = bert.BertConfig(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, max_position_embeddings=32)


def _model(family, **kwargs):
  if family in CAUSAL:
    module, config = CAUSAL[family]
    model = module.build(config, **kwargs)
    apply = lambda p, ids, rng: model.apply(  # pylint: disable=g-long-lambda
        {'params': p}, ids, ids > 0, deterministic=False,
        rngs={'dropout': rng})
    return model, module.init(model, jax.random.PRNGKey(0)), apply
  if family == 't5':
    model = t5.build(TINY_T5, **kwargs)
    apply = lambda p, ids, rng: model.apply(  # pylint: disable=g-long-lambda
        {'params': p}, ids, ids > 0, ids, deterministic=False,
        rngs={'dropout': rng})
    return model, t5.init(model, jax.random.PRNGKey(0)), apply
  model = bert.build(TINY_BERT, head=None, **kwargs)
  apply = lambda p, ids, rng: model.apply(  # pylint: disable=g-long-lambda
      {'params': p}, ids, ids > 0, deterministic=False,
      rngs={'dropout': rng})[0]
  return model, bert.init(model, jax.random.PRNGKey(0)), apply


CAUSAL = {
    'llama': (llama, llama.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8)),
    'gpt2': (gpt2, gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32,
                                   n_layer=2, n_head=4)),
}


def _grads(family, **kwargs):
  _, params, apply = _model(family, **kwargs)
  ids = jax.random.randint(jax.random.PRNGKey(1), (3, 10), 0, 64)
  loss = lambda p: jnp.mean(jnp.square(apply(p, ids, jax.random.PRNGKey(2))))
  return jax.jit(jax.grad(loss))(params)


@pytest.mark.parametrize('family', ['t5', 'bert', 'llama', 'gpt2'])
@pytest.mark.parametrize('policy', ['block', 'dots'])
def test_remat_keeps_the_gradients(family, policy):
  plain, rematted = _grads(family), _grads(family, remat=policy)
  # Dropout is on: a recomputed block draws the same masks. Sums run in
  # another order, hence float32 rounding.
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain)) > 1e-3


def test_remat_decodes_like_no_remat():
  model, params, _ = _model('t5')
  ids = jax.random.randint(jax.random.PRNGKey(3), (2, 7), 2, 64)
  tokens = [decoding.generate(t5.build(TINY_T5, remat=r), params, ids,
                              jnp.ones_like(ids), max_new_tokens=5)
            for r in ('none', 'block')]
  np.testing.assert_array_equal(tokens[0], tokens[1])
  del model


def test_unknown_remat_is_refused():
  with pytest.raises(ValueError, match=r"model.remat='all'"):
    t5.build(TINY_T5, remat='all')
  with pytest.raises(ValueError, match=r"model.remat='all'"):
    bert.build(TINY_BERT, remat='all')


def _worker_temp_bytes(family, remat, target='cpu'):
  env = dict(os.environ)
  env['XLA_FLAGS'] = ''  # one CPU device; the worker adds its flag
  out = subprocess.run(
      [sys.executable, str(WORKER), '--family', family, '--remat', remat,
       '--target', target], env=env, check=True, capture_output=True,
      text=True).stdout
  return json.loads(out.strip().splitlines()[-1])['temp_bytes']


@pytest.mark.parametrize('family', ['t5', 'bert'])
def test_remat_cuts_compiled_temp_bytes_on_cpu(family):
  none, block, dots = (_worker_temp_bytes(family, r)
                       for r in ('none', 'block', 'dots'))
  assert block < 0.85 * none, (none, block)
  assert dots < none, (none, dots)


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu (the TPU compiler) is not installed')
def test_remat_block_cuts_tpu_temp_bytes_three_times():
  none = _worker_temp_bytes('t5', 'none', 'v5e:2x2')
  block = _worker_temp_bytes('t5', 'block', 'v5e:2x2')
  assert block * 3 <= none, (none, block)


def _setup(name, **changes):
  config = config_reads.shorten(config_reads.get_config(name, 'runlocal'))
  for key, value in changes.items():
    section, field = key.split('.')
    config[section][field] = value
  return config, run_setup.setup(config, pathlib.Path(tempfile.mkdtemp()))


def _float_bytes(tree):
  leaves = jax.tree.leaves(tree)
  return sum(x.nbytes for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))


def _train(config, run, num_steps=2):
  tx = optimizers.optimizer(config.optimizer, run.total_steps, run.method)
  state, shardings = run_setup.init_state(run, tx)
  step = run_setup.train_step_fn(run, tx, shardings)
  batches = run_setup.loader(run, train=True)
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, run.base,
                          run_setup.device_batch(run, next(batches)))
    losses.append(float(metrics['loss']))
  return state, losses


@pytest.mark.parametrize('compute', ['float32', 'bfloat16'])
def test_bf16_base_halves_the_base_and_keeps_the_adapter_fp32(compute):
  name = 'bert_sentiment_lora'  # LoRA and a fully trained classifier copy
  config32, run32 = _setup(name, **{'model.dtype': compute})
  config16, run16 = _setup(name, **{'model.dtype': compute,
                                    'model.base_dtype': 'bfloat16'})
  assert _float_bytes(run16.base) * 2 == _float_bytes(run32.base)
  assert {x.dtype for x in jax.tree.leaves(run16.base)} == {jnp.dtype(jnp.bfloat16)}
  # Sharded as before.
  assert ([x.sharding for x in jax.tree.leaves(run16.base)] ==
          [x.sharding for x in jax.tree.leaves(run32.base)])
  state16, losses16 = _train(config16, run16)
  _, losses32 = _train(config32, run32)
  for tree in (state16.adapter, state16.opt_state):
    assert {x.dtype for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
  assert np.all(np.isfinite(losses16))
  # The base really is the rounded one, and only slightly different.
  assert losses16 != losses32
  np.testing.assert_allclose(losses16, losses32, rtol=0.05)


def test_bf16_base_merges_to_its_upcast_plus_the_fp32_delta():
  config, run = _setup('t5_lora', **{'model.base_dtype': 'bfloat16'})
  state, _ = _train(config, run)
  merged = merge.merge(run.base, state.adapter, run.method)
  kernels = {}
  for part, adapter in method_parts.parts(run.method, state.adapter):
    if isinstance(part, lora.LoraConfig):
      kernels.update(lora.kernels(part, run.base, adapter))
  assert kernels
  for path, node in kernels.items():
    w = peft_base.get(merged, path)
    assert w.dtype == jnp.float32
    delta = node.scale * jnp.matmul(node.a, node.b,
                                    precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_array_equal(
        w, jnp.asarray(peft_base.get(run.base, path), jnp.float32) + delta)
    assert float(jnp.abs(delta).max()) > 0


def test_bf16_base_keeps_qloras_nf4_kernels():
  _, run32 = _setup('bert_sentiment_qlora')
  config, run16 = _setup('bert_sentiment_qlora',
                         **{'model.base_dtype': 'bfloat16'})
  is_kernel = layers.is_adapted_kernel
  nodes = lambda base: [x for x in jax.tree.leaves(base, is_leaf=is_kernel)  # pylint: disable=g-long-lambda
                        if is_kernel(x)]
  assert nodes(run16.base)
  for a, b in zip(nodes(run16.base), nodes(run32.base)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
  plain = [x for x in jax.tree.leaves(run16.base, is_leaf=is_kernel)
           if not is_kernel(x)]
  assert plain and {x.dtype for x in plain} == {jnp.dtype(jnp.bfloat16)}
  assert np.all(np.isfinite(_train(config, run16)[1]))


def test_unknown_base_dtype_is_refused():
  with pytest.raises(ValueError, match=r"model.base_dtype='float16'"):
    _setup('bert_sentiment_lora', **{'model.base_dtype': 'float16'})


def test_constraints_apply_only_under_activation_sharding():
  x = jnp.ones((8, 3))
  assert layers.constrain(x, ('batch', None)) is x
  mesh = sharding.make_mesh({'data': -1})
  rows = NamedSharding(mesh, PartitionSpec('data'))
  with layers.activation_sharding(mesh, sharding.RULES):
    split = jax.jit(lambda x: layers.constrain(x, ('batch', None)))(x)
    # 3 rows do not divide over 8 devices: left whole, not an error.
    whole = jax.jit(lambda x: layers.constrain(x, ('batch', None)))(x[:3])
  assert split.sharding.is_equivalent_to(rows, 2)
  assert whole.sharding.is_fully_replicated
  assert layers.constrain(x, ('batch', None)) is x  # the context has ended


def _step_temp_bytes(num_devices, shard):
  """Compiled temp bytes per device of t5_lora's runlocal train step,
  batch 32 split over `num_devices` (fsdp)."""
  config = config_reads.shorten(config_reads.get_config('t5_lora',
                                                        'runlocal'))
  config.train.batch_size = 32
  config.mesh.update(data=1, fsdp=-1)
  config.model.shard_activations = shard
  run = run_setup.setup(config, pathlib.Path(tempfile.mkdtemp()),
                      devices=jax.devices()[:num_devices])
  tx = optimizers.optimizer(config.optimizer, run.total_steps, run.method)
  state, shardings = run_setup.init_state(run, tx)
  batch = run_setup.device_batch(run, next(run_setup.loader(run, train=True)))
  step = run_setup.train_step_fn(run, tx, shardings)
  compiled = step.lower(state, run.base, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_activation_sharding_splits_temp_bytes_over_devices():
  temps = [_step_temp_bytes(n, True) for n in (1, 2, 4, 8)]
  assert temps == sorted(temps, reverse=True), temps
  assert temps[3] * 4 <= temps[0], temps
  assert temps[3] < _step_temp_bytes(8, False), temps


def _attention_outputs(family, implementation, mask, dtype=jnp.float32):
  """T5 logits (relative position bias, padding and causal masks) or BERT
  states (padding mask, no bias) with `implementation`."""
  ids = jax.random.randint(jax.random.PRNGKey(1), (3, 10), 2, 64)
  if family == 't5':
    config = dataclasses.replace(TINY_T5, dropout_rate=0.0)
    model = t5.build(config, dtype=dtype, attention=implementation)
    params = t5.init(t5.build(config), jax.random.PRNGKey(0))
    out = model.apply({'params': params}, ids, mask, ids[:, :7])
  else:
    model = bert.build(TINY_BERT, head=None, dtype=dtype,
                       attention=implementation)
    params = bert.init(bert.build(TINY_BERT, head=None),
                       jax.random.PRNGKey(0))
    out = model.apply({'params': params}, ids, mask)[0]
  return np.asarray(out, np.float32)


@pytest.mark.parametrize('family', ['t5', 'bert'])
def test_xla_attention_matches_the_reference(family):
  mask = np.ones((3, 10), np.int32)
  mask[0, 6:] = 0
  reference = _attention_outputs(family, 'reference', mask)
  fused = _attention_outputs(family, 'xla', mask)
  scale = np.abs(reference).max()
  np.testing.assert_allclose(fused, reference, atol=1e-5 * scale)
  # The padding mask reaches the fused kernel.
  other = mask.copy()
  other[1, 4:] = 0
  changed = _attention_outputs(family, 'xla', other)
  assert np.abs(changed[1] - fused[1]).max() > 1e-3 * scale
  np.testing.assert_allclose(changed[2], fused[2], atol=1e-5 * scale)
  # bf16 products: close to the reference's bf16 products.
  reference16 = _attention_outputs(family, 'reference', mask, jnp.bfloat16)
  fused16 = _attention_outputs(family, 'xla', mask, jnp.bfloat16)
  np.testing.assert_allclose(fused16, reference16, atol=0.05 * scale)


def test_xla_attention_decodes_like_the_reference():
  config = dataclasses.replace(TINY_T5, dropout_rate=0.0)
  params = t5.init(t5.build(config), jax.random.PRNGKey(0))
  ids = jax.random.randint(jax.random.PRNGKey(3), (2, 7), 2, 64)
  tokens = [decoding.generate(t5.build(config, attention=a), params, ids,
                              jnp.ones_like(ids), max_new_tokens=5)
            for a in ('reference', 'xla')]
  np.testing.assert_array_equal(tokens[0], tokens[1])


def test_fused_attention_refusals():
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match="model.attention='cudnn' runs on"):
      t5.build(TINY_T5, attention='cudnn')
  with pytest.raises(ValueError, match="model.attention='flash'"):
    bert.build(TINY_BERT, attention='flash')
  with pytest.raises(ValueError, match="model.attention='xla': llama"):
    llama.build(CAUSAL['llama'][1], attention='xla')
  model = t5.build(TINY_T5, attention='xla')  # dropout_rate 0.1
  params = t5.init(model, jax.random.PRNGKey(0))
  ids = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match='no dropout on attention'):
    model.apply({'params': params}, ids, ids, ids, deterministic=False,
                rngs={'dropout': jax.random.PRNGKey(0)})


def _seq2seq_loss(model, params, rows):
  """Summed cross-entropy over the label tokens of `rows` (`pack` output)."""
  packing = rows if 'encoder_segment_ids' in rows else None
  logits = model.apply({'params': params}, rows['input_ids'],
                       rows['attention_mask'], rows['decoder_input_ids'],
                       rows['decoder_attention_mask'], packing=packing)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, rows['labels'][..., None], -1)[..., 0]
  return -jnp.sum(picked * rows['decoder_attention_mask'])


def test_packed_seq2seq_loss_equals_the_unpacked_loss():
  config = dataclasses.replace(TINY_T5, dropout_rate=0.0)
  model = t5.build(config)
  params = t5.init(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  examples = [(rng.integers(2, 64, rng.integers(2, 7)).tolist(),
               rng.integers(2, 64, rng.integers(1, 5)).tolist())
              for _ in range(7)]
  packed = seq2seq_packing.pack(examples, source_length=16, target_length=8)
  assert len(packed['input_ids']) < len(examples)  # rows really hold several
  assert packed['encoder_segment_ids'].max() > 1
  singles = [seq2seq_packing.pack([e], source_length=16, target_length=8)
             for e in examples]
  unpacked = {k: np.concatenate([s[k] for s in singles])
              for k in seq2seq_packing.KEYS}
  plain = {k: unpacked[k] for k in ('input_ids', 'attention_mask',
                                    'decoder_input_ids',
                                    'decoder_attention_mask', 'labels')}
  reference = _seq2seq_loss(model, params, plain)
  np.testing.assert_allclose(_seq2seq_loss(model, params, packed),
                             reference, rtol=1e-5)
  # Without the segments the packed rows attend across examples.
  packed_plain = {k: packed[k] for k in plain}
  assert abs(float(_seq2seq_loss(model, params, packed_plain)) -
             float(reference)) > 1e-3 * abs(float(reference))
