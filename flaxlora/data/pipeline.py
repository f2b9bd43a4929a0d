"""Shuffled, sharded batches with a checkpointable position.

Every process computes the same order of the whole dataset from (seed,
epoch), cuts it into global batches of `global_batch_size`, and reads and
pads only its own contiguous slice of each (`global_batch_size /
process_count` rows). The bucket length of a batch is chosen from the whole
global batch, so all processes produce the same shapes and the global batch
is the same whatever the process count.

The remainder of an epoch is dropped (training) or padded with rows whose
`weight` is 0 and `index` is -1 (evaluation), so weighted sums stay exact.

  loader = pipeline.Loader(data, global_batch_size=32, seed=0)
  batch = next(loader)          # {..., 'index': [B], 'weight': [B]}
  state = loader.state()        # {'epoch': 0, 'index': 1}: save it
  loader.restore(state)         # continues with exactly the next batch
"""
from typing import Any

import numpy as np

from flaxlora.data import buckets as buckets_lib


class Loader:
  """An iterator over per-process batches; see the module docstring."""

  def __init__(self, data: buckets_lib.Tokenized, *, global_batch_size: int,
               seed: int = 0, shuffle: bool = True,
               drop_remainder: bool = True, num_epochs: int | None = None,
               process_index: int = 0, process_count: int = 1):
    """Creates a loader at epoch 0, batch 0.

    Args:
      data: tokenized examples.
      global_batch_size: rows per step over all processes.
      seed: the shuffle seed; epoch e uses the order of (seed, e).
      shuffle: False keeps the dataset order (evaluation).
      drop_remainder: drop the last partial batch of each epoch (training)
        instead of padding it with weight-0 rows (evaluation).
      num_epochs: stop after this many epochs (None: never stop).
      process_index, process_count: this process and how many share the
        data (jax.process_index() / jax.process_count()).
    """
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(
          f'global_batch_size={global_batch_size} must be a positive multiple'
          f' of the process count {process_count}.')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index={process_index} is outside '
                       f'[0, {process_count}).')
    self.data = data
    self.global_batch_size = global_batch_size
    self.batch_size = global_batch_size // process_count
    self.seed, self.shuffle = seed, shuffle
    self.num_epochs = num_epochs
    self.process_index = process_index
    size = len(data)
    if drop_remainder:
      self.steps_per_epoch = size // global_batch_size
    else:
      self.steps_per_epoch = -(-size // global_batch_size)
    if not self.steps_per_epoch:
      raise ValueError(
          f'the dataset has {size} examples, fewer than global_batch_size='
          f'{global_batch_size}, and drop_remainder is set: no batch at all; '
          'lower the batch size or use more data.')
    self._epoch, self._index = 0, 0
    self._order = None  # (epoch, order of that epoch)

  def order(self, epoch: int) -> np.ndarray:
    """[num_examples] example order of `epoch` (the same on all processes)."""
    if self._order is None or self._order[0] != epoch:
      if self.shuffle:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.data))
      else:
        order = np.arange(len(self.data))
      self._order = (epoch, order)
    return self._order[1]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    size = self.global_batch_size
    chosen = self.order(self._epoch)[self._index * size:][:size]
    global_indices = np.full((size,), -1, np.int64)
    global_indices[:len(chosen)] = chosen
    widths = self.data.widths(global_indices)
    mine = slice(self.process_index * self.batch_size,
                 (self.process_index + 1) * self.batch_size)
    indices = global_indices[mine]
    batch = self.data.gather(indices, widths)
    batch['index'] = indices.astype(np.int32)
    batch['weight'] = (indices >= 0).astype(np.float32)
    self._index += 1
    if self._index == self.steps_per_epoch:
      self._epoch, self._index = self._epoch + 1, 0
    return batch

  def state(self) -> dict[str, int]:
    """The position: the epoch and the batch within it that comes next."""
    return {'epoch': self._epoch, 'index': self._index}

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from a position that `state()` returned."""
    if set(state) != {'epoch', 'index'}:
      raise ValueError(f'data iterator state {state} must have exactly the '
                       'keys epoch and index (from Loader.state()).')
    epoch, index = int(state['epoch']), int(state['index'])
    if epoch < 0 or not 0 <= index < self.steps_per_epoch:
      raise ValueError(
          f'data iterator state {state} does not fit this data: an epoch has '
          f'{self.steps_per_epoch} batches; was the checkpoint made with '
          'another dataset or batch size?')
    self._epoch, self._index = epoch, index
