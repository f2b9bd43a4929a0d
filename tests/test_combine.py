"""combine: every combination type against an independent numpy reference,
the deterministic ones against PEFT 0.21.2's `add_weighted_adapter`, and
DARE's random pruning by its structure and statistics.

Toy base: kernels q [8, 6], v [8, 8], o [6, 8]. Adapter one adapts q and v
(scale 8/R), adapter two q and o (scale 3/R), so q is shared and v, o are
each adapted by one input only.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxlora.peft import base as peft_base
from flaxlora.peft import combine
from flaxlora.peft import lora
from flaxlora.peft import merge

SHAPES = {'q/kernel': (8, 6), 'v/kernel': (8, 8), 'o/kernel': (6, 8)}
BASE = peft_base.unflatten({
    p: jax.random.normal(jax.random.PRNGKey(i), s)
    for i, (p, s) in enumerate(SHAPES.items())})
WEIGHTS = (0.7, -0.4)
DETERMINISTIC = ('linear', 'cat', 'svd', 'ties', 'ties_svd',
                 'magnitude_prune', 'magnitude_prune_svd')


def _random_adapter(method, seed):
  """method.init's layout with every leaf N(0, 0.3^2) (init has B = 0)."""
  adapter = method.init(jax.random.PRNGKey(seed), BASE)
  leaves, tree = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
  return jax.tree.unflatten(tree, [
      0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _pairs(ranks=(4, 4), **one_kw):
  """[(method, adapter)] x 2 with different alphas and target sets."""
  one = lora.lora(rank=ranks[0], alpha=8, targets=('q/kernel', 'v/kernel'),
                  **one_kw)
  two = lora.lora(rank=ranks[1], alpha=3, targets=('q/kernel', 'o/kernel'))
  return [(one, _random_adapter(one, 1)), (two, _random_adapter(two, 2))]


def _ranks_for(kind):
  return (4, 4) if kind in combine.MERGES else (4, 2)


def _deltas(method, adapter):
  """{path: merged kernel - base kernel} of a combined (method, adapter)."""
  merged = peft_base.flatten(merge.merge(BASE, adapter, method))
  base = peft_base.flatten(BASE)
  return {p: np.asarray(merged[p] - base[p], np.float64)
          for p in peft_base.flatten(adapter, is_leaf=lora.is_lora_node)}


# ------------------------------------------------------ numpy reference ---


def _np_entries(pairs, weights):
  """{path: [(a, b, scale, weight)]} in float64."""
  out = {}
  for (method, adapter), w in zip(pairs, weights):
    for p, leaf in peft_base.flatten(adapter,
                                     is_leaf=lora.is_lora_node).items():
      a, b = (np.asarray(leaf[k], np.float64) for k in 'ab')
      out.setdefault(p, []).append((a, b, method.config.scale_for(p), w))
  return out


def _np_prune(t, density):
  keep = np.argsort(-np.abs(t).ravel())[:int(density * t.size)]
  mask = np.zeros(t.size)
  mask[keep] = 1
  return t * mask.reshape(t.shape)


def _np_merge(kind, tensors, weights, density=None, method='total'):
  if kind in ('ties', 'magnitude_prune'):
    tensors = [_np_prune(t, density) for t in tensors]
  stack = np.stack(tensors)
  weighted = stack * np.reshape(weights, (-1,) + (1,) * (stack.ndim - 1))
  if kind != 'ties':
    return weighted.sum(0)
  votes = stack.sum(0) if method == 'total' else np.sign(stack).sum(0)
  agree = np.sign(stack) == np.where(votes >= 0, 1.0, -1.0)
  return (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1)


def _np_reference(kind, pairs, weights=WEIGHTS, density=None,
                  method='total', svd_rank=None):
  """{path: combined delta [in, out]} computed in float64 numpy."""
  svd_rank = svd_rank or max(m.config.rank for m, _ in pairs)
  out = {}
  for p, es in _np_entries(pairs, weights).items():
    if kind == 'cat':
      out[p] = sum(w * s * a @ b for a, b, s, w in es)
    elif kind.endswith('svd'):
      merge_kind = 'linear' if kind == 'svd' else kind[:-4]
      d = _np_merge(merge_kind, [s * a @ b for a, b, s, _ in es],
                    [w for *_, w in es], density, method)
      u, sv, vh = np.linalg.svd(d, full_matrices=False)
      out[p] = (u[:, :svd_rank] * sv[:svd_rank]) @ vh[:svd_rank]
    else:
      ws = [w * s for _, _, s, w in es]
      wa = [np.sign(x or 1) * np.sqrt(abs(x)) for x in ws]
      wb = [np.sqrt(abs(x)) for x in ws]
      out[p] = (_np_merge(kind, [e[0] for e in es], wa, density, method) @
                _np_merge(kind, [e[1] for e in es], wb, density, method))
  return out


def _single(pairs, i, path, weights=WEIGHTS):
  """The weighted update of input i alone at path (what `combine` must beat)."""
  (a, b, s, w), = [e for e in _np_entries(pairs[i:i + 1],
                                          weights[i:i + 1])[path]]
  return w * s * a @ b


def _assert_close(got, want, atol=1e-5):
  assert sorted(got) == sorted(want)
  for p in want:
    np.testing.assert_allclose(got[p], want[p], atol=atol, rtol=0, err_msg=p)


# ---------------------------------------------------------------- tests ---


@pytest.mark.parametrize('kind, sign_method', [
    *[(k, 'total') for k in DETERMINISTIC], ('ties', 'frequency'),
    ('ties_svd', 'frequency')])
def test_combination_matches_numpy_reference(kind, sign_method):
  pairs = _pairs(_ranks_for(kind))
  method, adapter = combine.combine(pairs, WEIGHTS, kind, density=0.5,
                                    majority_sign_method=sign_method)
  got = _deltas(method, adapter)
  _assert_close(got, _np_reference(kind, pairs, density=0.5,
                                   method=sign_method))
  for p in got:
    assert method.config.scale_for(p) == 1.0
  for i in (0, 1):  # q really mixes both inputs
    assert np.abs(got['q/kernel'] - _single(pairs, i, 'q/kernel')).max() > .05


def test_svd_at_full_rank_is_exact_and_truncation_is_best_approx():
  pairs = _pairs((4, 2))
  exact = _np_reference('cat', pairs)  # sum_i w_i s_i A_i B_i
  method, adapter = combine.combine(pairs, WEIGHTS, 'svd', svd_rank=6)
  _assert_close(_deltas(method, adapter), exact)
  a = np.asarray(adapter['v']['kernel']['a'])
  assert a.shape == (8, 6)  # like PEFT: lora_A = V^T rows, lora_B = U S
  np.testing.assert_allclose(a.T @ a, np.eye(6), atol=1e-5)
  method, adapter = combine.combine(pairs, WEIGHTS, 'svd', svd_rank=2)
  got = _deltas(method, adapter)
  sv = np.linalg.svd(exact['q/kernel'], compute_uv=False)
  err = np.linalg.norm(got['q/kernel'] - exact['q/kernel'])
  np.testing.assert_allclose(err, np.sqrt(np.sum(sv[2:] ** 2)), rtol=1e-4)
  assert err > 0.1


def test_partial_targets_use_the_inputs_that_adapt_them():
  for kind in ('linear', 'cat', 'svd'):
    pairs = _pairs(_ranks_for(kind))
    method, adapter = combine.combine(pairs, WEIGHTS, kind)
    got = _deltas(method, adapter)
    assert sorted(got) == ['o/kernel', 'q/kernel', 'v/kernel']
    np.testing.assert_allclose(got['v/kernel'], _single(pairs, 0, 'v/kernel'),
                               atol=1e-5)
    np.testing.assert_allclose(got['o/kernel'], _single(pairs, 1, 'o/kernel'),
                               atol=1e-5)
    assert method.config.paths(BASE) == sorted(SHAPES)


def test_cat_with_rank_pattern_sets_per_path_ranks():
  pairs = _pairs((4, 2), rank_pattern={'v/kernel': 3})
  method, adapter = combine.combine(pairs, WEIGHTS, 'cat')
  config = method.config
  assert [config.rank_for(p) for p in ('q/kernel', 'v/kernel', 'o/kernel')
          ] == [6, 3, 2]
  assert all(config.scale_for(p) == 1.0 for p in SHAPES)
  _assert_close(_deltas(method, adapter), _np_reference('cat', pairs))
  fresh = method.init(jax.random.PRNGKey(0), BASE)  # the config is valid
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, adapter)


def test_rslora_scale_is_folded_in():
  pairs = _pairs((4, 2), use_rslora=True)
  assert pairs[0][0].config.scale_for('q/kernel') == 4.0  # 8 / sqrt(4)
  for kind in ('linear', 'cat', 'svd'):
    pairs = _pairs(_ranks_for(kind), use_rslora=True)
    method, adapter = combine.combine(pairs, WEIGHTS, kind)
    assert not method.config.use_rslora
    _assert_close(_deltas(method, adapter), _np_reference(kind, pairs))


def test_single_adapter_is_combined_linearly_as_in_peft():
  pairs = _pairs()[:1]
  method, adapter = combine.combine(pairs, [0.5], 'svd', svd_rank=1)
  got = _deltas(method, adapter)
  for p in ('q/kernel', 'v/kernel'):  # not truncated to rank 1
    np.testing.assert_allclose(got[p], _single(pairs, 0, p, [0.5]),
                               atol=1e-5)
  assert method.config.rank_for('q/kernel') == 4


# ------------------------------------------------------------------ DARE ---


def test_prune_random_keeps_density_fraction_rescaled_and_unbiased():
  x = jax.random.normal(jax.random.PRNGKey(0), (100, 100))
  d = 0.3
  y = np.asarray(combine.prune_random(jax.random.PRNGKey(1), x, d))
  kept = y != 0
  assert abs(kept.mean() - d) < 4 * np.sqrt(d * (1 - d) / x.size)
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / d, rtol=1e-6)
  keys = jax.random.split(jax.random.PRNGKey(2), 2000)
  mean = jax.vmap(lambda k: combine.prune_random(k, x[:4, :5], d))(keys)
  sigma = np.abs(x[:4, :5]) * np.sqrt((1 - d) / d / len(keys))
  assert np.all(np.abs(mean.mean(0) - x[:4, :5]) < 5 * sigma)


