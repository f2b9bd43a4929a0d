"""Prompt tuning: combination, init, T5/BERT with a prompt, PEFT folders.

References are independent: numpy for the combination, transformers + torch
(`inputs_embeds` with the prompt spliced in by hand) and PEFT itself.
"""
import importlib
import json

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlora import models
from flaxlora import trainer
from flaxlora.models import decoding
from flaxlora.peft import base as peft_base
from flaxlora.peft import prompt
from flaxlora.peft import trainable
from flaxlora.peft.prompt import folder as prompt_folder

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

P = 4
TINY_T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
               num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, dropout_rate=0.0,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def as_torch(x, dtype=None):
  return torch.tensor(np.asarray(x), dtype=dtype)


# ------------------------------------------------------------ combination ---


@pytest.mark.parametrize('index', [0, 1, 3])
def test_insert_and_remove_positions(index):
  x = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
  p = -np.arange(1, 1 + P * 3, dtype=np.float32).reshape(P, 3)
  y = np.asarray(prompt.insert_prompt(jnp.asarray(x), jnp.asarray(p), index))
  ref = np.concatenate([x[:, :index], np.broadcast_to(p, (2, P, 3)),
                        x[:, index:]], axis=1)
  np.testing.assert_array_equal(y, ref)
  np.testing.assert_array_equal(
      np.asarray(prompt.remove_prompt(jnp.asarray(y), P, index)), x)
  # Per-example prompts [B, P, H] and masks [B, T] with ones.
  pb = np.stack([p, 2 * p])
  yb = np.asarray(prompt.insert_prompt(jnp.asarray(x), jnp.asarray(pb),
                                       index))
  np.testing.assert_array_equal(yb[1, index:index + P], 2 * p)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
  m = np.asarray(prompt.insert_prompt(jnp.asarray(mask),
                                      jnp.ones((P,), jnp.int32), index))
  assert m.shape == (2, 5 + P) and m.dtype == np.int32
  np.testing.assert_array_equal(m[:, index:index + P], 1)
  np.testing.assert_array_equal(prompt.remove_prompt(m, P, index), mask)


# -------------------------------------------------------------------- init ---


class WordTokenizer:
  """A stand-in transformers tokenizer: word i -> id i + 2."""

  def __init__(self, words):
    self.words = {w: i + 2 for i, w in enumerate(words)}

  def __call__(self, text, add_special_tokens=True):
    assert not add_special_tokens
    return {'input_ids': [self.words[w] for w in text.split()]}


def test_init_kinds_and_abstract_init():
  table = jax.random.normal(jax.random.PRNGKey(0), (50, 8))
  base = {'shared': {'embedding': table}}
  rng = jax.random.PRNGKey(1)
  uniform = prompt.prompt_tuning(6).init(rng, base)['prompt']
  assert uniform.shape == (6, 8) and float(jnp.abs(uniform).max()) <= 0.5
  sample = np.asarray(prompt.prompt_tuning(6, 'vocab_sample',
                                           vocab_range=10).init(
                                               rng, base)['prompt'])
  rows = np.asarray(table[:10])
  assert all(np.any(np.all(rows == r, axis=1)) for r in sample)
  tok = WordTokenizer(['great', 'movie', 'bad', 'very', 'good'])
  text = np.asarray(prompt.prompt_tuning(
      5, 'text', init_text='great movie', tokenizer=tok).init(
          rng, base)['prompt'])
  np.testing.assert_array_equal(text, np.asarray(table)[[2, 3, 2, 3, 2]])
  labels = np.asarray(prompt.prompt_tuning(
      5, 'class_labels', class_labels=['bad', 'very good'],
      tokenizer=tok).init(rng, base)['prompt'])
  np.testing.assert_allclose(labels[0], np.asarray(table)[4], atol=1e-6)
  np.testing.assert_allclose(labels[1], np.asarray(table)[[5, 6]].mean(0),
                             atol=1e-6)
  abstract = jax.eval_shape(prompt.prompt_tuning(7).init, rng,
                            jax.eval_shape(lambda: base))
  assert abstract['prompt'].shape == (7, 8)
  bert_base = {'embeddings': {'word': {'embedding': table}}}
  assert prompt.prompt_tuning(3).init(rng, bert_base)['prompt'].shape == (3, 8)


