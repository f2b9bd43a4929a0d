"""The Llama family's config, its Hugging Face config.json forms and
checkpoint names (Llama 2/3, Mistral, Qwen2, SmolLM2).

Used through the `llama` family module (`llama.LlamaConfig`,
`llama.config_from_hf`, `llama.hf_rules`...).
"""
import dataclasses
from typing import Any, Iterable

import numpy as np

from flaxlora.models import hf_io

MODEL_TYPES = ('llama', 'mistral', 'qwen2')
_ARCHITECTURES = {'llama': 'LlamaForCausalLM',
                  'mistral': 'MistralForCausalLM',
                  'qwen2': 'Qwen2ForCausalLM'}
ROPE_TYPES = ('default', 'llama3', 'linear')
HF_IGNORE = ()


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture (field names follow transformers' LlamaConfig).

  `qkv_bias`: biases on q/k/v only (Qwen2); `attention_bias`: on q/k/v/o
  (Llama's flag). `rope_scaling` holds the non-default entries of HF's
  `rope_parameters` as sorted (name, value) pairs (hashable).
  `sliding_window`: a query sees keys less than this many positions back
  (Mistral); None: all.
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None  # None: num_attention_heads
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = 'default'
  rope_scaling: tuple[tuple[str, float], ...] = ()
  attention_bias: bool = False
  qkv_bias: bool = False
  mlp_bias: bool = False
  attention_dropout: float = 0.0
  tie_word_embeddings: bool = False
  sliding_window: int | None = None
  max_position_embeddings: int = 2048
  model_type: str = 'llama'
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, 'num_key_value_heads',
                         self.num_attention_heads)
    if self.head_dim is None:
      object.__setattr__(self, 'head_dim',
                         self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f'num_attention_heads {self.num_attention_heads} is not a multiple '
          f'of num_key_value_heads {self.num_key_value_heads}.')
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f'rope_type {self.rope_type!r} is not supported; '
                       f'flaxlora implements {ROPE_TYPES}.')
    if self.model_type not in MODEL_TYPES:
      raise ValueError(f'model_type {self.model_type!r} is not one of '
                       f'{MODEL_TYPES}.')

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every end-of-sequence id (config.json may list several)."""
    eos = self.eos_token_id
    return () if eos is None else tuple(eos) if isinstance(eos, tuple) else (
        eos,)

  def inv_freq(self) -> np.ndarray:
    """RoPE's [D / 2] inverse frequencies (fp32), scaled by `rope_type`."""
    d = self.head_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d
    inv = (1.0 / (np.float32(self.rope_theta)**exponent)).astype(np.float32)
    scaling = dict(self.rope_scaling)
    if self.rope_type == 'linear':
      return (inv / np.float32(scaling['factor'])).astype(np.float32)
    if self.rope_type == 'llama3':
      return _llama3_inv_freq(inv, scaling)
    return inv


def _llama3_inv_freq(inv: np.ndarray, s: dict[str, float]) -> np.ndarray:
  """Llama 3.1's frequency-dependent RoPE scaling: long wavelengths divided
  by `factor`, short ones kept, a smooth blend in between."""
  factor, old = s['factor'], s['original_max_position_embeddings']
  low, high = s['low_freq_factor'], s['high_freq_factor']
  wavelen = 2 * np.pi / inv
  scaled = np.where(wavelen > old / low, inv / factor, inv)
  smooth = (old / wavelen - low) / (high - low)
  blend = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < old / high) & ~(wavelen > old / low)
  return np.where(medium, blend, scaled).astype(np.float32)


_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size',
           'num_hidden_layers', 'num_attention_heads', 'num_key_value_heads',
           'head_dim', 'rms_norm_eps', 'attention_dropout',
           'max_position_embeddings', 'bos_token_id', 'pad_token_id')
_ROPE_KEYS = {'default': (), 'linear': ('factor',),
              'llama3': ('factor', 'low_freq_factor', 'high_freq_factor',
                         'original_max_position_embeddings')}


