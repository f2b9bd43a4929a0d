"""Meshes, logical axis rules and sharded placement on 8 simulated devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import multihost_worker
from flaxlora import distributed
from flaxlora import sharding
from flaxlora.models import sharded

RULES = sharding.resolve_rules()


class Toy(nn.Module):
  """Params with the models' logical axes; `vocab` rows of the table."""
  vocab: int = 64

  @nn.compact
  def __call__(self, ids):
    init = nn.initializers.normal(1.0)
    table = self.param('embed', nn.with_logical_partitioning(
        init, ('vocab', 'embed')), (self.vocab, 16))
    kernel = self.param('mlp', nn.with_logical_partitioning(
        init, ('embed', 'mlp')), (16, 32))
    bias = self.param('bias', nn.with_logical_partitioning(
        nn.initializers.zeros, ('mlp',)), (32,))
    relpos = self.param('relpos', nn.with_logical_partitioning(
        init, ('relpos_buckets', 'relpos_heads')), (8, 4))
    return jnp.take(table, ids, axis=0) @ kernel + bias + relpos.sum()


def _toy_init(mesh, model=None):
  model = model or Toy()
  return sharded.init(model, jax.random.PRNGKey(0), mesh, RULES,
                                  jnp.zeros((2, 3), jnp.int32))


@pytest.mark.parametrize('sizes, shape', [
    ({}, (8, 1, 1)),
    ({'fsdp': -1}, (1, 8, 1)),
    ({'data': 2, 'fsdp': -1, 'tensor': 2}, (2, 2, 2)),
    ({'data': 1, 'fsdp': 2, 'tensor': 4}, (1, 2, 4)),
    (ml_collections.ConfigDict({'data': -1, 'tensor': 4}), (2, 1, 4)),
])
def test_mesh_shape(sizes, shape):
  mesh = sharding.make_mesh(sizes)
  assert tuple(mesh.shape.values()) == shape
  assert mesh.axis_names == sharding.MESH_AXES
  assert mesh.devices.size == 8
  assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}


