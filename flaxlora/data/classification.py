"""Sentence and sentence-pair classification features for BERT.

Batches (after `pipeline.Loader`) hold:
  input_ids, attention_mask, token_type_ids: int32 [B, T], T a bucket length
  label: int32 [B]
  index, weight: from the loader (weight 0 on padding rows).
"""
from typing import Any, Sequence

import numpy as np

from flaxlora.data import buckets as buckets_lib


def tokenize(records: Sequence[dict[str, Any]], tokenizer, *, max_length: int,
             buckets: Sequence[int] | None = None) -> buckets_lib.Tokenized:
  """Tokenizes classification records (see `sources.read_classification`).

  Args:
    records: dicts with 'text', 'text_pair' (None for single sentences) and
      'label'; all records must agree on having a pair or not.
    tokenizer: a Hugging Face tokenizer, e.g. BERT's WordPiece, or (single
      sentences, no token types) `byte_tokenizer.ByteTokenizer`.
    max_length: longest sequence, special tokens included; longer inputs are
      truncated (for pairs, the longer sentence first).
    buckets: shorter padding lengths; see `buckets.make_buckets`.
  """
  if not records:
    raise ValueError('classification.tokenize: no records.')
  pairs = [r.get('text_pair') is not None for r in records]
  if any(pairs) and not all(pairs):
    odd = records[pairs.index(not pairs[0])]['origin']
    raise ValueError(f'{odd}: mixes sentence pairs and single sentences; '
                     'set the pair field for every row or for none.')
  _check_room(tokenizer, max_length, pair=pairs[0])
  texts = [r['text'] for r in records]
  if pairs[0]:
    encoded = tokenizer(texts, [r['text_pair'] for r in records],
                        truncation=True, max_length=max_length)
  else:
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
  ids = [np.asarray(x, np.int32) for x in encoded['input_ids']]
  types = encoded.get('token_type_ids') or [np.zeros_like(x) for x in ids]
  return buckets_lib.Tokenized(
      sequences={
          'input_ids': ids,
          'attention_mask': [np.ones_like(x) for x in ids],
          'token_type_ids': [np.asarray(x, np.int32) for x in types],
      },
      scalars={'label': np.array([r['label'] for r in records], np.int32)},
      groups=dict.fromkeys(('input_ids', 'attention_mask', 'token_type_ids'),
                           'source'),
      buckets={'source': buckets_lib.make_buckets(max_length, buckets)},
      pad={'input_ids': tokenizer.pad_token_id})


def _check_room(tokenizer, max_length: int, pair: bool):
  special = tokenizer.num_special_tokens_to_add(pair=pair)
  needed = special + (2 if pair else 1)
  if max_length < needed:
    raise ValueError(
        f'max_length={max_length} cannot fit a {"pair" if pair else "sentence"}'
        f' ({special} special tokens + one token per sentence); use '
        f'max_length >= {needed}.')
