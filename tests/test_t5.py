"""flaxlora's T5 against transformers' T5ForConditionalGeneration (torch)."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import helpers

from flaxlora import models
from flaxlora.models import t5
from flaxlora.models import t5_stack

V, H = 96, 32
VARIANTS = {
    # v1.0: ReLU, tied output layer (with d_model**-0.5 scaling).
    'v1_0': dict(feed_forward_proj='relu', tie_word_embeddings=True),
    # v1.1 / Flan: gated-GELU, untied lm_head, no scaling.
    'v1_1': dict(feed_forward_proj='gated-gelu', tie_word_embeddings=False),
}


def _save_hf(folder, variant: str, seed: int = 0):
  """A tiny random HF T5 saved (safetensors) the way the hub holds it."""
  torch.manual_seed(seed)
  config = transformers.T5Config(
      vocab_size=V, d_model=H, d_kv=8, d_ff=64, num_layers=2,
      num_decoder_layers=3, num_heads=4, relative_attention_num_buckets=16,
      relative_attention_max_distance=20, decoder_start_token_id=0,
      **VARIANTS[variant])
  model = transformers.T5ForConditionalGeneration(config).eval()
  if variant == 'v1_1':
    # transformers 5 ties lm_head even for v1.1 configs; real v1.1/Flan
    # checkpoints have their own lm_head, so give it one.
    model.lm_head.weight = torch.nn.Parameter(torch.randn(V, H))
  model.save_pretrained(folder)
  if variant == 'v1_1':  # as in the hub's Flan config.json
    file = folder / 'config.json'
    config = json.loads(file.read_text())
    config['tie_word_embeddings'] = False
    file.write_text(json.dumps(config))
  return transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope='module')
def loaded(tmp_path_factory):
  """variant -> (variant, hf_model, model, params, config), built once."""
  cache = {}

  def get(variant):
    if variant not in cache:
      folder = tmp_path_factory.mktemp(variant)
      hf_model = _save_hf(folder, variant)
      cache[variant] = (variant, hf_model) + tuple(models.load(folder))
    return cache[variant]
  return get


@pytest.fixture(params=sorted(VARIANTS))
def pair(request, loaded):
  return loaded(request.param)


@functools.lru_cache
def _jit(model, method=None, **static):
  """model.apply compiled once per model and method (eager is slow)."""
  return jax.jit(functools.partial(model.apply, method=method, **static))


def _apply(model, params, *args, method=None, **kwargs):
  return _jit(model, method)({'params': params}, *args, **kwargs)


def _inputs():
  rng = np.random.RandomState(0)
  ids = rng.randint(2, V, (3, 30))  # > max_distance: log-spaced buckets too
  mask = np.ones_like(ids)
  mask[1, 21:], mask[2, 6:] = 0, 0
  dec = rng.randint(2, V, (3, 25))
  dec_mask = np.ones_like(dec)
  dec_mask[2, 12:] = 0
  return ids, mask, dec, dec_mask


def _hf_outputs(hf_model, ids, mask, dec, dec_mask):
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(ids),
                   attention_mask=torch.tensor(mask),
                   decoder_input_ids=torch.tensor(dec),
                   decoder_attention_mask=torch.tensor(dec_mask))
  return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def test_config_variant(pair):
  variant, _, model, params, config = pair
  assert config.tie_word_embeddings == (variant == 'v1_0')
  assert config.scale_decoder_outputs == (variant == 'v1_0')
  assert ('lm_head' in params) == (variant == 'v1_1')
  assert model.config.num_decoder_layers == 3
  assert 'block_2' in params['decoder'] and 'block_2' not in params['encoder']


def test_matches_transformers(pair):
  _, hf_model, model, params, _ = pair
  inputs = _inputs()
  ref_encoded, ref_logits = _hf_outputs(hf_model, *inputs)
  encoded = _apply(model, params, *inputs[:2], method='encode')
  logits = _apply(model, params, *inputs)
  np.testing.assert_allclose(encoded, ref_encoded, atol=1e-4, rtol=0)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
  # The comparison is not vacuous: one changed kernel changes the logits.
  kernel = params['decoder']['block_2']['mlp']['wo']['kernel']
  perturbed = jax.tree.map(lambda x: x, params)
  perturbed['decoder']['block_2']['mlp']['wo']['kernel'] = kernel + 0.05
  changed = _apply(model, perturbed, *inputs)
  assert np.abs(np.asarray(changed) - ref_logits).max() > 1e-2


def test_padding_is_masked(pair):
  _, _, model, params, _ = pair
  ids, mask, dec, dec_mask = _inputs()
  logits = _apply(model, params, ids, mask, dec, dec_mask)
  other = ids.copy()
  other[mask == 0] = 7  # different tokens under the padding
  logits2 = _apply(model, params, other, mask, dec, dec_mask)
  np.testing.assert_allclose(logits, logits2, atol=1e-5)
  unmasked = _apply(model, params, other, np.ones_like(mask), dec,
                         dec_mask)
  assert np.abs(np.asarray(unmasked) - np.asarray(logits))[1:].max() > 1e-3


def test_relative_position_bucket_matches_transformers():
  relative = torch.arange(-300, 301)[None, :]
  hf_bucket = transformers.models.t5.modeling_t5.T5Attention.\
      _relative_position_bucket  # pylint: disable=protected-access
  for bidirectional in (True, False):
    for buckets, distance in ((32, 128), (16, 20)):
      ref = hf_bucket(relative, bidirectional, buckets, distance).numpy()
      ours = t5_stack.relative_position_bucket(
          jnp.asarray(relative.numpy()), bidirectional=bidirectional,
          num_buckets=buckets, max_distance=distance)
      np.testing.assert_array_equal(ours, ref)
      assert len(np.unique(ref)) > buckets // 2  # log-spaced buckets too


def test_save_loads_in_transformers(pair, tmp_path):
  _, _, model, params, _ = pair
  params = jax.tree.map(lambda x: x * 1.01, params)  # not the HF weights
  folder = models.save(tmp_path / 'saved', model, params)
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(
      folder).eval()
  inputs = _inputs()
  _, ref = _hf_outputs(reloaded, *inputs)
  logits = _apply(model, params, *inputs)
  np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


def test_every_param_has_logical_axes(pair):
  _, _, model, params, _ = pair
  axes = t5.logical_axes(model)
  helpers.assert_every_param_has_axes(params, axes)
  assert tuple(axes['shared']['embedding']) == ('vocab', 'embed')
  relpos = axes['encoder']['relpos_bias']['embedding']
  assert tuple(relpos) == ('relpos_buckets', 'relpos_heads')
  cross = axes['decoder']['block_0']['cross_attention']
  assert tuple(cross['o']['kernel']) == ('heads', 'embed')


def test_bf16_compute_is_close(pair):
  _, _, model, params, config = pair
  inputs = _inputs()
  ref = np.asarray(_apply(model, params, *inputs))
  bf16 = t5.build(config, dtype=jnp.bfloat16)
  logits = _apply(bf16, params, *inputs)
  assert logits.dtype == jnp.bfloat16
  logits = np.asarray(logits, np.float32)
  assert np.isfinite(logits).all()
  assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max()
  assert np.abs(logits - ref).max() > 0  # really computed in bf16


def test_dropout(loaded):
  _, _, model, params, _ = loaded('v1_0')  # both variants share this code
  inputs = _inputs()
  ref = _apply(model, params, *inputs)
  train = _jit(model, None, deterministic=False)
  run = lambda seed: train(  # pylint: disable=g-long-lambda
      {'params': params}, *inputs, rngs={'dropout': jax.random.PRNGKey(seed)})
  assert np.abs(np.asarray(run(0)) - np.asarray(ref)).max() > 1e-3
  assert np.abs(np.asarray(run(0)) - np.asarray(run(1))).max() > 1e-3
  np.testing.assert_array_equal(run(0), run(0))


def test_cached_steps_equal_full_decode(pair):
  _, _, model, params, _ = pair
  ids, mask, dec, _ = _inputs()
  encoded = _apply(model, params, ids, mask, method='encode')
  full = _apply(model, params, dec, encoded, mask, method='decode')
  length = dec.shape[1]
  cache = model.apply({'params': params}, encoded, length, method='init_cache',
                      mutable=['cache'])[1]['cache']
  step = jax.jit(lambda c, x, i: model.apply(  # pylint: disable=g-long-lambda
      {'params': params, 'cache': c}, x, i, mask, method='decode_step',
      mutable=['cache']))
  for i in range(length):
    logits, cache = step(cache, dec[:, i:i + 1], i)
    cache = cache['cache']
    np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-4)


def test_decoding_cache_holds_a_transposed_tied_output_table(pair):
  variant, _, model, params, _ = pair
  ids, mask, _, _ = _inputs()
  encoded = _apply(model, params, ids, mask, method='encode')
  cache = model.apply({'params': params}, encoded, 4, method='init_cache',
                      mutable=['cache'])[1]['cache']
  if variant == 'v1_0':  # tied: [H, V], the embedding transposed
    np.testing.assert_array_equal(cache['output_table'],
                                  np.asarray(params['shared']['embedding']).T)
  else:  # v1.1 reads its own [H, V] lm_head kernel
    assert 'output_table' not in cache


def test_prompt_is_prepended(pair):
  _, _, model, params, _ = pair
  ids, mask, dec, dec_mask = _inputs()
  prompt = jax.random.normal(jax.random.PRNGKey(0), (5, H))
  encoded = _apply(model, params, ids, mask, prompt=prompt,
                        method='encode')
  assert encoded.shape == (3, 35, H)
  with_prompt = _apply(model, params, ids, mask, dec, dec_mask,
                            prompt=prompt)
  without = _apply(model, params, ids, mask, dec, dec_mask)
  assert np.abs(np.asarray(with_prompt) - np.asarray(without)).max() > 1e-3


def test_config_from_hf_forms():
  # transformers >= 5 writes tie_word_embeddings=True and this flag instead.
  tied_unscaled = t5.config_from_hf({'model_type': 't5', 'vocab_size': V,
                                     'tie_word_embeddings': True,
                                     'scale_decoder_outputs': False})
  assert tied_unscaled.tie_word_embeddings
  assert not tied_unscaled.scale_decoder_outputs
  flan = t5.config_from_hf({'model_type': 't5', 'tie_word_embeddings': False,
                            'feed_forward_proj': 'gated-gelu',
                            'eos_token_id': [1]})
  assert not flan.tie_word_embeddings and not flan.scale_decoder_outputs
  assert flan.eos_token_id == 1 and flan.decoder_start_token_id == 0
  with pytest.raises(ValueError, match='feed_forward_proj'):
    t5.T5Config(feed_forward_proj='gated-silu')
