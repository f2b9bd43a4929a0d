"""Loading Hugging Face tokenizers, refusing ones without their vocabulary.

    tokenizer = tokenizers.load_tokenizer('google-t5/t5-small')

transformers 5 quietly builds a T5 tokenizer of ~100 special tokens when a
folder lacks spiece.model and tokenizer.json, and that tokenizer maps every
word to <unk>: training then "works" on garbage. `load_tokenizer` checks for a
vocabulary file first and, after loading, that the vocabulary is as large as
the model's and that plain text does not all map to <unk>.
"""
import json
import os
import pathlib
from typing import Any

from flaxlora.models import gguf
from flaxlora.models import hf_io

# Any of these holds a vocabulary (T5: spiece.model or tokenizer.json; BERT:
# vocab.txt or tokenizer.json; BPE models: vocab.json + merges.txt).
VOCAB_FILES = ('tokenizer.json', 'spiece.model', 'sentencepiece.bpe.model',
               'vocab.txt', 'vocab.json')
PROBE = 'The quick brown fox jumps over the lazy dog.'


def _expected_vocab_size(folder: pathlib.Path) -> int | None:
  file = folder / hf_io.CONFIG_FILE
  if not file.is_file():
    return None
  try:
    return json.loads(file.read_text()).get('vocab_size')
  except (json.JSONDecodeError, AttributeError):
    return None


def _check_loaded(tokenizer, folder, vocab_size: int | None) -> None:
  size = len(tokenizer)
  # Checkpoints pad the embedding table (T5: 32100 tokens, 32128 rows), so
  # only a tokenizer far smaller than the model's vocabulary is wrong.
  if vocab_size and size < vocab_size // 2:
    raise ValueError(
        f'tokenizer from {folder} has {size} tokens but the model expects '
        f'vocab_size={vocab_size} (config.json): its vocabulary file '
        f'({" or ".join(VOCAB_FILES[:2])}) is missing or wrong. Copy it from '
        'the original checkpoint.')
  unk = tokenizer.unk_token_id
  special = set(getattr(tokenizer, 'all_special_ids', ())) - {unk}
  ids = [i for i in tokenizer(PROBE)['input_ids'] if i not in special]
  if unk is not None and ids and all(i == unk for i in ids):
    raise ValueError(
        f'tokenizer from {folder} maps all of {PROBE!r} to '
        f'{tokenizer.unk_token}: its vocabulary '
        f'({" or ".join(VOCAB_FILES[:2])}) is missing. Copy it from the '
        'original checkpoint.')


def load_tokenizer(folder_or_hub_id: str | os.PathLike, *,
                   vocab_size: int | None = None) -> Any:
  """A `transformers` tokenizer, checked to hold a real vocabulary.

  Args:
    folder_or_hub_id: a local folder, a hub id (cache only when offline)
      or a GGUF file (whose tokenizer transformers builds).
    vocab_size: the model's vocabulary size; by default config.json's, when
      the folder has one.

  Returns:
    The tokenizer (never built from remote code).

  Raises:
    ValueError: the folder has no vocabulary file, or the loaded tokenizer is
      far smaller than the model's vocabulary, or maps plain text to <unk>.
  """
  if gguf.is_gguf(folder_or_hub_id):  # the tokenizer stored in the file
    tokenizer = gguf.tokenizer(folder_or_hub_id)
    _check_loaded(tokenizer, folder_or_hub_id, vocab_size or
                  gguf.read_config(folder_or_hub_id)['vocab_size'])
    return tokenizer
  folder = hf_io.resolve(folder_or_hub_id)
  present = [name for name in VOCAB_FILES if (folder / name).is_file()]
  if not present:
    raise ValueError(
        f'{folder} has no tokenizer vocabulary: expected spiece.model or '
        'tokenizer.json (T5), vocab.txt (BERT) or vocab.json. Without it '
        'transformers builds a ~100-token tokenizer that maps every word to '
        '<unk>; copy the file from the original checkpoint into the folder.')
  import transformers  # pylint: disable=g-import-not-at-top
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      str(folder), trust_remote_code=False)
  _check_loaded(tokenizer, folder, vocab_size or _expected_vocab_size(folder))
  return tokenizer
