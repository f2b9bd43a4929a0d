"""LoRA family (LoRA, rsLoRA, DoRA, PiSSA), chain/trainable, merge, LoRA+,
describe: against numpy references on a toy model built from `layers.Dense`.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxlora.models import dropout as dropout_lib
from flaxlora.models import layers
from flaxlora.peft import base as peft_base
from flaxlora.peft import describe
from flaxlora.peft import lora
from flaxlora.peft import merge
from flaxlora.peft import trainable
from flaxlora.peft.lora import dora
from flaxlora.peft.lora import loraplus

H, F, C = 16, 24, 3  # toy widths: hidden, inner, classes


class Block(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    x = layers.RMSNorm(dtype=self.dtype, name='norm')(x)
    h = layers.Dense(F, ('embed', 'heads'), dtype=self.dtype, name='q')(
        x, deterministic)
    h = jnp.tanh(h)
    return layers.Dense(H, ('heads', 'embed'), dtype=self.dtype, name='v')(
        h, deterministic)


class Toy(nn.Module):
  """x [B, H] -> logits [B, C]; paths block/{norm,q,v}, head/{kernel,bias}."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    x = x + Block(self.dtype, name='block')(x, deterministic)
    return layers.Dense(C, ('embed', 'classes'), use_bias=True,
                        dtype=self.dtype, name='head')(x, deterministic)


def _np_forward(p, x, kernels=None):
  """Numpy reference of Toy with optional replacement kernels {path: W}."""
  kernels = kernels or {}
  k = lambda path: kernels.get(path, np.asarray(peft_base.get(p, path)))
  b = p['block']
  xn = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
  xn = xn * np.asarray(b['norm']['scale'])
  h = np.tanh(xn @ k('block/q/kernel'))
  y = x + h @ k('block/v/kernel')
  return y @ k('head/kernel') + np.asarray(p['head']['bias'])


@pytest.fixture(scope='module')
def toy():
  model = Toy()
  x = jax.random.normal(jax.random.PRNGKey(1), (5, H))
  params = model.init(jax.random.PRNGKey(0), x)['params']
  params = jax.tree.map(jnp.asarray, nn.meta.unbox(params))
  return model, params, x


def _perturb(adapter, seed=3, size=0.1):
  leaves, tree = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      x + size * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _run(model, method, params, adapter, x, **kw):
  p, extra = method.apply(params, adapter)
  return model.apply({'params': p}, x, **kw, **extra)


def _np_dense(adapter_leaf, w, scale):
  w = np.asarray(w, np.float64)
  a, b = (np.asarray(adapter_leaf[k], np.float64) for k in 'ab')
  dense = w + scale * a @ b
  if 'magnitude' in adapter_leaf:
    m = np.asarray(adapter_leaf['magnitude'], np.float64)
    dense = dense * (m / np.linalg.norm(dense, axis=0))
  return dense


@pytest.mark.parametrize('kwargs', [
    {}, {'init': 'gaussian'}, {'use_dora': True}, {'use_rslora': True,
                                                   'dropout': 0.1}])
def test_init_equals_base_then_matches_merged_reference(toy, kwargs):
  model, params, x = toy
  method = lora.lora(rank=4, alpha=8, targets='t5', **kwargs)
  adapter = method.init(jax.random.PRNGKey(2), params)
  base_out = model.apply({'params': params}, x)
  np.testing.assert_array_equal(_run(model, method, params, adapter, x),
                                base_out)
  adapter = _perturb(adapter)
  out = _run(model, method, params, adapter, x)
  config = method.config
  ref = _np_forward(params, np.asarray(x, np.float64), {
      p: _np_dense(peft_base.get(adapter, p), peft_base.get(params, p),
                   config.scale_for(p))
      for p in ('block/q/kernel', 'block/v/kernel')})
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  assert np.max(np.abs(out - base_out)) > 1e-3


def test_default_init_distribution_matches_peft(toy):
  _, params, _ = toy
  adapter = lora.lora(rank=4, targets='t5').init(jax.random.PRNGKey(0),
                                                 params)
  a = adapter['block']['v']['kernel']['a']                 # [F, R]
  bound = 1 / np.sqrt(F)                                   # kaiming a=sqrt(5)
  assert a.shape == (F, 4) and np.all(np.abs(a) <= bound)
  assert np.abs(a).max() > 0.6 * bound
  assert not np.any(adapter['block']['v']['kernel']['b'])
  g = lora.lora(rank=4, targets='t5', init='gaussian').init(
      jax.random.PRNGKey(0), params)['block']['q']['kernel']['a']
  assert 0.1 < np.std(g) < 0.45                            # std 1/R = 0.25


