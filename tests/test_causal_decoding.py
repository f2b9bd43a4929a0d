"""causal_decoding: greedy and beam tokens equal transformers' `generate` on
tiny random causal LMs (left padding, rows that end early); sampling warpers
equal transformers'; adapters and mixed-adapter batches decode like their
merged weights.

Each test runs on a family given by indirect parametrization of the
module-scoped `pair` (loaded once per family); the default suite runs every
family, greedy, beam search (both stopping rules), sampling, and adapters
and mixed batches with greedy and beam once, the slow run the rest of the
family x setting grid."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import helpers
from flaxlora import models
from flaxlora.models import causal_decoding
from flaxlora.peft import lora
from flaxlora.peft import multi
import test_causal_models as causal_tests

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

L = 8
FAMILIES = ('llama', 'gpt2')
GREEDY, BEAM = dict(num_beams=1), dict(num_beams=3)
BEAM_EARLY = dict(num_beams=2, length_penalty=0.0, early_stopping=True)


@pytest.fixture(scope='module')
def pair(request, tmp_path_factory):
  folder = tmp_path_factory.mktemp(request.param)
  ref = causal_tests.save_hf(request.param, folder)
  model, params, _ = models.load(folder)
  return ref, model, params


def hf_generate(ref, ids, mask, eos, **kwargs) -> np.ndarray:
  """transformers' new tokens [B, L], pad id 0 after EOS.

  (Its beam search fills finished hypotheses with EOS: `pad_token_id or
  eos_token_id` takes pad id 0 for missing.)
  """
  with torch.no_grad():
    out = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask),
                       max_new_tokens=L, eos_token_id=eos, pad_token_id=0,
                       do_sample=False, **kwargs)
  tokens = np.zeros((len(ids), L), np.int64)
  for row, seq in enumerate(out[:, ids.shape[1]:].numpy()):
    stop = np.flatnonzero(seq == eos)
    end = stop[0] + 1 if len(stop) else len(seq)
    tokens[row, :end] = seq[:end]
  return tokens


def early_eos(ref, ids, mask) -> int:
  """An EOS id that ends row 0 after 3 tokens of greedy decoding."""
  return int(hf_generate(ref, ids, mask, eos=causal_tests.V + 5)[0, 2])


@pytest.mark.parametrize('pair,settings', helpers.default_or_slow(
    [(f, s) for f in FAMILIES for s in (GREEDY, BEAM, BEAM_EARLY)],
    [('llama', GREEDY), ('gpt2', BEAM), ('llama', BEAM_EARLY)]),
                         indirect=['pair'])
def test_tokens_match_transformers_generate(pair, settings):
  ref, model, params = pair
  ids, mask = causal_tests.batch(3)
  eos = early_eos(ref, ids, mask)
  want = hf_generate(ref, ids, mask, eos, **settings)
  got = causal_decoding.generate(model, params, ids, mask, max_new_tokens=L,
                                 eos_token_id=eos, pad_token_id=0, **settings)
  np.testing.assert_array_equal(got, want)
  if settings['num_beams'] == 1:  # a row ended early, its tail padded
    assert (want == eos).any() and (want[:, -1] == 0).any()


@pytest.mark.parametrize('pair', helpers.default_or_slow(
    [(f,) for f in FAMILIES], [('gpt2',)]), indirect=True)
def test_beam_search_differs_from_greedy_somewhere(pair):
  ref, model, params = pair
  ids, mask = causal_tests.batch(4)
  run = lambda k: np.asarray(causal_decoding.generate(  # pylint: disable=g-long-lambda
      model, params, ids, mask, max_new_tokens=L, num_beams=k,
      eos_token_id=causal_tests.V + 5))
  assert (run(1) != run(4)).any()
  del ref


def test_warpers_match_transformers():
  rng = np.random.RandomState(0)
  logits = rng.randn(3, 40).astype(np.float32) * 3
  for temperature, top_k, top_p in ((0.7, 0, 1.0), (1.0, 5, 1.0),
                                    (1.0, 0, 0.8), (1.3, 7, 0.6)):
    processors = [transformers.TemperatureLogitsWarper(temperature)]
    if top_k:
      processors.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1:
      processors.append(transformers.TopPLogitsWarper(top_p))
    want = torch.tensor(logits)
    for p in processors:
      want = p(None, want)
    got = causal_decoding.warp(jnp.asarray(logits), temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want.numpy()))
    finite = ~np.isinf(got)
    np.testing.assert_allclose(np.asarray(got)[finite],
                               want.numpy()[finite], rtol=1e-6)
    assert np.isinf(got).any() or not (top_k or top_p < 1)


@pytest.mark.parametrize('pair', helpers.default_or_slow(
    [(f,) for f in FAMILIES], [('llama',)]), indirect=True)
def test_sampling_is_seeded(pair):
  _, model, params = pair
  ids, mask = causal_tests.batch(5)
  sample = lambda seed, **kw: np.asarray(causal_decoding.generate(  # pylint: disable=g-long-lambda
      model, params, ids, mask, max_new_tokens=L, do_sample=True,
      rng=jax.random.PRNGKey(seed), eos_token_id=causal_tests.V + 5, **kw))
  np.testing.assert_array_equal(sample(0, temperature=2.0),
                                sample(0, temperature=2.0))
  assert (sample(0, temperature=2.0) != sample(1, temperature=2.0)).any()
  greedy = causal_decoding.generate(model, params, ids, mask,
                                    max_new_tokens=L,
                                    eos_token_id=causal_tests.V + 5)
  np.testing.assert_array_equal(sample(3, top_k=1), greedy)


def _adapters(base, count):
  method = lora.lora(rank=4, alpha=8.0, targets=r'.*(q_proj|v_proj|c_attn)'
                     r'/kernel')
  out = []
  for i in range(count):
    adapter = method.init(jax.random.PRNGKey(i), base)
    adapter = jax.tree.map(  # B = 0 at init: make the adapter do something
        lambda x, i=i: x + 0.5 * jax.random.normal(jax.random.PRNGKey(9 + i),
                                                   x.shape), adapter)
    out.append((method, adapter))
  return out


def _merged(params, adapter, scale=2.0):
  """W + scale A B at every adapted kernel (the dense reference)."""
  if 'a' in adapter:
    return params + scale * adapter['a'] @ adapter['b']
  return {k: _merged(v, adapter[k], scale) if k in adapter else v
          for k, v in params.items()}


@pytest.mark.parametrize('pair,num_beams', helpers.default_or_slow(
    [(f, k) for f in FAMILIES for k in (1, 2)], [('llama', 1), ('gpt2', 2)]),
                         indirect=['pair'])
def test_adapters_and_mixed_batches_decode_like_merged_weights(pair,
                                                               num_beams):
  _, model, base = pair
  ids, mask = causal_tests.batch(6)
  ids, mask = np.concatenate([ids, ids[::-1]]), np.concatenate([mask,
                                                                mask[::-1]])
  run = lambda params, i=ids, m=mask: np.asarray(causal_decoding.generate(  # pylint: disable=g-long-lambda
      model, params, i, m, max_new_tokens=L, num_beams=num_beams,
      eos_token_id=causal_tests.V + 5))
  pairs = _adapters(base, 2)
  method, adapter = pairs[0]
  adapted = run(method.apply(base, adapter)[0])
  np.testing.assert_array_equal(adapted, run(_merged(base, adapter)))
  assert (adapted != run(base)).any()
  rows = np.array([0, 1, -1, 1])
  mixed = run(multi.apply(base, multi.stack(pairs, base), rows)[0])
  single = {-1: run(base), 0: adapted,  # each decoded once
            1: run(pairs[1][0].apply(base, pairs[1][1])[0])}
  alone = [single[r] for r in rows]
  np.testing.assert_array_equal(mixed, np.stack([a[i] for i, a in
                                                 enumerate(alone)]))


def test_chat_prompts_use_the_template_and_pad_left():
  tokenizers = pytest.importorskip('tokenizers')
  words = ['<pad>', '<s>', '</s>', 'user:', 'assistant:', 'hi', 'there',
           'how', 'are', 'you']
  core = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token='<pad>'))
  core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=core, pad_token='<pad>', eos_token='</s>')
  tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: "
                       "{{ m['content'] }} </s> {% endfor %}"
                       "{% if add_generation_prompt %}assistant:{% endif %}")
  ids, mask = causal_decoding.chat_prompts(tok, [
      [{'role': 'user', 'content': 'hi'}],
      [{'role': 'user', 'content': 'how are you'}]])
  assert tok.decode(ids[0][mask[0] == 1]) == 'user: hi </s> assistant:'
  assert mask[0, 0] == 0 and mask[1].all()  # left padding
