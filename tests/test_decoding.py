"""Greedy and beam search against transformers' `generate`, token for token."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from flaxlora import models
from flaxlora.models import decoding
from flaxlora.models import t5

V, H, L = 64, 32, 10
EOS, PAD = 1, 0


def _save_hf(folder, tied: bool):
  """A tiny random HF T5 whose EOS logit competes with a common token."""
  torch.manual_seed(1)
  config = transformers.T5Config(
      vocab_size=V, d_model=H, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      feed_forward_proj='relu' if tied else 'gated-gelu',
      tie_word_embeddings=tied, decoder_start_token_id=0)
  model = transformers.T5ForConditionalGeneration(config).eval()
  if not tied:  # v1.1 has its own lm_head (transformers 5 ties it)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(V, H))
  with torch.no_grad():  # random models rarely stop; make EOS likely
    ids, mask = _inputs()
    out = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                         max_new_tokens=L, do_sample=False)
    common = np.bincount(out[:, 1:].numpy().ravel(), minlength=V)[2:]
    head = model.get_output_embeddings().weight
    head[EOS] = head[2 + int(np.argmax(common))] * 1.02
  model.save_pretrained(folder)
  if not tied:
    file = folder / 'config.json'
    config = json.loads(file.read_text())
    config['tie_word_embeddings'] = False
    file.write_text(json.dumps(config))
  return model


def _inputs(batch=8, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(2, V, (batch, 11))
  mask = np.ones_like(ids)
  mask[1, 6:], mask[3, 4:] = 0, 0
  return ids, mask


@pytest.fixture(scope='module')
def loaded(tmp_path_factory):
  """variant -> (hf_model, model, params), each built and loaded once."""
  cache = {}

  def get(variant):
    if variant not in cache:
      folder = tmp_path_factory.mktemp(variant)
      hf_model = _save_hf(folder, tied=variant == 'v1_0')
      cache[variant] = (hf_model,) + tuple(models.load(folder)[:2])
    return cache[variant]
  return get


@pytest.fixture(params=['v1_0', 'v1_1'])
def pair(request, loaded):
  return loaded(request.param)


@pytest.fixture
def pair_v11(loaded):
  return loaded('v1_1')


def _hf_generate(hf_model, ids, mask, **kwargs):
  """HF tokens in flaxlora's layout: [B, L], no start token, PAD after EOS.

  (HF's beam search fills finished hypotheses with EOS, because its
  `pad_token_id or eos_token_id` treats pad id 0 as missing.)
  """
  with torch.no_grad():
    out = hf_model.generate(torch.tensor(ids),
                            attention_mask=torch.tensor(mask),
                            max_new_tokens=L, do_sample=False,
                            **kwargs).numpy()[:, 1:]
  tokens = np.full((out.shape[0], L), PAD)
  for row, seq in enumerate(out):
    stop = np.flatnonzero(seq == EOS)
    end = stop[0] + 1 if len(stop) else len(seq)
    tokens[row, :end] = seq[:end]
  return tokens


def _check_nontrivial(tokens):
  """Some rows stop early, some run to the end: both paths are exercised."""
  stopped = (tokens == EOS).any(1)
  assert stopped.any() and not stopped.all(), tokens


def test_greedy_matches_transformers(pair):
  hf_model, model, params = pair
  ids, mask = _inputs()
  ref = _hf_generate(hf_model, ids, mask, num_beams=1)
  _check_nontrivial(ref)
  tokens = decoding.generate(model, params, ids, mask, max_new_tokens=L)
  np.testing.assert_array_equal(tokens, ref)


@pytest.mark.parametrize('num_beams,length_penalty,early_stopping', [
    (2, 1.0, False), (3, 0.0, True), (4, 2.0, 'never'), (3, -0.5, 'never')])
def test_beam_search_matches_transformers(pair_v11, num_beams, length_penalty,
                                          early_stopping):
  hf_model, model, params = pair_v11
  ids, mask = _inputs()
  settings = dict(num_beams=num_beams, length_penalty=length_penalty,
                  early_stopping=early_stopping)
  ref = _hf_generate(hf_model, ids, mask, **settings)
  tokens = decoding.generate(model, params, ids, mask, max_new_tokens=L,
                             **settings)
  np.testing.assert_array_equal(tokens, ref)
  greedy = decoding.generate(model, params, ids, mask, max_new_tokens=L)
  assert (np.asarray(greedy) != ref).any()  # beams really searched


def test_beam_search_tied_model(loaded):
  hf_model, model, params = loaded('v1_0')
  ids, mask = _inputs(seed=1)
  ref = _hf_generate(hf_model, ids, mask, num_beams=3)
  tokens = decoding.generate(model, params, ids, mask, max_new_tokens=L,
                             num_beams=3)
  np.testing.assert_array_equal(tokens, ref)


def test_min_new_tokens_matches_transformers(pair_v11, num_beams=3):
  hf_model, model, params = pair_v11
  ids, mask = _inputs()
  ref = _hf_generate(hf_model, ids, mask, num_beams=num_beams,
                     min_new_tokens=4)
  tokens = np.asarray(decoding.generate(
      model, params, ids, mask, max_new_tokens=L, num_beams=num_beams,
      min_new_tokens=4))
  np.testing.assert_array_equal(tokens, ref)
  assert not (tokens[:, :3] == EOS).any()


@pytest.mark.parametrize('num_beams', [1, 2])
def test_cache_equals_full_recompute(pair_v11, num_beams):
  _, model, params = pair_v11
  ids, mask = _inputs(seed=2)
  cached = np.asarray(decoding.generate(model, params, ids, mask,
                                        max_new_tokens=L, num_beams=num_beams))
  full = np.asarray(decoding.generate(model, params, ids, mask,
                                      max_new_tokens=L, num_beams=num_beams,
                                      use_cache=False))
  np.testing.assert_array_equal(cached, full)
  assert len(np.unique(cached)) > 5


def test_pad_after_eos(pair_v11):
  _, model, params = pair_v11
  ids, mask = _inputs()
  tokens = np.asarray(decoding.generate(model, params, ids, mask,
                                        max_new_tokens=L, num_beams=2))
  for row in tokens:
    stop = np.flatnonzero(row == EOS)
    if len(stop):
      assert (row[stop[0] + 1:] == PAD).all(), row
      assert (row[:stop[0]] != PAD).all(), row


def test_no_recompiles(pair_v11):
  _, model, params = pair_v11

  def run(seed, batch=8):
    decoding.generate(model, params, *_inputs(batch, seed), max_new_tokens=L)
  run(0)
  before = decoding.compiled_count()
  for seed in (1, 2):  # new batches of the same shape: no new program
    run(seed)
  assert decoding.compiled_count() == before
  run(0, batch=4)  # the counter does see a new shape
  assert decoding.compiled_count() == before + 1


def test_bf16_generation_runs(pair_v11):
  _, model, params = pair_v11
  bf16 = t5.build(model.config, dtype=jnp.bfloat16)
  ids, mask = _inputs()
  tokens = np.asarray(decoding.generate(bf16, params, ids, mask,
                                        max_new_tokens=L, num_beams=2))
  assert tokens.shape == (8, L) and tokens.dtype == np.int32
  assert ((tokens >= 0) & (tokens < V)).all()
  assert len(np.unique(tokens)) > 3


def test_bf16_decoder_kernels_are_cast_once():
  params = {'kernel': jnp.ones((3, 4)), 'scale': jnp.ones((4,)),
            'codes': jnp.ones((3, 4), jnp.uint8)}
  cast = decoding.kernels_in(params, jnp.bfloat16)
  assert cast['kernel'].dtype == jnp.bfloat16
  assert cast['scale'].dtype == jnp.float32  # vectors stay
  assert cast['codes'].dtype == jnp.uint8
  assert decoding.kernels_in(params, jnp.float32) is params


def test_rejects_bad_settings(pair_v11):
  _, model, params = pair_v11
  ids, mask = _inputs()
  with pytest.raises(ValueError, match='early_stopping'):
    decoding.generate(model, params, ids, mask, max_new_tokens=L,
                      num_beams=2, early_stopping='sometimes')
  with pytest.raises(ValueError, match='max_new_tokens'):
    decoding.generate(model, params, ids, mask, max_new_tokens=0)