def test_dare_linear_merge_is_unbiased_task_arithmetic():
  ts = [jax.random.normal(jax.random.PRNGKey(i), (3, 4)) for i in (0, 1)]
  keys = jax.random.split(jax.random.PRNGKey(3), 4000)
  draws = jax.vmap(lambda k: combine.merge_tensors(
      'dare_linear', ts, WEIGHTS, 0.5, rng=k))(keys)
  linear = _np_merge('linear', [np.asarray(t) for t in ts], WEIGHTS)
  assert np.abs(draws.mean(0) - linear).max() < 0.08  # ~5 sigma
  assert np.abs(draws[0] - linear).max() > 0.1  # a single draw is noisy


def test_dare_linear_factors_are_rescaled_subsets():
  pairs = _pairs()
  d = 0.5
  _, adapter = combine.combine(pairs, WEIGHTS, 'dare_linear', density=d,
                               rng=jax.random.PRNGKey(0))
  a = np.asarray(adapter['q']['kernel']['a'])
  ws = [w * m.config.scale_for('q/kernel') for (m, _), w in zip(pairs,
                                                                 WEIGHTS)]
  c1, c2 = (np.asarray(p[1]['q']['kernel']['a']) * np.sign(w) *
            np.sqrt(abs(w)) / d for p, w in zip(pairs, ws))
  options = np.stack([0 * c1, c1, c2, c1 + c2])  # dropped / kept in one, both
  hit = np.abs(options - a).min(0) < 1e-5
  assert hit.all()
  which = np.abs(options - a).argmin(0)
  assert set(which.ravel()) == {0, 1, 2, 3}


