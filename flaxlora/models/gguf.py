"""Reads GGUF files (llama.cpp's format) as Hugging Face checkpoints.

    config_dict, tensors = gguf.read('model.Q4_1.gguf')

`read` returns what a Hugging Face folder would hold: a config.json dict and
float32 tensors under transformers' names, so a family's `hf_rules` load
them like any checkpoint (`models.load` does this for a .gguf path). Tensors
are dequantized with the `gguf` package (F32, F16, BF16, Q8_0, Q4_0, Q4_1
and the other types it implements). llama.cpp stores the q and k
projections of 'llama'-architecture models with the rows of each head
interleaved (its converter permutes them for its RoPE layout); `read` undoes
that the way transformers' own GGUF loader does. The tokenizer comes from
the file too (`tokenizer`), through transformers.
"""
import os
import pathlib
import re
from typing import Any

import numpy as np

SUFFIX = '.gguf'
# GGUF architecture -> Hugging Face model_type; both are `llama` family.
ARCHITECTURES = {'llama': 'llama', 'qwen2': 'qwen2'}
# Architectures whose q/k rows llama.cpp permutes.
_PERMUTED = ('llama',)
_GLOBAL_NAMES = {'token_embd': 'model.embed_tokens', 'output_norm':
                 'model.norm', 'output': 'lm_head'}
_BLOCK_NAMES = {
    'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm',
    'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
    'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
    'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj'}
_BLOCK = re.compile(r'blk\.(\d+)\.(\w+)\.(weight|bias)')


def is_gguf(path: str | os.PathLike) -> bool:
  """True for a path to a .gguf file."""
  return str(path).endswith(SUFFIX) and pathlib.Path(path).is_file()


def _reader(file: pathlib.Path):
  import gguf  # pylint: disable=g-import-not-at-top
  try:
    return gguf.GGUFReader(str(file))
  except (ValueError, OSError) as e:
    raise ValueError(f'{file}: not a readable GGUF file ({e}).') from e


def _field(reader, name: str, default: Any = None) -> Any:
  field = reader.fields.get(name)
  return default if field is None else field.contents()


def _config(reader, file: pathlib.Path, tied: bool) -> dict[str, Any]:
  """The config.json dict of the file's metadata."""
  arch = _field(reader, 'general.architecture')
  if arch not in ARCHITECTURES:
    raise ValueError(f'{file}: GGUF architecture {arch!r} is not supported; '
                     f'flaxlora reads {sorted(ARCHITECTURES)}.')
  get = lambda key, default=None: _field(reader, f'{arch}.{key}', default)
  heads = get('attention.head_count')
  hidden = get('embedding_length')
  tokens = _field(reader, 'tokenizer.ggml.tokens')
  config = dict(
      model_type=ARCHITECTURES[arch],
      vocab_size=get('vocab_size') or len(tokens),
      hidden_size=hidden, intermediate_size=get('feed_forward_length'),
      num_hidden_layers=get('block_count'), num_attention_heads=heads,
      num_key_value_heads=get('attention.head_count_kv', heads),
      head_dim=get('attention.key_length', hidden // heads),
      rms_norm_eps=get('attention.layer_norm_rms_epsilon', 1e-6),
      rope_theta=get('rope.freq_base', 10000.0),
      max_position_embeddings=get('context_length', 2048),
      tie_word_embeddings=tied, hidden_act='silu',
      bos_token_id=_field(reader, 'tokenizer.ggml.bos_token_id'),
      eos_token_id=_field(reader, 'tokenizer.ggml.eos_token_id'),
      pad_token_id=_field(reader, 'tokenizer.ggml.padding_token_id'))
  if get('rope.scaling.type') not in (None, 'none'):
    raise ValueError(f'{file}: RoPE scaling {get("rope.scaling.type")!r} '
                     'in a GGUF file is not supported.')
  return config


def read_config(file: str | os.PathLike) -> dict[str, Any]:
  """The config.json dict of a GGUF file (metadata only, no tensor read)."""
  file = pathlib.Path(file)
  reader = _reader(file)
  names = {t.name for t in reader.tensors}
  return _config(reader, file, 'output.weight' not in names)


def hf_name(name: str, file: pathlib.Path) -> str:
  """A GGUF tensor name -> transformers' name ('blk.0.attn_q.weight' ->
  'model.layers.0.self_attn.q_proj.weight')."""
  base, _, kind = name.rpartition('.')
  if base in _GLOBAL_NAMES:
    return f'{_GLOBAL_NAMES[base]}.{kind}'
  match = _BLOCK.fullmatch(name)
  if match and match.group(2) in _BLOCK_NAMES:
    i, part, kind = match.groups()
    return f'model.layers.{i}.{_BLOCK_NAMES[part]}.{kind}'
  if base == 'rope_freqs':
    raise ValueError(f'{file}: tensor {name!r} (Llama 3 RoPE frequency '
                     'factors) is not supported.')
  raise ValueError(f'{file}: tensor {name!r} is not one of a Llama-family '
                   'model; flaxlora cannot map it.')


def dequantize(tensor, file: pathlib.Path | str = 'GGUF') -> np.ndarray:
  """A GGUF reader tensor -> float32 [rows, ..., columns] (numpy order: the
  reverse of GGUF's dimension list, so a weight is [out, in])."""
  import gguf  # pylint: disable=g-import-not-at-top
  kind = gguf.GGMLQuantizationType(tensor.tensor_type)
  try:
    values = gguf.quants.dequantize(tensor.data, kind)
  except NotImplementedError as e:
    raise ValueError(f'{file}: tensor {tensor.name!r} has GGUF type '
                     f'{kind.name}, which the gguf package cannot dequantize '
                     f'({e}).') from None
  shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
  return np.asarray(values, np.float32).reshape(shape)


def unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation of [N*D, ...] (or a bias).

  Per head, llama.cpp stores the D rows as (D/2, 2) pairs taken from the
  two halves; this returns them to transformers' halves layout.
  """
  d = weight.shape[0] // num_heads // 2
  w = weight.reshape(num_heads, d, 2, *weight.shape[1:])
  return np.swapaxes(w, 1, 2).reshape(weight.shape)


def read(file: str | os.PathLike) -> tuple[dict[str, Any],
                                           dict[str, np.ndarray]]:
  """A GGUF file -> (config.json dict, {transformers name: fp32 array})."""
  file = pathlib.Path(file)
  reader = _reader(file)
  names = {t.name for t in reader.tensors}
  config = _config(reader, file, 'output.weight' not in names)
  permuted = _field(reader, 'general.architecture') in _PERMUTED
  tensors = {}
  for tensor in reader.tensors:
    name = hf_name(tensor.name, file)
    value = dequantize(tensor, file)
    if permuted and '.q_proj.' in name:
      value = unpermute(value, config['num_attention_heads'])
    elif permuted and '.k_proj.' in name:
      value = unpermute(value, config['num_key_value_heads'])
    tensors[name] = value
  return config, tensors


def tokenizer(file: str | os.PathLike) -> Any:
  """The transformers tokenizer stored in a GGUF file (its chat template
  included)."""
  import transformers  # pylint: disable=g-import-not-at-top
  file = pathlib.Path(file).resolve()
  return transformers.AutoTokenizer.from_pretrained(
      str(file.parent), gguf_file=file.name, trust_remote_code=False)
