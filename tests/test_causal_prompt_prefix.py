"""Prompt and prefix tuning on the causal families against torch + PEFT 0.21.

A tiny random transformers Llama (grouped-query attention: 4 query heads,
2 key/value heads) and GPT-2 are saved and loaded by flaxlora. PEFT folders
(task_type CAUSAL_LM) go both ways with the same logits, including
left-padded rows, and greedy decoding with the key/value cache gives PEFT's
tokens; every check also asserts that the adapter changes the output.

References: PEFT numbers a soft prompt's rows 0..P+T-1 whatever the padding
(it ignores position_ids for prompt tuning), so prompt logits are compared
on unpadded rows; for the prefix, PEFT offsets the given position_ids by P,
as flaxlora does, so padded rows are compared too. PEFT 0.21's `generate`
with prompt learning disagrees with its own forward under transformers 5,
so the decoding reference is a greedy loop over PEFT's forward, one row at
a time without padding.
"""
import json

import jax
import numpy as np
import pytest
import torch

import helpers
from test_causal_peft import HF  # the tiny transformers models
from flaxlora import models
from flaxlora.models import causal_decoding
from flaxlora.peft import prefix
from flaxlora.peft import prompt

peft = pytest.importorskip('peft')

# kind -> (flaxlora module, flaxlora factory, PEFT config)
KINDS = {
    'prompt': (prompt, lambda: prompt.prompt_tuning(num_tokens=3),
               lambda: peft.PromptTuningConfig(task_type='CAUSAL_LM',
                                               num_virtual_tokens=3)),
    'prefix': (prefix, lambda: prefix.prefix_tuning(num_tokens=3),
               lambda: peft.PrefixTuningConfig(task_type='CAUSAL_LM',
                                               num_virtual_tokens=3)),
}
CASES = [(f, k) for f in sorted(HF) for k in sorted(KINDS)]
# The default suite takes each family and each kind once a test (the
# llama prefix: grouped key/value heads); the slow run the rest.
LOAD_CASES = helpers.default_or_slow(CASES, [('llama', 'prompt'),
                                             ('gpt2', 'prefix')])
EXPORT_CASES = helpers.default_or_slow(CASES, [('llama', 'prefix'),
                                               ('gpt2', 'prompt')])
IDS = np.random.RandomState(0).randint(1, 61, (3, 7))
MASK = np.ones_like(IDS)
MASK[1, :2] = 0  # left padding
MASK[2, :4] = 0
NEW_TOKENS = 4


@pytest.fixture(scope='module')
def bases(tmp_path_factory):
  """{family: (folder, flaxlora model, base params)}."""
  out = {}
  for family, (cls, config) in HF.items():
    folder = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    cls(config).eval().save_pretrained(str(folder))
    out[family] = (folder,) + tuple(models.load(folder)[:2])
  return out


def _torch(model, ids, mask, kind):
  """PEFT's logits [B, T, V] of the tokens (see the module docstring)."""
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  extra = {} if kind == 'prompt' else {
      'position_ids': torch.tensor(positions).long()}
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(ids).long(),
                   attention_mask=torch.tensor(mask).long(), **extra).logits
  return logits.numpy()[:, -ids.shape[1]:]


def _ours(model, params, kwargs):
  return np.asarray(model.apply({'params': params}, IDS, MASK, **kwargs))


def _compared(kind):
  """[B, T] bool: the positions whose logits both frameworks define alike."""
  rows = MASK.all(axis=1, keepdims=True) if kind == 'prompt' else True
  return (MASK == 1) & rows


def _torch_greedy(model, row):
  """NEW_TOKENS greedy tokens of PEFT's forward, one unpadded row."""
  ids = row[None]
  for _ in range(NEW_TOKENS):
    with torch.no_grad():
      logits = model(input_ids=torch.tensor(ids).long(),
                     attention_mask=torch.ones(ids.shape).long()).logits
    ids = np.concatenate([ids, logits[:, -1].argmax(-1).numpy()[:, None]], 1)
  return ids[0, row.shape[0]:]


@pytest.mark.parametrize('family,kind', LOAD_CASES)
def test_peft_made_adapter_gives_peft_logits_and_tokens(family, kind, bases,
                                                        tmp_path):
  folder, model, base = bases[family]
  module, _, peft_config = KINDS[kind]
  torch.manual_seed(1)
  theirs = peft.get_peft_model(HF[family][0].from_pretrained(str(folder)),
                               peft_config()).eval()
  theirs.save_pretrained(str(tmp_path / 'p'))
  method, adapter = module.load(tmp_path / 'p', model)
  params, kwargs = method.apply(base, adapter)
  ours = _ours(model, params, kwargs)
  keep = _compared(kind)
  assert helpers.max_diff(ours[keep], _torch(theirs, IDS, MASK, kind)[
      keep]) < 1e-4
  assert helpers.max_diff(ours, _ours(model, base, {})) > 1e-3
  tokens = np.asarray(causal_decoding.generate(
      model, params, IDS, MASK, max_new_tokens=NEW_TOKENS, eos_token_id=0,
      model_kwargs=kwargs))
  for i, row in enumerate(IDS):
    np.testing.assert_array_equal(tokens[i],
                                  _torch_greedy(theirs, row[MASK[i] == 1]))


def _perturb(tree):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize('family,kind', EXPORT_CASES)
def test_flaxlora_adapter_loads_with_auto_peft_causal_lm(family, kind, bases,
                                                         tmp_path):
  folder, model, base = bases[family]
  module, make, _ = KINDS[kind]
  method = make()
  adapter = _perturb(method.init(jax.random.PRNGKey(0), base))
  params, kwargs = method.apply(base, adapter)
  ours = _ours(model, params, kwargs)
  out = method.export.write(tmp_path / 'a', model, None, adapter, method,
                            base_model_name_or_path=str(folder))
  config = json.loads((out / 'adapter_config.json').read_text())
  assert config['task_type'] == 'CAUSAL_LM'
  if (family, kind) == ('llama', 'prefix'):  # one prefix per key/value head
    assert (config['token_dim'], config['num_attention_heads']) == (16, 2)
  theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
  keep = _compared(kind)
  assert helpers.max_diff(ours[keep], _torch(theirs, IDS, MASK, kind)[
      keep]) < 1e-4
  other = _perturb(adapter)  # a changed adapter changes the output
  assert helpers.max_diff(ours, _ours(model, *method.apply(base, other))) > 1e-3
  method2, adapter2 = module.load(out, model)
  assert helpers.max_diff(_ours(model, *method2.apply(base, adapter2)),
                          ours) < 1e-5