@pytest.mark.parametrize('dare, exact', [
    ('dare_linear', 'linear'), ('dare_ties', 'ties'),
    ('dare_linear_svd', 'svd'), ('dare_ties_svd', 'ties_svd')])
def test_dare_at_density_one_is_its_deterministic_twin(dare, exact):
  pairs = _pairs(_ranks_for(exact))
  rng = jax.random.PRNGKey(0)
  got = _deltas(*combine.combine(pairs, WEIGHTS, dare, density=1.0, rng=rng))
  want = _deltas(*combine.combine(pairs, WEIGHTS, exact, density=1.0))
  _assert_close(got, want, atol=1e-6)
  half = _deltas(*combine.combine(pairs, WEIGHTS, dare, density=0.5, rng=rng))
  again = _deltas(*combine.combine(pairs, WEIGHTS, dare, density=0.5,
                                   rng=rng))
  other = _deltas(*combine.combine(pairs, WEIGHTS, dare, density=0.5,
                                   rng=jax.random.PRNGKey(1)))
  _assert_close(again, half, atol=0)
  assert np.abs(half['q/kernel'] - want['q/kernel']).max() > 0.05
  assert np.abs(half['q/kernel'] - other['q/kernel']).max() > 0.05


# ---------------------------------------------------------------- errors ---


