"""Prompt tuning's construction (Lester et al. 2021): insert, init, axes.

The adapter is one soft prompt `{'prompt': [P, H]}`; the base params are
untouched. `apply` hands the prompt to the model as its one optional argument:

    method = prompt.prompt_tuning(num_tokens=100, init='vocab_sample')
    adapter = method.init(rng, base)
    params, kw = method.apply(base, adapter)      # kw == {'prompt': [P, H]}
    logits = model.apply({'params': params}, *inputs, **kw)

Where the prompt goes (the models do the combining themselves, so that they
stay PEFT-agnostic; `insert_prompt` / `remove_prompt` below are the same
operations as pure functions, the references the tests check them against):
  * T5: prepended to the encoder input embeddings (index 0) and the encoder
    attention mask extended with ones; the decoder cross-attends to all P+S
    encoder positions. This is PEFT's layout too.
  * BERT: inserted right after [CLS] (index 1), so the pooler and the
    classifier still read [CLS] at position 0. The prompt enters at the word
    embedding level: it then gets position embeddings like any token (the
    sequence is simply P tokens longer, so T + P <= max_position_embeddings),
    token type 0 (segment A, which it precedes), and the embedding layer norm.
    Outputs per token (hidden states, QA start/end logits) have the P prompt
    positions removed, so position t still means input token t and SQuAD
    answer offsets need no shift. PEFT instead prepends before [CLS] (its
    pooler then reads a prompt vector); `folder` reads and writes PEFT's
    files, but a BERT prompt trained by one framework is placed differently
    by the other.
  * Llama-shaped and GPT-2 causal LMs: prepended to the token embeddings
    (index 0) with the mask extended by ones, as PEFT does; the prompt takes
    positions 0..P-1 and the tokens count on from P (a left-padded row's
    first real token is at P, so padding does not move the prompt), and the
    logits leave out the P prompt positions. Decoding with a key/value cache
    writes the prompt's P positions into the cache ahead of the tokens, in
    the first call (`causal_decoding`). PEFT numbers positions 0..P+T-1 whatever the
    padding, so rows without padding give the same logits in both.
"""
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec


INITS = ('random_uniform', 'vocab_sample', 'text', 'class_labels')

# The word embedding table of each model family ([V, H]): T5, BERT, Llama,
# GPT-2.
EMBEDDING_PATHS = (('shared', 'embedding'), ('embeddings', 'word', 'embedding'),
                   ('embed_tokens', 'embedding'), ('wte', 'embedding'))


def insert_prompt(x: jax.Array, prompt: jax.Array, index: int = 0
                  ) -> jax.Array:
  """Inserts `prompt` into `x` along the sequence axis, after `index` tokens.

  Args:
    x: [B, T, ...] (embeddings [B, T, H], a mask or token types [B, T]).
    prompt: [P, ...] shared by the batch, or [B, P, ...]; cast to x's dtype.
    index: number of leading tokens of x kept before the prompt.

  Returns:
    [B, T + P, ...]: x[:, :index], prompt, x[:, index:].
  """
  prompt = jnp.asarray(prompt, x.dtype)
  if prompt.ndim == x.ndim - 1:
    prompt = jnp.broadcast_to(prompt[None], (x.shape[0],) + prompt.shape)
  return jnp.concatenate([x[:, :index], prompt, x[:, index:]], axis=1)


def remove_prompt(y: jax.Array, num_tokens: int, index: int = 0
                  ) -> jax.Array:
  """Drops the P = `num_tokens` prompt positions: [B, T+P, ...] -> [B, T, ...].
  """
  return jnp.concatenate([y[:, :index], y[:, index + num_tokens:]], axis=1)


def embedding_table(base: Any) -> Any:
  """The word embedding table [V, H] of a model's params."""
  for path in EMBEDDING_PATHS:
    node = base
    for name in path:
      if not isinstance(node, dict) or name not in node:
        break
      node = node[name]
    else:
      return node
  raise ValueError(
      'prompt tuning needs the word embedding table, at '
      f'{["/".join(p) for p in EMBEDDING_PATHS]}; params have top-level keys '
      f'{sorted(base)[:8]}.')


def _token_ids(tokenizer: Any, text: str) -> list[int]:
  if tokenizer is None:
    raise ValueError(f'prompt_tuning init needs `tokenizer=` to tokenize '
                     f'{text!r}.')
  ids = tokenizer(text, add_special_tokens=False)['input_ids']
  if not ids:
    raise ValueError(f'prompt_tuning: {text!r} tokenizes to no tokens.')
  return list(ids)


def _repeat_to(ids: Sequence[int], n: int) -> np.ndarray:
  """Repeats and trims ids to exactly n (PEFT's rule for text init)."""
  reps = -(-n // len(ids))
  return np.asarray(list(ids) * reps, np.int32)[:n]


def init_prompt(rng, table, num_tokens, init, init_text, class_labels,
                 tokenizer, init_range, vocab_range) -> jax.Array:
  """[P, H] initial prompt; see `prompt_tuning` for the `init` kinds."""
  v, h = table.shape
  if init == 'random_uniform':
    return jax.random.uniform(rng, (num_tokens, h), jnp.float32,
                              -init_range, init_range)
  sample = jax.random.randint(rng, (num_tokens,), 0,
                              min(v, vocab_range or v))
  if init == 'vocab_sample':
    return jnp.take(table, sample, axis=0).astype(jnp.float32)
  if init == 'text':
    ids = _repeat_to(_token_ids(tokenizer, init_text), num_tokens)
    return jnp.take(table, jnp.asarray(ids), axis=0).astype(jnp.float32)
  # 'class_labels': the first C tokens are the mean embedding of each label's
  # word pieces (Lester et al. sec. 3), the rest are sampled from the vocab.
  if not class_labels:
    raise ValueError("prompt_tuning init='class_labels' needs class_labels=.")
  if len(class_labels) > num_tokens:
    raise ValueError(f'prompt_tuning: {len(class_labels)} class_labels do '
                     f'not fit in num_tokens={num_tokens}.')
  rows = [jnp.mean(jnp.take(table, jnp.asarray(_token_ids(tokenizer, label)),
                            axis=0), axis=0) for label in class_labels]
  rest = jnp.take(table, sample[len(rows):], axis=0)
  return jnp.concatenate([jnp.stack(rows), rest]).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """Prompt tuning hyperparameters (for `describe` and PEFT export)."""
  num_tokens: int = 100
  init: str = 'random_uniform'
  init_text: str | None = None


def adapter_logical_axes(base_axes: Any, adapter: dict[str, Any]
                         ) -> dict[str, PartitionSpec]:
  """The prompt is small and read by every device: replicated."""
  del base_axes, adapter
  return {'prompt': PartitionSpec('prompt', None)}
