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
"""
import dataclasses
from typing import Any, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlora.models import hf_io
from flaxlora.models import layers

Array = jax.Array

MODEL_TYPES = ('bert',)
HEADS = (None, 'classification', 'qa')
# The 'auto' head of `build`: the one the checkpoint's config.json names.
AUTO = 'auto'
_ARCHITECTURES = {None: 'BertModel',
                  'classification': 'BertForSequenceClassification',
                  'qa': 'BertForQuestionAnswering'}
_ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}
# Non-parameter buffers, and the head/pooler tensors of other architectures:
# a bare model may be loaded from a fine-tuned checkpoint (as transformers
# does); a model that has the head still reads them by its rules.
HF_IGNORE = tuple(
    prefix + name for prefix in ('', 'bert.')
    for name in ('embeddings.position_ids', 'embeddings.token_type_ids',
                 'pooler.dense.weight', 'pooler.dense.bias')) + (
                     'classifier.weight', 'classifier.bias',
                     'qa_outputs.weight', 'qa_outputs.bias')


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyper-parameters (the fields of a Hugging Face BertConfig).

  `id2label` is a tuple of label names, index = class id (hashable, unlike
  HF's dict). `head` is the head the checkpoint was saved with (from
  config.json `architectures`); `build` uses it by default.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  classifier_dropout: float | None = None
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  num_labels: int = 2
  id2label: tuple[str, ...] = ()
  head: str | None = None

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f'hidden_act {self.hidden_act!r} is not supported; use '
                       f'one of {sorted(_ACTIVATIONS)}.')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f'hidden_size {self.hidden_size} is not a multiple of '
          f'num_attention_heads {self.num_attention_heads}.')
    if self.head not in HEADS:
      raise ValueError(f'head {self.head!r} is not one of {HEADS}.')


class SelfAttention(nn.Module):
  """Multi-head self-attention; params query/key/value/output."""
  config: BertConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    """x [B, T, H], mask [B, T] (1 = token, 0 = padding) -> [B, T, H]."""
    cfg = self.config
    n = cfg.num_attention_heads
    d = cfg.hidden_size // n

    def project(name):
      y = layers.Dense(cfg.hidden_size, ('embed', 'heads'), use_bias=True,
                       dtype=self.dtype, name=name)(x, deterministic)
      return y.reshape(*y.shape[:2], n, d)  # [B, T, N, D]

    q, k, v = project('query'), project('key'), project('value')
    scores = jnp.einsum('btnd,bsnd->bnts', q, k,
                        preferred_element_type=jnp.float32) / jnp.sqrt(d)
    keep = mask[:, None, None, :].astype(bool)  # [B, 1, 1, S]
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(
        probs, deterministic=deterministic)
    y = jnp.einsum('bnts,bsnd->btnd', probs, v)
    y = y.reshape(*y.shape[:2], n * d)  # [B, T, N*D]
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
    h = _ACTIVATIONS[cfg.hidden_act](h)
    return layers.Dense(cfg.hidden_size, ('mlp', 'embed'), use_bias=True,
                        dtype=self.dtype, name='output')(h, deterministic)


class Layer(nn.Module):
  """One post-LN transformer layer: x = norm(x + dropout(sublayer(x)))."""
  config: BertConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    cfg = self.config
    dropout = nn.Dropout(cfg.hidden_dropout_prob)
    norm = lambda name: layers.LayerNorm(cfg.layer_norm_eps, self.dtype,
                                         name=name)
    y = SelfAttention(cfg, self.dtype, name='attention')(x, mask,
                                                          deterministic)
    x = norm('attention_norm')(x + dropout(y, deterministic=deterministic))
    y = Mlp(cfg, self.dtype, name='mlp')(x, deterministic)
    return norm('mlp_norm')(x + dropout(y, deterministic=deterministic))


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
               deterministic: bool, prompt: Array | None = None) -> Array:
    """[B, T] ids -> [B, T, H] ([B, T+P, H] with a [B, P, H] `prompt`).

    A prompt replaces word embeddings only, spliced in after [CLS]; its
    positions are numbered like tokens' and its token type is 0.
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
    t = x.shape[1]
    if t > cfg.max_position_embeddings:
      # jnp.take would silently clamp the positions past the table.
      raise ValueError(f'input length {t} (prompt included) exceeds '
                       f'max_position_embeddings {cfg.max_position_embeddings}'
                       '; truncate the inputs.')
    x = x + embed(cfg.max_position_embeddings, ('positions', 'embed'),
                  'position')(jnp.arange(t))[None]
    x = x + embed(cfg.type_vocab_size, ('token_types', 'embed'),
                  'token_type')(token_type_ids)
    x = layers.LayerNorm(cfg.layer_norm_eps, self.dtype, name='norm')(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class Encoder(nn.Module):
  config: BertConfig
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    for i in range(self.config.num_hidden_layers):
      x = Layer(self.config, self.dtype, name=f'layer_{i}')(x, mask,
                                                            deterministic)
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
  """
  config: BertConfig
  head: str | None = None
  num_labels: int = 2
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None,
               deterministic: bool = True,
               prompt: Array | None = None) -> Any:
    """Runs BERT on [B, T] int `input_ids`.

    Args:
      input_ids: [B, T] token ids.
      attention_mask: [B, T], 1 for tokens and 0 for padding (None: all 1).
      token_type_ids: [B, T] segment ids (None: all 0).
      deterministic: False enables dropout (needs rngs={'dropout': rng}).
      prompt: optional soft prompt [P, H] or [B, P, H] (prompt tuning),
        spliced in after [CLS] as word embeddings (see `Embeddings`); the
        per-token outputs drop its P positions, so position t is token t.

    Returns:
      head None: (hidden [B, T, H], pooled [B, H]) in `dtype`;
      'classification': logits [B, C]; 'qa': (start [B, T], end [B, T]).
    """
    cfg = self.config
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    num_prompt = 0
    if prompt is not None:
      prompt = jnp.broadcast_to(prompt, input_ids.shape[:1] +
                                prompt.shape[-2:])  # [B, P, H]
      num_prompt = prompt.shape[1]
      attention_mask = splice(attention_mask,
                              jnp.ones(prompt.shape[:2], jnp.int32))
    x = Embeddings(cfg, self.dtype, name='embeddings')(
        input_ids, token_type_ids, deterministic, prompt)
    x = Encoder(cfg, self.dtype, name='encoder')(x, attention_mask,
                                                 deterministic)
    dense = lambda n, axes, name: layers.Dense(
        n, axes, use_bias=True, dtype=self.dtype, name=name)
    if self.head == 'qa':
      logits = dense(2, ('embed', 'classes'), 'qa_outputs')(
          x, deterministic).astype(jnp.float32)  # [B, T+P, 2]
      logits = unsplice(logits, num_prompt)  # [B, T, 2]
      return logits[..., 0], logits[..., 1]
    pooled = jnp.tanh(dense(cfg.hidden_size, ('embed', 'mlp'), 'pooler')(
        x[:, 0], deterministic))  # [B, H]
    if self.head is None:
      return unsplice(x, num_prompt), pooled
    rate = (cfg.hidden_dropout_prob if cfg.classifier_dropout is None
            else cfg.classifier_dropout)
    pooled = nn.Dropout(rate)(pooled, deterministic=deterministic)
    return dense(self.num_labels, ('embed', 'classes'), 'classifier')(
        pooled, deterministic).astype(jnp.float32)


MODULE = Bert


def build(config: BertConfig, *, dtype: jnp.dtype = jnp.float32,
          head: str | None = AUTO, num_labels: int | None = None) -> Bert:
  """A Bert module.

  Args:
    config: BertConfig.
    dtype: compute dtype.
    head: None, 'classification' or 'qa'; 'auto' (default) takes the head
      the checkpoint was saved with (`config.head`).
    num_labels: classifier size; None takes `config.num_labels`.
  """
  head = config.head if head == AUTO else head
  if head not in HEADS:
    raise ValueError(f'head {head!r} is not one of {HEADS}.')
  if head == 'qa':
    if num_labels not in (None, 2):
      raise ValueError(f'num_labels={num_labels} with head=\'qa\': extractive '
                       'QA predicts exactly 2 logits (start, end).')
    num_labels = 2
  num_labels = config.num_labels if num_labels is None else num_labels
  if num_labels < 1:
    raise ValueError(f'num_labels must be >= 1, got {num_labels}.')
  return Bert(config, head=head, num_labels=num_labels, dtype=dtype)


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


def config_from_hf(config_dict: dict[str, Any]) -> BertConfig:
  """A BertConfig from a config.json dict."""
  position_type = config_dict.get('position_embedding_type', 'absolute')
  if position_type != 'absolute':
    raise ValueError(f'config.json: position_embedding_type {position_type!r}'
                     ' is not supported; flaxlora reads \'absolute\' only.')
  fields = {f.name for f in dataclasses.fields(BertConfig)}
  kwargs = {k: v for k, v in config_dict.items()
            if k in fields and k not in ('id2label', 'head', 'num_labels')}
  id2label = config_dict.get('id2label')
  if id2label:
    by_id = {int(k): v for k, v in id2label.items()}
    kwargs['id2label'] = tuple(by_id[i] for i in range(len(by_id)))
    kwargs['num_labels'] = len(by_id)
  elif config_dict.get('num_labels'):
    kwargs['num_labels'] = int(config_dict['num_labels'])
  heads = {arch: head for head, arch in _ARCHITECTURES.items()}
  archs = [heads[a] for a in config_dict.get('architectures') or ()
           if a in heads]
  kwargs['head'] = archs[0] if archs else None
  return BertConfig(**kwargs)


def config_to_hf(model: Bert) -> dict[str, Any]:
  """A config.json dict that makes transformers build `model`'s class."""
  cfg = model.config
  out = {k: v for k, v in dataclasses.asdict(cfg).items()
         if k not in ('id2label', 'head', 'num_labels')}
  labels = cfg.id2label
  if len(labels) != model.num_labels:
    labels = tuple(f'LABEL_{i}' for i in range(model.num_labels))
  out.update(
      model_type='bert', architectures=[_ARCHITECTURES[model.head]],
      position_embedding_type='absolute',
      id2label={str(i): name for i, name in enumerate(labels)},
      label2id={name: i for i, name in enumerate(labels)})
  return out


def hf_rules(model: Bert,
             keys: Collection[str] | None = None) -> list[hf_io.Rule]:
  """Checkpoint rules for `model`.

  Args:
    model: the Bert module.
    keys: the checkpoint's tensor names when loading: they tell the 'bert.'
      prefix of BertFor* checkpoints from bare BertModel names (e.g.
      sentence-transformers) and old 'LayerNorm.gamma/beta' names. None
      (saving): the names transformers writes for `model`'s class.
  """
  if keys is None:
    prefix = '' if model.head is None else 'bert.'
  else:
    prefix = 'bert.' if any(k.startswith('bert.') for k in keys) else ''
  # (flax path, checkpoint module name, kind); heads live outside 'bert.'.
  modules = [(('embeddings', 'norm'), prefix + 'embeddings.LayerNorm', 'norm')]
  for i in range(model.config.num_hidden_layers):
    path, key = ('encoder', f'layer_{i}'), f'{prefix}encoder.layer.{i}'
    modules += [
        (path + ('attention', 'query'), f'{key}.attention.self.query', 'dense'),
        (path + ('attention', 'key'), f'{key}.attention.self.key', 'dense'),
        (path + ('attention', 'value'), f'{key}.attention.self.value', 'dense'),
        (path + ('attention', 'output'), f'{key}.attention.output.dense',
         'dense'),
        (path + ('attention_norm',), f'{key}.attention.output.LayerNorm',
         'norm'),
        (path + ('mlp', 'intermediate'), f'{key}.intermediate.dense', 'dense'),
        (path + ('mlp', 'output'), f'{key}.output.dense', 'dense'),
        (path + ('mlp_norm',), f'{key}.output.LayerNorm', 'norm')]
  if model.head == 'qa':
    optional = [(('qa_outputs',), 'qa_outputs', 'dense')]
  else:
    optional = [(('pooler',), prefix + 'pooler.dense', 'dense')]
  if model.head == 'classification':
    optional.append((('classifier',), 'classifier', 'dense'))

  def name(key):  # a checkpoint's old LayerNorm names, when it has them
    old = key.replace('LayerNorm.weight', 'LayerNorm.gamma').replace(
        'LayerNorm.bias', 'LayerNorm.beta')
    return old if keys is not None and key not in keys and old in keys else key

  rules = [hf_io.Rule(('embeddings', part, 'embedding'),
                      f'{prefix}embeddings.{part}_embeddings.weight')
           for part in ('word', 'position', 'token_type')]
  for (path, key, kind), is_optional in (
      [(m, False) for m in modules] + [(m, True) for m in optional]):
    weight = 'kernel' if kind == 'dense' else 'scale'
    rules.append(hf_io.Rule(path + (weight,), name(f'{key}.weight'),
                            transpose=kind == 'dense', optional=is_optional))
    rules.append(hf_io.Rule(path + ('bias',), name(f'{key}.bias'),
                            optional=is_optional))
  return rules
