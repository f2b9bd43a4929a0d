"""BERT encoder (post-LN) with optional classification and extractive-QA heads.

    model = bert.build(config, dtype=jnp.bfloat16, head='classification')
    logits = model.apply({'params': params}, input_ids, attention_mask,
                         token_type_ids, deterministic=True)     # [B, C]

Built only from `layers`, so every parameter has logical axes and every dense
op goes through `layers.dot` (where PEFT methods plug in). The param tree and
the Hugging Face names it maps to:

  embeddings/{word,position,token_type}/embedding, embeddings/norm
  encoder/layer_{i}/attention/{query,key,value,output}, attention_norm,
    mlp/{intermediate,output}, mlp_norm
  pooler (not in the 'qa' model: BertForQuestionAnswering has none)
  classifier | qa_outputs

`BertConfig` and the Hugging Face config/checkpoint names live in `bert_hf`;
this module re-exports them so that `bert` is the family module of
`flaxlora.models`.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlora.models import attention
from flaxlora.models import bert_hf
from flaxlora.models import layer_scan
from flaxlora.models import layers
from flaxlora.models import remat as remat_lib

Array = jax.Array

BertConfig = bert_hf.BertConfig  # fields follow HF's BertConfig
HEADS = bert_hf.HEADS
# The 'auto' head of `build`: the one the checkpoint's config.json names.
AUTO = 'auto'
POOLINGS = ('cls', 'mean')
BTH = ('batch', None, None)  # logical axes of [B, T, H] states
# Keys: bert_hf.ACTIVATIONS, the names BertConfig accepts.
_ACTIVATIONS = {
    'gelu': layers.gelu,
    'gelu_new': functools.partial(layers.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(layers.gelu, approximate=True),
    'relu': jax.nn.relu,
}


class SelfAttention(nn.Module):
  """Multi-head self-attention; params query/key/value/output."""
  config: BertConfig
  dtype: jnp.dtype
  implementation: str = 'reference'  # attention.IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool,
               prefix: Array | None = None) -> Array:
    """x [B, T, H], mask [B, S] (1 = token, 0 = padding) -> [B, T, H].

    `prefix` [2, P, H]: keys/values before the tokens' own (S = P + T).
    """
    cfg = self.config
    n = cfg.num_attention_heads
    d = cfg.hidden_size // n

    def project(name):
      y = layers.Dense(cfg.hidden_size, ('embed', 'heads'), use_bias=True,
                       dtype=self.dtype, name=name)(x, deterministic)
      return attention.heads(y, n)  # [B, N, T, D]

    q, k, v = project('query'), project('key'), project('value')
    k, v = attention.prepend_kv(k, v, prefix, n)
    keep = mask[:, None, None, :].astype(bool)  # [B, 1, 1, S]
    if self.implementation == 'reference':
      q = q * jnp.asarray(d**-0.5, q.dtype)  # fewer products than scores
      scores = layers.einsum('bntd,bnsd->bnts', q, k, dtype=self.dtype)
      scores = layers.constrain(scores, attention.BHTD)  # [B, N, T, S]
      scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
      probs = layers.Dropout(cfg.attention_probs_dropout_prob)(
          probs, deterministic=deterministic)
      y = layers.einsum('bnts,bnsd->bntd', probs, v,
                        dtype=self.dtype).astype(self.dtype)
    else:
      y = attention.fused(
          q.astype(self.dtype), k, v, bias=None, mask=keep, scale=d**-0.5,
          implementation=self.implementation,
          dropout_rate=cfg.attention_probs_dropout_prob,
          deterministic=deterministic)
    y = jnp.swapaxes(y, 1, 2)
    y = y.reshape(*y.shape[:2], n * d)  # [B, T, N*D]
    y = layers.constrain(y, ('batch', None, 'heads'))
    return layers.Dense(cfg.hidden_size, ('heads', 'embed'), use_bias=True,
                        dtype=self.dtype, name='output')(y, deterministic)


class Mlp(nn.Module):
  """intermediate -> activation -> output."""
  config: BertConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    cfg = self.config
    h = layers.Dense(cfg.intermediate_size, ('embed', 'mlp'), use_bias=True,
                     dtype=self.dtype, name='intermediate')(x, deterministic)
    h = layers.constrain(_ACTIVATIONS[cfg.hidden_act](h),
                         ('batch', None, 'mlp'))  # [B, T, F]
    return layers.Dense(cfg.hidden_size, ('mlp', 'embed'), use_bias=True,
                        dtype=self.dtype, name='output')(h, deterministic)


class Layer(nn.Module):
  """One post-LN transformer layer: x = norm(x + dropout(sublayer(x)))."""
  config: BertConfig
  dtype: jnp.dtype
  attention_impl: str = 'reference'

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool,
               prefix: Array | None = None) -> Array:
    cfg = self.config
    dropout = layers.Dropout(cfg.hidden_dropout_prob)
    norm = lambda name: layers.LayerNorm(cfg.layer_norm_eps, self.dtype,
                                         name=name)
    y = SelfAttention(cfg, self.dtype, self.attention_impl,
                      name='attention')(x, mask,
                                                          deterministic,
                                                          prefix)
    x = norm('attention_norm')(x + dropout(y, deterministic=deterministic))
    y = Mlp(cfg, self.dtype, name='mlp')(x, deterministic)
    x = norm('mlp_norm')(x + dropout(y, deterministic=deterministic))
    return layers.constrain(x, BTH)


def splice(x: Array, inserted: Array) -> Array:
  """Inserts `inserted` [B, P, ...] after [CLS]: [B, T, ...] -> [B, T+P, ...].
  """
  return jnp.concatenate([x[:, :1], inserted.astype(x.dtype), x[:, 1:]],
                         axis=1)


def unsplice(y: Array, num_tokens: int) -> Array:
  """Drops the P = `num_tokens` positions after [CLS]: the inverse of splice.
  """
  return jnp.concatenate([y[:, :1], y[:, 1 + num_tokens:]], axis=1)


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, layer norm, dropout."""
  config: BertConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array,
               deterministic: bool, prompt: Array | None = None,
               first_position: int = 0) -> Array:
    """[B, T] ids -> [B, T, H] ([B, T+P, H] with a [B, P, H] `prompt`).

    A prompt replaces word embeddings only, spliced in after [CLS]; its
    positions are numbered like tokens' and its token type is 0. Positions
    start at `first_position` (P' after a key/value prefix of P' positions).
    """
    cfg = self.config
    embed = lambda n, axes, name: layers.Embed(
        n, cfg.hidden_size, axes, jnp.float32,
        nn.initializers.normal(0.02), name=name)
    x = embed(cfg.vocab_size, ('vocab', 'embed'), 'word')(input_ids)
    if prompt is not None:
      x = splice(x, prompt)
      token_type_ids = splice(token_type_ids,
                              jnp.zeros(prompt.shape[:2], jnp.int32))
    t = x.shape[1] + first_position
    if t > cfg.max_position_embeddings:
      # jnp.take would silently clamp the positions past the table.
      raise ValueError(f'input length {t} (prompt included, and the P '
                       'positions of a key/value prefix) exceeds '
                       'max_position_embeddings '
                       f'{cfg.max_position_embeddings}; truncate the inputs.')
    x = x + embed(cfg.max_position_embeddings, ('positions', 'embed'),
                  'position')(jnp.arange(first_position, t))[None]
    x = x + embed(cfg.type_vocab_size, ('token_types', 'embed'),
                  'token_type')(token_type_ids)
    x = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name='norm')(x)
    x = layers.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return layers.constrain(x, BTH)


