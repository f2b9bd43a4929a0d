"""T5's Hugging Face config.json fields and checkpoint tensor names.

Used through the `t5` family module (`t5.config_from_hf`, `t5.hf_rules`...).
"""
from typing import Any, Iterable

from flaxlora.models import hf_io
from flaxlora.models import t5

# Old checkpoints carry an unused relative bias in the first cross-attention.
HF_IGNORE = (
    'decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight',)

_FIELDS = ('vocab_size', 'd_model', 'd_kv', 'd_ff', 'num_layers',
           'num_decoder_layers', 'num_heads', 'relative_attention_num_buckets',
           'relative_attention_max_distance', 'dropout_rate',
           'layer_norm_epsilon', 'feed_forward_proj', 'pad_token_id',
           'eos_token_id', 'decoder_start_token_id')


def config_from_hf(config: dict[str, Any]) -> 't5.T5Config':
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
  return t5.T5Config(tie_word_embeddings=tie, scale_decoder_outputs=scale,
                     **kwargs)


def config_to_hf(model: 't5.T5') -> dict[str, Any]:
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


def hf_rules(model: 't5.T5',
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
