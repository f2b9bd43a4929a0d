"""Prompt/response features for decoder-only LMs (instructions, summaries).

A record {'source', 'target'} (see `sources.read_seq2seq`; the fields are
configurable, e.g. instruction/response or dialogue/summary) becomes one
sequence, the prompt followed by the response:

  input_ids       = prefix source suffix | target eos     int32 [B, T]
  attention_mask  = 1 on the tokens, 0 on padding          int32 [B, T]
  loss_mask       = 0 on the prompt, 1 on target and eos   int32 [B, T]

`loss_mask[t]` says whether token t is predicted (from tokens < t), so the
loss is the cross-entropy of logits[:, :-1] against input_ids[:, 1:]
weighted by loss_mask[:, 1:]: transformers' labels with -100 on the prompt.
The prompt is `Prompt`: a plain template around the source, or the
tokenizer's chat template with the template as the user message. Sources
are cut to `max_source_length` tokens, targets to `max_target_length`
(eos included), so every prompt is whole.

Packed (`pack=True`): several sequences share a row of `max_length` tokens,

  segment_ids     = 1, 2, .. per sequence, 0 on padding   int32 [B, T]
  positions       = 0, 1, .. restarting in each sequence   int32 [B, T]

and attention stays inside a segment; the loss is the same sum as
unpacked. Eval features also hold the prompt alone, left-padded, for
generation: 'prompt_ids', 'prompt_mask' [B, P].
"""
from typing import Any, Sequence

import numpy as np

from flaxlora.data import buckets as buckets_lib

SOURCE = '{source}'
# Stands for the source while a chat template is rendered.
_MARK = '\u2063SOURCE\u2063'


class Prompt:
  """Token ids around a source: prompt = prefix + source + suffix.

  Attributes:
    prefix, suffix: int lists of token ids.
  """

  def __init__(self, tokenizer: Any, template: str, chat: bool):
    """Tokenizes the fixed parts of the prompt.

    Args:
      tokenizer: a Hugging Face or byte tokenizer.
      template: text holding '{source}' once, e.g. 'Summarize:\\n{source}'.
      chat: render the template as the user message of the tokenizer's chat
        template (with the generation prompt of the assistant turn);
        otherwise the template is the whole prompt, after the tokenizer's
        bos token when it has one.
    """
    if template.count(SOURCE) != 1:
      raise ValueError(f'data.prompt={template!r} must hold {SOURCE} once '
                       '(where the source text goes).')
    if chat:
      if not getattr(tokenizer, 'chat_template', None):
        raise ValueError(f'data.chat_template=True but the tokenizer '
                         f'{type(tokenizer).__name__} has no chat template; '
                         'set data.chat_template=False (plain data.prompt).')
      text = tokenizer.apply_chat_template(
          [{'role': 'user', 'content': template.replace(SOURCE, _MARK)}],
          tokenize=False, add_generation_prompt=True)
      before, after = text.split(_MARK)
      self.prefix, self.suffix = self._ids(tokenizer, before), self._ids(
          tokenizer, after)
    else:
      before, after = template.split(SOURCE)
      bos = getattr(tokenizer, 'bos_token_id', None)
      self.prefix = [bos] * (bos is not None) + self._ids(tokenizer, before)
      self.suffix = self._ids(tokenizer, after)

  @staticmethod
  def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)['input_ids']
               ) if text else []

  def __call__(self, source_ids: Sequence[int]) -> list[int]:
    return self.prefix + list(source_ids) + self.suffix

  def __len__(self) -> int:
    """Tokens of the prompt besides the source."""
    return len(self.prefix) + len(self.suffix)


def max_length(prompt: Prompt, max_source_length: int,
               max_target_length: int) -> int:
  """The longest sequence: a whole prompt and target."""
  return len(prompt) + max_source_length + max_target_length


def _encode(tokenizer, texts: list[str], limit: int) -> list[list[int]]:
  ids = tokenizer(texts, add_special_tokens=False)['input_ids']
  return [list(x)[:limit] for x in ids]


