"""GPT-2: a causal LM with learned positions, LayerNorm and fused QKV.

    model = gpt2.build(gpt2.GPT2Config(...))
    logits = model.apply({'params': params}, input_ids, attention_mask)

Called like `llama.Llama` (masks, positions, packing and the cache are
`causal`'s). The param tree follows Hugging Face's module names; the dense
kernels are stored [in, out] like HF's Conv1D weights, so checkpoints load
without transposes:

  wte/embedding [V, H] (also the output layer), wpe/embedding [P, H], ln_f
  h_{i}/ln_1, ln_2, attn/c_attn [H, 3H] (q | k | v), attn/c_proj [H, H],
  mlp/c_fc [H, F], mlp/c_proj [F, H]
"""
import dataclasses
from typing import Any, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxlora.models import causal
from flaxlora.models import causal_stack
from flaxlora.models import hf_io
from flaxlora.models import layers

Array = jax.Array
_ACTIVATIONS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu')


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """GPT-2 hyper-parameters (the fields of transformers' GPT2Config)."""
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None  # None: 4 * n_embd
  activation_function: str = 'gelu_new'
  resid_pdrop: float = 0.1
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  layer_norm_epsilon: float = 1e-5
  bos_token_id: int | None = 50256
  eos_token_id: int | None = 50256
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.n_inner is None:
      object.__setattr__(self, 'n_inner', 4 * self.n_embd)
    if self.activation_function not in _ACTIVATIONS:
      raise ValueError(f'activation_function {self.activation_function!r} is '
                       f'not supported; use one of {_ACTIVATIONS}.')
    if self.n_embd % self.n_head:
      raise ValueError(f'n_embd {self.n_embd} is not a multiple of n_head '
                       f'{self.n_head}.')

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return () if self.eos_token_id is None else (self.eos_token_id,)


class Attention(nn.Module):
  """Multi-head causal self-attention from a fused q|k|v projection."""
  config: GPT2Config
  dtype: Any = jnp.float32
  attention: str = 'reference'  # attention.CAUSAL_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x, keep, deterministic=True, prefix=None, buffers=None,
               index=None):
    """x [B, T, H] -> ([B, T, H], new buffers); see `llama.Attention`."""
    c = self.config
    h, n = c.n_embd, c.n_head
    qkv = layers.Dense(3 * h, ('embed', 'heads'), use_bias=True,
                       dtype=self.dtype, name='c_attn')(x, deterministic)
    q, k, v = (causal.split_heads(y, n) for y in jnp.split(qkv, 3, axis=-1))
    k, v, buffers = causal.keys_values(k, v, prefix, buffers, index)
    out = causal.attend(q, k, v, keep, dtype=self.dtype,
                        dropout=layers.Dropout(c.attn_pdrop),
                        deterministic=deterministic,
                        chunked=self.attention == 'chunked')
    out = layers.Dense(h, ('heads', 'embed'), use_bias=True, dtype=self.dtype,
                       name='c_proj')(causal.merge_heads(out), deterministic)
    return out, buffers


class Mlp(nn.Module):
  """c_fc -> tanh-GELU -> c_proj."""
  config: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    c = self.config
    h = layers.Dense(c.n_inner, ('embed', 'mlp'), use_bias=True,
                     dtype=self.dtype, name='c_fc')(x, deterministic)
    h = layers.gelu(h, approximate=c.activation_function != 'gelu')
    return layers.Dense(c.n_embd, ('mlp', 'embed'), use_bias=True,
                        dtype=self.dtype, name='c_proj')(h, deterministic)