class Encoder(nn.Module):
  config: BertConfig
  dtype: jnp.dtype
  remat: str = 'none'
  attention_impl: str = 'reference'
  scan_layers: bool = False

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool,
               prefix_kv: Array | None = None) -> Array:
    """x [B, T, H], key mask [B, P + T], prefix_kv [L, 2, P, H] -> [B, T, H]
    """
    names = [f'layer_{i}' for i in range(self.config.num_hidden_layers)]
    if self.scan_layers and not self.is_initializing():
      return layer_scan.blocks(
          self, Layer(self.config, self.dtype, self.attention_impl,
                      parent=None), names, x, (mask,), deterministic,
          prefix_kv)
    # `deterministic` (argument 3 of Layer.__call__) is a Python bool.
    layer = remat_lib.wrap(Layer, self.remat, static_argnums=(3,))
    for i, name in enumerate(names):
      x = layer(self.config, self.dtype, self.attention_impl, name=name)(
          x, mask, deterministic, None if prefix_kv is None else prefix_kv[i])
    return x


class Bert(nn.Module):
  """BERT with an optional head.

  Attributes:
    config: BertConfig.
    head: None (returns hidden states and pooled output), 'classification'
      (logits [B, C] from the pooled output) or 'qa' (start and end logits
      [B, T]; no pooler, like BertForQuestionAnswering).
    num_labels: C, the classifier's outputs ('classification' only).
    dtype: compute dtype; params stay fp32 and head logits are fp32.
    pooling: what the pooler reads: 'cls', the [CLS] state (BERT's and
      Hugging Face's), or 'mean', the mean of the token states under the
      attention mask (soft-prompt positions excluded): the sentence vector
      sentence-transformers checkpoints such as all-MiniLM-L6-v2 were
      trained to give (their [CLS] state never was). Hugging Face has no
      class for 'mean' (`models.save` refuses it).
    remat: rematerialisation of every layer (`remat.POLICIES`).
    attention_impl: one of `attention.IMPLEMENTATIONS`.
    scan_layers: the encoder's layers as one scan (`layer_scan`) after
      init.
  """
  config: BertConfig
  head: str | None = None
  num_labels: int = 2
  dtype: jnp.dtype = jnp.float32
  pooling: str = 'cls'
  remat: str = 'none'
  attention_impl: str = 'reference'
  scan_layers: bool = False

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None,
               deterministic: bool = True,
               prompt: Array | None = None,
               prefix_kv: Array | None = None) -> Any:
    """Runs BERT on [B, T] int `input_ids`.

    Args:
      input_ids: [B, T] token ids.
      attention_mask: [B, T], 1 for tokens and 0 for padding (None: all 1).
      token_type_ids: [B, T] segment ids (None: all 0).
      deterministic: False enables dropout (needs rngs={'dropout': rng}).
      prompt: optional soft prompt [P, H] or [B, P, H] (prompt tuning),
        spliced in after [CLS] as word embeddings (see `Embeddings`); the
        per-token outputs drop its P positions, so position t is token t.
      prefix_kv: optional [L, 2, P, H] per-layer keys/values of P positions
        before the input (prefix tuning; see `flaxlora.models.attention`):
        every token attends to them and token positions start at P.

    Returns:
      head None: (hidden [B, T, H], pooled [B, H]) in `dtype`;
      'classification': logits [B, C]; 'qa': (start [B, T], end [B, T]).
    """
    cfg = self.config
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    token_mask = attention_mask  # [B, T]
    num_prompt = 0
    if prompt is not None:
      prompt = jnp.broadcast_to(prompt, input_ids.shape[:1] +
                                prompt.shape[-2:])  # [B, P, H]
      num_prompt = prompt.shape[1]
      attention_mask = splice(attention_mask,
                              jnp.ones(prompt.shape[:2], jnp.int32))
    num_prefix = attention.prefix_length(prefix_kv)
    x = Embeddings(cfg, self.dtype, name='embeddings')(
        input_ids, token_type_ids, deterministic, prompt, num_prefix)
    x = Encoder(cfg, self.dtype, self.remat, self.attention_impl,
                self.scan_layers, name='encoder')(
        x, attention.key_mask(attention_mask, num_prefix), deterministic,
        prefix_kv)
    dense = lambda n, axes, name: layers.Dense(
        n, axes, use_bias=True, dtype=self.dtype, name=name)
    if self.head == 'qa':
      logits = dense(2, ('embed', 'classes'), 'qa_outputs')(
          x, deterministic).astype(jnp.float32)  # [B, T+P, 2]
      logits = unsplice(logits, num_prompt)  # [B, T, 2]
      return logits[..., 0], logits[..., 1]
    pooled = jnp.tanh(dense(cfg.hidden_size, ('embed', 'mlp'), 'pooler')(
        _pool(x, token_mask, num_prompt, self.pooling), deterministic))
    if self.head is None:
      return unsplice(x, num_prompt), pooled
    rate = (cfg.hidden_dropout_prob if cfg.classifier_dropout is None
            else cfg.classifier_dropout)
    pooled = layers.Dropout(rate)(pooled, deterministic=deterministic)
    return dense(self.num_labels, ('embed', 'classes'), 'classifier')(
        pooled, deterministic).astype(jnp.float32)



