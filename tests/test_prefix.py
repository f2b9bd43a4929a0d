"""Prefix tuning against torch + PEFT 0.21 on tiny random T5 and BERT.

PEFT folders go both ways (flaxlora -> PeftModel, PEFT -> load_prefix) with
the same logits, the MLP reparameterisation equals PEFT's PrefixEncoder, T5
generation with a prefix is the same with and without the key/value cache,
and every check also asserts that the prefix changes the output.

PEFT 0.21.2's BERT forward refuses prefix tuning under transformers 5 (it
looks for a `past_key_values` argument, which transformers 5 renamed
`cache`), so the BERT reference runs what that forward would: PEFT's own
`get_prompt` cache through the transformers BERT with the mask extended by
P ones, then its classifier.
"""
import jax
import numpy as np
import pytest

import helpers
from configs import bert_sentiment_lora
from flaxlora import build
from flaxlora import models
from flaxlora import trainer
from flaxlora import workdir as workdir_lib
from flaxlora.models import decoding
from flaxlora.peft import base as peft_base
from flaxlora.peft import prefix
from flaxlora.peft import trainable
from flaxlora.peft.prompt import folder as prompt_folder

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
transformers = pytest.importorskip('transformers')

@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  t5_folder = helpers.save_tiny_t5(tmp_path_factory.mktemp('t5'),
                                  num_layers=3)
  bert_folder, _ = helpers.save_tiny_bert(tmp_path_factory.mktemp('bert'),
                                          head='classification')
  return {'t5': t5_folder, 'bert': bert_folder}


_LOADED, _JITTED = {}, {}


def _load(folder):
  if folder not in _LOADED:
    _LOADED[folder] = models.load(folder)[:2]
  return _LOADED[folder]


def _inputs(family):
  if family == 'bert':
    return helpers.batch()
  return helpers.t5_batch()


def _ours(model, params, family, kwargs=None):
  fn = _JITTED.setdefault(model, jax.jit(
      lambda p, kw, *inputs: model.apply({'params': p}, *inputs, **kw)))
  return np.asarray(fn(params, kwargs or {}, *_inputs(family)))


def _hf(folder, family):
  cls = (transformers.T5ForConditionalGeneration if family == 't5' else
         transformers.BertForSequenceClassification)
  return cls.from_pretrained(str(folder)).eval()


def _theirs(peft_model, family):
  """PEFT's logits for `_inputs(family)` (see the module docstring)."""
  with torch.no_grad():
    if family == 't5':
      ids, mask, dec = (torch.tensor(a, dtype=torch.long)
                        for a in _inputs(family))
      return peft_model(input_ids=ids, attention_mask=mask,
                        decoder_input_ids=dec).logits.numpy()
    ids, mask, types = (torch.tensor(a, dtype=torch.long)
                        for a in _inputs(family))
    return helpers.peft_bert_prefix_logits(peft_model, ids, mask, types)


def _perturb(tree, seed=1):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