def test_scaling_rslora_rank_and_alpha_patterns(toy):
  model, params, x = toy
  method = lora.lora(rank=4, alpha=8, targets=r'block/(q|v)/kernel',
                     rank_pattern={r'.*/v/kernel': 2},
                     alpha_pattern={r'block/q/.*': 3.0}, use_rslora=True)
  adapter = _perturb(method.init(jax.random.PRNGKey(2), params))
  q, v = adapter['block']['q']['kernel'], adapter['block']['v']['kernel']
  assert q['a'].shape == (H, 4) and v['b'].shape == (2, H)
  kernels = lora.kernels(method.config, params, adapter)
  assert kernels['block/q/kernel'].scale == pytest.approx(3.0 / np.sqrt(4))
  assert kernels['block/v/kernel'].scale == pytest.approx(8.0 / np.sqrt(2))
  plain = lora.lora(rank=4, alpha=8, targets='t5').config
  assert plain.scale_for('block/q/kernel') == 2.0
  ref = _np_forward(params, np.asarray(x, np.float64), {
      'block/q/kernel': _np_dense(q, params['block']['q']['kernel'],
                                  3.0 / 2.0),
      'block/v/kernel': _np_dense(v, params['block']['v']['kernel'],
                                  8.0 / np.sqrt(2))})
  np.testing.assert_allclose(_run(model, method, params, adapter, x), ref,
                             atol=1e-5, rtol=1e-5)


def test_dora_norm_detached_and_factored_norm_exact(toy):
  _, params, x = toy
  method = lora.lora(rank=4, alpha=8, targets=r'block/q/kernel',
                     use_dora=True)
  adapter = _perturb(method.init(jax.random.PRNGKey(2), params), size=0.3)
  leaf = adapter['block']['q']['kernel']
  w = params['block']['q']['kernel']
  np.testing.assert_allclose(
      dora.column_norm(w, leaf['a'], leaf['b'], 2.0),
      dora.dense_column_norm(w, leaf['a'], leaf['b'], 2.0), rtol=1e-6)

  def factored(lf):
    node = lora.LoraKernel(w, lf['a'], lf['b'], 2.0, 0.0, lf['magnitude'])
    return jnp.sum(jnp.sin(node.dot(x, dtype=jnp.float32)))

  def reference(lf):  # PEFT: the norm is a constant for autodiff
    dense = w + 2.0 * lf['a'] @ lf['b']
    g = lf['magnitude'] / jax.lax.stop_gradient(
        jnp.linalg.norm(dense, axis=0))
    return jnp.sum(jnp.sin(x @ (dense * g)))

  np.testing.assert_allclose(factored(leaf), reference(leaf), rtol=1e-5)
  got, want = jax.grad(factored)(leaf), jax.grad(reference)(leaf)
  for k in ('a', 'b', 'magnitude'):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)
    assert np.abs(got[k]).max() > 1e-4


@pytest.mark.parametrize('use_dora', [False, True])
def test_dropout_path_matches_peft_formula(toy, use_dora):
  _, params, x = toy
  w = params['block']['q']['kernel']
  rng = jax.random.PRNGKey(7)
  leaf = _perturb(lora.lora(rank=4, targets=r'block/q/kernel',
                            use_dora=use_dora).init(rng, params))
  leaf = leaf['block']['q']['kernel']
  node = lora.LoraKernel(w, leaf['a'], leaf['b'], 2.0, 0.25,
                         leaf.get('magnitude'))
  assert node.needs_rng
  out = node.dot(x, dtype=jnp.float32, dropout_rng=rng)
  xd = np.asarray(dropout_lib.dropout(x, 0.25, rng), np.float64)  # same mask
  assert 0.1 < np.mean(xd == 0) < 0.45
  w64, x64 = np.asarray(w, np.float64), np.asarray(x, np.float64)
  a, b = (np.asarray(leaf[k], np.float64) for k in 'ab')
  lora_out = 2.0 * xd @ a @ b
  if use_dora:  # PEFT: x W + (g - 1) dropout(x) W + g s dropout(x) A B
    g = np.asarray(leaf['magnitude']) / np.linalg.norm(w64 + 2.0 * a @ b,
                                                         axis=0)
    ref = x64 @ w64 + (g - 1) * (xd @ w64) + g * lora_out
  else:
    ref = x64 @ w64 + lora_out
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
  no_drop = node.dot(x, dtype=jnp.float32)
  assert np.max(np.abs(out - no_drop)) > 1e-3


