"""Mixed-precision products, hash dropout and GELU of flaxlora.models.layers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlora.models import dropout as dropout_lib
from flaxlora.models import layers

SPECS = [('bntd,bnsd->bnts', (2, 3, 4, 5), (2, 3, 6, 5)),
         ('bnts,bnsd->bntd', (2, 3, 4, 6), (2, 3, 6, 5)),
         ('abi,io->abo', (2, 4, 5), (5, 7))]


def _operands(lhs_shape, rhs_shape):
  a = jax.random.normal(jax.random.PRNGKey(0), lhs_shape)
  b = jax.random.normal(jax.random.PRNGKey(1), rhs_shape)
  return a, b


@pytest.mark.parametrize('spec,lhs_shape,rhs_shape', SPECS)
def test_bf16_einsum_and_its_gradients_match_numpy(spec, lhs_shape,
                                                   rhs_shape):
  a, b = _operands(lhs_shape, rhs_shape)
  weights = jax.random.normal(jax.random.PRNGKey(2),
                              layers.einsum(spec, a, b, dtype=jnp.float32).shape)
  loss = lambda a, b: jnp.sum(layers.einsum(spec, a, b, dtype=jnp.bfloat16)
                              * weights)
  grad_a, grad_b = jax.grad(loss, argnums=(0, 1))(a, b)
  assert grad_a.dtype == grad_b.dtype == jnp.float32  # operands' dtypes
  # numpy reference on the bf16-rounded operands, in float64
  rounded = lambda x: np.asarray(x.astype(jnp.bfloat16), np.float64)
  a64, b64, w64 = rounded(a), rounded(b), np.asarray(weights, np.float64)
  ins, out = spec.split('->')
  lhs, rhs = ins.split(',')
  want_a = np.einsum(f'{out},{rhs}->{lhs}', w64, b64)
  want_b = np.einsum(f'{lhs},{out}->{rhs}', a64, w64)
  np.testing.assert_allclose(grad_a, want_a, rtol=3e-2, atol=3e-2)
  np.testing.assert_allclose(grad_b, want_b, rtol=3e-2, atol=3e-2)
  y = layers.einsum(spec, a, b, dtype=jnp.bfloat16)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, np.einsum(spec, a64, b64), rtol=1e-5,
                             atol=1e-4)
  # bf16 really rounds: the fp32 product differs
  assert np.abs(np.asarray(layers.einsum(spec, a, b, dtype=jnp.float32)) -
                np.asarray(y)).max() > 1e-4


def test_bf16_backward_multiplies_only_bf16_operands():
  spec, lhs_shape, rhs_shape = SPECS[0]
  a, b = _operands(lhs_shape, rhs_shape)
  loss = lambda a, b: jnp.sum(layers.einsum(spec, a, b, dtype=jnp.bfloat16))
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(a, b)

  def dots(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        yield eqn
      for value in eqn.params.values():
        inner = getattr(value, 'jaxpr', None)
        if inner is not None:
          yield from dots(getattr(inner, 'jaxpr', inner))

  found = list(dots(jaxpr.jaxpr))
  assert len(found) == 3  # forward, and one per operand's gradient
  for eqn in found:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn
    assert eqn.params['preferred_element_type'] == jnp.float32


def test_hash_dropout_rate_and_independence():
  x = jnp.ones((200, 500))
  m1 = np.asarray(dropout_lib.dropout(x, 0.1, jax.random.PRNGKey(0))) == 0
  m2 = np.asarray(dropout_lib.dropout(x, 0.1, jax.random.PRNGKey(1))) == 0
  assert abs(m1.mean() - 0.1) < 0.005 and abs(m2.mean() - 0.1) < 0.005
  assert abs(np.corrcoef(m1.ravel(), m2.ravel())[0, 1]) < 0.02
  assert abs(np.corrcoef(m1[:, :-1].ravel(), m1[:, 1:].ravel())[0, 1]) < 0.02
  kept = np.asarray(dropout_lib.dropout(x, 0.1, jax.random.PRNGKey(0)))[~m1]
  np.testing.assert_allclose(kept, 1 / (1 - 6554 / 65536))   # unbiased


def _gelu_reference(x64, approximate):
  """numpy float64 GELU and its derivative."""
  if approximate:
    c = math.sqrt(2.0 / math.pi)
    t = np.tanh(c * (x64 + 0.044715 * x64**3))
    value = 0.5 * x64 * (1.0 + t)
    slope = 0.5 * (1.0 + t) + 0.5 * x64 * (1.0 - t**2) * c * (
        1.0 + 3 * 0.044715 * x64**2)
    return value, slope
  cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x64 / math.sqrt(2.0)))
  pdf = np.exp(-0.5 * x64**2) / math.sqrt(2.0 * math.pi)
  return x64 * cdf, cdf + x64 * pdf


@pytest.mark.parametrize('approximate', [False, True])
def test_gelu_values_and_gradient_match_numpy(approximate):
  x = np.linspace(-6.0, 6.0, 241).astype(np.float32)
  value, slope = _gelu_reference(x.astype(np.float64), approximate)
  gelu = lambda x: layers.gelu(x, approximate)
  np.testing.assert_allclose(gelu(jnp.asarray(x)), value, atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(gelu(x)))(jnp.asarray(x))
  np.testing.assert_allclose(grad, slope, atol=1e-5)  # fp32 tanh(u)**2 ~ 1
  # bf16 activations: the gradient is computed in fp32, returned in bf16
  grad16 = jax.grad(lambda x: jnp.sum(gelu(x).astype(jnp.float32)))(
      jnp.asarray(x, jnp.bfloat16))
  assert grad16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(grad16, np.float32), slope,
                             atol=2e-2)


@pytest.mark.parametrize('approximate', [False, True])
def test_gelu_backward_keeps_only_its_input(approximate):
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 16))
  activation_sized = lambda f: [
      leaf for leaf in jax.tree.leaves(jax.vjp(f, x)[1])
      if leaf.shape == x.shape]
  assert len(activation_sized(lambda x: layers.gelu(x, approximate))) == 1
  # what autodiff of the same formula keeps (the reason for the custom VJP)
  assert len(activation_sized(
      lambda x: jax.nn.gelu(x, approximate=approximate))) > 1
