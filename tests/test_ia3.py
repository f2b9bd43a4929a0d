"""IA3 against torch + PEFT 0.21 on tiny random T5 and BERT.

Vectors of one give the base exactly; perturbed vectors give PEFT's logits
through a PEFT folder both ways (flaxlora -> PeftModel, PEFT -> load_ia3),
and every parity check also asserts that the vectors change the logits.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from configs import bert_sentiment_lora
from flaxlora import build
from flaxlora import models
from flaxlora import resolved
from flaxlora import trainer
from flaxlora import workdir as workdir_lib
from flaxlora.peft import base as peft_base
from flaxlora.peft import ia3
from flaxlora.peft import trainable

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
transformers = pytest.importorskip('transformers')

@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  t5_folder = helpers.save_tiny_t5(tmp_path_factory.mktemp('t5'))
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


def _ours(model, params, family):
  fn = _JITTED.setdefault(model, jax.jit(
      lambda p, *inputs: model.apply({'params': p}, *inputs)))
  return np.asarray(fn(params, *_inputs(family)))


def _theirs(hf, family):
  if family == 'bert':
    return helpers.torch_outputs(hf, *_inputs(family))['logits']
  ids, mask, dec = (torch.tensor(a, dtype=torch.long)
                    for a in _inputs(family))
  with torch.no_grad():
    return hf(input_ids=ids, attention_mask=mask,
              decoder_input_ids=dec).logits.numpy()


def _hf(folder, family):
  cls = (transformers.T5ForConditionalGeneration if family == 't5' else
         transformers.BertForSequenceClassification)
  return cls.from_pretrained(str(folder)).eval()


def _perturb(tree, seed=1):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _method(family):
  if family == 't5':
    return ia3.ia3()
  return peft_base.chain(ia3.ia3(), trainable.trainable(r'classifier/.*'))


@pytest.mark.parametrize('family', ['t5', 'bert'])
def test_ones_are_the_base_and_flaxlora_vectors_load_in_peft(
    family, folders, tmp_path):
  model, base = _load(folders[family])
  method = _method(family)
  adapter = method.init(jax.random.PRNGKey(0), base)
  vectors = adapter if family == 't5' else adapter[0]
  assert all(bool(jnp.all(v == 1.0)) for v in jax.tree.leaves(vectors))
  base_logits = _ours(model, base, family)
  params, kwargs = method.apply(base, adapter)
  assert not kwargs
  np.testing.assert_allclose(_ours(model, params, family), base_logits,
                             atol=1e-6)
  adapter = _perturb(adapter)
  ours = _ours(model, method.apply(base, adapter)[0], family)
  method.export.write(tmp_path / 'a', model, base, adapter, method,
                      base_model_name_or_path=None)  # the run's export hook
  peft_model = peft.PeftModel.from_pretrained(_hf(folders[family], family),
                                              str(tmp_path / 'a')).eval()
  theirs = _theirs(peft_model, family)
  assert helpers.max_diff(ours, theirs) < 1e-4
  assert helpers.max_diff(theirs, base_logits) > 1e-2
  config = json.loads((tmp_path / 'a' / 'adapter_config.json').read_text())
  want = ({'target_modules': ['k', 'v', 'wo'], 'feedforward_modules': ['wo']}
          if family == 't5' else
          {'target_modules': ['key', 'output.dense', 'value'],
           'feedforward_modules': ['output.dense']})
  assert {k: sorted(config[k]) for k in want} == want
  method2, adapter2 = ia3.load(tmp_path / 'a', model, base)
  again = _ours(model, method2.apply(base, adapter2)[0], family)
  assert helpers.max_diff(again, ours) < 1e-5


@pytest.mark.parametrize('family', ['t5', 'bert'])
def test_peft_made_vectors_load_into_flaxlora(family, folders, tmp_path):
  task = 'SEQ_2_SEQ_LM' if family == 't5' else 'SEQ_CLS'
  peft_model = peft.get_peft_model(_hf(folders[family], family),
                                   peft.IA3Config(task_type=task)).eval()
  torch.manual_seed(1)
  with torch.no_grad():
    for name, param in peft_model.named_parameters():
      if 'ia3_l' in name or 'modules_to_save' in name:
        param.add_(0.5 * torch.randn_like(param))
  peft_model.save_pretrained(str(tmp_path / 'p'))
  theirs = _theirs(peft_model, family)
  model, base = _load(folders[family])
  method, adapter = ia3.load(tmp_path / 'p', model, base)
  ours = _ours(model, method.apply(base, adapter)[0], family)
  assert helpers.max_diff(ours, theirs) < 1e-4
  assert helpers.max_diff(ours, _ours(model, base, family)) > 1e-2
  config = method.config if family == 't5' else method.config.methods[0].config
  flags = ia3.targeted(config, base)
  ff = sorted(p for p, f in flags.items() if f)
  if family == 't5':  # 2 x (k, v) per encoder block + 4 per decoder block
    assert len(flags) == 2 * 3 + 2 * 5
    assert ff == [f'{s}/block_{i}/mlp/wo/kernel'
                  for s in ('decoder', 'encoder') for i in range(2)]
  else:  # PEFT's 'output.dense' also matches attention.output.dense
    assert ff == [f'encoder/layer_{i}/{m}/output/kernel'
                  for i in range(2) for m in ('attention', 'mlp')]


def test_kernel_scales_input_or_output_like_the_dense_reference():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(5, 3)).astype(np.float32)
  x = rng.normal(size=(2, 5)).astype(np.float32)
  out, inp = rng.normal(size=3), rng.normal(size=5)
  node = ia3.Ia3Kernel(jnp.asarray(w), jnp.asarray(out, jnp.float32), False)
  np.testing.assert_allclose(node.dot(x, dtype=jnp.float32),
                             (x @ w) * out, rtol=1e-5)
  np.testing.assert_allclose(node.merged(), w * out[None], rtol=1e-6)
  node = ia3.Ia3Kernel(jnp.asarray(w), jnp.asarray(inp, jnp.float32), True)
  np.testing.assert_allclose(node.dot(x, dtype=jnp.float32),
                             (x * inp) @ w, rtol=1e-5)
  assert helpers.max_diff(node.dot(x, dtype=jnp.float32), x @ w) > 1e-2


def test_vectors_follow_the_axis_they_scale(folders):
  model, base = _load(folders['bert'])
  method = ia3.ia3()
  adapter = jax.eval_shape(method.init, jax.random.PRNGKey(0), base)
  axes = peft_base.flatten(method.logical_axes(
      models.bert.logical_axes(model), adapter),
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert axes['encoder/layer_0/attention/key/kernel'] == (
      jax.sharding.PartitionSpec('heads'))
  assert axes['encoder/layer_0/mlp/output/kernel'] == (
      jax.sharding.PartitionSpec('mlp'))
  with pytest.raises(ValueError, match='matched none of the targeted'):
    ia3.ia3(targets=r'.*/key/kernel', feedforward=r'.*/wo/kernel').init(
        jax.random.PRNGKey(0), base)


def test_ia3_trains_from_a_config(tmp_path):
  config = bert_sentiment_lora.get_config('runlocal')
  # As --config.peft.method=ia3 --config.peft.targets='': the section's
  # LoRA-only fields (rank, alpha, ...) go; '' is the family's preset.
  config.peft.update(method='ia3', targets='')
  config = build.settle_peft(config, {'peft.method', 'peft.targets'})
  config.train.update(eval_every=0, checkpoint_every=0)
  config.optimizer.update(lr=3e-2, warmup_steps=0)
  trainer.train_and_evaluate(config, tmp_path)
  loss = [r['loss'] for r in workdir_lib.read_metrics(tmp_path)
          if r['split'] == 'train']
  assert loss[-1] < loss[0]
  built = build.model_and_method(resolved.resolve(config))
  model, base = built.model, jax.device_get(built.base)
  _, adapter = ia3.load(tmp_path / workdir_lib.PEFT_DIR, model,
                                    base)
  vectors = jax.tree.leaves(adapter[0])
  assert len(vectors) == 4 * 2  # key, value, 2 x output per layer
  assert max(float(jnp.max(jnp.abs(v - 1.0))) for v in vectors) > 1e-3
