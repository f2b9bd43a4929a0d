"""Tiny shared test utilities: small Hugging Face BERT checkpoints on disk,
and the logical-axes walk every model family's tests share.

Import as `import helpers` (pytest puts tests/ on sys.path).
"""
import pathlib

import jax
import numpy as np

TINY_BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=64, type_vocab_size=2)
TINY_T5 = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
               num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, decoder_start_token_id=0)
ARCHITECTURES = {None: 'BertModel',
                 'classification': 'BertForSequenceClassification',
                 'qa': 'BertForQuestionAnswering'}


def tiny_bert_torch(head=None, seed=0, **overrides):
  """A random transformers BERT (eval mode) of TINY_BERT size with `head`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  kwargs = dict(TINY_BERT, num_labels=3 if head == 'classification' else 2)
  kwargs.update(overrides)
  config = transformers.BertConfig(**kwargs)
  model = getattr(transformers, ARCHITECTURES[head])(config).eval()
  with torch.no_grad():  # non-zero biases and norms, so a mix-up shows
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return model


def save_tiny_bert(folder, head=None, seed=0, **overrides):
  """Saves `tiny_bert_torch(...)` as safetensors; returns (folder, model)."""
  model = tiny_bert_torch(head, seed, **overrides)
  model.save_pretrained(str(folder), safe_serialization=True)
  return pathlib.Path(folder), model


def save_tiny_t5(folder, seed=0, **overrides):
  """A random `TINY_T5` (+ overrides) T5ForConditionalGeneration saved as
  safetensors; returns the folder."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(
      transformers.T5Config(**{**TINY_T5, **overrides})).eval()
  model.save_pretrained(str(folder), safe_serialization=True)
  return pathlib.Path(folder)


def t5_batch(seed=0, vocab=TINY_T5['vocab_size']):
  """ids [2, 7] (row 1 padded after 5), mask, decoder ids [2, 4]."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(2, vocab, (2, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  return ids, mask, rng.randint(2, vocab, (2, 4)).astype(np.int32)


def batch(seed=0, b=3, t=9, vocab=TINY_BERT['vocab_size']):
  """ids, mask (padding at the end of rows 1 and 2), token types: [B, T]."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, vocab, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  mask[1, t - 3:] = 0
  mask[2, t // 2:] = 0
  ids = np.where(mask == 1, ids, 0)
  token_types = np.zeros((b, t), np.int32)
  token_types[:, t // 3:] = 1
  return ids, mask, token_types


def torch_outputs(model, ids, mask, token_types):
  """The transformers model's outputs as a dict of numpy arrays."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                token_type_ids=torch.tensor(token_types, dtype=torch.long))
  return {k: v.numpy() for k, v in out.items() if isinstance(v, torch.Tensor)}


def peft_bert_prefix_logits(peft_model, ids, mask, token_types):
  """Logits of a PEFT PREFIX_TUNING BertForSequenceClassification (torch
  tensors in, numpy out). PEFT 0.21's BERT forward refuses prefixes (no past
  key values); its own pieces don't: the prefix positions join the mask and
  the prompt is the encoder's cache."""
  import torch  # pylint: disable=g-import-not-at-top
  p = peft_model.active_peft_config.num_virtual_tokens
  mask = torch.cat([torch.ones(mask.shape[0], p, dtype=mask.dtype), mask],
                   dim=1)
  hf = peft_model.base_model
  out = hf.bert(input_ids=ids, attention_mask=mask, token_type_ids=token_types,
                cache=peft_model.get_prompt(ids.shape[0]))
  return hf.classifier(hf.dropout(out.pooler_output)).numpy()


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) -
                             np.asarray(b, np.float32))))


def assert_every_param_has_axes(params, axes) -> dict:
  """Every param leaf has a PartitionSpec of one logical name per dimension.

  Returns {key path: spec}, for family-specific checks.
  """
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_axes = dict(jax.tree_util.tree_flatten_with_path(
      axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0])
  assert len(flat_axes) == len(flat_params)
  for path, value in flat_params:
    spec = flat_axes[path]
    assert len(spec) == value.ndim, (path, spec)
    assert all(isinstance(name, str) and name for name in spec), (path, spec)
  return flat_axes


def default_or_slow(cases, default):
  """pytest params of `cases` (tuples), those not in `default` marked slow:
  the default suite runs a subset that covers every behaviour once, CI's
  slow run the rest of the grid."""
  import pytest  # pylint: disable=g-import-not-at-top
  return [pytest.param(*case, marks=() if case in default else
                       pytest.mark.slow) for case in cases]
