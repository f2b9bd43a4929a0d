"""Greedy and beam search for flaxlora's T5, each one jitted XLA loop.

(`greedy` and `beam` are the loops; `causal_decoding` drives them for the
decoder-only models.)

    tokens = decoding.generate(model, params, input_ids, attention_mask,
                               max_new_tokens=64, num_beams=4)  # [B, 64]

The loop is a `lax.while_loop` over a key/value cache of static size
`max_new_tokens` (see `t5`), so a call compiles once per model, settings and
input shape, never per step. It stops early when every sequence (greedy) or
every beam search (by the rules below) is done. Tokens after a sequence's EOS
are `pad_token_id`.

Beam search follows `transformers`' vectorised beam search (v5) step by step
so that both pick the same tokens: 2 * num_beams candidates per step, finished
hypotheses scored by sum(log p) / length**length_penalty, and its
`early_stopping` rules (True: stop once num_beams hypotheses are done; False:
stop when the best running beam, at its current length, cannot beat the worst
finished one; 'never': the same at the longest possible length when
length_penalty > 0).
"""
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_NEG = -1.0e9  # the reference's "excluded" score


def _encode(model, params, input_ids, attention_mask, model_kwargs):
  """-> encoded [B, S', H] and its mask [B, S'] (S' > S with a prompt)."""
  encoded = model.apply({'params': params}, input_ids, attention_mask,
                        method='encode', **model_kwargs)
  extra = encoded.shape[1] - attention_mask.shape[1]
  if extra:  # a prefix (prompt) the encoder prepended attends everywhere
    ones = jnp.ones((attention_mask.shape[0], extra), attention_mask.dtype)
    attention_mask = jnp.concatenate([ones, attention_mask], axis=1)
  return encoded, attention_mask


def _decoder_inputs(tokens: Array, start: int) -> Array:
  """Generated tokens [B, L] -> decoder inputs [B, L] (start, t0, t1...)."""
  first = jnp.full((tokens.shape[0], 1), start, tokens.dtype)
  return jnp.concatenate([first, tokens[:, :-1]], axis=1)


def _decoder_kwargs(model_kwargs):
  """The model kwargs the decoder reads too: a key/value prefix, whose
  'decoder' entry goes in front of the self-attention cache."""
  return {k: v for k, v in model_kwargs.items() if k == 'prefix_kv'}


def _stepper(model, params, encoded, mask, length: int, use_cache: bool,
             kwargs):
  """(init() -> cache, step(inputs [B, L], index, cache) -> logits, cache).

  With use_cache, a step feeds one token through the cached decoder;
  without, it recomputes the whole decoder over `inputs` (the reference).
  `kwargs`: the decoder's model kwargs (`_decoder_kwargs`).
  """
  if use_cache:
    def init():
      _, variables = model.apply({'params': params}, encoded, length,
                                 method='init_cache', mutable=['cache'],
                                 **kwargs)
      return variables['cache']

    def step(inputs, index, cache):
      ids = jax.lax.dynamic_slice_in_dim(inputs, index, 1, axis=1)
      logits, variables = model.apply(
          {'params': params, 'cache': cache}, ids, index, mask,
          method='decode_step', mutable=['cache'])
      return logits[:, 0].astype(jnp.float32), variables['cache']
  else:
    def init():
      return {}

    def step(inputs, index, cache):
      logits = model.apply({'params': params}, inputs, encoded, mask,
                           method='decode', **kwargs)
      logits = jax.lax.dynamic_index_in_dim(logits, index, 1, keepdims=False)
      return logits.astype(jnp.float32), cache
  return init, step


def is_eos(token: Array, eos: tuple[int, ...]) -> Array:
  """Whether each of `token` (int array) is one of the EOS ids."""
  return jnp.isin(token, jnp.asarray(eos, jnp.int32))


def _suppress_eos(scores, index, min_new_tokens, eos):
  """Forbids EOS before `min_new_tokens` tokens (HF's min_new_tokens)."""
  if not min_new_tokens:
    return scores
  forbid = (index < min_new_tokens) & is_eos(jnp.arange(scores.shape[-1]),
                                             eos)
  return jnp.where(forbid, -jnp.inf, scores)


def argmax(logits, index):
  del index  # the same rule at every step
  return jnp.argmax(logits, -1).astype(jnp.int32)


def greedy(init, step, batch, length, ids, min_new_tokens, pick=argmax):
  """-> tokens [B, L]; `ids` = (start, eos ids (a tuple), pad).

  `init() -> cache` and `step(inputs [B, L], index, cache) -> (logits
  [B, V], cache)` run the model (see `_stepper`); `pick(logits, index) ->
  [B] int32` chooses each token (argmax; sampling passes its own).
  """
  start, eos, pad = ids

  def cond(state):
    index, _, finished, _ = state
    return (index < length) & ~jnp.all(finished)

  def body(state):
    index, tokens, finished, cache = state
    logits, cache = step(_decoder_inputs(tokens, start), index, cache)
    logits = _suppress_eos(logits, index, min_new_tokens, eos)
    token = jnp.where(finished, pad, pick(logits, index))
    tokens = tokens.at[:, index].set(token)
    return index + 1, tokens, finished | is_eos(token, eos), cache

  state = (jnp.int32(0), jnp.full((batch, length), pad, jnp.int32),
           jnp.zeros((batch,), bool), init())
  return jax.lax.while_loop(cond, body, state)[1]


