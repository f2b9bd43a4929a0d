"""Greedy, beam search and sampling for the causal LMs (`llama`, `gpt2`).

    tokens = causal_decoding.generate(model, params, input_ids,
                                      attention_mask, max_new_tokens=64)
    tokens = causal_decoding.generate(..., num_beams=4)
    tokens = causal_decoding.generate(..., do_sample=True, temperature=0.7,
                                      top_p=0.9, rng=jax.random.PRNGKey(0))

Prompts are left-padded ([B, T], mask 0 on the left). One jitted program
per model, settings and shape: the prompt fills a key/value cache of T + L
slots in one call, then a `lax.while_loop` feeds one token per step (the
loops are `decoding.greedy` and `decoding.beam`, which follow transformers'
rules so that tokens match its `generate`). A row stops at any EOS id; the
loop stops when all have. Tokens after a row's EOS are the pad id.

Adapters: pass the params a PEFT method's `apply` returns, and its model
kwargs (a soft prompt goes before the prompt; a key/value prefix fills the
cache's first slots). A `multi` bank's adapted kernels pick each row's
adapter, beams following their item.

Chat prompts: `chat_prompts(tokenizer, conversations)` applies the
tokenizer's chat template and left-pads the batch.
"""
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxlora import models
from flaxlora.models import decoding

Array = jax.Array


def _stepper(model, params, input_ids, mask, length, model_kwargs):
  """(init() -> state, step(inputs [R, L], index, state) -> logits, state).

  init runs the prompt through the model into a fresh cache and keeps its
  last logits; step 0 returns those, step i > 0 feeds token inputs[:, i]
  (the token chosen at step i - 1, as `decoding` shifts them).
  """
  family = models.family_of_model(model)
  kwargs = dict(model_kwargs)
  prefix = kwargs.pop('prefix_kv', None)
  prompt = kwargs.get('prompt')
  extra = 0 if prompt is None else prompt.shape[-2]
  rows = input_ids.shape[0]

  def init():
    cache = family.init_cache(model, rows, extra + input_ids.shape[1] +
                              length, prefix)
    logits, cache = model.apply({'params': params}, input_ids, mask,
                                cache=cache, **kwargs)
    return {'cache': cache, 'first': logits[:, -1].astype(jnp.float32)}

  def step(inputs, index, state):
    def first():
      return state['first'], state

    def later():
      ids = jax.lax.dynamic_slice_in_dim(inputs, index, 1, axis=1)
      logits, cache = model.apply({'params': params}, ids,
                                  jnp.ones_like(ids), cache=state['cache'])
      return logits[:, 0].astype(jnp.float32), dict(state, cache=cache)

    return jax.lax.cond(index == 0, first, later)

  return init, step


def _reorder(state, rows: Array):
  """Every per-row array follows its beam (the slot index is shared)."""
  return jax.tree.map(
      lambda x: x if x.ndim == 0 else jnp.take(x, rows, axis=0), state)


def warp(logits: Array, temperature: float, top_k: int,
         top_p: float) -> Array:
  """Sampling logits [B, V] as transformers warps them: temperature, then
  top-k, then top-p (the smallest set of tokens whose probability reaches
  top_p, at least one); excluded tokens get -inf."""
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    before = jnp.cumsum(jax.nn.softmax(ranked, -1), -1) - jax.nn.softmax(
        ranked, -1)  # probability of the better tokens
    drop_ranked = before >= top_p
    drop = jnp.zeros_like(drop_ranked).at[
        jnp.arange(logits.shape[0])[:, None], order].set(drop_ranked)
    logits = jnp.where(drop, -jnp.inf, logits)
  return logits


@functools.partial(jax.jit, static_argnames=(
    'model', 'max_new_tokens', 'num_beams', 'ids', 'length_penalty',
    'early_stopping', 'min_new_tokens', 'sampling'))
def _generate(params, input_ids, attention_mask, model_kwargs, rng, *, model,
              max_new_tokens, num_beams, ids, length_penalty, early_stopping,
              min_new_tokens, sampling):
  batch = input_ids.shape[0]
  if num_beams > 1:  # each item's beams are consecutive rows
    input_ids = jnp.repeat(input_ids, num_beams, axis=0)
    attention_mask = jnp.repeat(attention_mask, num_beams, axis=0)
  init, step = _stepper(model, decoding.kernels_in(params, model.dtype),
                        input_ids, attention_mask, max_new_tokens,
                        model_kwargs)
  if num_beams > 1:
    settings = (num_beams, length_penalty, early_stopping, min_new_tokens)
    return decoding.beam(init, step, batch, max_new_tokens, ids, settings,
                         reorder=_reorder)
  def sample(logits, index):
    logits = warp(logits, *sampling)
    key = jax.random.fold_in(rng, index)
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)
  pick = decoding.argmax if sampling is None else sample
  return decoding.greedy(init, step, batch, max_new_tokens, ids,
                         min_new_tokens, pick)


