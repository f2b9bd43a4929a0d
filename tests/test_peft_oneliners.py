"""Exported PEFT folders load with PEFT's one-liners (issue #20).

`peft.AutoPeftModelFor*.from_pretrained(folder)` reads the base from
adapter_config.json's `base_model_name_or_path` and picks the head from
`task_type`; these tests write tiny random bases with `models.save`, export
LoRA and prompt tuning folders that point at them, load them with the
one-liner (offline) and compare logits with flaxlora's. They also pin the
compact `target_modules` / `modules_to_save` names against PEFT's own
matcher, and the base reference resolution.
"""
import json
import os
from typing import Callable, NamedTuple

import jax
import numpy as np
import pytest

import helpers
from flaxlora import models
from flaxlora.peft import base as peft_base
from flaxlora.peft import hf_folder
from flaxlora.peft import lora
from flaxlora.peft import method_parts
from flaxlora.peft import peft_names
from flaxlora.peft import prompt
from flaxlora.peft import trainable
from flaxlora.peft.lora import folder as lora_folder
from flaxlora.peft.prompt import folder as prompt_folder

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
transformers = pytest.importorskip('transformers')
tuners_utils = pytest.importorskip('peft.tuners.tuners_utils')

TINY_T5 = dict(model_type='t5', vocab_size=64, d_model=32, d_kv=8, d_ff=48,
               num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, decoder_start_token_id=0)
# The SST-2 run's targets: every dense kernel of the encoder (local_data).
ALL_KERNELS = (r'.*/(attention/(query|key|value|output)|'
               r'mlp/(intermediate|output))/kernel')
P = 3


def _save_base(folder, family, **head):
  """A random flaxlora model saved as a transformers folder."""
  if family == 't5':
    config = models.FAMILIES['t5'].config_from_hf(TINY_T5)
  else:
    config = models.FAMILIES['bert'].config_from_hf(
        dict(helpers.TINY_BERT, model_type='bert'))
  model = models.FAMILIES[family].build(config, **head)
  params = models.FAMILIES[family].init(model, jax.random.PRNGKey(0))
  params = _perturb(params, seed=2, scale=0.05)  # non-zero biases, norms
  models.save(folder, model, params)
  return model, params


