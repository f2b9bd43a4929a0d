"""Each task's loss (flaxlora.tasks) against transformers' own loss.

Tiny random Hugging Face models are saved here and loaded by flaxlora; the
reference is the torch model's `loss` with -100 (or out-of-range) labels
where flaxlora gives weight 0. Batches hold padded tokens and a padding
row, and each test also shows that masking one more position changes the
loss (so the weights are not ignored).
"""
import ml_collections
import numpy as np
import torch
import transformers

import helpers
from flaxlora import models
from flaxlora import tasks


def _config(task, **data):
  return ml_collections.ConfigDict(
      {'task': task, 'data': dict(metric='rouge', labels=(), **data)})


def _loss(task, params, batch):
  total, weight = task.loss(params, {}, batch, None)
  return float(total) / float(weight)


def test_classification_loss_matches_transformers(tmp_path):
  folder, hf = helpers.save_tiny_bert(tmp_path, head='classification')
  model, params, _ = models.load(folder, head='classification', num_labels=3)
  ids, mask, types = helpers.batch(b=4)
  batch = {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': types,
           'label': np.array([0, 2, 1, 1], np.int32),
           'weight': np.array([1, 1, 1, 0], np.float32)}  # row 3: padding
  task = tasks.make(_config('classification'), model)
  labels = torch.tensor(np.where(batch['weight'] > 0, batch['label'],
                                 -100)).long()
  with torch.no_grad():
    reference = hf(input_ids=torch.tensor(ids).long(),
                   attention_mask=torch.tensor(mask).long(),
                   token_type_ids=torch.tensor(types).long(),
                   labels=labels).loss.item()
  ours = _loss(task, params, batch)
  assert abs(ours - reference) < 1e-5
  masked = dict(batch, weight=np.array([1, 0, 1, 0], np.float32))
  assert abs(_loss(task, params, masked) - ours) > 1e-4


def test_span_qa_loss_matches_transformers(tmp_path):
  folder, hf = helpers.save_tiny_bert(tmp_path, head='qa')
  model, params, _ = models.load(folder, head='qa')
  ids, mask, types = helpers.batch(b=4)
  t = ids.shape[1]
  batch = {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': types,
           'start_positions': np.array([3, 1, 0, 2], np.int32),
           'end_positions': np.array([5, 2, 0, 4], np.int32),
           'weight': np.array([1, 1, 1, 0], np.float32)}
  task = tasks.make(_config('squad'), model)
  real = batch['weight'] > 0  # transformers ignores positions >= T
  with torch.no_grad():
    reference = hf(
        input_ids=torch.tensor(ids).long(),
        attention_mask=torch.tensor(mask).long(),
        token_type_ids=torch.tensor(types).long(),
        start_positions=torch.tensor(np.where(real, batch['start_positions'],
                                              t)).long(),
        end_positions=torch.tensor(np.where(real, batch['end_positions'],
                                            t)).long()).loss.item()
  ours = _loss(task, params, batch)
  assert abs(ours - reference) < 1e-5
  masked = dict(batch, weight=np.array([0, 1, 1, 0], np.float32))
  assert abs(_loss(task, params, masked) - ours) > 1e-4


def test_seq2seq_loss_matches_transformers(tmp_path):
  folder = helpers.save_tiny_t5(tmp_path)
  hf = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
  model, params, _ = models.load(folder)
  rng = np.random.RandomState(0)
  ids, mask, _ = helpers.t5_batch()
  ids, mask = np.concatenate([ids, ids[:1]]), np.concatenate([mask, mask[:1]])
  labels = rng.randint(2, helpers.TINY_T5['vocab_size'], (3, 5))
  target_mask = np.ones_like(labels)
  target_mask[1, 3:] = 0  # a short target, padded
  labels = np.where(target_mask == 1, labels, 0).astype(np.int32)
  decoder_ids = np.concatenate([np.zeros((3, 1), np.int32), labels[:, :-1]],
                               axis=1)
  batch = {'input_ids': ids, 'attention_mask': mask, 'labels': labels,
           'decoder_input_ids': decoder_ids,
           'decoder_attention_mask': target_mask.astype(np.int32),
           'weight': np.array([1, 1, 0], np.float32)}  # row 2: padding
  task = tasks.make(_config('seq2seq'), model)
  hf_labels = np.where((target_mask == 1) & (batch['weight'][:, None] > 0),
                       labels, -100)
  with torch.no_grad():  # transformers shifts the labels itself
    reference = hf(input_ids=torch.tensor(ids).long(),
                   attention_mask=torch.tensor(mask).long(),
                   labels=torch.tensor(hf_labels).long()).loss.item()
  ours = _loss(task, params, batch)
  assert abs(ours - reference) < 1e-5
  masked = dict(batch, decoder_attention_mask=np.where(
      np.arange(5) == 0, 0, target_mask).astype(np.int32))
  assert abs(_loss(task, params, masked) - ours) > 1e-4
