"""PEFT folder round trips against torch + peft on tiny random T5 and BERT.

flaxlora adapter -> save_peft -> peft.PeftModel gives flaxlora's logits;
a PEFT-made adapter -> load_peft gives PEFT's logits; save_merged loads in
transformers with the same logits. Every check also asserts that the adapter
changes the logits.
"""
import json

import jax
import numpy as np
import pytest

import helpers
from flaxlora import models
from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft import trainable
from flaxlora.peft.lora import folder as lora_folder

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
transformers = pytest.importorskip('transformers')

TINY_T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
               num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, decoder_start_token_id=0)


@pytest.fixture(scope='module')
def t5_folder(tmp_path_factory):
  torch.manual_seed(0)
  hf = transformers.T5ForConditionalGeneration(
      transformers.T5Config(**TINY_T5)).eval()
  folder = tmp_path_factory.mktemp('t5')
  hf.save_pretrained(str(folder), safe_serialization=True)
  return folder


@pytest.fixture(scope='module')
def bert_folder(tmp_path_factory):
  folder, _ = helpers.save_tiny_bert(tmp_path_factory.mktemp('bert'),
                                     head='classification')
  return folder


def _t5_inputs():
  rng = np.random.RandomState(0)
  ids = rng.randint(2, 64, (2, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  return ids, mask, rng.randint(2, 64, (2, 4)).astype(np.int32)


def _torch_logits(hf, family):
  with torch.no_grad():
    if family == 't5':
      ids, mask, dec = (torch.tensor(a, dtype=torch.long)
                        for a in _t5_inputs())
      return hf(input_ids=ids, attention_mask=mask,
                decoder_input_ids=dec).logits.numpy()
    ids, mask, types = helpers.batch()
    return helpers.torch_outputs(hf, ids, mask, types)['logits']


_JITTED = {}


def _flax_logits(model, params, family):
  # One compiled forward per model (eager op-by-op dispatch is slower).
  fn = _JITTED.setdefault(model, jax.jit(
      lambda p, *inputs: model.apply({'params': p}, *inputs)))
  inputs = _t5_inputs() if family == 't5' else helpers.batch()
  return np.asarray(fn(params, *inputs))


_LOADED = {}


def _load(folder):
  """models.load, once per folder (its init compiles)."""
  if folder not in _LOADED:
    _LOADED[folder] = models.load(folder)
  return _LOADED[folder]


def _hf(folder, family):
  cls = (transformers.T5ForConditionalGeneration if family == 't5' else
         transformers.BertForSequenceClassification)
  return cls.from_pretrained(str(folder)).eval()


def _perturb(adapter, seed=1):
  leaves, tree = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


CASES = {
    't5_rslora_patterns': ('t5', lambda: lora.lora(
        rank=4, alpha=8, targets='t5', use_rslora=True,
        rank_pattern={r'decoder/block_1/.*': 2},
        alpha_pattern={r'encoder/block_0/attention/v/kernel': 3.0})),
    't5_dora_mlp': ('t5', lambda: lora.lora(
        rank=4, targets=r'.*/(q|mlp/wo)/kernel', use_dora=True)),
    'bert_head': ('bert', lambda: peft_base.chain(
        lora.lora(rank=4, targets='bert'),
        trainable.trainable(r'classifier/.*'))),
    'bert_dora_kernel_only_head': ('bert', lambda: peft_base.chain(
        lora.lora(rank=2, alpha=4, targets='bert', use_dora=True),
        trainable.trainable(r'classifier/kernel'))),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_flaxlora_adapter_loads_in_peft(case, t5_folder, bert_folder,
                                        tmp_path):
  family, make = CASES[case]
  folder = t5_folder if family == 't5' else bert_folder
  model, base, _ = _load(folder)
  method = make()
  adapter = _perturb(method.init(jax.random.PRNGKey(0), base))
  params, _ = method.apply(base, adapter)
  ours = _flax_logits(model, params, family)
  lora_folder.save_peft(tmp_path / 'adapter', model, base, adapter, method)
  peft_model = peft.PeftModel.from_pretrained(_hf(folder, family),
                                              str(tmp_path / 'adapter'))
  theirs = _torch_logits(peft_model.eval(), family)
  base_logits = _torch_logits(_hf(folder, family), family)
  assert helpers.max_diff(ours, theirs) < 1e-4
  assert helpers.max_diff(base_logits, theirs) > 1e-2
  # ...and it reads back into the same method and adapter.
  method2, adapter2 = lora.load(tmp_path / 'adapter', model, base)
  params2, _ = method2.apply(base, adapter2)
  assert helpers.max_diff(_flax_logits(model, params2, family), ours) < 1e-5


def test_t5_config_uses_peft_short_names(t5_folder, tmp_path):
  model, base, _ = _load(t5_folder)
  method = lora.lora(rank=2, targets='t5')
  adapter = method.init(jax.random.PRNGKey(0), base)
  lora_folder.save_peft(tmp_path / 'a', model, base, adapter, method,
                    base_model_name_or_path='tiny-t5')
  config = json.loads((tmp_path / 'a' / 'adapter_config.json').read_text())
  assert config['target_modules'] == ['q', 'v']
  assert config['task_type'] == 'SEQ_2_SEQ_LM' and config['r'] == 2
  assert config['base_model_name_or_path'] == 'tiny-t5'


def _peft_made(folder, family, out, **lora_kwargs):
  torch.manual_seed(3)
  peft_model = peft.get_peft_model(_hf(folder, family),
                                   peft.LoraConfig(**lora_kwargs))
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if 'lora_' in name or 'modules_to_save' in name:
        p.add_(0.2 * torch.randn_like(p))  # non-zero lora_B, moved heads
  peft_model.save_pretrained(str(out))
  return _torch_logits(peft_model.eval(), family)


@pytest.mark.parametrize('family,kwargs', [
    ('t5', dict(r=4, lora_alpha=8, target_modules=['q', 'v', 'wo'],
                use_dora=True,
                rank_pattern={'decoder.block.1.layer.0.SelfAttention.q': 2},
                alpha_pattern={'wo': 4})),
    ('bert', dict(r=4, lora_alpha=16, target_modules=['query', 'value'],
                  use_rslora=True, task_type='SEQ_CLS')),
])
def test_peft_made_adapter_loads_in_flaxlora(family, kwargs, t5_folder,
                                             bert_folder, tmp_path):
  folder = t5_folder if family == 't5' else bert_folder
  theirs = _peft_made(folder, family, tmp_path / 'peft', **kwargs)
  model, base, _ = _load(folder)
  method, adapter = lora.load(tmp_path / 'peft', model, base)
  params, _ = method.apply(base, adapter)
  ours = _flax_logits(model, params, family)
  assert helpers.max_diff(ours, theirs) < 1e-4
  assert helpers.max_diff(ours, _flax_logits(model, base, family)) > 1e-2
  # save_merged: a plain checkpoint transformers loads, same logits.
  lora_folder.save_merged(tmp_path / 'merged', model, base, adapter, method)
  merged = _torch_logits(_hf(tmp_path / 'merged', family), family)
  assert helpers.max_diff(merged, theirs) < 1e-4


def test_load_errors_name_the_problem(bert_folder, tmp_path):
  model, base, _ = _load(bert_folder)
  _peft_made(bert_folder, 'bert', tmp_path / 'ok', r=2,
             target_modules=['query'])
  config_file = tmp_path / 'ok' / 'adapter_config.json'
  config = json.loads(config_file.read_text())
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'adapter_model.safetensors').write_bytes(
      (tmp_path / 'ok' / 'adapter_model.safetensors').read_bytes())
  for change, match in (({'peft_type': 'PROMPT_TUNING'}, 'PROMPT_TUNING'),
                        ({'fancy_new_knob': 1}, 'unknown field'),
                        ({'bias': 'all'}, 'bias'),
                        ({'init_lora_weights': 'pissa'}, 'PiSSA'),
                        ({'r': 3}, 'rank 2')):
    (bad / 'adapter_config.json').write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=match):
      lora.load(bad, model, base)
  wider, _ = helpers.save_tiny_bert(tmp_path / 'wide', head='classification',
                                    hidden_size=48)
  wide_model, wide_base, _ = models.load(wider)
  with pytest.raises(ValueError, match=r'lora_A\.weight.*another base'):
    lora.load(tmp_path / 'ok', wide_model, wide_base)


def test_save_errors(bert_folder, tmp_path):
  model, base, _ = _load(bert_folder)
  method = lora.lora(rank=2, targets='bert', init='pissa')
  adapter = method.init(jax.random.PRNGKey(0), base)
  with pytest.raises(ValueError, match='rank 2R over the original base'):
    lora_folder.save_peft(tmp_path / 'p', model, base, adapter, method)
  method = lora.lora(rank=2, targets=r'pooler/kernel|.*query/kernel')
  adapter = method.init(jax.random.PRNGKey(0), base)
  lora_folder.save_peft(tmp_path / 'q', model, base, adapter, method)
  config = json.loads((tmp_path / 'q' / 'adapter_config.json').read_text())
  # 'dense' would also select the encoder's dense layers.
  assert config['target_modules'] == ['pooler.dense', 'query']
