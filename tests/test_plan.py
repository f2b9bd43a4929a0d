"""experiments.plan / flaxlora.plan and chips: targets, the batch bisection,
abstract batches, the CLI on the host's devices, a TPU v5e:2x2 compile, and the
one-line error without libtpu."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import bert_sentiment_lora
from configs import llama_lora
from configs import pod_lora
from flaxlora import build
from flaxlora import chips
from flaxlora import plan
from flaxlora import plan_tables
from flaxlora import resolved
from flaxlora import sharding
from flaxlora.data import pipeline
from flaxlora.data import task_data
from flaxlora.models import presets

# One block each way: the compiles of these tests take seconds.
TINY = 'runlocal'
TINY_FLAGS = ['--config.model.init.num_layers=1',
              '--config.model.init.num_decoder_layers=1']


def _tiny_config():
  config = pod_lora.get_config(TINY)
  config.model.init.update(num_layers=1, num_decoder_layers=1)
  return config


@pytest.mark.parametrize('name, topology, count', [
    ('v5e-1', 'v5e:1x1', 1), ('v5e-8', 'v5e:2x4', 8),
    ('v5e-16', 'v5e:4x4', 16), ('v5e-256', 'v5e:16x16', 256),
    ('v5p-128', 'v5p:4x4x4', 64), ('v5p-256', 'v5p:4x4x8', 128),
    ('v4-32', 'v4:2x2x4', 16), ('v4-8', 'v4:2x2x1', 4),
    ('v5e:2x2', 'v5e:2x2', 4)])
def test_targets_are_google_slice_shapes(name, topology, count):
  t = chips.target(name)
  assert (t.topology, t.chips) == (topology, count)
  assert t.chip is chips.CHIPS[name[:3].rstrip('-:')]


@pytest.mark.parametrize('name', ['v6x-8', 'v5e-12', 'v4-7', 'v5e:2x2x1',
                                  'tpu'])
def test_bad_targets_name_the_accepted_forms(name):
  with pytest.raises(ValueError, match='--target='):
    chips.target(name)


@pytest.mark.parametrize('largest, unit, start, limit, expected', [
    (37, 4, 8, 1000, 36),      # grows 8..64, bisects down to 36
    (5, 1, 64, 1000, 5),       # the start fails: bisects below it
    (3, 4, 8, 1000, 0),        # not even one unit fits
    (10**6, 8, 16, 100, 96),   # everything fits: the limit (a multiple)
    (100, 16, 1, 1000, 96)])   # the start rounds up to one unit
def test_largest_batch_bisects_over_multiples_of_the_unit(
    largest, unit, start, limit, expected):
  best, tried = plan.largest_batch(lambda b: b <= largest, unit, start,
                                   limit)
  assert best == expected
  sizes = [size for size, _ in tried]
  assert all(size % unit == 0 and 0 < size <= limit for size in sizes)
  assert len(sizes) == len(set(sizes))  # no size compiled twice
  assert all(ok == (size <= largest) for size, ok in tried)
  assert len(sizes) <= 2 * int(np.log2(limit / unit)) + 2


def _real_batch(config):
  data = task_data.load(config, build.tokenizer(resolved.resolve(config)))
  return next(iter(pipeline.Loader(
      data.train, global_batch_size=config.train.batch_size, seed=0,
      shuffle=True, drop_remainder=True)))


def _packed_llama():
  config = llama_lora.get_config('runlocal')
  config.data.pack = True
  return config


@pytest.mark.parametrize('config', [
    pod_lora.get_config('runlocal'),
    bert_sentiment_lora.get_config('runlocal'),
    llama_lora.get_config('runlocal'), _packed_llama()],
                         ids=['seq2seq', 'bert', 'causal', 'packed'])
def test_abstract_batch_has_the_keys_and_dtypes_of_a_real_one(config):
  config.data.buckets = ()  # every batch padded to the longest length
  real = _real_batch(config)
  mesh = sharding.make_mesh({'data': -1})
  abstract = plan.abstract_batch(config, config.train.batch_size, mesh,
                                 sharding.resolve_rules())
  assert sorted(abstract) == sorted(real)
  for name, x in real.items():
    assert abstract[name].dtype == x.dtype, name
    assert abstract[name].shape[0] == x.shape[0], name
    # A causal row also holds the prompt template's tokens, which plan
    # leaves out (`plan.sequence_length`).
    if config.task != 'causal_lm':
      assert abstract[name].shape == x.shape, name


def _plan(*args, patch=''):
  """Runs `experiments.plan` in a subprocess (its --config flag would clash
  with other commands' in this one); `patch`: Python run before it."""
  code = (f'{patch}\nimport sys\nfrom experiments import plan\n'
          'plan.define_flags()\nsys.exit(plan.cli(sys.argv))')
  return subprocess.run([sys.executable, '-c', code, *args],
                        capture_output=True, text=True, check=False)


def test_plan_on_the_host_devices_through_the_cli(tmp_path):
  path = tmp_path / 'plan.json'
  done = _plan(f'--config={pod_lora.__file__}:{TINY}', '--target=cpu',
               f'--json={path}', *TINY_FLAGS)
  out = done.stdout
  assert done.returncode == 0, out + done.stderr
  assert 'target' in out and 'cpu' in out
  [report] = json.loads(path.read_text())
  devices = len(jax.devices())
  assert report['chips'] == devices and report['mesh']['fsdp'] == devices
  assert report['fits'] and 0 < report['headroom'] < 1
  b = report['bytes']
  assert b['total'] >= b['base'] + b['adapter'] + b['opt_state'] + b['temp']
  # The base is split over the devices (FSDP): a chip holds about 1/8.
  model, params = build.abstract_params(
      resolved.resolve(plan.without_weights(_tiny_config())))
  whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  assert whole / devices <= b['base'] < whole / 2
  # Block remat recomputes each block's forward pass, which is not useful
  # work: about 4 of the 6 passes' FLOPs are (forward, backward).
  assert report['remat'] == 'block'
  assert 0.4 < report['useful_flops'] / report['flops'] < 0.9
  assert report['command'].startswith('python -m experiments.plan')
  assert report['host']['jax'] == jax.__version__
  # The docs table is made from such JSON files.
  table = subprocess.run([sys.executable, '-m', 'experiments.plan_table',
                          str(path)], capture_output=True, text=True,
                         check=True)
  rows = table.stdout.strip().splitlines()
  assert len(rows) == 3 and rows[0].startswith('| model |')
  assert '| cpu |' in rows[2] and '| yes |' in rows[2]


def test_a_scanned_step_is_costed_with_every_layer():
  # XLA's cost analysis counts a loop's body once: the plan scales the
  # scanned step's figures by what the unrolled step costs over it.
  config = pod_lora.get_config(TINY)  # 2 + 2 layers, scanned
  scanned = plan.plan(config, chips.target('cpu'))
  config.model.scan_layers = False
  unrolled = plan.plan(config, chips.target('cpu'))
  assert 'compiled_flops' in scanned and 'compiled_flops' not in unrolled
  assert scanned['compiled_flops'] < 0.8 * scanned['flops']
  assert scanned['flops'] == pytest.approx(unrolled['flops'], rel=0.1)
  assert scanned['bytes_accessed'] == pytest.approx(
      unrolled['bytes_accessed'], rel=0.3)


@pytest.mark.parametrize('variant', [
    'model=flan-t5-xxl', 'model=flan-t5-xl,method=qlora', 'model=bert-large',
    'model=llama-3-8b', 'model=qwen2-7b,method=qlora,batch=4'])
def test_pod_configs_name_presets_and_valid_methods(variant):
  config = pod_lora.get_config(variant)
  assert presets.config_json(config.model.path)['model_type'] in (
      't5', 'bert', 'llama', 'qwen2')
  assert build.peft_method(config.peft, config.model.family).init
  assert (config.mesh.fsdp, config.model.remat, config.model.scan_layers) == (
      -1, 'block', True)


def test_missing_libtpu_is_one_line_with_the_install():
  done = _plan(f'--config={pod_lora.__file__}:{TINY}', '--target=v5e-16',
               patch='from flaxlora import chips\n'
               'chips.libtpu_installed = lambda: False')
  err = done.stderr.strip()
  assert done.returncode == 2, err
  assert len(err.splitlines()) == 1, err
  assert "pip install 'flaxlora[tpu]'" in err and 'v5e-16' in err


@pytest.mark.skipif(not chips.libtpu_installed(),
                    reason="libtpu is not installed: pip install "
                    "'flaxlora[tpu]' (.ci/run installs it)")
def test_tiny_t5_lora_step_compiles_for_a_v5e_2x2_slice():
  t = chips.target('v5e:2x2')
  devices = chips.devices(t)
  assert [d.platform for d in devices] == ['tpu'] * 4
  assert devices[0].device_kind == 'TPU v5 lite'
  report = plan.plan(_tiny_config(), t, devices)
  assert report['fits'] and report['mesh']['fsdp'] == 4
  b = report['bytes']
  # (A step this small keeps no temporaries in HBM: temp may be 0.)
  assert b['base'] + b['adapter'] + b['opt_state'] <= b['total']
  assert b['total'] < t.chip.hbm_bytes
  assert report['flops'] > 0 and report['bytes_accessed'] > 0
  assert report['roofline_seconds'] == max(report['compute_seconds'],
                                           report['memory_seconds'])
  assert 0 < report['mfu'] < 1


@pytest.mark.parametrize('model, billions', [
    ('flan-t5-xxl', 11.14), ('flan-t5-xl', 2.85), ('bert-large', 0.335),
    ('llama-3-8b', 8.03), ('qwen2-7b', 7.62)])
def test_presets_have_the_published_parameter_counts(model, billions):
  config = plan.without_weights(pod_lora.get_config(f'model={model}'))
  _, params = build.abstract_params(resolved.resolve(config, reads=()))
  count = sum(x.size for x in jax.tree.leaves(params))
  assert count == pytest.approx(billions * 1e9, rel=0.01)


def test_markdown_shows_the_temps_a_refusing_compiler_asked_for():
  report = {'model': 'm', 'peft': 'lora', 'batch_size': 4, 'sequence': '8',
            'remat': 'block', 'base_dtype': 'bfloat16', 'target': 'v5e-1',
            'mesh': {'data': 1, 'fsdp': 1, 'tensor': 1}, 'grad_accum_steps': 2,
            'bytes': {'base': 1}, 'hbm_bytes': chips.GIB * 16, 'fits': False,
            'error': 'RESOURCE_EXHAUSTED: Ran out of memory on HBM, the '
                     'total memory required for HLO temporaries (16.11G) '
                     'exceeds available HBM (15.75G).'}
  row = plan_tables.markdown([report]).splitlines()[-1]
  assert '| 4 x 8 (2 x 2) |' in row and '| 1x1x1 | temps 16.11G (16) |' in row
  assert plan_tables.refused_temps(dict(report, error='')) == '-'
