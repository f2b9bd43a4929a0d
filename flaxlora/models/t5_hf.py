"""T5's config, its Hugging Face config.json form and checkpoint names.

Used through the `t5` family module (`t5.T5Config`, `t5.config_from_hf`,
`t5.hf_rules`...).
"""
import dataclasses
from typing import Any, Iterable

from flaxlora.models import hf_io

# Old checkpoints carry an unused relative bias in the first cross-attention.
HF_IGNORE = (
    'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight',)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The architecture of a T5 model (field names follow HF's T5Config)."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int | None = None  # None: num_layers
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = 'relu'  # 'relu' (v1.0) | 'gated-gelu' (v1.1)
  tie_word_embeddings: bool = True
  scale_decoder_outputs: bool | None = None  # None: tie_word_embeddings
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0

  def __post_init__(self):
    if self.feed_forward_proj not in ('relu', 'gated-gelu'):
      raise ValueError(
          f'T5Config.feed_forward_proj={self.feed_forward_proj!r} is not '
          "supported; use 'relu' (T5 v1.0) or 'gated-gelu' (v1.1, Flan).")
    if self.num_decoder_layers is None:
      object.__setattr__(self, 'num_decoder_layers', self.num_layers)
    if self.scale_decoder_outputs is None:
      object.__setattr__(self, 'scale_decoder_outputs',
                         self.tie_word_embeddings)


_FIELDS = ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_layers',
           'num_decoder_layers', 'num_heads', 'relative_attention_num_buckets',
           'relative_attention_max_distance', 'dropout_rate',
           'layer_norm_epsilon', 'feed_forward_proj', 'pad_token_id',
           'eos_token_id', 'decoder_start_token_id')


def config_from_hf(config: dict[str, Any]) -> T5Config:
  """A `T5Config` from a config.json dict.

  Output-layer tying follows `tie_word_embeddings` (False in v1.1 / Flan
  configs); the d_model**-0.5 output scaling follows `scale_decoder_outputs`
  when present (transformers >= 5 writes it) and the tying otherwise.
  """
  kwargs = {k: config[k] for k in _FIELDS if config.get(k) is not None}
  if isinstance(kwargs.get('eos_token_id'), list):
    kwargs['eos_token_id'] = kwargs['eos_token_id'][0]
  kwargs.setdefault('decoder_start_token_id', kwargs.get('pad_token_id', 0))
  tie = config.get('tie_word_embeddings', True) is not False
  scale = config.get('scale_decoder_outputs', tie)
  return T5Config(tie_word_embeddings=tie, scale_decoder_outputs=scale,
                  **kwargs)


def config_to_hf(model: Any) -> dict[str, Any]:
  """The config.json dict `transformers` reads back as the same model."""
  c = model.config
  gated = c.feed_forward_proj == 'gated-gelu'
  out = {k: getattr(c, k) for k in _FIELDS}
  out.update(
      model_type='t5', architectures=['T5ForConditionalGeneration'],
      is_encoder_decoder=True, tie_word_embeddings=c.tie_word_embeddings,
      scale_decoder_outputs=c.scale_decoder_outputs,
      dense_act_fn='gelu_new' if gated else 'relu', is_gated_act=gated)
  return out


def _attention(path: tuple[str, ...], prefix: str) -> list[hf_io.Rule]:
  return [hf_io.Rule(path + (name, 'kernel'), f'{prefix}.{name}.weight',
                     transpose=True) for name in ('q', 'k', 'v', 'o')]


def _block(stack: str, i: int, mlp_names: Iterable[str]) -> list[hf_io.Rule]:
  """Rules of encoder/decoder block i (HF: {stack}.block.{i}.layer.{j})."""
  path, hf = (stack, f'block_{i}'), f'{stack}.block.{i}.layer'
  rules = _attention(path + ('attention',), f'{hf}.0.SelfAttention')
  rules.append(hf_io.Rule(path + ('attention_norm', 'scale'),
                          f'{hf}.0.layer_norm.weight'))
  ff = 1
  if stack == 'decoder':
    rules += _attention(path + ('cross_attention',), f'{hf}.1.EncDecAttention')
    rules.append(hf_io.Rule(path + ('cross_attention_norm', 'scale'),
                            f'{hf}.1.layer_norm.weight'))
    ff = 2
  for name in mlp_names:
    rules.append(hf_io.Rule(path + ('mlp', name, 'kernel'),
                            f'{hf}.{ff}.DenseReluDense.{name}.weight',
                            transpose=True))
  rules.append(hf_io.Rule(path + ('mlp_norm', 'scale'),
                          f'{hf}.{ff}.layer_norm.weight'))
  return rules


def hf_rules(model: Any,
             keys: Iterable[str] | None = None) -> list[hf_io.Rule]:
  """One `hf_io.Rule` per flax parameter of `model` (keys are unused)."""
  del keys  # T5 checkpoints have one layout.
  c = model.config
  tied = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')
  if c.tie_word_embeddings:
    tied += ('lm_head.weight',)
  rules = [hf_io.Rule(('shared', 'embedding'), 'shared.weight', aliases=tied)]
  mlp_names = (('wi_0', 'wi_1', 'wo') if c.feed_forward_proj == 'gated-gelu'
               else ('wi', 'wo'))
  for stack, depth in (('encoder', c.num_layers),
                       ('decoder', c.num_decoder_layers)):
    rules.append(hf_io.Rule(
        (stack, 'relpos_bias', 'embedding'),
        f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.'
        'weight'))
    for i in range(depth):
      rules += _block(stack, i, mlp_names)
    rules.append(hf_io.Rule((stack, 'final_norm', 'scale'),
                            f'{stack}.final_layer_norm.weight'))
  if not c.tie_word_embeddings:
    rules.append(hf_io.Rule(('lm_head', 'kernel'), 'lm_head.weight',
                            transpose=True))
  return rules
