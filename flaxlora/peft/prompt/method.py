"""Prompt tuning's factory and folder loader.

    method = prompt.prompt_tuning(num_tokens=100, init='vocab_sample')
    method, adapter = prompt.load('path/to/peft', model)
"""
import os
from typing import Any, Mapping, Sequence

import jax

from flaxlora.peft import base as peft_base
from flaxlora.peft import trainable
from flaxlora.peft.prompt import core
from flaxlora.peft.prompt import folder as prompt_folder


def _write_peft(folder, model, base, adapter, method, **kwargs):
  del base  # a PROMPT_TUNING folder holds the prompt (and head copies) only
  return prompt_folder.save_prompt(folder, model, adapter, method, **kwargs)


EXPORT = peft_base.Export(_write_peft, needs_base=False)


def prompt_tuning(num_tokens: int = 100, init: str = 'random_uniform', *,
                  init_text: str | None = None,
                  class_labels: Sequence[str] | None = None,
                  tokenizer: Any = None, init_range: float = 0.5,
                  vocab_range: int | None = None) -> peft_base.PeftMethod:
  """A soft prompt of `num_tokens` vectors, trained with the base frozen.

  Args:
    num_tokens: P, the prompt length (0 gives the base model exactly).
    init: 'random_uniform' (U(-init_range, init_range)), 'vocab_sample'
      (embeddings of ids drawn uniformly from the first `vocab_range` of the
      vocabulary; Lester et al. use the 5000 most frequent, the first 5000
      of T5's frequency-ordered SentencePiece vocabulary), 'text' (the
      embeddings of `init_text`'s tokens, repeated or cut to P, as PEFT
      does), or 'class_labels' (each label's mean token embedding first, the
      rest vocab-sampled).
    init_text: the text for init='text'.
    class_labels: label words for init='class_labels'.
    tokenizer: a transformers tokenizer for 'text' / 'class_labels' (special
      tokens are not added).
    init_range: half-width of the uniform init.
    vocab_range: sample ids from [0, vocab_range) (None: the whole vocab).

  Returns:
    PeftMethod; adapter {'prompt': [P, H] fp32}; apply -> (base, {'prompt'}).
  """
  if init not in core.INITS:
    raise ValueError(f'prompt_tuning init={init!r}; choose one of '
                     f'{core.INITS}.')
  if not isinstance(num_tokens, int) or num_tokens < 0:
    raise ValueError(f'prompt_tuning num_tokens={num_tokens!r}; it must be '
                     'an int >= 0.')
  if init == 'text' and not init_text:
    raise ValueError("prompt_tuning init='text' needs init_text=.")

  def init_fn(rng: jax.Array, base: Any) -> dict[str, jax.Array]:
    table = core.embedding_table(base)
    return {'prompt': core.init_prompt(rng, table, num_tokens, init, init_text,
                                   class_labels, tokenizer, init_range,
                                   vocab_range)}

  def apply_fn(base: Any, adapter: dict[str, jax.Array]
               ) -> tuple[Any, dict[str, jax.Array]]:
    return base, {'prompt': adapter['prompt']}

  return peft_base.PeftMethod(init_fn, apply_fn,
                              core.PromptConfig(num_tokens, init, init_text),
                              logical_axes=core.adapter_logical_axes,
                              export=EXPORT)


def load(folder: str | os.PathLike, model: Any,
         base: Mapping[str, Any] | None = None
         ) -> tuple[peft_base.PeftMethod, Any]:
  """(method, adapter) of a PEFT PROMPT_TUNING folder (written by PEFT or
  `folder.save_prompt`) for `model`: prompt_tuning(P), chained with
  `trainable` when the folder holds modules to save; adapter
  {'prompt': [P, H]} (or the chain's tuple). `base` is not read."""
  del base
  kwargs, adapter, copies = prompt_folder.read_prompt(folder, model)
  return trainable.with_copies(prompt_tuning(**kwargs), adapter, copies)