def _gather(x: Array, index: Array) -> Array:
  """x [B, K, ...], index [B, M] -> [B, M, ...] along the beam axis."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _reorder_cache(cache, rows: Array):
  """Self-attention buffers follow their beams; cross-attention K/V are
  identical across a batch item's beams and stay."""
  def pick(path, leaf):
    names = [getattr(k, 'key', None) for k in path]
    return jnp.take(leaf, rows, axis=0) if 'attention' in names else leaf
  return jax.tree_util.tree_map_with_path(pick, cache)


def _merge_finished(kept, candidates, excluded):
  """The best `beams` finished hypotheses of the kept ones and this step's.

  Args:
    kept: (seqs [B, N, L], scores [B, N], finished [B, N]) so far.
    candidates: (seqs [B, K, L], length-normalised scores [B, K], did
      [B, K]: the candidate just finished and is among the top N).
    excluded: [B, 1] masks of rows that take no new hypothesis; each adds
      -1e9 (as the reference does), as does `~did`.
  """
  seqs, scores, finished = kept
  top_seq, new, did = candidates
  for mask in (*excluded, ~did):
    new = new + mask.astype(jnp.float32) * _NEG
  merged = jnp.concatenate([scores, new], 1)
  best = jax.lax.top_k(merged, scores.shape[1])[1]
  return (_gather(jnp.concatenate([seqs, top_seq], 1), best),
          _gather(merged, best),
          _gather(jnp.concatenate([finished, did], 1), best))


def beam(init, step, batch, length, ids, settings, reorder=_reorder_cache):
  """HF-equivalent beam search -> best hypothesis [B, L].

  `init`, `step` and `ids` as in `greedy` (B * num_beams rows, each item's
  beams together); `reorder(cache, rows [B * num_beams])` makes the cache
  follow the surviving beams.
  """
  start, eos, pad = ids
  beams, penalty, early, min_new_tokens = settings
  k = 2 * beams  # enough candidates that `beams` of them are not EOS
  # Length-penalty denominators as the reference computes them (python
  # float, then float32): index i -> (i + 1) ** penalty.
  denom = jnp.asarray(np.array([(i + 1)**penalty for i in range(length)],
                               np.float32))
  never = early == 'never' and penalty > 0.0
  early_true = early is True
  top_mask = jnp.arange(k) < beams

  def cond(s):
    index, _, _, _, _, finished, unsat, hits, _ = s
    return ((index < length) & jnp.any(unsat) &
            ~(jnp.all(finished) & early_true) & ~jnp.all(hits))

  def body(s):
    index, run_seq, run_scores, seqs, scores, finished, unsat, _, cache = s
    flat = _decoder_inputs(run_seq.reshape(batch * beams, length), start)
    logits, cache = step(flat, index, cache)
    logp = _suppress_eos(jax.nn.log_softmax(logits, -1), index,
                         min_new_tokens, eos)
    vocab = logp.shape[-1]
    logp = logp.reshape(batch, beams, vocab) + run_scores[:, :, None]
    top_lp, top_idx = jax.lax.top_k(logp.reshape(batch, beams * vocab), k)
    source, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seq = _gather(run_seq, source).at[:, :, index].set(token)
    hits = is_eos(token, eos) | (index + 1 >= length)  # [B, K]
    # Running beams: the best `beams` candidates that did not just stop.
    masked = top_lp + hits.astype(jnp.float32) * _NEG
    keep = jax.lax.top_k(masked, beams)[1]
    run_seq, run_scores = _gather(top_seq, keep), _gather(masked, keep)
    rows = _gather(source, keep) + jnp.arange(batch)[:, None] * beams
    cache = reorder(cache, rows.reshape(-1))
    # Finished hypotheses: merge the new ones (top `beams` only) and keep the
    # best `beams`; each exclusion adds -1e9 like the reference.
    seqs, scores, finished = _merge_finished(
        (seqs, scores, finished),
        (top_seq, top_lp / denom[index], hits & top_mask),
        (jnp.all(finished, -1, keepdims=True) & early_true, ~unsat))
    # Can a running beam still beat the worst finished hypothesis?
    reach = denom[length - 1] if never else denom[index]
    worst = jnp.where(finished, jnp.min(scores, 1, keepdims=True), _NEG)
    unsat = unsat & jnp.any(run_scores[:, :1] / reach > worst, -1,
                            keepdims=True)
    return (index + 1, run_seq, run_scores, seqs, scores, finished, unsat,
            hits, cache)

  state = _beam_start(batch, beams, length, pad, init())
  return jax.lax.while_loop(cond, body, state)[3][:, 0]


