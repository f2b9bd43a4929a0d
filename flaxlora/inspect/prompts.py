"""Nearest vocabulary tokens of learned soft-prompt vectors.

A prompt-tuning adapter {'prompt': [P, H]} holds P vectors in the model's
embedding space; the tokens whose embeddings have the highest cosine
similarity to each vector hint at what it learned (Lester et al., 2021,
Sec. 7). The [P, V] similarity is computed in chunks of the vocabulary, so
a large V never needs a [P, V] matrix at once beyond one chunk.
"""
import dataclasses
from typing import Any, Sequence

import numpy as np

from flaxlora.inspect import table
from flaxlora.inspect import tree as tree_lib

EMBEDDING_PATHS = ('shared/embedding', 'embeddings/word/embedding')
_CHUNK = 8192


@dataclasses.dataclass(frozen=True)
class Neighbour:
  token_id: int
  token: str
  cosine: float


def _decode(tokenizer: Any, token_id: int) -> str:
  if tokenizer is None:
    return str(token_id)
  if hasattr(tokenizer, 'convert_ids_to_tokens'):
    return str(tokenizer.convert_ids_to_tokens(int(token_id)))
  try:  # show special tokens too: a prompt vector may sit next to one
    return str(tokenizer.decode([int(token_id)], skip_special_tokens=False))
  except TypeError:
    return str(tokenizer.decode([int(token_id)]))


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_tokens(prompt: Any, embedding: Any, k: int = 5,
                   tokenizer: Any = None) -> list[list[Neighbour]]:
  """The k most cosine-similar vocabulary entries of each prompt vector.

  Args:
    prompt: [P, H] learned prompt.
    embedding: [V, H] the base model's token embedding table.
    k: neighbours per prompt vector.
    tokenizer: optional; decodes ids (`convert_ids_to_tokens` or `decode`).

  Returns:
    P lists of k `Neighbour`s, most similar first.
  """
  prompt = _unit(np.asarray(prompt, np.float32))
  embedding = np.asarray(embedding)
  if prompt.ndim != 2 or embedding.ndim != 2 or (
      prompt.shape[1] != embedding.shape[1]):
    raise ValueError(f'prompt [P, H] {prompt.shape} and embedding [V, H] '
                     f'{embedding.shape} must share H.')
  k = min(k, embedding.shape[0])
  best_ids = np.zeros((prompt.shape[0], 0), np.int64)
  best_cos = np.zeros((prompt.shape[0], 0), np.float32)
  for start in range(0, embedding.shape[0], _CHUNK):
    chunk = _unit(np.asarray(embedding[start:start + _CHUNK], np.float32))
    cos = np.concatenate([best_cos, prompt @ chunk.T], axis=1)  # [P, k + C]
    ids = np.concatenate(
        [best_ids, np.broadcast_to(np.arange(start, start + len(chunk)),
                                   (prompt.shape[0], len(chunk)))], axis=1)
    top = np.argsort(-cos, axis=1, kind='stable')[:, :k]
    best_cos = np.take_along_axis(cos, top, axis=1)
    best_ids = np.take_along_axis(ids, top, axis=1)
  return [[Neighbour(int(i), _decode(tokenizer, i), float(c))
           for i, c in zip(ids, cos)] for ids, cos in zip(best_ids, best_cos)]


def embedding_of(base: Any, path: str | None = None) -> Any:
  """The base model's word embedding table [V, H] (T5 or BERT layout)."""
  flat = tree_lib.flatten(base)
  for candidate in ([path] if path else EMBEDDING_PATHS):
    if candidate in flat:
      return flat[candidate]
  raise ValueError(f'no embedding table at {path or EMBEDDING_PATHS}; pass '
                   'embedding_path= naming the [V, H] table in the base.')


_HEADERS = ('position', 'nearest tokens: id:token (cosine)')


class PromptReport:
  """Nearest tokens per prompt position, printable as text and HTML."""

  def __init__(self, neighbours: Sequence[Sequence[Neighbour]]):
    self.neighbours = [list(n) for n in neighbours]

  def _cells(self) -> list[list[str]]:
    return [[str(p), ', '.join(f'{n.token_id}:{n.token!r} ({n.cosine:.3f})'
                               for n in row)]
            for p, row in enumerate(self.neighbours)]

  def __str__(self) -> str:
    return table.text(_HEADERS, self._cells(),
                      f'prompt ({len(self.neighbours)} vectors)')

  def _repr_html_(self) -> str:
    return table.html_table(_HEADERS,
                            self._cells())


def analyze_prompt(base: Any, adapter: Any, k: int = 5, tokenizer: Any = None,
                   embedding_path: str | None = None) -> PromptReport:
  """`nearest_tokens` of a prompt-tuning adapter ({'prompt': [P, H]})."""
  flat = tree_lib.flatten(adapter)
  prompts = [v for p, v in flat.items() if p.rpartition('/')[2] == 'prompt']
  if len(prompts) != 1:
    raise ValueError(f'expected one prompt [P, H] leaf in the adapter, found '
                     f'{len(prompts)} among {list(flat)[:4]}.')
  return PromptReport(nearest_tokens(prompts[0], embedding_of(base,
                                                              embedding_path),
                                     k, tokenizer))