def test_dropout_needs_rng_in_model_and_is_off_when_deterministic(toy):
  model, params, x = toy
  method = lora.lora(rank=4, targets='t5', dropout=0.5)
  adapter = _perturb(method.init(jax.random.PRNGKey(2), params))
  det = _run(model, method, params, adapter, x)
  rngs = {'dropout': jax.random.PRNGKey(0)}
  train = _run(model, method, params, adapter, x, deterministic=False,
               rngs=rngs)
  assert np.max(np.abs(det - train)) > 1e-3
  again = _run(model, method, params, adapter, x, deterministic=False,
               rngs=rngs)
  np.testing.assert_array_equal(train, again)


def test_gradients_reach_only_the_adapter_and_cost_less(toy):
  model, params, x = toy
  method = peft_base.chain(lora.lora(rank=4, targets='t5'),
                           trainable.trainable(r'head/bias'))
  adapter = method.init(jax.random.PRNGKey(2), params)

  def loss(adapter, params):
    return jnp.sum(_run(model, method, params, adapter, x) ** 2)

  grads = jax.grad(loss)(adapter, params)
  assert jax.tree.structure(grads) == jax.tree.structure(adapter)
  q = grads[0]['block']['q']['kernel']
  assert np.abs(q['b']).max() > 0 and np.abs(grads[1]['head']['bias']).max()
  # Flops: LoRA's step skips weight gradients of the frozen kernels.
  wide = Toy()
  big_x = jnp.ones((256, H))
  lora_flops = _flops(jax.grad(lambda a, p: jnp.sum(
      _run(wide, method, p, a, big_x))), adapter, params)
  full_flops = _flops(jax.grad(lambda p: jnp.sum(
      wide.apply({'params': p}, big_x))), params)
  assert lora_flops < 0.9 * full_flops, (lora_flops, full_flops)


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost['flops']


def test_init_on_abstract_params(toy):
  _, params, _ = toy
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          params)
  for kw in ({}, {'use_dora': True}, {'init': 'pissa'}):
    method = peft_base.chain(lora.lora(rank=3, targets='t5', **kw),
                             trainable.trainable('head/.*'))
    shapes = jax.eval_shape(method.init, jax.random.PRNGKey(0), abstract)
    q = shapes[0]['block']['q']['kernel']
    assert q['a'].shape == (H, 3) and q['b'].shape == (3, F)
    assert ('magnitude' in q) == bool(kw.get('use_dora'))
    assert shapes[1]['head']['kernel'].shape == (H, C)


def test_bad_input_errors_name_the_problem(toy):
  _, params, _ = toy
  rng = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r'matched no parameter.*block/'):
    lora.lora(targets=r'.*/query/kernel').init(rng, params)
  with pytest.raises(ValueError, match='not 2-D'):
    lora.lora(rank=1, targets=r'block/norm/scale').init(rng, params)
  with pytest.raises(ValueError, match='dense kernels only'):
    lora.lora(rank=1, targets=r'head/.*', ).init(rng, {'head': {
        'embedding': jnp.zeros((4, 4))}})
  with pytest.raises(ValueError, match='positive int'):
    lora.lora(rank=0)
  with pytest.raises(ValueError, match='positive int'):
    lora.lora(rank_pattern={'.*': -1})
  with pytest.raises(ValueError, match=r'exceeds min\(16, 24\)'):
    lora.lora(rank=17, targets='t5').init(rng, params)
  with pytest.raises(ValueError, match='rank_pattern regex'):
    lora.lora(targets='t5', rank_pattern={'nope': 2}).init(rng, params)
  with pytest.raises(ValueError, match='init must be one of'):
    lora.lora(init='loftq')
  with pytest.raises(ValueError, match='not a valid regex'):
    lora.lora(targets='(')
  with pytest.raises(TypeError, match='lora_r'):
    lora.lora(lora_r=4)  # pylint: disable=unexpected-keyword-arg
  with pytest.raises(ValueError, match='exactly one preset'):
    lora.lora().init(rng, {'x': {'kernel': jnp.zeros((4, 4))}})
  with pytest.raises(ValueError, match='matched no parameter'):
    trainable.trainable('classifier/.*').init(rng, params)
  method = peft_base.chain(lora.lora(rank=2, targets='t5'),
                           trainable.trainable('block/q/kernel'))
  with pytest.raises(ValueError, match='already adapted'):
    method.apply(params, method.init(rng, params))


