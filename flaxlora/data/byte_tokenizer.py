"""A ByT5-style byte tokenizer that needs no vocabulary file.

Ids are UTF-8 bytes shifted by 3: pad 0, eos 1, unk 2, byte b -> b + 3, so
`vocab_size` is 259. The call API follows Hugging Face tokenizers closely
enough for flaxlora's data code to take either:

  tok = byte_tokenizer.ByteTokenizer()
  tok(['hi', 'hello'], padding='longest')
  # {'input_ids': int32 [2, 6], 'attention_mask': int32 [2, 6]}
  tok(['hi'])['input_ids']   # [[107, 108, 1]] (lists when not padded)
  tok.decode([107, 108, 1])  # 'hi'
"""
from typing import Sequence

import numpy as np

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
OFFSET = 3


class ByteTokenizer:
  """UTF-8 bytes + 3; see the module docstring."""

  pad_token_id = PAD_ID
  eos_token_id = EOS_ID
  unk_token_id = UNK_ID
  vocab_size = 256 + OFFSET

  def __len__(self) -> int:
    return self.vocab_size

  def num_special_tokens_to_add(self, pair: bool = False) -> int:
    if pair:
      raise ValueError('ByteTokenizer encodes single texts, not sentence '
                       'pairs; use a BERT tokenizer for pair tasks.')
    return 1  # eos

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    ids = [b + OFFSET for b in text.encode('utf-8')]
    return ids + [EOS_ID] if add_special_tokens else ids

  def __call__(self, texts: str | Sequence[str], max_length: int | None = None,
               padding: bool | str = False, truncation: bool = False,
               add_special_tokens: bool = True):
    """Tokenizes one text or a batch.

    Args:
      texts: a string or a list of strings.
      max_length: the longest sequence (eos included) allowed.
      padding: False / 'do_not_pad' (lists of ids), True / 'longest' (numpy
        [B, T] padded to the longest), or 'max_length' ([B, max_length]).
      truncation: cut sequences to max_length (keeping eos last); without it
        a longer sequence is an error.
      add_special_tokens: append eos (1) to each sequence.

    Returns:
      {'input_ids', 'attention_mask'}: lists when not padding, int32 numpy
      arrays otherwise; unbatched when `texts` is a string.
    """
    single = isinstance(texts, str)
    texts = [texts] if single else texts
    batch = [self.encode(t, add_special_tokens) for t in texts]
    if max_length is not None:
      if max_length < int(add_special_tokens) + 1 and truncation:
        raise ValueError(f'max_length={max_length} leaves no room for text; '
                         'use max_length >= 2.')
      batch = [self._fit(ids, max_length, truncation, add_special_tokens, i)
               for i, ids in enumerate(batch)]
    if padding in (False, None, 'do_not_pad'):
      masks = [[1] * len(ids) for ids in batch]
      if single:
        return {'input_ids': batch[0], 'attention_mask': masks[0]}
      return {'input_ids': batch, 'attention_mask': masks}
    if padding == 'max_length':
      if max_length is None:
        raise ValueError("padding='max_length' needs max_length.")
      width = max_length
    elif padding in (True, 'longest'):
      width = max(len(ids) for ids in batch)
    else:
      raise ValueError(f'padding={padding!r}: use False, "longest" or '
                       '"max_length".')
    ids = np.full((len(batch), width), PAD_ID, np.int32)
    for i, row in enumerate(batch):
      ids[i, :len(row)] = row
    out = {'input_ids': ids, 'attention_mask': (ids != PAD_ID).astype(np.int32)}
    return {k: v[0] for k, v in out.items()} if single else out

  @staticmethod
  def _fit(ids, max_length, truncation, add_eos, index):
    if len(ids) <= max_length:
      return ids
    if not truncation:
      raise ValueError(
          f'text {index} is {len(ids)} ids long, over max_length={max_length};'
          ' pass truncation=True or a larger max_length.')
    return ids[:max_length - 1] + [EOS_ID] if add_eos else ids[:max_length]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of ids; bytes that are not valid UTF-8 are dropped."""
    data = bytearray()
    for i in np.asarray(ids, np.int64).reshape(-1).tolist():
      if OFFSET <= i < self.vocab_size:
        data.append(i - OFFSET)
      elif not skip_special_tokens and i in (PAD_ID, EOS_ID, UNK_ID):
        data.extend(('<pad>', '</s>', '<unk>')[i].encode())
    return data.decode('utf-8', errors='ignore')

  def batch_decode(self, batch: Sequence[Sequence[int]],
                   skip_special_tokens: bool = True) -> list[str]:
    return [self.decode(ids, skip_special_tokens) for ids in batch]