def test_errors_name_the_problem_and_the_fix():
  pairs = _pairs((4, 2))
  cases = [
      (dict(combination_type='linear'), r"q/kernel has ranks \[2, 4\]; use "
       "'cat'"),
      (dict(combination_type='mean'), 'not one of'),
      (dict(combination_type='ties'), 'needs density in'),
      (dict(combination_type='dare_linear_svd', density=0.5), 'pass rng='),
      (dict(combination_type='svd', svd_rank=7), 'exceeds min'),
      (dict(majority_sign_method='mode'), 'majority_sign_method'),
      (dict(svd_clamp=1.5), 'svd_clamp is a quantile'),
  ]
  for kw, match in cases:
    with pytest.raises(ValueError, match=match):
      combine.combine(pairs, WEIGHTS, **kw)
  with pytest.raises(ValueError, match='one weight per adapter'):
    combine.combine(pairs, [1.0])
  dora = lora.lora(rank=2, targets=('q/kernel',), use_dora=True)
  with pytest.raises(ValueError, match='DoRA'):
    combine.combine(pairs + [(dora, dora.init(jax.random.PRNGKey(0), BASE))],
                    WEIGHTS + (1.0,))
  chain = peft_base.chain(pairs[0][0])
  with pytest.raises(ValueError, match='not lora.lora'):
    combine.combine([(chain, (pairs[0][1],))], [1.0])
  with pytest.raises(ValueError, match='do not fit its rank'):
    combine.combine([(pairs[1][0], pairs[0][1])], [1.0])


# ------------------------------------------------------------------ PEFT ---


