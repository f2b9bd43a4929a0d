"""Llama-family and GPT-2 causal LMs against transformers (PyTorch).

Tiny random checkpoints are saved by transformers, loaded by
`models.load`, and the logits compared on a left-padded batch; the same
params saved by `models.save` load back into transformers.
"""
import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from flaxlora import models
from flaxlora.models import causal

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

V, T = 61, 9
LLAMA = dict(vocab_size=V, hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, eos_token_id=2, bos_token_id=1,
             pad_token_id=0)
LLAMA3 = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=4)


def _hf_configs():
  t = transformers
  return {
      'llama': (t.LlamaForCausalLM, t.LlamaConfig(**LLAMA)),
      'llama3_bias': (t.LlamaForCausalLM, t.LlamaConfig(
          **LLAMA, rope_scaling=LLAMA3, attention_bias=True, mlp_bias=True,
          tie_word_embeddings=True)),
      'mistral': (t.MistralForCausalLM, t.MistralConfig(
          **LLAMA, sliding_window=3)),
      'qwen2': (t.Qwen2ForCausalLM, t.Qwen2Config(
          **LLAMA, tie_word_embeddings=True)),
      'gpt2': (t.GPT2LMHeadModel, t.GPT2Config(
          vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
          eos_token_id=2, bos_token_id=1)),
  }


KINDS = tuple(_hf_configs())


def hf_model(kind: str):
  """A tiny random transformers model; biases and norms made non-trivial."""
  cls, config = _hf_configs()[kind]
  torch.manual_seed(0)
  model = cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'norm' in name or 'ln_' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def save_hf(kind: str, folder) -> 'torch.nn.Module':
  model = hf_model(kind)
  model.save_pretrained(folder)
  return model


def batch(seed: int = 0):
  """ids, mask [2, T]: row 1 left-padded by 3, row 0 full."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, V, (2, T))
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  ids[1, :3] = 0
  return ids, mask


def hf_logits(model, ids, mask) -> np.ndarray:
  positions = np.maximum(mask.cumsum(-1) - 1, 0)  # what generate passes
  with torch.no_grad():
    return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()


def masked_diff(a, b, mask) -> float:
  return float(np.abs((np.asarray(a) - b) * mask[..., None]).max())


@pytest.mark.parametrize('kind', KINDS)
def test_logits_match_transformers_both_ways(kind, tmp_path):
  ref_model = save_hf(kind, tmp_path / 'hf')
  model, params, _ = models.load(tmp_path / 'hf')
  ids, mask = batch()
  ref = hf_logits(ref_model, ids, mask)
  logits = model.apply({'params': params}, ids, mask)
  assert logits.shape == (2, T, V)
  assert masked_diff(logits, ref, mask) <= 1e-4
  # A changed weight changes the logits: the comparison is not vacuous.
  bumped = jax.tree.map(lambda x: x, params)
  leaf = 'embed_tokens' if 'embed_tokens' in params else 'wte'
  bumped[leaf]['embedding'] = params[leaf]['embedding'] * 1.1
  assert masked_diff(model.apply({'params': bumped}, ids, mask), ref,
                     mask) > 1e-3
  # Saved by flaxlora, read by transformers: the same logits.
  models.save(tmp_path / 'out', model, params)
  back = type(ref_model).from_pretrained(tmp_path / 'out').eval()
  assert masked_diff(hf_logits(back, ids, mask), ref, mask) <= 1e-4


@pytest.fixture(scope='module', params=['llama', 'gpt2'])
def tiny(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp(request.param)
  save_hf(request.param, folder)
  model, params, _ = models.load(folder)
  return model, params


def test_packed_rows_equal_separate_examples(tiny):
  model, params = tiny
  rng = np.random.RandomState(1)
  a, b = rng.randint(3, V, (1, 4)), rng.randint(3, V, (1, 5))
  packed = np.concatenate([a, b], axis=1)
  segments = np.array([[1] * 4 + [2] * 5])
  positions = np.array([list(range(4)) + list(range(5))])
  out = model.apply({'params': params}, packed, positions=positions,
                    segment_ids=segments)
  alone = [model.apply({'params': params}, x) for x in (a, b)]
  np.testing.assert_allclose(out, np.concatenate(alone, axis=1), atol=1e-5)
  crossed = model.apply({'params': params}, packed)  # no segments
  assert np.abs(np.asarray(crossed[:, 4:]) - alone[1]).max() > 1e-3


def test_cache_steps_equal_full_forward(tiny):
  model, params = tiny
  family = models.family_of_model(model)
  ids, mask = batch(2)
  full = model.apply({'params': params}, ids, mask)
  cache = family.init_cache(model, 2, T)
  logits, cache = model.apply({'params': params}, ids[:, :5], mask[:, :5],
                              cache=cache)
  steps = [logits]
  for t in range(5, T):
    logits, cache = model.apply({'params': params}, ids[:, t:t + 1],
                                mask[:, t:t + 1], cache=cache)
    steps.append(logits)
  assert int(cache['index']) == T
  np.testing.assert_allclose(np.concatenate(steps, 1) * mask[..., None],
                             np.asarray(full) * mask[..., None], atol=1e-5)


def test_grouped_cache_holds_key_value_heads_once():
  model = models.llama.build(models.llama.LlamaConfig(**{
      k: v for k, v in LLAMA.items() if 'token' not in k}))
  cache = models.llama.init_cache(model, 3, 10)
  assert cache['layers'][0]['key'].shape == (3, 2, 10, 8)  # [B, K, S, D]
  assert cache['mask'].shape == (3, 10)


def test_dropout_is_active_when_not_deterministic(tiny):
  model, params = tiny
  model = model.clone(config=_with_dropout(model.config))
  ids, mask = batch()
  quiet = model.apply({'params': params}, ids, mask)
  noisy = model.apply({'params': params}, ids, mask, deterministic=False,
                      rngs={'dropout': jax.random.PRNGKey(0)})
  assert np.abs(np.asarray(noisy) - np.asarray(quiet)).max() > 1e-3


def _with_dropout(config):
  fields = {f.name for f in dataclasses.fields(config)}
  rates = {k: 0.3 for k in ('attention_dropout', 'resid_pdrop', 'embd_pdrop',
                            'attn_pdrop') if k in fields}
  return dataclasses.replace(config, **rates)


def test_logical_axes_name_key_value_heads():
  model = models.llama.build(models.llama.LlamaConfig(**{
      k: v for k, v in LLAMA.items() if 'token' not in k}))
  axes = models.llama.logical_axes(model)['layers_0']['self_attn']
  assert tuple(axes['q_proj']['kernel']) == ('embed', 'heads')
  assert tuple(axes['k_proj']['kernel']) == ('embed', 'kv_heads')
  assert tuple(axes['o_proj']['kernel']) == ('heads', 'embed')


def test_default_positions_skip_left_padding():
  mask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(causal.default_positions(mask),
                                [[0, 0, 0, 1], [0, 1, 2, 3]])