def test_bad_arguments():
  with pytest.raises(ValueError, match="init='nope'"):
    prompt.prompt_tuning(4, 'nope')
  with pytest.raises(ValueError, match='num_tokens=-1'):
    prompt.prompt_tuning(-1)
  with pytest.raises(ValueError, match='init_text'):
    prompt.prompt_tuning(4, 'text')
  with pytest.raises(ValueError, match='word embedding table'):
    prompt.prompt_tuning(4).init(jax.random.PRNGKey(0),
                                 {'other': jnp.ones((3, 3))})


# ---------------------------------------------------------------------- T5 ---


@pytest.fixture(scope='module')
def t5_setup(tmp_path_factory):
  folder = tmp_path_factory.mktemp('t5')
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(
      transformers.T5Config(**TINY_T5)).eval()
  hf.save_pretrained(str(folder), safe_serialization=True)
  model, params, _ = models.load(folder)
  rng = np.random.RandomState(0)
  ids = rng.randint(2, 64, (3, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  mask[2, 3:] = 0
  ids = np.where(mask == 1, ids, 0)
  dec = rng.randint(2, 64, (3, 5)).astype(np.int32)
  dec[:, 0] = 0
  return folder, model, params, (ids, mask, dec)


def random_prompt(seed, p=P, h=32):
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (p, h)))


def t5_logits(model, params, inputs, p=None):
  ids, mask, dec = inputs
  kw = {} if p is None else {'prompt': jnp.asarray(p)}
  return np.asarray(jax.jit(model.apply)({'params': params}, ids, mask, dec,
                                         **kw))


def test_t5_zero_length_prompt_is_base_and_prompt_changes_output(t5_setup):
  _, model, params, inputs = t5_setup
  method = prompt.prompt_tuning(0)
  adapter = method.init(jax.random.PRNGKey(0), params)
  p, kw = method.apply(params, adapter)
  assert kw['prompt'].shape == (0, 32) and p is params
  base = t5_logits(model, params, inputs)
  np.testing.assert_array_equal(t5_logits(model, p, inputs, kw['prompt']),
                                base)
  assert helpers.max_diff(t5_logits(model, params, inputs, random_prompt(1)),
                          base) > 1e-2


def test_t5_peft_round_trips(t5_setup, tmp_path):
  folder, model, params, inputs = t5_setup
  ids, mask, dec = inputs
  method = prompt.prompt_tuning(P)
  adapter = {'prompt': random_prompt(2)}
  ours = t5_logits(model, params, inputs, adapter['prompt'])
  prompt_folder.save_prompt(tmp_path / 'ours', model, adapter, method,
                        base_model_name_or_path=str(folder))
  hf = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
  peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / 'ours'))
  with torch.no_grad():
    theirs = peft_model(input_ids=as_torch(ids, torch.long),
                        attention_mask=as_torch(mask, torch.long),
                        decoder_input_ids=as_torch(dec, torch.long)).logits
  assert helpers.max_diff(ours, theirs.numpy()) < 1e-4
  assert helpers.max_diff(ours, t5_logits(model, params, inputs)) > 1e-2

  # PEFT-made (its T5 layout: [2P, H]) -> flaxlora.
  hf = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
  made = peft.get_peft_model(hf, peft.PromptTuningConfig(
      task_type='SEQ_2_SEQ_LM', num_virtual_tokens=P))
  with torch.no_grad():
    made.prompt_encoder['default'].embedding.weight.normal_()
    theirs = made(input_ids=as_torch(ids, torch.long),
                  attention_mask=as_torch(mask, torch.long),
                  decoder_input_ids=as_torch(dec, torch.long)).logits.numpy()
  made.save_pretrained(str(tmp_path / 'peft'))
  loaded_method, loaded = prompt.load(tmp_path / 'peft', model)
  p, kw = loaded_method.apply(params, loaded)
  assert kw['prompt'].shape == (P, 32)
  assert helpers.max_diff(t5_logits(model, p, inputs, kw['prompt']),
                          theirs) < 1e-4