def test_base_params_are_never_modified(toy):
  _, params, _ = toy
  before = jax.tree.map(np.array, params)
  method = peft_base.chain(lora.lora(rank=2, targets='t5'),
                           trainable.trainable('head/.*'))
  adapter = _perturb(method.init(jax.random.PRNGKey(0), params))
  method.apply(params, adapter)
  merge.merge(params, adapter, method)
  jax.tree.map(np.testing.assert_array_equal, before, params)
  assert isinstance(params['block']['q']['kernel'], jax.Array)


@pytest.mark.parametrize('use_dora', [False, True])
def test_pissa_prepare_base_and_init_agree_in_either_order(toy, use_dora):
  model, params, x = toy
  method = lora.lora(rank=3, alpha=6, targets='t5', init='pissa',
                     use_dora=use_dora)
  rng = jax.random.PRNGKey(0)
  prepared = method.prepare_base(params)
  # init on the original base (SVD of W) = init on the prepared base.
  adapter = method.init(rng, prepared)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5),
               method.init(rng, params), adapter)
  w = np.asarray(params['block']['q']['kernel'], np.float64)
  u, s, vh = np.linalg.svd(w, full_matrices=False)
  top = (u[:, :3] * s[:3]) @ vh[:3]
  leaf = adapter['block']['q']['kernel']
  np.testing.assert_allclose(2.0 * leaf['a'] @ leaf['b'], top, atol=1e-5)
  node = prepared['block']['q']['kernel']
  np.testing.assert_allclose(node.w, w - top, atol=1e-5)
  np.testing.assert_allclose(node.original(), w, atol=1e-5)
  # At init the model computes W, on the prepared base (prepare_base is
  # idempotent) and on the original one (apply prepares it on the fly).
  want = model.apply({'params': params}, x)
  for b in (prepared, method.prepare_base(prepared), params):
    np.testing.assert_allclose(_run(model, method, b, adapter, x), want,
                               atol=1e-5)
  # Without the residual (plain LoRA apply) the top part counts twice.
  plain = lora.lora(rank=3, alpha=6, targets='t5', use_dora=use_dora)
  twice = merge.merge(params, adapter, plain)['block']['q']['kernel']
  assert np.abs(np.asarray(twice) - w).max() > 1e-2
  np.testing.assert_allclose(
      merge.merge(prepared, adapter, method)['block']['q']['kernel'], w,
      atol=1e-5)
  trained = _perturb(adapter)
  ours = _run(model, method, prepared, trained, x)
  np.testing.assert_allclose(_run(model, method, params, trained, x), ours,
                             atol=1e-5)
  assert np.abs(ours - want).max() > 1e-3
  np.testing.assert_allclose(
      model.apply({'params': merge.merge(prepared, trained, method)}, x),
      ours, atol=1e-5)
  with pytest.raises(ValueError, match='prepared PiSSA kernel has rank 3'):
    lora.lora(rank=2, alpha=6, targets='t5', init='pissa').init(rng,
                                                                 prepared)


@pytest.mark.parametrize('use_dora', [False, True])
def test_merge_and_unmerge(toy, use_dora):
  model, params, x = toy
  method = peft_base.chain(lora.lora(rank=4, targets='t5',
                                     use_dora=use_dora),
                           trainable.trainable('head/bias'))
  adapter = _perturb(method.init(jax.random.PRNGKey(2), params))
  merged = merge.merge(params, adapter, method)
  assert all(isinstance(l, jax.Array) for l in jax.tree.leaves(merged))
  factored = _run(model, method, params, adapter, x)
  np.testing.assert_allclose(model.apply({'params': merged}, x), factored,
                             atol=1e-5, rtol=1e-5)
  assert np.abs(factored - model.apply({'params': params}, x)).max() > 1e-3
  if use_dora:
    with pytest.raises(ValueError, match='DoRA'):
      merge.unmerge(merged, adapter, method)
    return
  back = merge.unmerge(merged, adapter, method)
  np.testing.assert_allclose(back['block']['q']['kernel'],
                             params['block']['q']['kernel'], atol=1e-6)


def test_bf16_merge_error_is_small_but_nonzero():
  """The library's merge of bf16 factors: off by bf16 rounding only, well
  below the adapter's own size (merge.py's docstring)."""
  rng = np.random.default_rng(0)
  w = rng.normal(0, 0.02, (64, 64)).astype(np.float32)
  a = rng.normal(0, 0.1, (64, 8)).astype(np.float32)
  b = rng.normal(0, 0.1, (8, 64)).astype(np.float32)
  exact = lora.LoraKernel(w, a, b, 2.0).merged()
  bf = jnp.bfloat16
  low = lora.LoraKernel(jnp.asarray(w, bf), jnp.asarray(a, bf),
                        jnp.asarray(b, bf), 2.0)
  method = lora.lora(rank=8, alpha=16.0, targets=r'q/kernel')
  params = {'q': {'kernel': low.w}}
  adapter = {'q': {'kernel': {'a': low.a, 'b': low.b}}}
  approx = merge.merge(params, adapter, method)['q']['kernel']
  assert approx.dtype == jnp.float32
  err = float(np.max(np.abs(approx - exact)))
  effect = float(np.max(np.abs(2.0 * a @ b)))  # the adapter's part
  assert 1e-5 < err < 0.01 * effect, (err, effect)


