"""LoRA on the causal families to PEFT folders with task_type CAUSAL_LM.

A tiny random transformers Llama and GPT-2 are saved, loaded by flaxlora,
given a LoRA adapter with non-zero B; the exported folder must load with
`peft.AutoPeftModelForCausalLM.from_pretrained(folder)` alone and give
flaxlora's logits, and the merged export must load in transformers with
the same logits (and differ from the base: the adapter counts). The
families' LoRA and IA3 presets pick the modules PEFT picks by default.
"""
import json

import jax
import numpy as np
import pytest
import torch
import transformers

from flaxlora import models
from flaxlora.peft import base as peft_base
from flaxlora.peft import hf_folder
from flaxlora.peft.ia3 import kernel as ia3_kernel
from flaxlora.peft.ia3 import method as ia3_method
from flaxlora.peft.lora import folder as lora_folder
from flaxlora.peft.lora import method as lora_method

peft = pytest.importorskip('peft')

HF = {
    'llama': (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    'gpt2': (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4)),
}
TARGETS = {'llama': r'.*/self_attn/(q|v)_proj/kernel',
           'gpt2': r'.*/attn/c_attn/kernel'}


def _torch_logits(model, ids, mask):
  """Logits with flaxlora's positions of left-padded rows (GPT-2's learned
  positions count from each row's first token)."""
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids).long(),
                 attention_mask=torch.tensor(mask).long(),
                 position_ids=torch.tensor(positions).long()).logits.numpy()


@pytest.mark.parametrize('family', sorted(HF))
def test_lora_folder_loads_with_auto_peft_causal_lm(family, tmp_path):
  cls, config = HF[family]
  torch.manual_seed(0)
  cls(config).eval().save_pretrained(str(tmp_path / 'base'))
  model, base, _ = models.load(tmp_path / 'base')
  method = lora_method.lora(rank=4, alpha=8.0, targets=TARGETS[family])
  adapter = method.init(jax.random.PRNGKey(0), base)
  adapter = jax.tree.map(  # B = 0 at init: make the adapter count
      lambda x: x + 0.05 * np.random.RandomState(1).randn(*x.shape), adapter)
  params, kwargs = method.apply(base, adapter)
  ids = np.random.RandomState(0).randint(1, 61, (2, 7))
  mask = np.ones_like(ids)
  mask[1, :2] = 0  # left padding
  ours = np.asarray(model.apply({'params': params}, ids, mask, **kwargs))
  folder = lora_folder.save_peft(
      tmp_path / 'peft', model, base, adapter, method,
      base_model_name_or_path=str(tmp_path / 'base'))
  assert json.loads((folder / 'adapter_config.json').read_text())[
      'task_type'] == 'CAUSAL_LM'
  loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
  real = mask == 1
  theirs = _torch_logits(loaded, ids, mask)
  np.testing.assert_allclose(theirs[real], ours[real], atol=1e-4)
  merged = lora_folder.save_merged(tmp_path / 'merged', model, base, adapter,
                                   method)
  plain = transformers.AutoModelForCausalLM.from_pretrained(
      str(merged)).eval()
  np.testing.assert_allclose(_torch_logits(plain, ids, mask)[real],
                             ours[real], atol=1e-4)
  base_logits = np.asarray(model.apply({'params': base}, ids, mask))
  assert np.abs(base_logits - ours)[real].max() > 1e-3


@pytest.mark.parametrize('family', sorted(HF))
def test_presets_pick_peft_default_modules(family, tmp_path):
  """targets=None (the family's preset) adapts exactly the modules PEFT's
  CAUSAL_LM defaults adapt in the same transformers model, and the IA3
  preset scales the inputs of PEFT's feed-forward modules."""
  cls, config = HF[family]
  cls(config).save_pretrained(str(tmp_path))
  model, base, _ = models.load(tmp_path)
  rules = hf_folder.linear_rules(model)
  name = lambda path: hf_folder.linear_module(rules[path], path)
  rng = jax.random.PRNGKey(0)
  adapter = lora_method.lora(rank=2).init(rng, base)
  ours = {name(p.rsplit('/', 1)[0]) for p in peft_base.flatten(adapter)}
  lora = peft.get_peft_model(cls(config), peft.LoraConfig(
      task_type='CAUSAL_LM', r=2))
  theirs = {n[len('base_model.model.'):] for n, m in lora.named_modules()
            if hasattr(m, 'lora_A') and m.lora_A}
  assert ours == theirs and len(ours) >= config.num_hidden_layers
  scaled = ia3_kernel.targeted(ia3_method.ia3().config, base)
  ours = {name(p): ff for p, ff in scaled.items()}
  ia3 = peft.get_peft_model(cls(config), peft.IA3Config(
      task_type='CAUSAL_LM'))
  theirs = {n[len('base_model.model.'):]: m.is_feedforward
            for n, m in ia3.named_modules() if hasattr(m, 'ia3_l')}
  assert ours == theirs
  assert sum(ours.values()) == config.num_hidden_layers  # one per layer