def _pool(x: Array, token_mask: Array, num_prompt: int, pooling: str) -> Array:
  """[B, H]: the [CLS] state of `x` [B, T+P, H], or the mean of its token
  states where `token_mask` [B, T] is 1 (the P prompt positions left out)."""
  if pooling == 'cls':
    return x[:, 0]
  return masked_mean(unsplice(x, num_prompt), token_mask).astype(x.dtype)


def masked_mean(tokens: Array, token_mask: Array) -> Array:
  """[B, H] fp32 mean of `tokens` [B, T, H] where `token_mask` [B, T] is 1."""
  weights = token_mask.astype(jnp.float32)[..., None]  # [B, T, 1]
  return ((tokens.astype(jnp.float32) * weights).sum(1) /
          jnp.maximum(weights.sum(1), 1.0))


_check_attention = attention.check_implementation


def build(config: BertConfig, *, dtype: jnp.dtype = jnp.float32,
          head: str | None = AUTO, num_labels: int | None = None,
          pooling: str = 'cls', remat: str = 'none',
          attention: str = 'reference', scan_layers: bool = False) -> Bert:
  """A Bert module.

  Args:
    config: BertConfig.
    dtype: compute dtype.
    head: None, 'classification' or 'qa'; 'auto' (default) takes the head
      the checkpoint was saved with (`config.head`).
    num_labels: classifier size; None takes `config.num_labels`.
    pooling: 'cls' or 'mean' (see `Bert`).
    remat: one of `remat.POLICIES` (see `Bert`).
    attention: one of `attention.IMPLEMENTATIONS`.
    scan_layers: the encoder's layers as one scan (see `Bert`).
  """
  head = config.head if head == AUTO else head
  if head not in HEADS:
    raise ValueError(f'head {head!r} is not one of {HEADS}.')
  if pooling not in POOLINGS:
    raise ValueError(f'pooling {pooling!r} is not one of {POOLINGS}.')
  if head == 'qa' and pooling != 'cls':
    raise ValueError(f'pooling={pooling!r} with head=\'qa\': the QA head '
                     'reads every token and has no pooler; use \'cls\'.')
  if head == 'qa':
    if num_labels not in (None, 2):
      raise ValueError(f'num_labels={num_labels} with head=\'qa\': extractive '
                       'QA predicts exactly 2 logits (start, end).')
    num_labels = 2
  num_labels = config.num_labels if num_labels is None else num_labels
  if num_labels < 1:
    raise ValueError(f'num_labels must be >= 1, got {num_labels}.')
  remat_lib.wrap(Layer, remat)  # checks the name
  _check_attention(attention)
  return Bert(config, head=head, num_labels=num_labels, dtype=dtype,
              pooling=pooling, remat=remat, attention_impl=attention,
              scan_layers=bool(scan_layers))


def _boxed_init(model: Bert, rng: Array) -> Any:
  t = min(8, model.config.max_position_embeddings)
  ids = jnp.zeros((1, t), jnp.int32)
  return model.init(rng, ids, jnp.ones_like(ids))['params']


def init(model: Bert, rng: Array) -> Any:
  """Fresh fp32 params (plain arrays, logical-axis boxes removed).

  Eager on purpose: a jit would compile anew for every model, which costs more
  than it saves here; sharded init goes through `jax.jit(..., out_shardings)`
  in `flaxlora.sharding` instead.
  """
  return nn.unbox(_boxed_init(model, rng))


def logical_axes(model: Bert) -> Any:
  """A tree like the params whose leaves are PartitionSpecs of logical names.
  """
  boxed = jax.eval_shape(lambda: _boxed_init(model, jax.random.PRNGKey(0)))
  return nn.get_partition_spec(boxed)


MODULE = Bert
MODEL_TYPES = ('bert',)

HF_IGNORE = bert_hf.HF_IGNORE
config_from_hf = bert_hf.config_from_hf
config_to_hf = bert_hf.config_to_hf
hf_class_missing = bert_hf.hf_class_missing
hf_rules = bert_hf.hf_rules
