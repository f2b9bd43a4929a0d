"""NF4 quantisation against a numpy reference of the QLoRA paper's algorithm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec
from scipy import stats

from flaxlora.peft.qlora import nf4


def reference_levels() -> np.ndarray:
  """NF4 from the paper: 8 positive and 7 negative normal quantiles and 0,
  with offset (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, rescaled to [-1, 1]."""
  offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
  positive = stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  negative = -stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  levels = np.sort(np.concatenate([positive, [0.0], negative]))
  return levels / levels.max()


def reference_quantize(w: np.ndarray):
  """numpy QLoRA quantisation of kernel w [I, O] (I % 64 == 0), in the
  row-major order of the torch weight w.T [O, I]; nearest levels by argmin.

  Returns (4-bit codes [O*I], 8-bit scale codes, absmax2, offset, dequant).
  """
  flat = w.T.reshape(-1, 64).astype(np.float64)
  absmax = np.abs(flat).max(axis=1)
  levels = reference_levels()
  codes = np.abs(flat[..., None] / absmax[:, None, None] - levels).argmin(-1)
  offset = absmax.mean()
  centred = absmax - offset
  n = len(centred)
  pad = -n % 256
  blocks = np.concatenate([centred, np.zeros(pad)]).reshape(-1, 256)
  absmax2 = np.abs(blocks).max(axis=1)
  dyn = nf4.DYNAMIC.astype(np.float64)
  q2 = np.abs(blocks[..., None] / absmax2[:, None, None] - dyn).argmin(-1)
  absmax_dq = (dyn[q2] * absmax2[:, None]).reshape(-1)[:n] + offset
  dequant = (levels[codes] * absmax_dq[:, None]).reshape(w.shape[1], -1).T
  return codes.reshape(-1), q2.reshape(-1)[:n], absmax2, offset, dequant


def test_levels_match_paper_construction():
  np.testing.assert_allclose(nf4.LEVELS, reference_levels(), atol=1e-6)
  assert nf4.LEVELS[7] == 0.0 and len(np.unique(nf4.LEVELS)) == 16


def bitsandbytes_dynamic_map():
  """bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7,
  total_bits=8)` (bitsandbytes/functional.py), restated from its definition
  in torch: for exponent i, the midpoints of 2**i + 1 linspace(0.1, 1)
  boundaries, times +-10**(i - 6); then 0 and 1; sorted."""
  data = []
  for i in range(7):
    boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float64)
    means = (boundaries[:-1] + boundaries[1:]) / 2.0
    data += (10.0**(i - 6) * means).tolist()
    data += (-(10.0**(i - 6)) * means).tolist()
  data += [0.0, 1.0]
  assert len(data) == 256
  return np.sort(np.array(data))


def test_dynamic_map_equals_bitsandbytes_codes():
  ours = nf4.DYNAMIC.astype(np.float64)
  np.testing.assert_allclose(ours, bitsandbytes_dynamic_map(), rtol=1e-6,
                             atol=1e-12)
  # Published values of that map: the largest code below 1 and the
  # smallest positive one.
  np.testing.assert_allclose(ours[-2], 0.99296875, rtol=1e-6)
  np.testing.assert_allclose(ours[ours > 0].min(), 5.5e-7, rtol=1e-6)


def test_dynamic_map_is_signed_8bit():
  d = nf4.DYNAMIC
  assert d.shape == (256,) and len(np.unique(d)) == 256
  assert d.max() == 1.0 and 0.0 in d and d.min() < -0.99
  # Float-like: 7 decades of range; the top decade [0.1, 1] holds 64
  # bin midpoints (plus 1.0), each lower decade half as many.
  positive = d[d > 0]
  assert 1e-7 < positive.min() < 1e-6
  assert np.sum(positive >= 0.1) == 65 and np.sum(
      (positive >= 0.01) & (positive < 0.1)) == 32


@pytest.mark.parametrize('shape', [(128, 48), (256, 64)])
def test_matches_numpy_reference(shape):
  rng = np.random.default_rng(0)
  w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
  codes, q2, absmax2, offset, dequant = reference_quantize(w)
  q = nf4.quantize(jnp.asarray(w))
  i, o = shape
  # Unpack ours into the reference's [O, I] row-major order.
  packed = np.asarray(q.codes)                                  # [I/2, O]
  ours = np.stack([packed >> 4, packed & 15], axis=1).reshape(i, o).T
  np.testing.assert_array_equal(ours.reshape(-1), codes)
  np.testing.assert_array_equal(np.asarray(q.scale_codes).T.reshape(-1), q2)
  np.testing.assert_allclose(np.asarray(q.scale_scales), absmax2, rtol=1e-6)
  np.testing.assert_allclose(float(q.scale_offset), offset, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q.dequantize()), dequant, atol=1e-6)


def test_round_trip_error_and_bytes():
  w = jax.random.normal(jax.random.PRNGKey(1), (512, 256)) * 0.02
  q = nf4.quantize(w)
  err = np.asarray(q.dequantize() - w)
  # Per block the error is at most half the widest NF4 gap times the absmax
  # (plus the tiny double-quantisation error); on average far less.
  widest = np.max(np.diff(nf4.LEVELS)) / 2
  assert np.abs(err).max() <= widest * float(jnp.abs(w).max()) * 1.01
  assert 0 < np.sqrt(np.mean(err**2)) < 0.12 * float(jnp.std(w))
  ratio = q.nbytes() / (w.size * 4)
  assert 0.125 < ratio <= 0.14, ratio


def test_padding_odd_shapes_and_zeros():
  w = jax.random.normal(jax.random.PRNGKey(2), (40, 7))
  w = w.at[:, 3].set(0.0)
  q = nf4.quantize(w)
  assert q.codes.shape == (32, 7) and q.shape == (40, 7)
  d = q.dequantize()
  assert d.shape == (40, 7)
  np.testing.assert_array_equal(np.asarray(d[:, 3]), 0.0)
  assert float(jnp.abs(d - w).max()) < 0.2 * float(jnp.abs(w).max())


def test_dot_equals_dense_reference_and_jits():
  w = jax.random.normal(jax.random.PRNGKey(3), (64, 32))
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 64))
  q = nf4.quantize(w)
  y = jax.jit(lambda q, x: q.dot(x, dtype=jnp.float32))(q, x)
  ref = np.einsum('bti,io->bto', np.asarray(x, np.float64),
                  np.asarray(q.dequantize(), np.float64))
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-4)
  assert not np.allclose(np.asarray(y), np.asarray(x @ w), atol=1e-3)
  bf16 = q.dot(x, dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), ref, atol=0.3)


def test_quantize_params_selects_and_is_idempotent():
  params = {'enc': {'q': {'kernel': jnp.ones((64, 8))},
                    'norm': {'scale': jnp.ones((64,))}},
            'shared': {'embedding': jnp.ones((10, 64))},
            'classifier': {'kernel': jnp.ones((64, 2))}}
  q = nf4.quantize_params(params)
  assert nf4.is_nf4(q['enc']['q']['kernel'])
  assert q['shared']['embedding'] is params['shared']['embedding']
  assert q['classifier']['kernel'] is params['classifier']['kernel']
  again = nf4.quantize_params(q)
  assert again['enc']['q']['kernel'] is q['enc']['q']['kernel']
  np.testing.assert_allclose(
      np.asarray(nf4.dequantize_params(q)['enc']['q']['kernel']), 1.0)
  with pytest.raises(ValueError, match='matched no 2-D param.*enc/q/kernel'):
    nf4.quantize_params(params, include=r'.*/wo/kernel')


def test_logical_axes_tree_matches_structure():
  params = {'q': {'kernel': jnp.ones((64, 16))}}
  q = nf4.quantize_params(params)
  axes = nf4.params_logical_axes(
      {'q': {'kernel': PartitionSpec('embed', 'heads')}}, q)
  leaves = jax.tree.leaves(axes, is_leaf=lambda v: isinstance(
      v, PartitionSpec))
  assert len(leaves) == len(jax.tree.leaves(q))
  assert axes['q']['kernel'].codes == PartitionSpec('embed', 'heads')
  assert jax.tree.structure(q) == jax.tree.structure(
      jax.tree.map(lambda s: 0, axes, is_leaf=lambda v: isinstance(
          v, PartitionSpec)))


def test_rejects_non_2d():
  with pytest.raises(ValueError, match='2-D kernel'):
    nf4.quantize(jnp.ones((4, 4, 4)))


def _stack(layers=6, width=256):
  kernels = [nf4.quantize(0.05 * jax.random.normal(jax.random.PRNGKey(i),
                                                   (width, width)))
             for i in range(layers)]
  x = jax.random.normal(jax.random.PRNGKey(9), (8, width))
  return kernels, x


def test_gradient_equals_autodiff_of_dequantised_reference():
  kernels, x = _stack(layers=2, width=128)

  def fast(x):
    for k in kernels:
      x = jnp.tanh(k.dot(x, dtype=jnp.float32))
    return jnp.sum(x**2)

  def reference(x):  # the slow path: plain autodiff through dequantisation
    for k in kernels:
      x = jnp.tanh(x @ k.dequantize())
    return jnp.sum(x**2)

  g = jax.jit(jax.grad(fast))(x)
  np.testing.assert_allclose(np.asarray(g),
                             np.asarray(jax.grad(reference)(x)), atol=1e-5)
  assert float(jnp.abs(g).max()) > 0


def test_train_step_never_holds_all_dequantised_kernels():
  kernels, x = _stack()
  a = jnp.zeros((256, 4))

  def loss(a, kernels, x):  # a LoRA-like trainable path beside each kernel
    for k in kernels:
      x = jnp.tanh(k.dot(x, dtype=jnp.float32) + (x @ a) @ jnp.ones((4, 256)))
    return jnp.sum(x)

  memory = jax.jit(jax.grad(loss)).lower(a, kernels, x).compile(
      ).memory_analysis()
  if memory is None:
    pytest.skip('this backend reports no memory analysis')
  all_fp32 = 6 * 256 * 256 * 4
  # Plain autodiff keeps every dequantised kernel for the backward pass
  # (temp >= all_fp32); the recomputing VJP holds about one at a time.
  assert memory.temp_size_in_bytes < all_fp32 / 2, memory.temp_size_in_bytes