@pytest.mark.parametrize('sizes, message', [
    ({'data': 3, 'fsdp': -1}, r'data=3, fsdp=-1, tensor=1.*multiply to 3.*8 '
     'devices'),
    ({'data': 2, 'tensor': 2}, r'data=2, fsdp=1, tensor=2\) multiply to 4, '
     'but there are 8 devices'),
    ({'data': -1, 'fsdp': -1}, 'at most one may be -1'),
    ({'tensor': 0}, 'must be positive'),
])
def test_mesh_size_errors(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(sizes)


def test_rules_map_logical_axes():
  assert sharding.logical_to_spec(('batch', None), RULES) == P(
      ('data', 'fsdp'), None)
  assert sharding.logical_to_spec(('embed', 'mlp'), RULES) == P(
      'fsdp', 'tensor')
  # A mesh axis serves one dimension only: the second `embed` replicates.
  assert sharding.logical_to_spec(('embed', 'embed'), RULES) == P(
      'fsdp', None)
  for name in ('lora_rank', 'prompt', 'relpos_buckets', 'positions',
               'token_types', 'classes'):
    assert sharding.logical_to_spec((name,), RULES) == P(None)
  rules = sharding.resolve_rules({'vocab': None, 'embed': ['tensor']})
  assert sharding.logical_to_spec(('vocab', 'embed'), rules) == P(
      None, ('tensor',))
  assert dict(rules)['mlp'] == 'tensor'  # untouched entries stay
  from_config = sharding.resolve_rules(
      ml_collections.ConfigDict({'vocab': None}))
  assert dict(from_config)['vocab'] is None


def test_rule_errors():
  with pytest.raises(ValueError, match=r"'vocab' -> 'model'.*unknown"):
    sharding.resolve_rules([('vocab', 'model')])
  with pytest.raises(ValueError, match="w: logical axis 'wat' has no "
                     'sharding rule'):
    sharding.logical_to_spec(('wat',), RULES, where='w')


def test_non_divisible_parameter_error_names_path():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  with pytest.raises(ValueError, match=(
      r"parameter embed: dimension 0 \('vocab'\) has size 63, which mesh "
      r"axes \('tensor',\) \(tensor=2\) do not divide; shape \(63, 16\)")):
    _toy_init(mesh, Toy(vocab=63))
  # The fix the message suggests works.
  rules = sharding.resolve_rules({'vocab': None})
  params, _ = sharded.init(
      Toy(vocab=63), jax.random.PRNGKey(0), mesh, rules,
      jnp.zeros((2, 3), jnp.int32))
  assert params['embed'].sharding.spec == P(None, 'fsdp')


def _device_bytes(tree):
  per_device = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = (per_device.get(shard.device, 0) +
                                  shard.data.nbytes)
  return per_device


def test_fsdp_splits_params_and_init_matches_one_device():
  one = sharding.make_mesh({}, devices=jax.devices()[:1])
  reference, _ = _toy_init(one)
  nbytes = {k: v.nbytes for k, v in reference.items()}
  # How many pieces each param is cut into (embed->fsdp, mlp/vocab->tensor).
  for sizes, parts in [
      ({'fsdp': 8}, {'embed': 8, 'mlp': 8, 'bias': 1, 'relpos': 1}),
      ({'data': 2, 'fsdp': 4}, {'embed': 4, 'mlp': 4, 'bias': 1, 'relpos': 1}),
      ({'fsdp': 2, 'tensor': 4}, {'embed': 8, 'mlp': 8, 'bias': 4,
                                  'relpos': 1})]:
    params, axes = _toy_init(sharding.make_mesh(sizes))
    assert axes['mlp'] == P('embed', 'mlp')
    per_device = _device_bytes(params)
    assert len(per_device) == 8
    expected = sum(nbytes[k] // parts[k] for k in nbytes)
    assert set(per_device.values()) == {expected}, sizes
    if sizes == {'fsdp': 8}:  # the big tables: ~1/fsdp of all bytes
      assert expected < 0.2 * sum(nbytes.values())
    # Partitionable threefry: the values do not depend on the mesh.
    jax.tree.map(np.testing.assert_array_equal, params, reference)


class _RecordingSlicer:
  """A host array that records which slices devices ask for."""

  def __init__(self, array):
    self.array, self.shape, self.reads = array, array.shape, []

  def __getitem__(self, index):
    self.reads.append(index)
    return self.array[index]


def test_host_to_global_reads_only_device_slices():
  mesh = sharding.make_mesh({'fsdp': 2, 'tensor': 4})
  host = {'w': np.arange(16 * 32, dtype=np.float32).reshape(16, 32),
          'r': np.ones((8, 4), np.float32)}
  shardings = sharding.named_shardings(
      host, {'w': P('embed', 'mlp'), 'r': P(None, None)}, mesh, RULES)
  slicers = jax.tree.map(_RecordingSlicer, host)
  arrays = distributed.host_to_global(slicers, shardings)
  np.testing.assert_array_equal(arrays['w'], host['w'])
  shard_shapes = {host['w'][i].shape for i in slicers['w'].reads}
  assert shard_shapes == {(8, 8)}  # never the whole [16, 32]
  assert arrays['w'].sharding.spec == P('fsdp', 'tensor')
  assert arrays['r'].sharding.is_fully_replicated


def test_global_batch_and_to_host():
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  local = {'ids': np.arange(8 * 3).reshape(8, 3), 'y': np.arange(8)}
  batch = distributed.global_batch(local, mesh, RULES)
  assert batch['ids'].sharding.spec == P(('data', 'fsdp'), None)
  assert batch['ids'].addressable_shards[0].data.shape == (2, 3)
  back = distributed.to_host(batch)
  np.testing.assert_array_equal(back['ids'], local['ids'])
  np.testing.assert_array_equal(back['y'], local['y'])


def test_optimizer_shardings_follow_params():
  import optax  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh({'fsdp': 2, 'tensor': 4})
  params, axes = _toy_init(mesh)
  shardings = sharding.named_shardings(params, axes, mesh, RULES)
  tx = optax.adamw(1e-3)
  opt_shardings = sharding.optimizer_shardings(tx, params, shardings, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  adam = opt_state[0]
  assert adam.mu['mlp'].sharding.spec == P('fsdp', 'tensor')
  assert adam.nu['embed'].sharding.spec == P('tensor', 'fsdp')
  assert adam.count.sharding.is_fully_replicated


# ----------------------------------------------- LoRA training on meshes ---

MESHES = [(8, 1, 1), (2, 2, 2), (1, 2, 4)]


@pytest.fixture(scope='module')
def single_device_runs():
  """Per family: losses, adapter and base of the run on one device."""
  one = sharding.make_mesh({}, devices=jax.devices()[:1])
  runs = {}
  for family in ('t5', 'bert', 'llama'):
    losses, state, _, base = multihost_worker.train(family, one)
    runs[family] = (losses, multihost_worker.flat_arrays(
        distributed.to_host(state['adapter'])), distributed.to_host(base))
  return runs


@pytest.mark.parametrize('family', ['t5', 'bert', 'llama'])
@pytest.mark.parametrize('shape', MESHES)
def test_lora_steps_match_single_device(single_device_runs, family, shape):
  losses, adapter, base = single_device_runs[family]
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
  got_losses, state, shardings, _ = multihost_worker.train(
      family, mesh, host_base=base)
  np.testing.assert_allclose(got_losses, losses, atol=1e-5, rtol=0)
  got = multihost_worker.flat_arrays(distributed.to_host(state['adapter']))
  assert got.keys() == adapter.keys()
  for key in adapter:
    np.testing.assert_allclose(got[key], adapter[key], atol=1e-5, rtol=0,
                               err_msg=key)
  # Training moved the adapter (B starts at 0) and lowered the loss, so the
  # match above is not between two untouched states.
  assert any(np.abs(v).max() > 1e-3 for k, v in adapter.items()
             if k.endswith("['b']"))
  assert losses[-1] < losses[0]
  # Adapters and their AdamW moments are split like their base kernels.
  specs = {s.spec for s in jax.tree.leaves(shardings['adapter'])}
  mu_specs = {s.spec for s in jax.tree.leaves(shardings['opt_state'])}
  if shape == (1, 2, 4):
    assert P('fsdp', None) in specs and P(None, 'tensor') in specs
    assert specs <= mu_specs


def test_orbax_checkpoint_restores_on_another_mesh(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  params, axes = _toy_init(sharding.make_mesh({'data': 2, 'fsdp': 2,
                                               'tensor': 2}))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'ckpt', params)
    checkpointer.wait_until_finished()
    mesh = sharding.make_mesh({'fsdp': 2, 'tensor': 4})
    target = sharding.abstract_sharded(
        params, sharding.named_shardings(params, axes, mesh, RULES))
    restored = checkpointer.restore(tmp_path / 'ckpt', target)
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  assert restored['mlp'].sharding.mesh.shape == mesh.shape
  assert restored['mlp'].addressable_shards[0].data.shape == (8, 8)


# ------------------------------------------- checkpoints straight to shards ---


def test_sharded_load_matches_load(tmp_path, monkeypatch):
  import helpers  # pylint: disable=g-import-not-at-top
  from flaxlora import models  # pylint: disable=g-import-not-at-top
  folder, _ = helpers.save_tiny_bert(tmp_path / 'bert', head=None,
                                     vocab_size=96, intermediate_size=64)
  reads = []
  slicer = sharded._Slicer  # pylint: disable=protected-access
  getitem = slicer.__getitem__

  def recording_getitem(self, index):
    out = getitem(self, index)
    reads.append((self.shape, out.shape))
    return out
  monkeypatch.setattr(slicer, '__getitem__', recording_getitem)
  mesh = sharding.make_mesh({'fsdp': 2, 'tensor': 4})
  rng = jax.random.PRNGKey(3)
  _, params, _ = sharded.load(
      folder, mesh, RULES, rng=rng, head='classification', num_labels=3)
  _, reference, _ = models.load(folder, rng=rng, head='classification',
                                num_labels=3)
  got, want = distributed.to_host(params), distributed.to_host(reference)
  # Read tensors are exact; the fresh head is the same draw up to rounding
  # (the sharded init computes the normal transform in another fusion).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               got.pop('classifier'), want.pop('classifier'))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  word = params['embeddings']['word']['embedding']
  assert word.sharding.spec == P('tensor', 'fsdp')
  assert word.addressable_shards[0].data.shape == (24, 16)
  # Each device read its own slice of each checkpoint tensor, never it whole.
  assert ((96, 32), (24, 16)) in reads
  assert all(shape != full for full, shape in reads if full == (96, 32))
  # The head the checkpoint lacks was initialised (sharded), not left zero.
  classifier = params['classifier']['kernel']
  assert classifier.sharding.spec == P('fsdp', None)
  assert np.abs(np.asarray(classifier)).max() > 0


def test_bench_memory_table_from_shapes():
  from experiments import bench_sharding  # pylint: disable=g-import-not-at-top
  mesh_one = jax.sharding.AbstractMesh((1, 1, 1), sharding.MESH_AXES)
  mesh_fsdp = jax.sharding.AbstractMesh((1, 8, 1), sharding.MESH_AXES)
  one = bench_sharding.memory_row('t5-small', mesh_one)
  split = bench_sharding.memory_row('t5-small', mesh_fsdp)
  assert 60e6 < one['params'] < 61e6  # t5-small: 60.5M parameters
  assert one['base_fp32'] == 4 * one['params']
  assert one['base_bf16'] == 2 * one['params']
  # Only the small relative-position tables stay whole on every device.
  assert one['base_fp32'] / 8 < split['base_fp32'] < one['base_fp32'] / 7.9
  assert split['adapter_adamw'] < one['adapter_adamw']


def test_tensor_parallel_greedy_decoding_matches_one_device():
  """The `generate` benchmark's tensor-parallel runner: same tokens."""
  from experiments import bench_generate  # pylint: disable=g-import-not-at-top
  from flaxlora.models import decoding  # pylint: disable=g-import-not-at-top
  from flaxlora.models import t5  # pylint: disable=g-import-not-at-top
  model = t5.build(t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64,
                               num_layers=2, num_heads=4, dropout_rate=0.0))
  params = t5.init(model, jax.random.PRNGKey(0))
  ids = np.random.RandomState(0).randint(2, 64, (2, 12))
  mask = np.ones_like(ids)
  split = bench_generate._tensor_parallel(model, params, 2)  # pylint: disable=protected-access
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(split)}
  assert any('tensor' in s for s in specs), specs  # really split
  one = decoding.generate(model, params, ids, mask, max_new_tokens=6,
                          min_new_tokens=6)
  two = decoding.generate(model, split, ids, mask, max_new_tokens=6,
                          min_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(one), np.asarray(two))
