"""Extractive QA (SQuAD) features for BERT and n-best span post-processing.

A question and its context become one or more features of at most
`max_length` tokens, `[CLS] question [SEP] context window [SEP]`. A context
too long for one window is split into overlapping windows: consecutive
windows share `doc_stride` context tokens (Hugging Face's `stride`, not the
original BERT step). Answers become token positions through the fast
tokenizer's offset mapping; a window that does not hold the whole answer
points both positions at [CLS] (index 0).

Batches hold input_ids, attention_mask, token_type_ids [B, T],
start_positions, end_positions [B], and the loader's index / weight [B];
`index` is the feature number that `best_answers` takes back.
"""
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from flaxlora.data import buckets as buckets_lib
from flaxlora.data import sources

SEQUENCES = ('input_ids', 'attention_mask', 'token_type_ids')


def tokenize(records: Sequence[dict[str, Any]], tokenizer, *,
             max_length: int = 384, doc_stride: int = 128,
             buckets: Sequence[int] | None = None) -> buckets_lib.Tokenized:
  """Features of SQuAD records (see `sources.read_squad`).

  Args:
    records: dicts with 'id', 'question', 'context', 'answers' ([{'text',
      'start'}]; the first answer sets the training positions) and 'origin'.
    tokenizer: a fast Hugging Face tokenizer (offset mappings are needed).
    max_length: tokens per feature, special tokens included.
    doc_stride: context tokens shared by consecutive windows of one context.
    buckets: shorter padding lengths; see `buckets.make_buckets`.

  Returns:
    Features; `meta[i]` holds 'example' (the record's position), 'id' and
    'offsets' (int32 [L, 2] character spans of context tokens, -1 elsewhere).

  Raises:
    ValueError: an answer outside its context, or a question too long to
      leave room for `doc_stride` + 1 context tokens.
  """
  if not getattr(tokenizer, 'is_fast', False):
    raise ValueError('squad.tokenize needs a fast tokenizer (offset '
                     'mappings); load it with use_fast=True.')
  questions = [r['question'].lstrip() for r in records]
  _check_fits(records, questions, tokenizer, max_length, doc_stride)
  encoded = tokenizer(
      questions, [r['context'] for r in records], truncation='only_second',
      max_length=max_length, stride=doc_stride,
      return_overflowing_tokens=True, return_offsets_mapping=True)
  columns = {name: [] for name in SEQUENCES}
  starts, ends, meta = [], [], []
  for i, example in enumerate(encoded['overflow_to_sample_mapping']):
    record = records[example]
    ids = np.asarray(encoded['input_ids'][i], np.int32)
    columns['input_ids'].append(ids)
    columns['attention_mask'].append(np.ones_like(ids))
    columns['token_type_ids'].append(
        np.asarray(encoded['token_type_ids'][i], np.int32))
    offsets = np.array(encoded['offset_mapping'][i], np.int32).reshape(-1, 2)
    in_context = np.array([s == 1 for s in encoded.sequence_ids(i)])
    offsets[~in_context] = -1
    start, end = _positions(record, offsets)
    starts.append(start)
    ends.append(end)
    meta.append({'example': example, 'id': record['id'], 'offsets': offsets})
  return buckets_lib.Tokenized(
      sequences=columns,
      scalars={'start_positions': np.array(starts, np.int32),
               'end_positions': np.array(ends, np.int32)},
      groups=dict.fromkeys(SEQUENCES, 'source'),
      buckets={'source': buckets_lib.make_buckets(max_length, buckets)},
      pad={'input_ids': tokenizer.pad_token_id}, meta=meta)


def _check_fits(records, questions, tokenizer, max_length, doc_stride):
  """Each question must leave room for doc_stride + 1 context tokens."""
  special = tokenizer.num_special_tokens_to_add(pair=True)
  lengths = [len(ids) for ids in tokenizer(
      questions, add_special_tokens=False)['input_ids']]
  for record, length in zip(records, lengths):
    for answer in record['answers']:
      sources.check_answer({'text': answer['text'],
                            'answer_start': answer['start']},
                           record['context'], record['origin'])
    room = max_length - special - length
    if room <= doc_stride:
      raise ValueError(
          f'{record["origin"]}: the question is {length} tokens, which with '
          f'{special} special tokens leaves {max(room, 0)} of max_length='
          f'{max_length} for the context, not more than doc_stride='
          f'{doc_stride}; raise max_length or lower doc_stride.')