class Block(nn.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x)), with residual dropout."""
  config: GPT2Config
  dtype: Any = jnp.float32
  attention: str = 'reference'

  @nn.compact
  def __call__(self, x, keep, deterministic=True, prefix=None, buffers=None,
               index=None):
    c = self.config
    norm = lambda name: layers.LayerNorm(c.layer_norm_epsilon, self.dtype,
                                         name=name)
    drop = layers.Dropout(c.resid_pdrop)
    y, buffers = Attention(c, self.dtype, self.attention, name='attn')(
        norm('ln_1')(x), keep, deterministic, prefix, buffers, index)
    x = x + drop(y, deterministic=deterministic)
    y = Mlp(c, self.dtype, name='mlp')(norm('ln_2')(x), deterministic)
    return x + drop(y, deterministic=deterministic), buffers


class GPT2(nn.Module):
  """GPT-2 with its tied output layer; called like `llama.Llama`. `remat`:
  one of `remat.POLICIES`, on every block; `scan_layers`: see
  `causal_stack.blocks`."""
  config: GPT2Config
  dtype: Any = jnp.float32
  remat: str = 'none'
  attention: str = 'reference'  # attention.CAUSAL_IMPLEMENTATIONS
  scan_layers: bool = False

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               positions: Array | None = None,
               segment_ids: Array | None = None, deterministic: bool = True,
               cache: causal.Cache | None = None, prompt: Array | None = None,
               prefix_kv: Array | None = None, head: bool = True):
    """Logits [B, T, V]; with a cache (logits, new cache). Arguments as in
    `llama.Llama.__call__` (prefix_kv [L, 2, P, H]; head=False: the final
    hidden states [B, T, H])."""
    c = self.config
    embed = lambda n, axes, name: layers.Embed(  # pylint: disable=g-long-lambda
        n, c.n_embd, axes, self.dtype, nn.initializers.normal(0.02),
        name=name)
    wte = embed(c.vocab_size, ('vocab', 'embed'), 'wte')
    inp = causal.inputs(wte(input_ids), input_ids, attention_mask, positions,
                        segment_ids, cache, prompt, prefix_kv)
    x = inp.x + embed(c.n_positions, ('positions', 'embed'), 'wpe')(
        inp.positions)
    x = layers.Dropout(c.embd_pdrop)(x, deterministic=deterministic)
    x, new_layers = causal_stack.blocks(
        self, Block, [f'h_{i}' for i in range(c.n_layer)], x, (inp.keep,),
        deterministic, cache, prefix_kv)
    x = layers.LayerNorm(c.layer_norm_epsilon, self.dtype, name='ln_f')(x)
    if not head and cache is None:
      return x[:, inp.num_prompt:]
    logits = layers.constrain(wte.attend(x[:, inp.num_prompt:]),
                              ('batch', None, 'vocab'))
    if cache is None:
      return logits
    return logits, causal.next_cache(cache, inp, new_layers)


class Head(nn.Module):
  """`GPT2`'s tied output layer alone, over the same params (wte): hidden
  states [..., H] -> logits [..., V]."""
  config: GPT2Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    del deterministic  # no adapted kernel in a tied table
    c = self.config
    return layers.Embed(c.vocab_size, c.n_embd, ('vocab', 'embed'),
                        self.dtype, name='wte').attend(x)


GPT2.HEAD = Head


def build(config: GPT2Config, *, dtype: Any = jnp.float32,
          remat: str = 'none', attention: str = 'reference',
          scan_layers: bool = False) -> GPT2:
  """A GPT2 module; see `causal.build`."""
  return causal.build(GPT2, Block, 'gpt2', config, dtype, remat, attention,
                      scan_layers)


# Fresh fp32 params, and their logical axes: shared by the causal families.
init = causal.init_params
logical_axes = causal.param_axes


def init_cache(model: GPT2, batch: int, max_length: int,
               prefix_kv: Array | None = None) -> causal.Cache:
  """An empty cache of `max_length` slots (see `causal.empty_cache`)."""
  c = model.config
  return causal.empty_cache(batch, max_length, num_layers=c.n_layer,
                            kv_heads=c.n_head, head_dim=c.n_embd // c.n_head,
                            dtype=model.dtype, prefix_kv=prefix_kv)


_FIELDS = tuple(f.name for f in dataclasses.fields(GPT2Config))


def config_from_hf(config: dict[str, Any]) -> GPT2Config:
  """A GPT2Config from a config.json dict."""
  for flag, ok in (('scale_attn_weights', True),
                   ('scale_attn_by_inverse_layer_idx', False),
                   ('reorder_and_upcast_attn', False)):
    if config.get(flag, ok) != ok:
      raise ValueError(f'config.json: {flag}={config[flag]} is not supported; '
                       f'flaxlora reads GPT-2 with {flag}={ok}.')
  return GPT2Config(**{k: config[k] for k in _FIELDS if k in config})


def config_to_hf(model: GPT2) -> dict[str, Any]:
  """The config.json dict transformers reads back as the same model."""
  out = dataclasses.asdict(model.config)
  out.update(model_type='gpt2', architectures=['GPT2LMHeadModel'],
             tie_word_embeddings=True)
  return out


# Causal-mask buffers of older checkpoints (per layer, any prefix).
_BUFFERS = ('attn.bias', 'attn.masked_bias')
HF_IGNORE = tuple(f'{prefix}h.{i}.{name}' for prefix in ('', 'transformer.')
                  for i in range(128) for name in _BUFFERS)


def hf_rules(model: GPT2,
             keys: Collection[str] | None = None) -> list[hf_io.Rule]:
  """Checkpoint rules; `keys` tell bare GPT2Model names (openai-community's
  files) from GPT2LMHeadModel's 'transformer.' ones (None: the latter)."""
  prefix = 'transformer.'
  if keys is not None and not any(k.startswith(prefix) for k in keys):
    prefix = ''
  rules = [hf_io.Rule(('wte', 'embedding'), f'{prefix}wte.weight',
                      aliases=('lm_head.weight',)),
           hf_io.Rule(('wpe', 'embedding'), f'{prefix}wpe.weight')]
  modules = [('ln_f',)]
  for i in range(model.config.n_layer):
    modules += [(f'h_{i}', *m) for m in (
        ('ln_1',), ('ln_2',), ('attn', 'c_attn'), ('attn', 'c_proj'),
        ('mlp', 'c_fc'), ('mlp', 'c_proj'))]
  for path in modules:
    key = prefix + '.'.join(p.replace('_', '.') if p.startswith('h_') else p
                            for p in path)
    weight = 'scale' if path[-1].startswith('ln') else 'kernel'
    rules.append(hf_io.Rule(path + (weight,), f'{key}.weight'))
    rules.append(hf_io.Rule(path + ('bias',), f'{key}.bias'))
  return rules


MODULE = GPT2
MODEL_TYPES = ('gpt2',)
hf_class_missing = lambda model: ''  # every config is a GPT2LMHeadModel
