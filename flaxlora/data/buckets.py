"""Tokenized examples of variable length, padded per batch to length buckets.

Padding every batch to the longest example wastes compute on short data;
padding to the batch's own longest example recompiles the step for every new
length. A short list of bucket lengths bounds the number of shapes: a batch
is padded to the smallest bucket that fits its longest example.

Sequences belong to length groups (BERT: 'source'; T5: 'source' and 'target'),
each with its own buckets, so a T5 batch's source and target lengths are
chosen independently.
"""
import dataclasses
from typing import Any, Sequence

import numpy as np


def make_buckets(max_length: int, buckets: Sequence[int] | None = None,
                 name: str = 'max_length') -> tuple[int, ...]:
  """Sorted bucket lengths ending at max_length (longer ones are dropped).

  Args:
    max_length: the longest sequence; always the last bucket.
    buckets: extra, shorter lengths (None: only max_length).
    name: the config option, for errors.
  """
  if max_length < 1:
    raise ValueError(f'{name}={max_length} must be positive.')
  buckets = list(buckets or ())
  if any(int(b) < 1 for b in buckets):
    raise ValueError(f'bucket lengths {buckets} for {name} must be positive.')
  return tuple(sorted({int(b) for b in buckets if b <= max_length} |
                      {max_length}))


def pick(length: int, buckets: Sequence[int], group: str = 'source') -> int:
  """The smallest bucket >= length."""
  for bucket in buckets:
    if bucket >= length:
      return bucket
  raise ValueError(f'a {group} sequence of length {length} exceeds the '
                   f'largest bucket {max(buckets)}; raise max_length.')


@dataclasses.dataclass
class Tokenized:
  """Tokenized examples (rows of any length) ready for batching.

  Attributes:
    sequences: name -> one 1-D int32 array per example (e.g. 'input_ids').
    scalars: name -> array [num_examples] (e.g. 'label').
    groups: sequence name -> length group ('source', 'target').
    buckets: length group -> sorted bucket lengths.
    pad: sequence name -> its padding value (default 0).
    meta: one dict per example that is not batched (ids, offsets, texts),
      looked up through the batch's 'index' column.
    left: sequence names padded on the left (prompts to generate from).
  """
  sequences: dict[str, list[np.ndarray]]
  scalars: dict[str, np.ndarray]
  groups: dict[str, str]
  buckets: dict[str, tuple[int, ...]]
  pad: dict[str, int] = dataclasses.field(default_factory=dict)
  meta: list[dict[str, Any]] | None = None
  left: tuple[str, ...] = ()

  def __post_init__(self):
    sizes = {name: len(col) for name, col in
             (*self.sequences.items(), *self.scalars.items())}
    if self.meta is not None:
      sizes['meta'] = len(self.meta)
    if len(set(sizes.values())) > 1:
      raise AssertionError(f'columns differ in length: {sizes}')
    if not sizes or not next(iter(sizes.values())):
      raise ValueError('the dataset holds no examples after tokenisation.')
    assert set(self.groups) == set(self.sequences), (self.groups,
                                                     self.sequences)
    assert set(self.groups.values()) <= set(self.buckets), self.buckets
    self.scalars = {k: np.asarray(v) for k, v in self.scalars.items()}
    self._lengths = {}  # group -> [num_examples], computed once

  def __len__(self) -> int:
    return len(next(iter({**self.sequences, **self.scalars}.values())))

  def lengths(self, group: str) -> np.ndarray:
    """[num_examples] the longest row of `group` in each example."""
    if group not in self._lengths:
      names = [n for n, g in self.groups.items() if g == group]
      self._lengths[group] = np.max(
          [[len(row) for row in self.sequences[n]] for n in names], axis=0)
    return self._lengths[group]

  def widths(self, indices: np.ndarray) -> dict[str, int]:
    """Bucket length per group for the examples `indices` (-1: padding)."""
    real = indices[indices >= 0]
    widths = {}
    for group, buckets in self.buckets.items():
      longest = int(self.lengths(group)[real].max()) if real.size else 1
      widths[group] = pick(longest, buckets, group)
    return widths

  def gather(self, indices: np.ndarray, widths: dict[str, int]
             ) -> dict[str, np.ndarray]:
    """Padded numpy batch of `indices` [B]; index -1 gives an all-pad row."""
    batch = {}
    for name, rows in self.sequences.items():
      out = np.full((len(indices), widths[self.groups[name]]),
                    self.pad.get(name, 0), np.int32)
      for i, index in enumerate(indices):
        if index >= 0 and name in self.left:
          out[i, out.shape[1] - len(rows[index]):] = rows[index]
        elif index >= 0:
          out[i, :len(rows[index])] = rows[index]
      batch[name] = out
    for name, values in self.scalars.items():
      out = np.zeros((len(indices),), values.dtype)
      out[indices >= 0] = values[indices[indices >= 0]]
      batch[name] = out
    return batch
