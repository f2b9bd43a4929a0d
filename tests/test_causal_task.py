"""The causal-LM task's loss (flaxlora.tasks.CausalLM) on a tiny Llama.

The reference is transformers' LlamaForCausalLM loss with -100 labels on
the prompt and padding; packing several examples a row must give the same
loss sum and weight as one example a row.
"""
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from flaxlora import models
from flaxlora import tasks
from flaxlora.data import byte_tokenizer
from flaxlora.data import causal
from flaxlora.data import pipeline

TOK = byte_tokenizer.ByteTokenizer()
LLAMA = dict(vocab_size=259, hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, eos_token_id=1, bos_token_id=None,
             pad_token_id=0)
RECORDS = [{'source': 'abcdef', 'target': 'xy'},
           {'source': 'gh', 'target': 'zzz'},
           {'source': 'ijklmn', 'target': 'w'},
           {'source': 'opq', 'target': 'rstu'}]


@pytest.fixture(scope='module', name='llama')
def _llama(tmp_path_factory):
  """(transformers model, flaxlora model, params) of one tiny Llama."""
  folder = tmp_path_factory.mktemp('llama')
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
  hf.save_pretrained(str(folder))
  model, params, _ = models.load(folder)
  return hf.eval(), model, params


def _task(model):
  config = ml_collections.ConfigDict(
      {'task': 'causal_lm', 'data': {'metric': 'rouge'}})
  return tasks.make(config, model)


def _batch(data, size):
  loader = pipeline.Loader(data, global_batch_size=size, shuffle=False,
                           drop_remainder=False, num_epochs=1)
  return next(iter(loader))


def _features(pack=False):
  prompt = causal.Prompt(TOK, 'S {source} =', chat=False)
  return causal.tokenize(RECORDS, TOK, prompt, max_source_length=16,
                         max_target_length=5, pack=pack)


def test_loss_matches_transformers_with_masked_labels(llama):
  hf, model, params = llama
  batch = _batch(_features(), 5)  # 4 right-padded rows + a padding row
  assert batch['weight'].tolist() == [1, 1, 1, 1, 0]
  task = _task(model)
  total, weight = task.loss(params, {}, batch, None)
  ids = torch.tensor(batch['input_ids']).long()
  keep = (batch['loss_mask'] == 1) & (batch['weight'][:, None] > 0)
  with torch.no_grad():
    reference = hf(input_ids=ids,
                   attention_mask=torch.tensor(batch['attention_mask']).long(),
                   labels=torch.where(torch.tensor(keep), ids, -100)).loss
  assert float(weight) == keep[:, 1:].sum() == 3 + 4 + 2 + 5  # with eos
  assert abs(float(total) / float(weight) - float(reference)) < 1e-5
  # Unmasking the prompt of row 0 changes the loss.
  loss_mask = batch['loss_mask'].copy()
  loss_mask[0, :] = batch['attention_mask'][0]
  total2, weight2 = task.loss(params, {}, dict(batch, loss_mask=loss_mask),
                              None)
  assert abs(float(total2) / float(weight2) - float(total) / float(weight)
             ) > 1e-4


def test_packed_rows_give_the_unpacked_loss(llama):
  _, model, params = llama
  task = _task(model)
  plain = _batch(_features(), 4)
  data = _features(pack=True)
  assert len(data) == 2  # two examples a row
  packed = _batch(data, len(data))
  total, weight = task.loss(params, {}, plain, None)
  packed_total, packed_weight = task.loss(params, {}, packed, None)
  assert float(packed_weight) == float(weight)
  np.testing.assert_allclose(float(packed_total), float(total), rtol=1e-5)
  # Without its segments the packed row attends across examples: it
  # differs, so the segments are what keeps the examples apart.
  crossed = {k: v for k, v in packed.items() if k != 'segment_ids'}
  crossed_total, _ = task.loss(params, {}, crossed, None)
  assert abs(float(crossed_total) - float(total)) > 1e-3