def test_t5_generation_with_prompt_equals_concatenated_embeddings(t5_setup):
  folder, model, params, inputs = t5_setup
  ids, mask, _ = inputs
  p = 10 * random_prompt(3)  # large enough to change greedy choices
  ours = np.asarray(decoding.generate(
      model, params, ids, mask, max_new_tokens=6,
      model_kwargs={'prompt': jnp.asarray(p)}))
  hf = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
  with torch.no_grad():
    embeds = hf.get_input_embeddings()(as_torch(ids, torch.long))
    embeds = torch.cat([as_torch(p)[None].expand(3, -1, -1), embeds], 1)
    full_mask = np.concatenate([np.ones((3, P), np.int32), mask], 1)
    ref = hf.generate(inputs_embeds=embeds,
                      attention_mask=as_torch(full_mask, torch.long),
                      max_new_tokens=6, do_sample=False, num_beams=1,
                      min_length=0).numpy()[:, 1:]
  ref = np.pad(ref, ((0, 0), (0, 6 - ref.shape[1])))
  np.testing.assert_array_equal(ours, ref)
  base = np.asarray(decoding.generate(model, params, ids, mask,
                                      max_new_tokens=6))
  assert not np.array_equal(base, ours)


def test_load_prompt_errors(t5_setup, tmp_path):
  _, model, params, _ = t5_setup
  with pytest.raises(FileNotFoundError, match='adapter_config.json'):
    prompt.load(tmp_path, model)
  method = prompt.prompt_tuning(P)
  prompt_folder.save_prompt(tmp_path / 'a', model, {'prompt': random_prompt(4)},
                        method)
  config_file = tmp_path / 'a' / prompt_folder.CONFIG_FILE
  text = config_file.read_text()
  config_file.write_text(text.replace('"num_virtual_tokens": 4',
                                      '"num_virtual_tokens": 5'))
  with pytest.raises(ValueError, match='prompt_embeddings.*shape'):
    prompt.load(tmp_path / 'a', model)
  config_file.write_text(text.replace('PROMPT_TUNING', 'LORA'))
  with pytest.raises(ValueError, match="'LORA' is not PROMPT_TUNING"):
    prompt.load(tmp_path / 'a', model)


# -------------------------------------------------------------------- BERT ---


def bert_reference(hf, ids, mask, types, p, index=1):
  """transformers BERT on word embeddings with `p` spliced in by hand."""
  with torch.no_grad():
    words = hf.get_input_embeddings()(as_torch(ids, torch.long)).numpy()
  embeds = np.asarray(prompt.insert_prompt(jnp.asarray(words),
                                           jnp.asarray(p), index))
  full_mask = np.asarray(prompt.insert_prompt(
      jnp.asarray(mask), jnp.ones((len(p),), jnp.int32), index))
  full_types = np.asarray(prompt.insert_prompt(
      jnp.asarray(types), jnp.zeros((len(p),), jnp.int32), index))
  with torch.no_grad():
    return hf(inputs_embeds=as_torch(embeds),
              attention_mask=as_torch(full_mask, torch.long),
              token_type_ids=as_torch(full_types, torch.long))


@pytest.mark.parametrize('head', ['classification', 'qa'])
def test_bert_prompt_after_cls_matches_transformers(head, tmp_path):
  folder, hf = helpers.save_tiny_bert(tmp_path, head=head)
  model, params, _ = models.load(folder)
  ids, mask, types = helpers.batch()
  p = random_prompt(5)
  apply = jax.jit(model.apply)
  out = apply({'params': params}, ids, mask, types, prompt=jnp.asarray(p))
  base = apply({'params': params}, ids, mask, types)
  zero = apply({'params': params}, ids, mask, types,
               prompt=jnp.zeros((0, 32)))
  ref = bert_reference(hf, ids, mask, types, p)
  if head == 'classification':
    # The tiny head's logits are ~0.03, so the prompt's effect is judged
    # against the parity error rather than an absolute size.
    error = helpers.max_diff(out, ref.logits.numpy())
    assert error < 1e-5
    assert helpers.max_diff(out, base) > 20 * error
    np.testing.assert_allclose(np.asarray(zero), np.asarray(base), atol=1e-6)
  else:
    # Prompt positions dropped: logits [B, T] index the original tokens.
    for ours, theirs, b, z in zip(out, (ref.start_logits, ref.end_logits),
                                  base, zero):
      assert ours.shape == ids.shape
      theirs = np.asarray(prompt.remove_prompt(theirs.numpy(), P, 1))
      assert helpers.max_diff(ours, theirs) < 1e-4
      assert helpers.max_diff(ours, b) > 1e-3
      np.testing.assert_allclose(np.asarray(z), np.asarray(b), atol=1e-6)


