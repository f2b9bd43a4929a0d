"""Packing of seq2seq examples into fixed-length rows (T5 training).

    rows = seq2seq_packing.pack(examples, source_length=64, target_length=16)
    logits = model.apply({'params': p}, rows['input_ids'],
                         rows['attention_mask'], rows['decoder_input_ids'],
                         rows['decoder_attention_mask'], packing=rows)

Several (source, target) examples share one row of the encoder and one of
the decoder; `segment_ids` number them (1, 2, ...; 0 is padding) and
`positions` restart at 0 in each, so that `t5.T5` attends within a segment
only and computes T5's relative positions per segment: the loss of a packed
batch equals the loss of the same examples unpacked. A pure helper (numpy
in, numpy out); wiring it into a data pipeline is the pipeline's.
"""
from typing import Sequence

import numpy as np

KEYS = ('input_ids', 'attention_mask', 'encoder_segment_ids',
        'encoder_positions', 'decoder_input_ids', 'decoder_attention_mask',
        'decoder_segment_ids', 'decoder_positions', 'labels')


def pack(examples: Sequence[tuple[Sequence[int], Sequence[int]]], *,
         source_length: int, target_length: int,
         decoder_start_id: int = 0) -> dict[str, np.ndarray]:
  """Packs (source ids, target ids) examples greedily, in order, into rows.

  A row is closed when the next example's source or target does not fit.
  Each segment's decoder input is its target shifted right behind
  `decoder_start_id`.

  Args:
    examples: (source ids, target ids) pairs; each must fit one row.
    source_length: S, the encoder row length.
    target_length: T, the decoder row length.
    decoder_start_id: T5's decoder start token (the pad id, 0).

  Returns:
    {key: int32 [R, S] (encoder keys) or [R, T] (decoder keys, labels)} for
    the KEYS; padding has segment id 0, mask 0 and label 0.
  """
  rows, used = [], None
  for number, (source, target) in enumerate(examples):
    source, target = list(source), list(target)
    if len(source) > source_length or len(target) > target_length:
      raise ValueError(f'example {number} has {len(source)} source and '
                       f'{len(target)} target tokens, more than a row '
                       f'({source_length}, {target_length}); truncate it.')
    if (used is None or used[0] + len(source) > source_length or
        used[1] + len(target) > target_length):
      rows.append({k: np.zeros(source_length if k.startswith(
          ('input', 'attention', 'encoder')) else target_length, np.int32)
                   for k in KEYS})
      used, segment = [0, 0], 0
    row, segment = rows[-1], segment + 1
    s, t = slice(used[0], used[0] + len(source)), slice(
        used[1], used[1] + len(target))
    row['input_ids'][s] = source
    row['attention_mask'][s] = 1
    row['encoder_segment_ids'][s] = segment
    row['encoder_positions'][s] = np.arange(len(source))
    row['labels'][t] = target
    row['decoder_input_ids'][t] = [decoder_start_id] + target[:-1]
    row['decoder_attention_mask'][t] = 1
    row['decoder_segment_ids'][t] = segment
    row['decoder_positions'][t] = np.arange(len(target))
    used = [used[0] + len(source), used[1] + len(target)]
  return {k: np.stack([r[k] for r in rows]) for k in KEYS}