def _beam_start(batch: int, beams: int, length: int, pad: int, cache):
  """The state `beam`'s loop starts from: (index, running sequences
  [B, beams, L] all `pad`, their scores [B, beams] (only beam 0 alive),
  finished sequences, their scores [B, beams] and flags, whether each item
  may still improve [B, 1], the last step's EOS hits [B, 2 * beams], the
  cache)."""
  run_seq = jnp.full((batch, beams, length), pad, jnp.int32)
  run_scores = jnp.zeros((batch, beams)).at[:, 1:].set(_NEG)
  return (jnp.int32(0), run_seq, run_scores, run_seq,
          jnp.full((batch, beams), _NEG), jnp.zeros((batch, beams), bool),
          jnp.ones((batch, 1), bool), jnp.zeros((batch, 2 * beams), bool),
          cache)


def kernels_in(params, dtype):
  """fp32 matrices (kernels, embeddings) cast to a narrower compute `dtype`.

  Every step of the loop reads every decoder kernel; casting them once here
  halves what the steps read instead of converting them at each step.
  Vectors (norm scales, quantisation scales) stay as they are.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return params
  return jax.tree.map(
      lambda x: x.astype(dtype) if x.ndim == 2 and x.dtype == jnp.float32
      else x, params)


@functools.partial(jax.jit, static_argnames=(
    'model', 'max_new_tokens', 'num_beams', 'length_penalty',
    'early_stopping', 'min_new_tokens', 'use_cache'))
def _generate(params, input_ids, attention_mask, model_kwargs, *, model,
              max_new_tokens, num_beams, length_penalty, early_stopping,
              min_new_tokens, use_cache):
  config = model.config
  ids = (config.decoder_start_token_id, (config.eos_token_id,),
         config.pad_token_id)
  encoded, mask = _encode(model, params, input_ids, attention_mask,
                          model_kwargs)
  batch = input_ids.shape[0]
  if num_beams > 1:  # every beam of an item reads the item's source
    encoded = jnp.repeat(encoded, num_beams, axis=0)
    mask = jnp.repeat(mask, num_beams, axis=0)
  init, step = _stepper(model, kernels_in(params, model.dtype), encoded,
                        mask, max_new_tokens, use_cache,
                        _decoder_kwargs(model_kwargs))
  if num_beams == 1:
    return greedy(init, step, batch, max_new_tokens, ids, min_new_tokens)
  settings = (num_beams, length_penalty, early_stopping, min_new_tokens)
  return beam(init, step, batch, max_new_tokens, ids, settings)


def generate(model, params, input_ids: Array, attention_mask: Array, *,
             max_new_tokens: int, num_beams: int = 1,
             length_penalty: float = 1.0,
             early_stopping: bool | str = False, min_new_tokens: int = 0,
             use_cache: bool = True,
             model_kwargs: dict[str, Any] | None = None) -> Array:
  """Greedy (num_beams=1) or beam search decoding with a T5 model.

  Args:
    model: a `t5.T5`.
    params: its params (adapted kernels allowed, e.g. after `lora.apply`).
    input_ids: [B, S] source ids.
    attention_mask: [B, S], 1 for tokens.
    max_new_tokens: L, the most tokens generated (the decoder start token
      not counted).
    num_beams: 1 for greedy search.
    length_penalty: beam search scores sum(log p) / length**length_penalty.
    early_stopping: True, False or 'never' (see the module docstring).
    min_new_tokens: EOS is forbidden before this many tokens.
    use_cache: False recomputes the decoder over all tokens at each step
      (slow; the reference the cache is tested against).
    model_kwargs: extra arguments of `model.encode` (e.g. a PEFT method's
      model kwargs such as a soft prompt); a key/value prefix (`prefix_kv`)
      also reaches the decoder and its cache.

  Returns:
    [B, L] int32 generated ids, `pad_token_id` after EOS.
  """
  if max_new_tokens < 1 or num_beams < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} and '
                     f'num_beams={num_beams} must both be >= 1.')
  if early_stopping not in (True, False, 'never'):
    raise ValueError(f"early_stopping={early_stopping!r}; use True, False "
                     "or 'never'.")
  return _generate(params, jnp.asarray(input_ids, jnp.int32),
                   jnp.asarray(attention_mask, jnp.int32), model_kwargs or {},
                   model=model, max_new_tokens=max_new_tokens,
                   num_beams=num_beams, length_penalty=float(length_penalty),
                   early_stopping=early_stopping,
                   min_new_tokens=min_new_tokens, use_cache=use_cache)


def compiled_count() -> int:
  """How many programs `generate` has compiled so far in this process."""
  return _generate._cache_size()  # pylint: disable=protected-access
