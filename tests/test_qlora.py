"""QLoRA: LoRA over an NF4 base equals LoRA on the dequantised base; exports.

References: `lora` + `merge` on the dequantised fp32 base (flaxlora's own
LoRA, tested against PEFT in test_lora / test_peft_io), transformers + torch
for the merged checkpoint, PEFT for the adapter folder.
"""
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlora import export
from flaxlora import models
from flaxlora import trainer
from flaxlora.models import t5
from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft import merge
from flaxlora.peft import qlora
from flaxlora.peft.qlora import nf4

TINY_T5 = dict(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2,
               num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, dropout_rate=0.0,
               feed_forward_proj='gated-gelu', tie_word_embeddings=False,
               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
TARGETS = r'.*/(q|v|wo)/kernel'


@pytest.fixture(scope='module')
def setup():
  model = t5.build(t5.T5Config(**TINY_T5))
  base = t5.init(model, jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  ids = rng.randint(2, 64, (2, 6)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 4:] = 0
  dec = rng.randint(2, 64, (2, 4)).astype(np.int32)
  apply = jax.jit(lambda p: model.apply({'params': p}, ids, mask, dec))
  method = qlora.qlora(rank=4, alpha=8, targets=TARGETS)
  quantized = method.prepare_base(base)
  adapter = method.init(jax.random.PRNGKey(1), quantized)
  # A trained-looking adapter: B != 0, so LoRA changes the output.
  adapter = jax.tree.map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape),
      adapter)
  return model, base, quantized, method, adapter, apply


def qlora_logits(setup, base=None):
  _, raw, quantized, method, adapter, apply = setup
  params, kw = method.apply(quantized if base is None else base, adapter)
  assert not kw
  return np.asarray(apply(params))


def test_only_kernels_quantised_and_bytes(setup):
  _, base, quantized, _, _, _ = setup
  flat = peft_base.flatten(quantized)
  kernels = [p for p, v in flat.items() if nf4.is_nf4(v)]
  assert kernels and all(p.endswith('/kernel') for p in kernels)
  assert not any(p.startswith('lm_head') for p in kernels)  # kept by `keep`
  assert not nf4.is_nf4(flat['shared/embedding'])
  assert not nf4.is_nf4(flat['encoder/final_norm/scale'])
  fp32 = sum(peft_base.get(base, p).size * 4 for p in kernels)
  ratio = sum(flat[p].nbytes() for p in kernels) / fp32
  assert 0.125 < ratio <= 0.14, ratio


def test_forward_equals_lora_on_dequantised_base(setup):
  _, base, quantized, method, adapter, apply = setup
  ours = qlora_logits(setup)
  dequantized = nf4.dequantize_params(quantized)
  reference = lora.lora(rank=4, alpha=8, targets=TARGETS)
  params, _ = reference.apply(dequantized, adapter)
  np.testing.assert_allclose(ours, np.asarray(apply(params)), atol=1e-5)
  merged = merge.merge(dequantized, adapter, reference)
  # Dense W + sAB sums in another order: fp32 rounding on logits of ~20.
  np.testing.assert_allclose(ours, np.asarray(apply(merged)), atol=1e-4)
  # The adapter matters, and so does the quantisation.
  assert np.abs(ours - np.asarray(apply(dequantized))).max() > 1e-3
  assert np.abs(np.asarray(apply(dequantized)) -
                np.asarray(apply(base))).max() > 1e-4
  # A raw base is quantised on the fly: the same numbers, without savings.
  np.testing.assert_allclose(qlora_logits(setup, base), ours, atol=1e-6)


def test_dora_on_nf4_equals_dora_on_dequantised_base(setup):
  _, _, quantized, _, _, apply = setup
  method = qlora.qlora(rank=4, alpha=8, targets=r'.*/q/kernel', use_dora=True)
  adapter = method.init(jax.random.PRNGKey(3), quantized)
  adapter = jax.tree.map(lambda x: x + 0.05, adapter)
  dequantized = nf4.dequantize_params(quantized)
  reference = lora.lora(rank=4, alpha=8, targets=r'.*/q/kernel',
                        use_dora=True)
  np.testing.assert_allclose(
      np.asarray(apply(method.apply(quantized, adapter)[0])),
      np.asarray(apply(reference.apply(dequantized, adapter)[0])), atol=1e-5)


def test_gradients_reach_only_the_adapter(setup):
  model, _, quantized, method, adapter, _ = setup
  ids = jnp.ones((2, 5), jnp.int32)

  def loss(adapter, base):
    params, _ = method.apply(base, adapter)
    logits = model.apply({'params': params}, ids, ids, ids)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

  grads = jax.jit(jax.grad(loss))(adapter, quantized)
  assert jax.tree.structure(grads) == jax.tree.structure(adapter)
  for leaf in jax.tree.leaves(grads):
    assert float(jnp.abs(leaf).max()) > 0
  # The quantised storage is integer: no gradient can flow into it.
  base_grads = jax.jit(jax.grad(loss, argnums=1, allow_int=True))(
      adapter, quantized)
  codes = base_grads['encoder']['block_0']['attention']['q']['kernel'].codes
  assert codes.dtype == jax.dtypes.float0