def _perturb(tree, seed=1, scale=0.2):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _t5_inputs():
  rng = np.random.RandomState(0)
  ids = rng.randint(2, 64, (2, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  return ids, mask, rng.randint(2, 64, (2, 4)).astype(np.int32)


def _inputs(model):
  """T5: ids, mask [B, S], decoder ids [B, T]; BERT: ids, mask, types."""
  if not hasattr(model, 'head'):
    return _t5_inputs()
  ids, mask, types = helpers.batch()
  if model.head == 'qa':
    # PEFT 0.21's PeftModelForQuestionAnswering.forward drops
    # token_type_ids (LoRA path), so both sides use segment 0 here.
    types = np.zeros_like(types)
  return ids, mask, types


def _flax_logits(model, params, **kw):
  """T5: [B, T, V]; BERT classification: [B, C]; BERT QA: [2, B, T]."""
  out = jax.jit(model.apply)({'params': params}, *_inputs(model), **kw)
  return np.asarray(out)


def _torch_logits(hf, model):
  """The torch model's logits on `model`'s inputs, shaped as flaxlora's."""
  inputs = [torch.tensor(a, dtype=torch.long) for a in _inputs(model)]
  with torch.no_grad():
    if not hasattr(model, 'head'):
      return hf(input_ids=inputs[0], attention_mask=inputs[1],
                decoder_input_ids=inputs[2]).logits.numpy()
    out = hf(input_ids=inputs[0], attention_mask=inputs[1],
             token_type_ids=inputs[2])
  if model.head == 'qa':
    return np.stack([out.start_logits.numpy(), out.end_logits.numpy()])
  return out.logits.numpy()


class Case(NamedTuple):
  family: str
  head: dict
  make: Callable[[], peft_base.PeftMethod]
  auto: str                 # the peft.AutoPeftModelFor* one-liner
  targets: list[str]        # target_modules expected in the folder
  to_save: list[str] | None  # modules_to_save expected
  base_ref: str             # how the run names its base (see _base_ref)


CASES = {
    't5_seq2seq': Case(
        't5', {}, lambda: lora.lora(
            rank=2, targets=r'.*attention/(q|k|v|o)/kernel'),  # + cross
        'AutoPeftModelForSeq2SeqLM', ['k', 'o', 'q', 'v'], None, 'pkg'),
    'bert_sst2_setup': Case(
        'bert', {'head': 'classification', 'num_labels': 3},
        lambda: peft_base.chain(lora.lora(rank=2, targets=ALL_KERNELS),
                                trainable.trainable(r'(classifier|pooler)/.*')),
        'AutoPeftModelForSequenceClassification',
        ['dense', 'key', 'query', 'value'], ['classifier', 'pooler'],
        'folder'),
    'bert_qa': Case(
        'bert', {'head': 'qa'}, lambda: peft_base.chain(
            lora.lora(rank=2, targets='bert'),
            trainable.trainable(r'qa_outputs/.*')),
        'AutoPeftModelForQuestionAnswering', ['query', 'value'],
        ['qa_outputs'], 'relative'),
}


def _base_ref(how, tmp_path, monkeypatch):
  """(folder to save the base in, what the run passes to save_peft).

  'folder': an absolute folder; 'pkg': the run's model.path
  'pkg:package/base', passed as is; 'relative': a relative model.path
  through `base_model_reference` (the loader later runs elsewhere).
  """
  if how == 'folder':
    return tmp_path / 'base', str(tmp_path / 'base')
  if how == 'pkg':
    name = f'i20_pkg_{tmp_path.name}'.replace('-', '_')
    (tmp_path / 'site' / name).mkdir(parents=True)
    (tmp_path / 'site' / name / '__init__.py').write_text('')
    monkeypatch.syspath_prepend(str(tmp_path / 'site'))
    return tmp_path / 'site' / name / 'base', f'pkg:{name}/base'
  monkeypatch.chdir(tmp_path)
  return tmp_path / 'base', lambda: peft_names.base_model_reference('base')


@pytest.mark.parametrize('case', sorted(CASES))
def test_lora_folder_loads_with_the_one_liner(case, tmp_path, monkeypatch):
  c = CASES[case]
  base_folder, ref = _base_ref(c.base_ref, tmp_path, monkeypatch)
  model, base = _save_base(base_folder, c.family, **c.head)
  method = c.make()
  adapter = _perturb(method.init(jax.random.PRNGKey(0), base))
  params, _ = method.apply(base, adapter)
  ours = _flax_logits(model, params)
  folder = lora_folder.save_peft(tmp_path / 'adapter', model, base, adapter,
                             method, base_model_name_or_path=(
                                 ref() if callable(ref) else ref))
  config = json.loads((folder / hf_folder.CONFIG_FILE).read_text())
  assert config['base_model_name_or_path'] == str(base_folder.resolve())
  assert config['target_modules'] == c.targets
  assert config['modules_to_save'] == c.to_save

  monkeypatch.chdir(tmp_path / 'adapter')  # a relative path would break
  peft_model = getattr(peft, c.auto).from_pretrained(str(folder)).eval()
  theirs = _torch_logits(peft_model, model)
  assert helpers.max_diff(ours, theirs) < 1e-4
  assert helpers.max_diff(ours, _flax_logits(model, base)) > 1e-2
  # PEFT put LoRA on exactly the modules flaxlora adapted, no more.
  ours_modules = _lora_modules(model, base, method, adapter)
  assert set(peft_model.base_model.targeted_module_names) == ours_modules
  assert len(c.targets) < len(ours_modules)

  # The compact folder reads back into flaxlora with the same logits.
  method2, adapter2 = lora.load(folder, model, base)
  params2, _ = method2.apply(base, adapter2)
  assert helpers.max_diff(_flax_logits(model, params2), ours) < 1e-5


def _lora_modules(model, base, method, adapter):
  """Torch names of the modules the method's LoRA part adapts."""
  rules = {'/'.join(r.path): r
           for r in models.family_of_model(model).hf_rules(model)}
  config, sub = next((c, s) for c, s in method_parts.parts(method, adapter)
                     if isinstance(c, lora.LoraConfig))
  return {rules[p].key[:-len('.weight')]
          for p in lora.kernels(config, base, sub)}


def test_t5_prompt_folder_loads_with_the_one_liner(tmp_path, monkeypatch):
  base_folder, ref = _base_ref('pkg', tmp_path, monkeypatch)
  model, base = _save_base(base_folder, 't5')
  method = prompt.prompt_tuning(P)
  adapter = {'prompt': np.asarray(
      jax.random.normal(jax.random.PRNGKey(3), (P, 32)))}
  ours = _flax_logits(model, base, prompt=adapter['prompt'])
  folder = prompt_folder.save_prompt(tmp_path / 'prompt', model, adapter,
                                 method, base_model_name_or_path=ref)
  config = json.loads((folder / prompt_folder.CONFIG_FILE).read_text())
  assert config['base_model_name_or_path'] == str(base_folder.resolve())
  assert config['task_type'] == 'SEQ_2_SEQ_LM'
  peft_model = peft.AutoPeftModelForSeq2SeqLM.from_pretrained(
      str(folder)).eval()
  assert helpers.max_diff(ours, _torch_logits(peft_model, model)) < 1e-4
  assert helpers.max_diff(ours, _flax_logits(model, base)) > 1e-2


def test_bert_prompt_folder_loads_with_the_one_liner(tmp_path):
  # PEFT places a BERT prompt before [CLS] (flaxlora after), so logits
  # differ by design; the one-liner must still load the right tensors.
  model, base = _save_base(tmp_path / 'base', 'bert',
                           head='classification', num_labels=3)
  method = peft_base.chain(prompt.prompt_tuning(P),
                           trainable.trainable(r'(classifier|pooler)/.*'))
  adapter = _perturb(method.init(jax.random.PRNGKey(0), base))
  folder = prompt_folder.save_prompt(
      tmp_path / 'prompt', model, adapter, method,
      base_model_name_or_path=str(tmp_path / 'base'))
  config = json.loads((folder / prompt_folder.CONFIG_FILE).read_text())
  assert config['modules_to_save'] == ['classifier', 'pooler']
  peft_model = peft.AutoPeftModelForSequenceClassification.from_pretrained(
      str(folder))
  np.testing.assert_array_equal(
      peft_model.prompt_encoder['default'].embedding.weight.detach().numpy(),
      np.asarray(adapter[0]['prompt']))
  inner = peft_model.base_model
  for module, path in ((inner.classifier, 'classifier'),
                       (inner.bert.pooler, 'pooler')):
    saved = module.modules_to_save['default']
    linear = saved if path == 'classifier' else saved.dense
    np.testing.assert_allclose(linear.weight.detach().numpy().T,
                               np.asarray(adapter[1][path]['kernel']),
                               atol=1e-6)
    assert helpers.max_diff(linear.weight.detach().numpy().T,
                            base[path]['kernel']) > 1e-2


def test_base_model_reference(tmp_path, monkeypatch):
  package = tmp_path / 'site' / 'i20_tiny_pkg'
  (package / 'model').mkdir(parents=True)
  (package / '__init__.py').write_text('')
  monkeypatch.syspath_prepend(str(tmp_path / 'site'))
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'local').mkdir()

  ref = peft_names.base_model_reference
  assert ref('pkg:i20_tiny_pkg/model') == str((package / 'model').resolve())
  assert os.path.isabs(ref('pkg:i20_tiny_pkg/model'))
  assert ref('local') == str((tmp_path / 'local').resolve())
  assert ref('./local/') == str((tmp_path / 'local').resolve())
  assert ref('google-bert/bert-base-uncased') == 'google-bert/bert-base-uncased'
  assert ref('') is None
  with pytest.raises(ValueError, match='pip install no-such-pkg-i20'):
    ref('pkg:no_such_pkg_i20/model')
  with pytest.raises(ValueError, match='does not exist'):
    ref('pkg:i20_tiny_pkg/missing')
  # save_* never write the private scheme, even when handed it.
  assert peft_names.resolve_pkg('pkg:i20_tiny_pkg/model') == ref(
      'pkg:i20_tiny_pkg/model')
  assert peft_names.resolve_pkg('me/published') == 'me/published'
  assert peft_names.resolve_pkg(None) is None


def _bert_keys(layers=2):
  """Parameter names of a tiny BertForSequenceClassification."""
  return [k for k, _ in helpers.tiny_bert_torch(
      'classification', num_hidden_layers=layers).named_parameters()]


def _peft_selects(target_modules, keys, modules_to_save=None):
  """The modules PEFT's own matcher puts LoRA on (a reference)."""
  config = peft.LoraConfig(target_modules=target_modules,
                           modules_to_save=modules_to_save)
  names = peft_names._module_names(keys)  # pylint: disable=protected-access
  return {n for n in names if tuners_utils.check_target_module_exists(
      config, n) is True}


def _linear(keys, pattern):
  return sorted({k[:-len('.weight')] for k in keys
                 if k.endswith('.weight') and 'LayerNorm' not in k
                 and 'embeddings' not in k and pattern(k)})


def test_compact_target_modules_are_compact_and_exact():
  keys = _bert_keys()
  encoder = _linear(keys, lambda k: '.encoder.' in k)
  assert len(encoder) == 12
  # The SST-2 case: with the pooler saved whole, 'dense' is safe (PEFT
  # skips modules to save); the old writer gave the 12 full names here.
  to_save = peft_names.compact_modules_to_save(
      ['bert.pooler.dense', 'classifier'], keys)
  assert to_save == ['classifier', 'pooler']
  short = peft_names.compact_target_modules(encoder, keys, to_save)
  assert short == ['dense', 'key', 'query', 'value']
  assert _peft_selects(short, keys, to_save) == set(encoder)
  # Without the pooler saved, 'dense' would over-select it: longer suffixes.
  longer = peft_names.compact_target_modules(encoder, keys)
  assert longer == ['intermediate.dense', 'key', 'output.dense', 'query',
                    'value']
  assert _peft_selects(longer, keys) == set(encoder)
  assert _peft_selects(['dense', 'key', 'query', 'value'], keys) != set(
      encoder)


def test_compact_target_modules_fall_back_to_full_names():
  t5 = models.FAMILIES['t5']
  model = t5.build(t5.config_from_hf(TINY_T5))
  keys = [r.key for r in t5.hf_rules(model)]
  only = ['encoder.block.0.layer.0.SelfAttention.q']  # not the decoder's
  assert peft_names.compact_target_modules(only, keys) == only
  assert _peft_selects(only, keys) == set(only)
  assert _peft_selects(['q'], keys) != set(only)
  # One layer of BERT: the shortest exact suffix, not 'query'.
  keys = _bert_keys()
  one = ['bert.encoder.layer.1.attention.self.query']
  assert peft_names.compact_target_modules(one, keys) == [
      '1.attention.self.query']
  assert _peft_selects(['1.attention.self.query'], keys) == set(one)


def test_lora_on_a_saved_module_is_refused():
  keys = _bert_keys()
  with pytest.raises(ValueError, match='classifier has LoRA and is also'):
    peft_names.compact_target_modules(['classifier'], keys, ['classifier'])


def test_compact_modules_to_save_stay_exact():
  keys = _bert_keys()
  norm = ['bert.encoder.layer.0.output.LayerNorm']
  # 'LayerNorm' or 'output.LayerNorm' would also wrap other layers' norms.
  assert peft_names.compact_modules_to_save(norm, keys) == ['0.output.LayerNorm']
  assert peft_names.compact_modules_to_save([], keys) is None
  # A kernel-only trainable pooler is still saved whole as 'pooler'.
  assert peft_names.compact_modules_to_save(['bert.pooler.dense'], keys) == [
      'pooler']