def test_bert_gradients_reach_only_the_prompt(tmp_path):
  folder, _ = helpers.save_tiny_bert(tmp_path, head='classification')
  model, params, _ = models.load(folder)
  ids, mask, types = helpers.batch()
  method = peft_base.chain(prompt.prompt_tuning(P, 'vocab_sample'),
                           trainable.trainable(r'classifier/.*'))
  adapter = method.init(jax.random.PRNGKey(0), params)

  def loss(adapter):
    p, kw = method.apply(params, adapter)
    logits = model.apply({'params': p}, ids, mask, types, **kw)
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

  grads = jax.jit(jax.grad(loss))(adapter)
  assert jax.tree.structure(grads) == jax.tree.structure(adapter)
  assert float(jnp.abs(grads[0]['prompt']).sum()) > 0
  assert float(jnp.abs(grads[1]['classifier']['kernel']).sum()) > 0


def test_bert_peft_folder_round_trips(tmp_path):
  folder, hf = helpers.save_tiny_bert(tmp_path / 'base',
                                      head='classification')
  model, params, _ = models.load(folder)
  method = peft_base.chain(prompt.prompt_tuning(P),
                           trainable.trainable(r'classifier/.*'))
  adapter = method.init(jax.random.PRNGKey(0), params)
  adapter = (adapter[0], jax.tree.map(lambda x: x + 0.5, adapter[1]))
  prompt_folder.save_prompt(tmp_path / 'ours', model, adapter, method)
  peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / 'ours'))
  weight = peft_model.prompt_encoder['default'].embedding.weight
  np.testing.assert_allclose(weight.detach().numpy(),
                             np.asarray(adapter[0]['prompt']), atol=0)
  head = peft_model.base_model.classifier.modules_to_save['default']
  np.testing.assert_allclose(
      head.weight.detach().numpy().T,
      np.asarray(adapter[1]['classifier']['kernel']), atol=0)

  # PEFT-made -> flaxlora: same tensors, same method shape.
  peft_model.save_pretrained(str(tmp_path / 'peft'))
  loaded_method, loaded = prompt.load(tmp_path / 'peft', model)
  np.testing.assert_array_equal(loaded[0]['prompt'], adapter[0]['prompt'])
  np.testing.assert_allclose(loaded[1]['classifier']['bias'],
                             adapter[1]['classifier']['bias'], atol=0)
  p, kw = loaded_method.apply(params, loaded)
  assert p['classifier']['kernel'] is loaded[1]['classifier']['kernel']
  assert kw['prompt'].shape == (P, 32)


# ------------------------------------------------------------------ runner ---


@pytest.mark.parametrize('name, kind, trainable', [
    ('t5_prompt_tuning', 'SEQ_2_SEQ_LM', 8 * 64),
    # prompt + classifier + pooler
    ('bert_sentiment_prompt', 'SEQ_CLS', 8 * 32 + 66 + 1056),
])
def test_runlocal_through_the_trainer(tmp_path, name, kind, trainable):
  config = importlib.import_module(f'configs.{name}').get_config('runlocal')
  config.train.update(steps=4, eval_every=2, log_every=2, checkpoint_every=2)
  config.eval.max_examples = 16
  summary = trainer.train_and_evaluate(config, tmp_path)
  assert summary['step'] == 4
  assert summary['trainable_params'] == trainable  # prompt (+ head) only
  peft_config = json.loads(
      (tmp_path / 'peft' / prompt_folder.CONFIG_FILE).read_text())
  assert (peft_config['peft_type'], peft_config['task_type']) == (
      'PROMPT_TUNING', kind)