def sequences(records: Sequence[dict[str, Any]], tokenizer: Any,
              prompt: Prompt, *, max_source_length: int,
              max_target_length: int
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(prompt ids, target ids + eos) per record, each int32 [n]."""
  if not records:
    raise ValueError('causal.tokenize: no records.')
  if max_target_length < 2:
    raise ValueError(f'data.max_target_length={max_target_length} cannot fit'
                     ' one target token + eos; use >= 2.')
  if max_source_length < 1:
    raise ValueError(f'data.max_source_length={max_source_length} must be '
                     'positive.')
  eos = tokenizer.eos_token_id
  if eos is None:
    raise ValueError(f'the tokenizer {type(tokenizer).__name__} has no eos '
                     'token; a causal LM needs one to end its responses.')
  source_ids = _encode(tokenizer, [r['source'] for r in records],
                       max_source_length)
  target_ids = _encode(tokenizer, [r['target'] for r in records],
                       max_target_length - 1)
  prompts = [np.asarray(prompt(s), np.int32) for s in source_ids]
  targets = [np.asarray(t + [eos], np.int32) for t in target_ids]
  return prompts, targets


def _pad_id(tokenizer) -> int:
  pad = tokenizer.pad_token_id
  return tokenizer.eos_token_id if pad is None else pad


def tokenize(records: Sequence[dict[str, Any]], tokenizer: Any,
             prompt: Prompt, *, max_source_length: int,
             max_target_length: int, buckets: Sequence[int] | None = None,
             pack: bool = False, with_prompts: bool = False
             ) -> buckets_lib.Tokenized:
  """Tokenizes causal-LM records; see the module docstring.

  Args:
    records: {'source', 'target', ...} records.
    tokenizer: a Hugging Face or byte tokenizer with an eos token.
    prompt: the template around each source.
    max_source_length: source tokens kept (the rest is cut).
    max_target_length: target tokens kept, eos included.
    buckets: shorter row lengths than `max_length(...)`.
    pack: several sequences a row (`pack_rows`); train data only.
    with_prompts: also 'prompt_ids' / 'prompt_mask', left-padded (eval).
  """
  if pack and with_prompts:
    raise ValueError('packed rows hold several prompts; pack train data '
                     'only.')
  prompts, targets = sequences(records, tokenizer, prompt,
                               max_source_length=max_source_length,
                               max_target_length=max_target_length)
  length = max_length(prompt, max_source_length, max_target_length)
  pad = _pad_id(tokenizer)
  if pack:
    return pack_rows(prompts, targets, length, pad)
  ids = [np.concatenate([p, t]) for p, t in zip(prompts, targets)]
  columns = {
      'input_ids': ids,
      'attention_mask': [np.ones_like(x) for x in ids],
      'loss_mask': [np.concatenate([np.zeros_like(p), np.ones_like(t)])
                    for p, t in zip(prompts, targets)],
  }
  groups = dict.fromkeys(columns, 'tokens')
  bucket_lengths = {'tokens': buckets_lib.make_buckets(
      length, buckets, 'data.max_source_length + data.max_target_length')}
  left = ()
  if with_prompts:
    columns['prompt_ids'] = prompts
    columns['prompt_mask'] = [np.ones_like(p) for p in prompts]
    groups.update(prompt_ids='prompt', prompt_mask='prompt')
    bucket_lengths['prompt'] = buckets_lib.make_buckets(
        len(prompt) + max_source_length, buckets, 'data.max_source_length')
    left = ('prompt_ids', 'prompt_mask')
  return buckets_lib.Tokenized(
      sequences=columns, scalars={}, groups=groups,
      buckets=bucket_lengths,
      pad={'input_ids': pad, 'prompt_ids': pad}, left=left)


def pack_rows(prompts: Sequence[np.ndarray], targets: Sequence[np.ndarray],
              length: int, pad: int) -> buckets_lib.Tokenized:
  """Sequences (prompt + target) packed in order into rows of `length`.

  A row takes the next sequence while it fits, then a new row starts;
  nothing is split. Each row is one example of the loader ('tokens' group,
  one bucket: `length`).
  """
  rows, row, used = [], [], 0
  for p, t in zip(prompts, targets):
    size = len(p) + len(t)
    if row and used + size > length:
      rows.append(row)
      row, used = [], 0
    row.append((p, t))
    used += size
  rows.append(row)
  columns = {k: [] for k in ('input_ids', 'attention_mask', 'loss_mask',
                             'segment_ids', 'positions')}
  for row in rows:
    parts = {k: [] for k in columns}
    for segment, (p, t) in enumerate(row, start=1):
      n = len(p) + len(t)
      parts['input_ids'].append(np.concatenate([p, t]))
      parts['attention_mask'].append(np.ones(n, np.int32))
      parts['loss_mask'].append(np.concatenate(
          [np.zeros_like(p), np.ones_like(t)]))
      parts['segment_ids'].append(np.full(n, segment, np.int32))
      parts['positions'].append(np.arange(n, dtype=np.int32))
    for k in columns:
      columns[k].append(np.concatenate(parts[k]).astype(np.int32))
  return buckets_lib.Tokenized(
      sequences=columns, scalars={}, groups=dict.fromkeys(columns, 'tokens'),
      buckets={'tokens': (length,)}, pad={'input_ids': pad})