@pytest.mark.parametrize('use_dora', [False, True])
def test_mixed_precision_compute(toy, use_dora):
  _, params, x = toy
  model = Toy(dtype=jnp.bfloat16)
  method = lora.lora(rank=4, targets='t5', use_dora=use_dora)
  init = method.init(jax.random.PRNGKey(2), params)
  out = _run(model, method, params, init, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, model.apply({'params': params}, x))
  adapter = _perturb(init, size=0.5)
  # The adapter's change to the output, in fp32 and in bf16: bf16 gets it
  # to within 10% of its size (a bf16 path without the LoRA term: 100%).
  effect = (_run(Toy(), method, params, adapter, x) -
            _run(Toy(), method, params, init, x))
  effect16 = (_run(model, method, params, adapter, x).astype(jnp.float32) -
              out.astype(jnp.float32))
  size = float(jnp.linalg.norm(effect))
  assert size > 0.05 * float(jnp.linalg.norm(out.astype(jnp.float32)))
  assert float(jnp.linalg.norm(effect16 - effect)) < 0.1 * size


def test_jit_train_step_with_loraplus(toy):
  model, params, x = toy
  method = lora.lora(rank=4, targets='t5', use_dora=True)
  adapter = _perturb(method.init(jax.random.PRNGKey(2), params))
  tx = loraplus.loraplus_optimizer(0.01, ratio=4.0, tx_factory=optax.sgd)
  labels = loraplus.labels(adapter)['block']['q']['kernel']
  assert labels == {'a': 'other', 'b': 'lora_b', 'magnitude': 'other'}

  @jax.jit
  def step(adapter, opt_state, params):
    grads = jax.grad(lambda a: jnp.sum(
        _run(model, method, params, a, x) ** 2))(adapter)
    updates, opt_state = tx.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, grads

  new, _, grads = step(adapter, tx.init(adapter), params)
  for leaf, lr in (('a', 0.01), ('b', 0.04), ('magnitude', 0.01)):
    old = adapter['block']['q']['kernel'][leaf]
    g = grads['block']['q']['kernel'][leaf]
    np.testing.assert_allclose(new['block']['q']['kernel'][leaf],
                               old - lr * g, rtol=1e-5, atol=1e-7)
  schedule = loraplus.loraplus_optimizer(optax.constant_schedule(0.1),
                                         ratio=16.0)
  assert schedule.init(adapter) is not None
  with pytest.raises(ValueError, match='ratio'):
    loraplus.loraplus_optimizer(0.1, ratio=0.0)


def test_describe_and_logical_axes(toy):
  model, params, x = toy
  method = peft_base.chain(lora.lora(rank=4, targets='t5', use_dora=True),
                           trainable.trainable('head/.*'))
  info = describe.describe(params, method)
  lora_added = (H * 4 + 4 * F + F) + (F * 4 + 4 * H + H)
  head = H * C + C
  assert info.trainable == lora_added + head
  assert info.frozen == peft_base.num_params(params)
  assert [r.rank for r in info.rows] == [4, 4, 'full', 'full']
  text = str(info)
  assert 'block/q/kernel' in text and '16x24' in text and '%' in text
  assert '<table>' in info._repr_html_()
  boxed = model.init(jax.random.PRNGKey(0), x)['params']
  axes = nn.get_partition_spec(boxed)
  adapter = method.init(jax.random.PRNGKey(0), params)
  names = lora.adapter_logical_axes(axes, adapter)
  q = names[0]['block']['q']['kernel']
  assert tuple(q['a']) == ('embed', 'lora_rank')
  assert tuple(q['b']) == ('lora_rank', 'heads')
  assert tuple(q['magnitude']) == ('heads',)
  assert tuple(names[1]['head']['kernel']) == ('embed', 'classes')
  spec = jax.sharding.PartitionSpec
  assert isinstance(q['a'], spec)
  assert (jax.tree.structure(names, is_leaf=lambda n: isinstance(n, spec))
          .num_leaves == len(jax.tree.leaves(adapter)))