def _peft_combined(pairs, weights, kind, **kw):
  """PEFT's add_weighted_adapter on a torch twin of the toy base.

  Returns ({path: B A as [in, out]}, {path: get_delta_weight as [in, out]}).
  """
  torch = pytest.importorskip('torch')
  peft = pytest.importorskip('peft')

  class Toy(torch.nn.Module):

    def __init__(self):
      super().__init__()
      for p, (fan_in, fan_out) in SHAPES.items():
        setattr(self, p.split('/')[0], torch.nn.Linear(fan_in, fan_out))

  model, names = None, ['one', 'two'][:len(pairs)]
  for name, (method, adapter) in zip(names, pairs):
    c, flat = method.config, peft_base.flatten(adapter,
                                                is_leaf=lora.is_lora_node)
    config = peft.LoraConfig(r=c.rank, lora_alpha=c.alpha,
                             use_rslora=c.use_rslora,
                             target_modules=[p.split('/')[0] for p in flat])
    if model is None:
      model = peft.get_peft_model(Toy(), config, adapter_name=name)
    else:
      model.add_adapter(name, config)
    for p, leaf in flat.items():  # A [in, R] -> lora_A.weight [R, in]
      layer = getattr(model.base_model.model, p.split('/')[0])
      layer.lora_A[name].weight.data = torch.tensor(np.asarray(leaf['a']).T)
      layer.lora_B[name].weight.data = torch.tensor(np.asarray(leaf['b']).T)
  model.add_weighted_adapter(names, list(weights), 'combo', kind, **kw)
  product, delta = {}, {}
  for p in SHAPES:
    layer = getattr(model.base_model.model, p.split('/')[0])
    if 'combo' in getattr(layer, 'lora_A', {}):
      with torch.no_grad():
        ba = layer.lora_B['combo'].weight @ layer.lora_A['combo'].weight
        product[p] = ba.numpy().T.astype(np.float64)
        delta[p] = layer.get_delta_weight('combo').numpy().T
  return product, delta


@pytest.mark.filterwarnings('ignore::UserWarning')  # PEFT: density >= 1
@pytest.mark.parametrize('kind, density', [
    *[(k, 0.5) for k in DETERMINISTIC], ('dare_linear', 1.0),
    ('dare_ties_svd', 1.0)])
def test_matches_peft_add_weighted_adapter(kind, density):
  pairs = _pairs(_ranks_for(kind))
  kw = dict(density=density, svd_rank=3 if kind.endswith('svd') else None)
  _, want = _peft_combined(pairs, WEIGHTS, kind, **kw)
  got = _deltas(*combine.combine(pairs, WEIGHTS, kind,
                                 rng=jax.random.PRNGKey(0), **kw))
  _assert_close(got, want, atol=1e-4)
  assert np.abs(got['q/kernel'] - _single(pairs, 0, 'q/kernel')).max() > .05


def test_matches_peft_single_adapter_and_svd_clamp():
  pairs = _pairs((4, 2))
  _, want = _peft_combined(pairs[:1], [0.5], 'svd')
  _assert_close(_deltas(*combine.combine(pairs[:1], [0.5], 'svd')), want,
                atol=1e-4)
  # svd_clamp is not compared with PEFT: the quantile of the pooled factor
  # entries depends on the sign of each singular pair, which LAPACK picks.
  method, adapter = combine.combine(pairs, WEIGHTS, 'svd', svd_clamp=0.9)
  _, free = combine.combine(pairs, WEIGHTS, 'svd')
  free = {k: np.asarray(free['q']['kernel'][k]) for k in 'ab'}
  hi = np.quantile(np.concatenate([free['a'].ravel(), free['b'].ravel()]),
                   0.9)
  for k in 'ab':
    np.testing.assert_allclose(adapter['q']['kernel'][k],
                               np.clip(free[k], -hi, hi), atol=1e-6)
  assert np.abs(_deltas(method, adapter)['q/kernel'] -
                _deltas(*combine.combine(pairs, WEIGHTS, 'svd'))['q/kernel']
                ).max() > 1e-3


def test_rslora_matches_peft_factors_not_its_sqrt_r_scaling():
  """PEFT 0.21.2 keeps use_rslora on the combined adapter with alpha = R, so
  its update is sqrt(R) times its own factors' product (peft#3449); ours is
  the product itself (scale 1)."""
  pairs = _pairs((4, 2), use_rslora=True)
  product, delta = _peft_combined(pairs, WEIGHTS, 'cat')
  got = _deltas(*combine.combine(pairs, WEIGHTS, 'cat'))
  _assert_close(got, product, atol=1e-4)
  np.testing.assert_allclose(delta['q/kernel'],
                             np.sqrt(6) * product['q/kernel'], rtol=1e-5)
