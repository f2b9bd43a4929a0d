"""flaxlora.inspect: summary, LoRA/DoRA/prompt analyses, diff and plots.

References are dense numpy computations on small layers; each analysis test
also checks that a real adapter change moves the statistic.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flaxlora import sharding
from flaxlora.inspect import analysis
from flaxlora.inspect import diff
from flaxlora.inspect import plots
from flaxlora.inspect import prompts
from flaxlora.inspect import summary
from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft import trainable


def _rand(rng, *shape, scale=1.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _base(seed=0):
  """A T5-shaped toy base: 2 blocks, q/v kernels [16, 24], norms, emb."""
  rng = np.random.default_rng(seed)
  blocks = {f'block_{i}': {
      'attention': {n: {'kernel': _rand(rng, 16, 24)} for n in 'qv'},
      'attention_norm': {'scale': np.ones(16, np.float32)}}
            for i in range(2)}
  return {'shared': {'embedding': _rand(rng, 50, 16)},
          'encoder': dict(blocks, final_norm={'scale': np.ones(16,
                                                            np.float32)})}


def _adapter(seed=1, rank=4, zero_b=False):
  rng = np.random.default_rng(seed)
  adapter = {'encoder': {}}
  for i in range(2):
    for n in 'qv':
      b = np.zeros((rank, 24), np.float32) if zero_b else _rand(rng, rank, 24)
      adapter['encoder'].setdefault(f'block_{i}', {}).setdefault(
          'attention', {})[n] = {'kernel': {'a': _rand(rng, 16, rank),
                                            'b': b}}
  return adapter


# ------------------------------------------------------------------ summary --


def test_summary_totals_and_trainable_split():
  base = _base()
  base['shared']['embedding'] = base['shared']['embedding'].astype(
      jnp.bfloat16)
  adapter = _adapter()
  s = summary.summary(base, adapter, method_names='lora')
  base_leaves = jax.tree.leaves(base)
  adapter_leaves = jax.tree.leaves(adapter)
  assert s.total.size == sum(x.size for x in base_leaves + adapter_leaves)
  assert s.total.nbytes == sum(x.nbytes for x in base_leaves + adapter_leaves)
  assert s.total.trainable_size == sum(x.size for x in adapter_leaves)
  assert s.total.trainable_nbytes == sum(x.nbytes for x in adapter_leaves)
  assert len(s.trainable_paths) == len(adapter_leaves) == 8
  assert all(p.endswith(('/a', '/b')) for p in s.trainable_paths)
  assert len(s.frozen_paths) == len(base_leaves)
  assert {r.owner for r in s.rows if r.trainable} == {'lora'}
  assert {r.owner for r in s.rows if not r.trainable} == {'base'}
  # Module totals partition the overall total.
  assert sum(m.size for m in s.modules) == s.total.size
  assert {m.name for m in s.modules} == {
      'shared/embedding', 'encoder/block_0', 'encoder/block_1',
      'encoder/final_norm'}
  block0 = next(m for m in s.modules if m.name == 'encoder/block_0')
  assert block0.trainable_size == 4 * (16 * 4 + 4 * 24) // 2
  emb = next(r for r in s.rows if r.path == 'shared/embedding')
  assert (emb.dtype, emb.nbytes) == ('bfloat16', 50 * 16 * 2)
  text = str(s)
  assert 'encoder/block_1/attention/v/kernel/b' in text
  assert f'{s.total.size:,}' in text
  html = s._repr_html_()
  assert '<details>' in html and 'encoder/block_0' in html


def test_summary_without_adapter_is_all_trainable_and_abstract_ok():
  base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      _base())
  s = summary.summary(base, depth=1)
  assert s.total.trainable_size == s.total.size > 0
  assert [m.name for m in s.modules] == ['encoder', 'shared']
  assert {r.sharding for r in s.rows} == {'-'}
  boxed = {'k': nn.Partitioned(jnp.ones((4, 8)), names=('embed', 'mlp'))}
  assert [(r.path, r.size) for r in summary.summary(boxed).rows] == [
      ('k', 32)]


def test_summary_method_names_for_chains_and_regexes():
  adapter = (_adapter(), {'prompt': np.zeros((3, 16), np.float32)})
  s = summary.summary(_base(), adapter, method_names=('lora', 'prompt'))
  owners = {r.path: r.owner for r in s.rows if r.trainable}
  assert owners['prompt'] == 'prompt'
  assert owners['encoder/block_0/attention/q/kernel/a'] == 'lora'
  s = summary.summary(_base(), adapter[0],
                      method_names={r'.*/q/.*': 'lora-q', r'.*': 'lora-v'})
  assert {r.owner for r in s.rows if r.trainable} == {'lora-q', 'lora-v'}
  with pytest.raises(ValueError, match='matches no regex'):
    summary.summary(_base(), adapter[0], method_names={r'.*/q/.*': 'x'})
  with pytest.raises(ValueError, match='one name per part'):
    summary.summary(_base(), adapter, method_names=('lora',))


def test_summary_sharding_column_on_8_devices():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 4})
  def put(x, *spec):
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))
  base = {'q': {'kernel': put(jnp.ones((16, 24)), 'fsdp', 'tensor')},
          'emb': put(jnp.ones((40, 16)), ('fsdp', 'tensor')),
          'norm': put(jnp.ones(16)),
          'one': jax.device_put(jnp.ones(3), jax.devices()[0])}
  rows = {r.path: r for r in summary.summary(base, {'x': np.ones(2)}).rows}
  assert rows['q/kernel'].sharding == 'P(fsdp, tensor)'
  assert rows['q/kernel'].device_bytes == 16 * 24 * 4 // 8
  assert rows['emb'].sharding == 'P((fsdp, tensor))'
  assert rows['emb'].device_bytes == 5 * 16 * 4
  assert rows['norm'].sharding == 'replicated'
  assert rows['norm'].device_bytes == rows['norm'].nbytes
  assert rows['one'].sharding == 'single device'
  assert rows['x'].sharding == 'host'


def test_tree_view_renders_treescope_html():
  html = summary.tree_view({'base': _base(), 'adapter': _adapter()},
                           compressed=False)
  text = html._repr_html_()
  assert 'treescope' in text and 'block_0' in text


# ----------------------------------------------------------------- analysis --


def _dense_reference(a, b, w, scale, k):
  """Every LoRA statistic from the dense update (numpy, float64)."""
  a, b, w = (np.asarray(t, np.float64) for t in (a, b, w))
  dw = scale * a @ b
  u, s, vt = np.linalg.svd(dw)
  proj = np.linalg.norm(u[:, :k].T @ w @ vt[:k].T)
  p = s[s > 1e-9 * s[0]] / s[s > 1e-9 * s[0]].sum()
  return dict(s=s[:a.shape[1]], norm=np.linalg.norm(dw),
              rel=np.linalg.norm(dw) / np.linalg.norm(w), proj=proj,
              amp=np.linalg.norm(dw) / proj,
              erank=np.exp(-np.sum(p * np.log(p))),
              top=np.sqrt(np.sum(np.linalg.svd(w, compute_uv=False)[:k]**2)))


@pytest.mark.parametrize('shape, rank, top_k', [((16, 24), 4, None),
                                                ((40, 12), 3, 2),
                                                ((6, 30), 8, None)])
def test_layer_stats_match_dense_reference(shape, rank, top_k):
  rng = np.random.default_rng(0)
  a, b = _rand(rng, shape[0], rank), _rand(rng, rank, shape[1])
  w = _rand(rng, *shape)
  stats = analysis.layer_stats(a, b, w, scale=0.5, top_k=top_k)
  ref = _dense_reference(a, b, w, 0.5, min(top_k or rank, min(shape)))
  np.testing.assert_allclose(stats.singular_values, ref['s'][:len(
      stats.singular_values)], rtol=1e-6, atol=1e-9)
  for field, key in [('update_norm', 'norm'), ('relative_norm', 'rel'),
                     ('projection', 'proj'), ('amplification', 'amp'),
                     ('effective_rank', 'erank'),
                     ('base_top_projection', 'top')]:
    np.testing.assert_allclose(getattr(stats, field), ref[key], rtol=1e-5,
                               err_msg=field)
  assert not stats.dense
  assert 0 < stats.random_projection < stats.base_top_projection


def test_layer_stats_ranks_and_zero_update():
  rng = np.random.default_rng(1)
  a, w = _rand(rng, 20, 4), _rand(rng, 20, 10)
  b = np.outer(np.ones(4), _rand(rng, 10))  # rank-one update
  one = analysis.layer_stats(a, b, w)
  np.testing.assert_allclose(one.effective_rank, 1.0, rtol=1e-6)
  assert one.energy_rank == 1
  zero = analysis.layer_stats(a, np.zeros((4, 10)), w)
  assert zero.relative_norm == zero.effective_rank == 0
  assert zero.amplification is None and zero.projection is None
  # The statistic moves when the adapter does.
  assert analysis.layer_stats(a, _rand(rng, 4, 10), w).relative_norm > 0.1


def _dora_dense(a, b, w, scale, m):
  a, b, w = (np.asarray(t, np.float64) for t in (a, b, w))
  adapted = w + scale * a @ b
  return m * adapted / np.linalg.norm(adapted, axis=0) - w


def test_dora_stats_dense_only_below_threshold(monkeypatch):
  rng = np.random.default_rng(2)
  a, b, w = _rand(rng, 12, 3), _rand(rng, 3, 9), _rand(rng, 12, 9)
  m = np.linalg.norm(w, axis=0) * (1 + 0.3 * rng.random(9))
  ref = _dora_dense(a, b, w, 2.0, m)
  calls = []
  real = analysis._dense_delta
  monkeypatch.setattr(analysis, '_dense_delta',
                      lambda *x: calls.append(1) or real(*x))
  small = analysis.layer_stats(a, b, w, 2.0, m)
  assert small.dense and len(calls) == 1
  np.testing.assert_allclose(small.update_norm, np.linalg.norm(ref),
                             rtol=1e-6)
  np.testing.assert_allclose(small.singular_values,
                             np.linalg.svd(ref, compute_uv=False), rtol=1e-6,
                             atol=1e-9)
  big = analysis.layer_stats(a, b, w, 2.0, m, max_dense_elements=12 * 9 - 1)
  assert not big.dense and len(calls) == 1
  assert big.spectrum_of == 'low-rank part' and big.base_top_projection is None
  np.testing.assert_allclose(big.update_norm, np.linalg.norm(ref), rtol=1e-6)
  # Magnitude equal to the column norms with B = 0 is DoRA's init: no change.
  init = analysis.layer_stats(a, np.zeros_like(b), w, 2.0,
                              np.linalg.norm(w, axis=0))
  assert init.update_norm < 1e-6 < small.update_norm


def test_lora_never_densifies_a_huge_layer(monkeypatch):
  monkeypatch.setattr(analysis, '_dense_delta', None)  # any call would fail
  rng = np.random.default_rng(3)
  n = 200_000  # dense dW would be 160 GB
  a, b = _rand(rng, n, 4), _rand(rng, 4, n)
  stats = analysis.layer_stats(a, b, None, scale=2.0)
  np.testing.assert_allclose(
      stats.update_norm,
      2.0 * np.sqrt(np.trace((a.T.astype(np.float64) @ a) @ (b @ b.T))),
      rtol=1e-6)
  assert stats.relative_norm is None and len(stats.singular_values) == 4


def test_analyze_tree_scales_chains_and_errors():
  base, adapter = _base(), _adapter()
  report = analysis.analyze(base, adapter, scales=2.0)
  assert len(report.layers) == 4
  path = 'encoder/block_1/attention/v/kernel'
  node = adapter['encoder']['block_1']['attention']['v']['kernel']
  w = base['encoder']['block_1']['attention']['v']['kernel']
  ref = _dense_reference(node['a'], node['b'], w, 2.0, 4)
  np.testing.assert_allclose(report.by_path[path].relative_norm, ref['rel'],
                             rtol=1e-5)
  by_map = analysis.analyze(base, adapter, {p: 2.0 for p in report.by_path})
  assert by_map.by_path[path].relative_norm == (
      report.by_path[path].relative_norm)
  for block in adapter['encoder'].values():
    block['attention']['v']['kernel']['scale'] = np.float32(4.0)
  stored = analysis.analyze(base, (adapter, {'prompt': np.zeros((2, 16))}),
                            include=r'.*/v/kernel')
  assert list(stored.by_path) == ['encoder/block_0/attention/v/kernel', path]
  np.testing.assert_allclose(stored.by_path[path].relative_norm,
                             2 * ref['rel'], rtol=1e-5)
  assert 'encoder/block_1/attention/q/kernel' in str(report)
  assert '<table>' in report._repr_html_()
  with pytest.raises(ValueError, match='stores no scale'):
    analysis.analyze(base, _adapter())
  with pytest.raises(ValueError, match='base params lack'):
    analysis.analyze({'shared': base['shared']}, adapter, 1.0)
  with pytest.raises(ValueError, match='no LoRA nodes'):
    analysis.analyze(base, {'prompt': np.zeros((2, 16))}, 1.0)


# ------------------------------------------------------------------ prompts --


class _FakeTokenizer:

  def convert_ids_to_tokens(self, i):
    return f'tok{i}'


def test_nearest_tokens_match_full_reference(monkeypatch):
  monkeypatch.setattr(prompts, '_CHUNK', 7)  # many chunks to merge
  rng = np.random.default_rng(4)
  emb = _rand(rng, 300, 16)
  prompt = np.stack([3 * emb[5], -emb[17] + 0.01, _rand(rng, 16)])
  got = prompts.nearest_tokens(prompt, emb, k=4, tokenizer=_FakeTokenizer())
  unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  cos = (prompt / np.linalg.norm(prompt, axis=1, keepdims=True)) @ unit.T
  for row, ref in zip(got, cos):
    order = np.argsort(-ref)[:4]
    assert [n.token_id for n in row] == list(order)
    np.testing.assert_allclose([n.cosine for n in row], ref[order], rtol=1e-5)
  assert got[0][0].token == 'tok5' and got[0][0].cosine > 0.999
  assert got[1][0].token_id != 17  # pointing away from token 17
  report = prompts.analyze_prompt({'shared': {'embedding': emb}},
                                  {'prompt': prompt}, k=2)
  assert "5:'5'" in str(report) and len(report.neighbours) == 3


# --------------------------------------------------------------------- diff --


def test_diff_finds_exactly_the_perturbed_leaves():
  a = _base()
  b = jax.tree.map(np.copy, a)
  b['encoder']['block_1']['attention']['q']['kernel'][2, 3] += 0.5
  b['encoder']['final_norm']['scale'] *= 1.1
  b['extra'] = np.zeros(2)
  del b['shared']
  b['encoder']['block_0']['attention_norm']['scale'] = np.ones(4)
  d = diff.diff(a, b)
  changed = {c.path: c for c in d.changed}
  assert set(changed) == {'encoder/block_1/attention/q/kernel',
                          'encoder/final_norm/scale'}
  np.testing.assert_allclose(
      changed['encoder/block_1/attention/q/kernel'].max_abs, 0.5, rtol=1e-6)
  np.testing.assert_allclose(changed['encoder/final_norm/scale'].rel_norm,
                             0.1, rtol=1e-5)
  assert d.only_a == ['shared/embedding'] and d.only_b == ['extra']
  assert d.mismatched == ['encoder/block_0/attention_norm/scale (16,) vs (4,)']
  assert len(d.unchanged) == len(jax.tree.leaves(a)) - 4
  assert not d.identical and diff.diff(a, jax.tree.map(np.copy, a)).identical
  assert [c.path for c in diff.diff(a, b, atol=0.3).changed] == [
      'encoder/block_1/attention/q/kernel']
  assert 'only in b: extra' in str(d)
  assert repr(d).startswith('Diff(2 changed,')


# -------------------------------------------------------------------- plots --


def test_heatmap_grid_and_pngs(tmp_path):
  adapter = _adapter()
  adapter['encoder']['block_1']['attention'].pop('q')
  report = analysis.analyze(_base(), adapter, 1.0)
  layers, modules, grid = plots.heatmap_grid(report)
  assert layers == ['encoder/block_0', 'encoder/block_1']
  assert modules == ['attention/q', 'attention/v']
  assert np.isnan(grid[1, 0])
  assert grid[1, 1] == report.by_path[
      'encoder/block_1/attention/v/kernel'].relative_norm
  plots.heatmap(report, path=tmp_path / 'heat.png')
  fig = plots.spectra(report, path=tmp_path / 'spectra.png')
  assert len(fig.axes[0].lines) == 3
  for name in ('heat.png', 'spectra.png'):
    assert (tmp_path / name).read_bytes()[:4] == b'\x89PNG'
  assert plots.split_path('decoder/block_10/mlp/wo/kernel') == (
      'decoder/block_10', 'mlp/wo')
  with pytest.raises(ValueError, match='not in the report'):
    plots.spectra(report, paths=['nope'])


# ---------------------------------------------------- with the real methods --


def test_analyze_and_summary_with_the_lora_method():
  base = _base()
  method = peft_base.chain(
      lora.lora(rank=4, alpha=8.0, targets=r'.*/q/kernel'),
      lora.lora(rank=2, alpha=8.0, targets=r'.*/v/kernel', use_dora=True,
                use_rslora=True),
      trainable.trainable(r'encoder/final_norm/scale'))
  adapter = method.init(jax.random.PRNGKey(0), base)
  at_init = analysis.analyze(base, adapter, method)
  assert len(at_init.layers) == 4
  assert all(l.update_norm < 1e-5 for l in at_init.layers)  # B = 0
  # Train-like perturbation of every B, then compare with the method's own
  # dense merge (LoraKernel.merged) as the reference update.
  rng = np.random.default_rng(5)
  adapter = jax.tree_util.tree_map_with_path(
      lambda p, x: x + _rand(rng, *x.shape, scale=0.1)
      if p[-1].key == 'b' else x, adapter)
  report = analysis.analyze(base, adapter, method)
  params, _ = method.apply(base, adapter)
  for path, stats in report.by_path.items():
    node = peft_base.get(params, path)
    dw = np.asarray(node.merged(), np.float64) - np.asarray(node.w)
    np.testing.assert_allclose(stats.update_norm, np.linalg.norm(dw),
                               rtol=1e-4, err_msg=path)
    assert stats.relative_norm > 1e-3
    assert stats.dense == ('/v/' in path)
  assert report.by_path['encoder/block_0/attention/v/kernel'].scale == (
      8.0 / math.sqrt(2))
  s = summary.summary(base, adapter, method_names=method)
  owners = {r.owner for r in s.rows if r.trainable}
  assert owners == {'lora', 'dora+rslora', 'trainable'}
  assert s.total.trainable_size == sum(x.size for x in jax.tree.leaves(
      adapter))


def test_qlora_base_summary_bytes_and_dequantised_analysis():
  from flaxlora.peft.qlora import nf4  # pylint: disable=g-import-not-at-top
  base, adapter = _base(), _adapter()
  quantized = nf4.quantize_params(base)
  s = summary.summary(quantized, adapter, 'lora')
  adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(adapter))
  assert s.total.nbytes == nf4.nbytes(quantized) + adapter_bytes
  assert s.total.nbytes < summary.summary(base, adapter).total.nbytes
  assert any(r.path.endswith('q/kernel') and r.dtype == 'nf4'
             for r in s.rows)
  got = analysis.analyze(quantized, adapter, 1.0)
  want = analysis.analyze(nf4.dequantize_params(quantized), adapter, 1.0)
  for path, stats in want.by_path.items():
    np.testing.assert_allclose(got.by_path[path].relative_norm,
                               stats.relative_norm, rtol=1e-6)


def test_summary_counts_an_nf4_kernel_as_one_in_by_out_param_row():
  from flaxlora.peft.qlora import nf4  # pylint: disable=g-import-not-at-top
  base, adapter = _base(), _adapter()
  quantized = nf4.quantize_params(base)
  s = summary.summary(quantized, adapter, 'lora')
  dense = summary.summary(base, adapter, 'lora')
  # Quantising changes the bytes, not the parameter count or the rows.
  assert [r.path for r in s.rows] == [r.path for r in dense.rows]
  assert s.total.size == dense.total.size
  assert s.total.trainable_size == dense.total.trainable_size
  path = 'encoder/block_0/attention/q/kernel'
  row = {r.path: r for r in s.rows}[path]
  kernel = quantized['encoder']['block_0']['attention']['q']['kernel']
  assert (row.shape, row.size, row.dtype) == ((16, 24), 16 * 24, 'nf4')
  # Stored: codes [64/2, 24] u8 (16 rows padded to a block of 64) + scale
  # codes [1, 24] u8 + two fp32 scales.
  assert row.nbytes == 32 * 24 + 24 + 4 + 4 == sum(
      x.nbytes for x in jax.tree.leaves(kernel))
  assert row.device_bytes == row.nbytes
  assert s.total.nbytes == sum(x.nbytes for x in jax.tree.leaves(
      (quantized, adapter)))
  # Sharded as the trainer shards it (nf4.logical_axes): out over 'tensor'.
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 1, 'tensor': 4})
  placed = jax.tree.map(
      lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)), kernel,
      nf4.logical_axes(P(None, 'tensor'), kernel))
  row = summary.summary({'q': {'kernel': placed}}).rows[0]
  assert (row.path, row.sharding, row.size) == ('q/kernel', 'P(None, tensor)',
                                                16 * 24)
  assert row.device_bytes == 32 * 6 + 6 + 4 + 4