def _positions(record, offsets: np.ndarray) -> tuple[int, int]:
  """Token (start, end) of the record's first answer; (0, 0) if outside."""
  if not record['answers']:
    return 0, 0
  answer = record['answers'][0]
  first = answer['start']
  last = first + len(answer['text'])  # exclusive
  tokens = np.flatnonzero(offsets[:, 0] >= 0)
  if offsets[tokens[0], 0] > first or offsets[tokens[-1], 1] < last:
    return 0, 0
  # The last token starting at or before the answer, the first ending at or
  # after its end: inside a word piece the span widens to the whole piece.
  start = tokens[offsets[tokens, 0] <= first][-1]
  end = tokens[offsets[tokens, 1] >= last][0]
  return int(start), int(end)


def best_answers(features: buckets_lib.Tokenized,
                 records: Sequence[dict[str, Any]], indices: Iterable[int],
                 start_logits: Iterable[np.ndarray],
                 end_logits: Iterable[np.ndarray], *, n_best: int = 20,
                 max_answer_length: int = 30) -> dict[str, str]:
  """The best answer text of every record from its features' logits.

  Args:
    features: what `tokenize` returned for `records`.
    records: the SQuAD records.
    indices: feature numbers (a batch's 'index'; negative rows are padding
      and skipped).
    start_logits, end_logits: one row [T] per index (T may differ between
      rows; positions past a feature's length are ignored).
    n_best: candidate starts and ends per feature.
    max_answer_length: the longest answer in tokens.

  Returns:
    record id -> answer text ('' when no valid span was scored).
  """
  spans = best_spans(features, records, indices, start_logits, end_logits,
                     n_best=n_best, max_answer_length=max_answer_length)
  return {r['id']: span.text for r, span in zip(records, spans)}


class Span(NamedTuple):
  """An answer: its text, score (start + end logit) and character offsets
  [start, end) in the context (score -inf and '' when none was scored)."""
  text: str
  score: float
  start: int
  end: int


def best_spans(features: buckets_lib.Tokenized,
               records: Sequence[dict[str, Any]], indices: Iterable[int],
               start_logits: Iterable[np.ndarray],
               end_logits: Iterable[np.ndarray], *, n_best: int = 20,
               max_answer_length: int = 30) -> list[Span]:
  """The best `Span` of every record (in order); arguments as
  `best_answers`."""
  best = {}  # example -> Span
  for index, start, end in zip(indices, start_logits, end_logits):
    if index < 0:
      continue
    meta = features.meta[int(index)]
    offsets = meta['offsets']
    span = _best_span(offsets, np.asarray(start)[:len(offsets)],
                      np.asarray(end)[:len(offsets)], n_best,
                      max_answer_length)
    if span is None:
      continue
    score, s, e = span
    example = meta['example']
    if example not in best or score > best[example].score:
      first, last = int(offsets[s, 0]), int(offsets[e, 1])
      context = records[example]['context']
      best[example] = Span(context[first:last], score, first, last)
  none = Span('', float('-inf'), 0, 0)
  return [best.get(i, none) for i in range(len(records))]


def _best_span(offsets, start, end, n_best, max_answer_length):
  """(score, start, end) of the best valid span of one feature, or None."""
  valid = offsets[:, 0] >= 0
  starts = [s for s in np.argsort(-start)[:n_best] if valid[s]]
  ends = [e for e in np.argsort(-end)[:n_best] if valid[e]]
  best = None
  for s in starts:
    for e in ends:
      if s <= e < s + max_answer_length:
        score = float(start[s] + end[e])
        if best is None or score > best[0]:
          best = (score, int(s), int(e))
  return best