def generate(model, params, input_ids: Array, attention_mask: Array, *,
             max_new_tokens: int, num_beams: int = 1, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             rng: Array | None = None, length_penalty: float = 1.0,
             early_stopping: bool | str = False, min_new_tokens: int = 0,
             eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None,
             model_kwargs: dict[str, Any] | None = None) -> Array:
  """Continues left-padded prompts with a causal LM.

  Args:
    model: a `llama.Llama` or `gpt2.GPT2`.
    params: its params (adapted kernels allowed, e.g. after `lora.apply`).
    input_ids: [B, T] prompt ids, left-padded.
    attention_mask: [B, T], 1 for tokens, 0 for the left padding.
    max_new_tokens: L, the most tokens generated per row.
    num_beams: > 1 for beam search (not with do_sample).
    do_sample: sample from the warped distribution instead of argmax.
    temperature, top_k, top_p: sampling warpers (top_k 0 and top_p 1: off).
    rng: the sampling seed (a jax.random key); required with do_sample.
    length_penalty, early_stopping: beam search rules (see `decoding`).
    min_new_tokens: EOS is forbidden before this many tokens.
    eos_token_id: one id or several (default: the model config's).
    pad_token_id: fills rows after their EOS (default: the config's, else
      the first EOS id).
    model_kwargs: a PEFT method's model kwargs (`prompt`, `prefix_kv`).

  Returns:
    [B, L] int32 generated ids.
  """
  eos, pad = _special_ids(model.config, eos_token_id, pad_token_id)
  if max_new_tokens < 1 or num_beams < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} and '
                     f'num_beams={num_beams} must both be >= 1.')
  if do_sample and num_beams > 1:
    raise ValueError('do_sample with num_beams > 1 (beam sampling) is not '
                     'supported; use one of them.')
  if do_sample and rng is None:
    raise ValueError('do_sample=True needs rng=jax.random.PRNGKey(seed).')
  if not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
    raise ValueError(f'temperature={temperature} must be > 0, top_p={top_p} '
                     f'in (0, 1] and top_k={top_k} >= 0.')
  if early_stopping not in (True, False, 'never'):
    raise ValueError(f"early_stopping={early_stopping!r}; use True, False "
                     "or 'never'.")
  sampling = ((float(temperature), int(top_k), float(top_p)) if do_sample
              else None)
  return _generate(
      params, jnp.asarray(input_ids, jnp.int32),
      jnp.asarray(attention_mask, jnp.int32), model_kwargs or {},
      jax.random.PRNGKey(0) if rng is None else rng, model=model,
      max_new_tokens=max_new_tokens, num_beams=num_beams,
      ids=(pad, tuple(int(e) for e in eos), int(pad)),
      length_penalty=float(length_penalty), early_stopping=early_stopping,
      min_new_tokens=min_new_tokens, sampling=sampling)


def _special_ids(config: Any, eos_token_id: int | Sequence[int] | None,
                 pad_token_id: int | None) -> tuple[tuple[int, ...], int]:
  """(EOS ids, pad id): the given ones, else the model config's; the pad
  falls back to the first EOS id.

  Raises:
    ValueError: no EOS id, given or in the config.
  """
  eos = config.eos_ids if eos_token_id is None else tuple(
      np.atleast_1d(eos_token_id).tolist())
  if not eos:
    raise ValueError('no EOS id: pass eos_token_id (the config has none).')
  pad = config.pad_token_id if pad_token_id is None else pad_token_id
  return eos, eos[0] if pad is None else pad


def chat_prompts(tokenizer, conversations: Sequence[Sequence[dict[str, str]]],
                 max_length: int | None = None) -> tuple[np.ndarray,
                                                         np.ndarray]:
  """Conversations ([{'role': 'user', 'content': ...}, ...] each) -> left-
  padded ids and mask [B, T] through the tokenizer's chat template, ending
  with the assistant's turn to speak."""
  texts = [tokenizer.apply_chat_template(list(c), tokenize=False,
                                         add_generation_prompt=True)
           for c in conversations]
  enc = tokenizer(texts, return_tensors='np', padding=True,
                  padding_side='left', add_special_tokens=False,
                  truncation=max_length is not None, max_length=max_length)
  return enc['input_ids'], enc['attention_mask']