def config_from_hf(config: dict[str, Any]) -> LlamaConfig:
  """A `LlamaConfig` from a config.json dict (transformers 4 or 5 form)."""
  model_type = config['model_type']
  kwargs = {k: config[k] for k in _FIELDS if config.get(k) is not None}
  act = config.get('hidden_act', 'silu')
  if act != 'silu':
    raise ValueError(f'config.json: hidden_act {act!r} is not supported; '
                     "the Llama family uses 'silu'.")
  rope = dict(config.get('rope_parameters') or config.get('rope_scaling') or
              {})
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type not in _ROPE_KEYS:
    raise ValueError(f'config.json: rope_type {rope_type!r} is not '
                     f'supported; flaxlora implements {sorted(_ROPE_KEYS)}.')
  theta = rope.get('rope_theta', config.get('rope_theta', 10000.0))
  scaling = tuple(sorted((k, float(rope[k])) for k in _ROPE_KEYS[rope_type]))
  eos = config.get('eos_token_id')
  window = None
  if model_type == 'mistral':
    window = config.get('sliding_window')
  elif model_type == 'qwen2' and config.get('use_sliding_window'):
    raise ValueError('config.json: use_sliding_window=true (Qwen2) is not '
                     'supported; flaxlora reads full-attention Qwen2.')
  bias = bool(config.get('attention_bias', False))
  return LlamaConfig(
      model_type=model_type, rope_theta=float(theta), rope_type=rope_type,
      rope_scaling=scaling, attention_bias=bias and model_type == 'llama',
      qkv_bias=model_type == 'qwen2', mlp_bias=bool(config.get('mlp_bias')),
      tie_word_embeddings=bool(config.get('tie_word_embeddings', False)),
      sliding_window=window,
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos, **kwargs)


def config_to_hf(model: Any) -> dict[str, Any]:
  """The config.json dict transformers reads back as the same model."""
  c = model.config
  out = {k: getattr(c, k) for k in _FIELDS}
  eos = c.eos_token_id
  out.update(
      model_type=c.model_type, architectures=[_ARCHITECTURES[c.model_type]],
      hidden_act='silu', tie_word_embeddings=c.tie_word_embeddings,
      eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
      rope_theta=c.rope_theta,
      rope_parameters=dict(c.rope_scaling, rope_type=c.rope_type,
                           rope_theta=c.rope_theta))
  if c.model_type == 'llama':
    out.update(attention_bias=c.attention_bias, mlp_bias=c.mlp_bias)
  if c.model_type == 'mistral':
    out.update(sliding_window=c.sliding_window)
  if c.model_type == 'qwen2':
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def hf_rules(model: Any,
             keys: Iterable[str] | None = None) -> list[hf_io.Rule]:
  """One `hf_io.Rule` per flax parameter (HF names: model.layers.{i}...)."""
  del keys  # one layout
  c = model.config
  tied = ('lm_head.weight',) if c.tie_word_embeddings else ()
  rules = [hf_io.Rule(('embed_tokens', 'embedding'),
                      'model.embed_tokens.weight', aliases=tied),
           hf_io.Rule(('norm', 'scale'), 'model.norm.weight')]
  qkv = c.qkv_bias or c.attention_bias
  biased = {('self_attn', 'q_proj'): qkv, ('self_attn', 'k_proj'): qkv,
            ('self_attn', 'v_proj'): qkv,
            ('self_attn', 'o_proj'): c.attention_bias,
            ('mlp', 'gate_proj'): c.mlp_bias, ('mlp', 'up_proj'): c.mlp_bias,
            ('mlp', 'down_proj'): c.mlp_bias}
  for i in range(c.num_hidden_layers):
    path, key = (f'layers_{i}',), f'model.layers.{i}'
    for norm in ('input_layernorm', 'post_attention_layernorm'):
      rules.append(hf_io.Rule(path + (norm, 'scale'), f'{key}.{norm}.weight'))
    for (block, name), bias in biased.items():
      rules.append(hf_io.Rule(path + (block, name, 'kernel'),
                              f'{key}.{block}.{name}.weight', transpose=True))
      if bias:
        rules.append(hf_io.Rule(path + (block, name, 'bias'),
                                f'{key}.{block}.{name}.bias'))
  if not c.tie_word_embeddings:
    rules.append(hf_io.Rule(('lm_head', 'kernel'), 'lm_head.weight',
                            transpose=True))
  return rules
