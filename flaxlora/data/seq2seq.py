"""Source/target features for T5: summarization and text-to-text QA.

Decoder inputs are formed here, not by the model: T5 starts decoding from
the pad id, so for a target `y_1 .. y_n </s>`

  labels             = y_1 .. y_n </s>  pad ..   int32 [B, T]
  decoder_input_ids  = pad y_1 .. y_n   pad ..   int32 [B, T]
  decoder_attention_mask = 1 on the n + 1 target positions, else 0;
                       it is also the loss weight of each label.

and the source is `input_ids`, `attention_mask` int32 [B, S]. S and T are
bucketed independently (groups 'source' and 'target'). The loader's `index`
is the record's position in the list given to `tokenize` (one feature per
record), which is how evaluation finds the reference text.
"""
from typing import Any, Sequence

import numpy as np

from flaxlora.data import buckets as buckets_lib

SUMMARIZE = 'summarize: '


def tokenize(records: Sequence[dict[str, Any]], tokenizer, *,
             max_source_length: int, max_target_length: int,
             prefix: str = '', source_buckets: Sequence[int] | None = None,
             target_buckets: Sequence[int] | None = None
             ) -> buckets_lib.Tokenized:
  """Tokenizes seq2seq records ({'source', 'target', ...}).

  Args:
    records: see `sources.read_seq2seq` or `squad_to_text`.
    tokenizer: a T5 tokenizer or `byte_tokenizer.ByteTokenizer`; it must
      append eos and truncate keeping it.
    max_source_length: S, eos included; longer sources are truncated.
    max_target_length: T, eos included; longer targets are truncated.
    prefix: task prefix prepended to each source (e.g. SUMMARIZE).
    source_buckets, target_buckets: shorter padding lengths per side.
  """
  if not records:
    raise ValueError('seq2seq.tokenize: no records.')
  prefix_ids = tokenizer(prefix, add_special_tokens=False)['input_ids']
  if len(prefix_ids) + 2 > max_source_length:
    raise ValueError(
        f'max_source_length={max_source_length} cannot fit the prefix '
        f'{prefix!r} ({len(prefix_ids)} tokens) + one source token + eos; use'
        f' max_source_length >= {len(prefix_ids) + 2}.')
  if max_target_length < 2:
    raise ValueError(f'max_target_length={max_target_length} cannot fit one '
                     'target token + eos; use max_target_length >= 2.')
  sources = tokenizer([prefix + r['source'] for r in records],
                      truncation=True, max_length=max_source_length)
  targets = tokenizer([r['target'] for r in records], truncation=True,
                      max_length=max_target_length)
  source_ids = [np.asarray(x, np.int32) for x in sources['input_ids']]
  labels = [np.asarray(x, np.int32) for x in targets['input_ids']]
  start = np.int32(tokenizer.pad_token_id)
  return buckets_lib.Tokenized(
      sequences={
          'input_ids': source_ids,
          'attention_mask': [np.ones_like(x) for x in source_ids],
          'labels': labels,
          'decoder_input_ids': [np.concatenate([[start], y[:-1]])
                                for y in labels],
          'decoder_attention_mask': [np.ones_like(y) for y in labels],
      },
      scalars={},
      groups={'input_ids': 'source', 'attention_mask': 'source',
              'labels': 'target', 'decoder_input_ids': 'target',
              'decoder_attention_mask': 'target'},
      buckets={
          'source': buckets_lib.make_buckets(
              max_source_length, source_buckets, 'max_source_length'),
          'target': buckets_lib.make_buckets(
              max_target_length, target_buckets, 'max_target_length'),
      },
      pad={'input_ids': tokenizer.pad_token_id,
           'labels': tokenizer.pad_token_id,
           'decoder_input_ids': tokenizer.pad_token_id})


def squad_to_text(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """SQuAD records as T5 text-to-text QA records.

  source 'question: Q context: C', target the first answer; 'references'
  keeps every gold answer for exact match / F1. A source truncated to
  max_source_length may lose the answer; such examples stay (they are rare
  at 512 tokens and real T5 is trained the same way).
  """
  out = []
  for r in records:
    if not r['answers']:
      raise ValueError(f'{r["origin"]}: a question without answers cannot '
                       'be a text-to-text QA example.')
    out.append({
        'id': r['id'],
        'source': f'question: {r["question"].strip()} context: '
                  f'{r["context"]}',
        'target': r['answers'][0]['text'],
        'references': [a['text'] for a in r['answers']],
        'origin': r['origin'],
    })
  return out