def test_abstract_init_and_jit_with_quantised_base(setup):
  _, _, quantized, method, adapter, apply = setup
  abstract = jax.eval_shape(method.init, jax.random.PRNGKey(1), quantized)
  assert jax.tree.structure(abstract) == jax.tree.structure(adapter)
  # The quantised base is an ordinary jit argument (a pytree of arrays).
  step = jax.jit(lambda b, a: method.apply(b, a)[0])
  params = step(quantized, adapter)
  np.testing.assert_allclose(np.asarray(apply(params)), qlora_logits(setup),
                             atol=1e-6)


def test_quantised_base_shards_like_any_params(setup):
  from flaxlora import sharding  # pylint: disable=g-import-not-at-top
  model, _, quantized, method, adapter, apply = setup
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  rules = sharding.resolve_rules(None)
  axes = nf4.params_logical_axes(t5.logical_axes(model), quantized)
  placed = jax.device_put(quantized, sharding.named_shardings(
      quantized, axes, mesh, rules))
  codes = placed['encoder']['block_0']['mlp']['wo']['kernel'].codes
  assert codes.shape == (64, 64)  # [I/2, O] of a [128, 64] kernel
  # (mlp, embed) -> (tensor, fsdp): each device holds a quarter.
  assert {s.data.shape for s in codes.addressable_shards} == {(32, 32)}
  params, _ = method.apply(placed, adapter)
  # Sharded sums add in another order: fp32 rounding on logits of ~20.
  np.testing.assert_allclose(np.asarray(apply(params)), qlora_logits(setup),
                             atol=1e-4)


def test_bad_regex_errors(setup):
  _, base, _, _, _, _ = setup
  with pytest.raises(ValueError, match='matched no 2-D param'):
    qlora.qlora(quantize=r'nothing/.*').config.prepare_base(base)
  with pytest.raises(ValueError, match='not a valid regex'):
    qlora.qlora(keep='(')
  with pytest.raises(ValueError, match="init='pissa' is not supported"):
    qlora.qlora(init='pissa')


def test_save_merged_loads_in_transformers(setup, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  model, _, quantized, method, adapter, _ = setup
  qlora.save_merged(tmp_path / 'merged', model, quantized, adapter, method)
  hf = transformers.T5ForConditionalGeneration.from_pretrained(
      tmp_path / 'merged').eval()
  ids = np.array([[5, 6, 7, 8, 1]])
  dec = np.array([[0, 9, 10]])
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.ones(
        1, 5, dtype=torch.long), decoder_input_ids=torch.tensor(dec)).logits
  params, _ = method.apply(quantized, adapter)
  ours = jax.jit(model.apply)({'params': params}, ids, np.ones_like(ids),
                              dec)
  assert np.abs(np.asarray(ours) - theirs.numpy()).max() < 1e-4


def test_peft_export_of_the_adapter(setup, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  peft = pytest.importorskip('peft')
  model, _, quantized, method, adapter, _ = setup
  # PEFT's base: the dequantised kernels (what a 4-bit base computes with).
  models.save(tmp_path / 'base', model, nf4.dequantize_params(quantized))
  export.save_peft(tmp_path / 'peft', model, quantized, adapter, method)
  hf = transformers.T5ForConditionalGeneration.from_pretrained(
      tmp_path / 'base').eval()
  peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / 'peft'))
  ids = np.array([[5, 6, 7, 8, 1]])
  dec = np.array([[0, 9, 10]])
  with torch.no_grad():
    theirs = peft_model(input_ids=torch.tensor(ids),
                        attention_mask=torch.ones(1, 5, dtype=torch.long),
                        decoder_input_ids=torch.tensor(dec)).logits.numpy()
  params, _ = method.apply(quantized, adapter)
  apply = jax.jit(model.apply)
  ours = np.asarray(apply({'params': params}, ids, np.ones_like(ids), dec))
  assert np.abs(ours - theirs).max() < 1e-4
  base_logits = apply({'params': nf4.dequantize_params(quantized)}, ids,
                      np.ones_like(ids), dec)
  assert np.abs(ours - np.asarray(base_logits)).max() > 1e-3


@pytest.mark.parametrize('name', ['t5_qlora', 'bert_sentiment_qlora'])
def test_runlocal_through_the_trainer(tmp_path, name):
  config = importlib.import_module(f'configs.{name}').get_config('runlocal')
  config.train.update(steps=4, eval_every=2, log_every=2, checkpoint_every=2)
  config.eval.max_examples = 16
  summary = trainer.train_and_evaluate(config, tmp_path)
  assert summary['step'] == 4
  peft_config = json.loads((tmp_path / 'peft' / 'adapter_config.json'
                            ).read_text())
  assert peft_config['peft_type'] == 'LORA'
  assert peft_config['r'] == config.peft.rank