CASES = {
    't5': ('t5', lambda: prefix.prefix_tuning(num_tokens=3)),
    'bert_projection_head': ('bert', lambda: peft_base.chain(
        prefix.prefix_tuning(num_tokens=4, projection=True, hidden=16),
        trainable.trainable(r'classifier/.*'))),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_flaxlora_prefix_loads_in_peft(case, folders, tmp_path):
  family, make = CASES[case]
  model, base = _load(folders[family])
  method = make()
  adapter = _perturb(method.init(jax.random.PRNGKey(0), base))
  params, kwargs = method.apply(base, adapter)
  ours = _ours(model, params, family, kwargs)
  method.export.write(tmp_path / 'a', model, None, adapter, method,
                      base_model_name_or_path=None)  # the run's export hook
  peft_model = peft.PeftModel.from_pretrained(_hf(folders[family], family),
                                              str(tmp_path / 'a')).eval()
  theirs = _theirs(peft_model, family)
  assert helpers.max_diff(ours, theirs) < 1e-4
  assert helpers.max_diff(theirs, _ours(model, params, family)) > 1e-2
  method2, adapter2 = prefix.load(tmp_path / 'a', model)
  params2, kwargs2 = method2.apply(base, adapter2)
  assert helpers.max_diff(_ours(model, params2, family, kwargs2), ours) < 1e-5


@pytest.mark.parametrize('family', ['t5', 'bert'])
def test_peft_made_prefix_loads_into_flaxlora(family, folders, tmp_path):
  task = 'SEQ_2_SEQ_LM' if family == 't5' else 'SEQ_CLS'
  torch.manual_seed(2)
  peft_model = peft.get_peft_model(_hf(folders[family], family),
                                   peft.PrefixTuningConfig(
                                       task_type=task, num_virtual_tokens=5,
                                       prefix_projection=family == 't5'))
  peft_model.eval()
  peft_model.save_pretrained(str(tmp_path / 'p'))
  theirs = _theirs(peft_model, family)
  model, base = _load(folders[family])
  method, adapter = prefix.load(tmp_path / 'p', model)
  params, kwargs = method.apply(base, adapter)
  ours = _ours(model, params, family, kwargs)
  assert helpers.max_diff(ours, theirs) < 1e-4
  # The random BERT's classifier (std 0.02) gives logits near 0.03: the
  # prefix moves them by over ten times the parity tolerance.
  assert helpers.max_diff(ours, _ours(model, base, family)) > 1e-3


def test_projection_is_peft_prefix_encoder(folders):
  _, base = _load(folders['bert'])
  method = prefix.prefix_tuning(num_tokens=4, projection=True, hidden=16)
  adapter = _perturb(method.init(jax.random.PRNGKey(0), base))
  config = peft.PrefixTuningConfig(
      task_type='SEQ_CLS', num_virtual_tokens=4, token_dim=32, num_layers=2,
      num_attention_heads=4, encoder_hidden_size=16, prefix_projection=True)
  encoder = peft.tuners.prefix_tuning.PrefixEncoder(config)
  as_torch = lambda x: torch.tensor(np.asarray(x))
  with torch.no_grad():
    encoder.embedding.weight.copy_(as_torch(adapter['embedding']))
    encoder.transform[0].weight.copy_(as_torch(adapter['w1']).T)
    encoder.transform[0].bias.copy_(as_torch(adapter['b1']))
    encoder.transform[2].weight.copy_(as_torch(adapter['w2']).T)
    encoder.transform[2].bias.copy_(as_torch(adapter['b2']))
    theirs = encoder(torch.arange(4)[None])[0].numpy()
  ours = prefix.table(method.config, adapter)
  assert ours.shape == (4, 2 * 2 * 32)
  assert helpers.max_diff(ours, theirs) < 1e-5
  zero = prefix.prefix_tuning(num_tokens=4, projection=True, init='zero')
  assert not np.any(prefix.table(zero.config, zero.init(
      jax.random.PRNGKey(0), base)))


def test_t5_generates_with_a_cached_prefix(folders):
  model, base = _load(folders['t5'])
  method = prefix.prefix_tuning(num_tokens=3)
  adapter = method.init(jax.random.PRNGKey(0), base)
  params, kwargs = method.apply(base, adapter)
  assert sorted(kwargs['prefix_kv']) == ['decoder']
  ids, mask, _ = _inputs('t5')
  run = lambda p, kw, cache: np.asarray(decoding.generate(
      model, p, ids, mask, max_new_tokens=5, model_kwargs=kw,
      use_cache=cache))
  cached = run(params, kwargs, True)
  np.testing.assert_array_equal(cached, run(params, kwargs, False))
  assert np.any(cached != run(base, {}, True))


def test_prefix_trains_from_a_config(tmp_path):
  config = bert_sentiment_lora.get_config('runlocal')
  config.peft.method = 'prefix_tuning'
  config = build.settle_peft(config, {'peft.method'})  # LoRA's fields go
  config.train.update(eval_every=0, checkpoint_every=0)
  config.optimizer.update(lr=1e-2, warmup_steps=0)
  trainer.train_and_evaluate(config, tmp_path)
  loss = [r['loss'] for r in workdir_lib.read_metrics(tmp_path)
          if r['split'] == 'train']
  assert loss[-1] < loss[0]
  peft_dir = tmp_path / workdir_lib.PEFT_DIR
  table = prompt_folder.read_folder(peft_dir)[1]['prompt_embeddings']
  assert table.shape == (20, 2 * 2 * 32)  # PEFT's default P, 2 x L x H
