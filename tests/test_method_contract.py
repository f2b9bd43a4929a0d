"""The method contract: a run asks a PEFT method everything through its hooks.

A method defined here, in the test file only, trains through
`train_and_evaluate` with every hook in use; the trainer, the build step and
the export path import no method module; LoRA+ from a config moves B exactly
as a hand-built `optax.multi_transform` does.
"""
import ast
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import bert_sentiment_lora
from configs import bert_squad_lora
from flaxlora import export
from flaxlora import optimizers
from flaxlora import run_setup
from flaxlora import steps
from flaxlora import trainer
from flaxlora.models import layers
from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
# Modules a run reaches a method through: they may name no method.
GENERIC = ('flaxlora/trainer.py', 'flaxlora/run_setup.py', 'flaxlora/build.py',
           'flaxlora/export.py', 'flaxlora/steps.py', 'flaxlora/optimizers.py')
# Every method package and module of flaxlora/peft but the contract itself
# (base), the registry, the method-agnostic views of a method
# (method_parts) and what every PEFT folder shares (peft_names, hf_folder);
# every *Config class there.
PEFT_DIR = REPO / 'flaxlora' / 'peft'
METHOD_MODULES = tuple(sorted(
    p.stem for p in PEFT_DIR.iterdir()
    if (p.suffix == '.py' or (p / '__init__.py').is_file()) and p.stem not in (
        '__init__', 'base', 'registry', 'method_parts', 'peft_names',
        'hf_folder')))
METHOD_CONFIGS = tuple(sorted(
    node.name for p in PEFT_DIR.glob('**/*.py')
    for node in ast.walk(ast.parse(p.read_text()))
    if isinstance(node, ast.ClassDef) and node.name.endswith('Config')))


def test_the_lists_cover_the_methods():
  assert {'lora', 'qlora', 'nblora', 'scalora', 'prefix', 'ia3', 'multi',
          'prompt', 'trainable'} <= set(METHOD_MODULES)
  assert {'ChainConfig', 'LoraConfig', 'PromptConfig',
          'TrainableConfig'} <= set(METHOD_CONFIGS)


def _imports(tree: ast.AST) -> set[str]:
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      names.update(f'{node.module}.{a.name}' for a in node.names)
  return names


@pytest.mark.parametrize('module', GENERIC)
def test_generic_modules_name_no_method(module):
  tree = ast.parse((REPO / module).read_text())
  named = {n for n in _imports(tree) if n.startswith('flaxlora.peft.') and
           n.split('.')[2] in METHOD_MODULES}
  assert not named, f'{module} imports method modules {sorted(named)}'
  attributes = {n.attr for n in ast.walk(tree)
                if isinstance(n, ast.Attribute)}
  assert not attributes & set(METHOD_CONFIGS), module
  assert 'flaxlora.peft.base.peft_base' not in _imports(tree)


def test_import_check_sees_a_method_import():
  """The check above can fail: it flags what trainer.py imported before."""
  old = 'from flaxlora.peft.qlora import nf4\nx = peft_base.ChainConfig\n'
  tree = ast.parse(old)
  assert 'flaxlora.peft.qlora.nf4' in _imports(tree)
  assert {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & \
      set(METHOD_CONFIGS)


# ------------------------------------ a method the library does not know ---
# It follows docs/adding_a_method.md's checklist, step by step.

# Checklist 1: one package; this test file stands in for
# flaxlora/peft/scaled_bias/, and imports only flaxlora.peft.base.


@dataclasses.dataclass(frozen=True)
class ScaledBiasConfig:
  scale: float
  limit: float
  lr_multiplier: float


def scaled_bias(scale: float = 2.0, limit: float = 0.05,
                lr_multiplier: float = 3.0) -> peft_base.PeftMethod:
  """Trains one delta per bias, added as `scale * delta`; every hook set.

  prepare_base adds 0.5 to every LayerNorm bias of the base (a visible
  change, even on a base whose biases start at zero); the optimizer runs at
  `lr_multiplier` x the run's rate; after_step clips every delta to
  [-limit, limit].
  """
  # Checklist 2: a factory returning a PeftMethod; its config a frozen
  # dataclass of the arguments.
  config = ScaledBiasConfig(scale, limit, lr_multiplier)

  def paths(base):
    return [p for p in peft_base.flatten(base) if p.endswith('/bias')]

  # Checklist 3: only the hooks it changes (prepare_base, optimizer,
  # after_step); the others keep their defaults.
  def init(rng, base):
    del rng
    return peft_base.unflatten({p: jnp.zeros(peft_base.get(base, p).shape)
                                for p in paths(base)})

  # Checklist 4: biases are added, no kernel product changes, so no
  # adapted-kernel node is needed (LoRA's is `lora.kernel.LoraKernel`).
  def apply(base, adapter):
    updates = {p: peft_base.get(base, p) + scale * d
               for p, d in peft_base.flatten(adapter).items()}
    return peft_base.replace(base, updates), {}

  def prepare_base(base):
    norms = [p for p in peft_base.flatten(base) if p.endswith('norm/bias')]
    return peft_base.replace(base, {p: peft_base.get(base, p) + 0.5
                                    for p in norms})

  def after_step(adapter, opt_state, base, step):
    del base, step
    return jax.tree.map(lambda d: jnp.clip(d, -limit, limit),
                        adapter), opt_state

  # Checklist 5: no PEFT folder form, so its export says why.
  return peft_base.PeftMethod(
      init, apply, config, prepare_base=prepare_base,
      optimizer=lambda make_tx: make_tx(lr_multiplier),
      after_step=after_step,
      export=peft_base.Export(reason='scaled biases have no PEFT form'))


@pytest.fixture(name='registered')
def _registered():
  """`scaled_bias` registered as a method: the one step besides writing it."""
  # Checklist 6: one registration.
  registry.register('scaled_bias', scaled_bias)
  yield
  registry.unregister('scaled_bias')


def _bias_config():
  config = bert_sentiment_lora.get_config('runlocal')
  config.peft = ml_collections.ConfigDict(dict(
      method='scaled_bias', scale=2.0, limit=0.05, lr_multiplier=3.0,
      trainable=''))
  config.train.update(steps=6, eval_every=0, log_every=3)
  config.optimizer.update(warmup_steps=0, schedule='constant')
  return config


# Checklist 7: it trains through train_and_evaluate from a config.
# Checklist 8: a test method has no page; tests/test_docs.py checks that
# every registered method has one.


@pytest.mark.usefixtures('registered')
def test_a_method_defined_here_trains_through_the_trainer(tmp_path):
  config = _bias_config()
  summary = trainer.train_and_evaluate(config, tmp_path / 'run')
  assert summary['peft_method'] == [{
      'type': 'ScaledBiasConfig', 'scale': 2.0, 'limit': 0.05,
      'lr_multiplier': 3.0}]
  assert not (tmp_path / 'run' / 'peft').exists()  # no PEFT form
  run = run_setup.setup(config, tmp_path / 'again')
  # prepare_base ran on the trainer's base: norm biases shifted by 0.5.
  norm = run.base['embeddings']['norm']['bias']
  config.peft.method = 'lora'
  config.peft = bert_sentiment_lora.get_config('runlocal').peft
  plain = run_setup.setup(config, tmp_path / 'plain')
  np.testing.assert_allclose(norm, plain.base['embeddings']['norm'][
      'bias'] + 0.5)
  # after_step clipped the trained deltas; they moved (the optimizer ran).
  folder = tmp_path / 'run' / 'adapter'
  like = jax.eval_shape(run.method.init, run.adapter_rng, run.base)
  deltas = jax.tree.leaves(export.load_adapter(folder, like))
  largest = max(float(np.abs(d).max()) for d in deltas)
  assert 0 < largest <= 0.05 + 1e-7
  assert any(float(np.abs(d).max()) == pytest.approx(0.05) for d in deltas)


@pytest.mark.usefixtures('registered')
def test_the_optimizer_hook_sets_the_rate():
  """lr_multiplier=3 moves the adapter 3x as far as 1 in one SGD-like
  step (Adam's first step moves every entry by lr * sign)."""
  opt = _bias_config().optimizer
  opt.update(weight_decay=0.0)
  adapter = {'x': {'bias': jnp.zeros(4)}}
  grads = {'x': {'bias': jnp.asarray([1.0, -2.0, 0.5, 3.0])}}
  moves = []
  for multiplier in (1.0, 3.0):
    tx = optimizers.optimizer(opt, 10, scaled_bias(lr_multiplier=multiplier))
    updates, _ = tx.update(grads, tx.init(adapter), adapter)
    moves.append(np.asarray(updates['x']['bias']))
  np.testing.assert_allclose(moves[1], 3 * moves[0], rtol=1e-6)
  assert np.abs(moves[0]).min() > 0


# ----------------------------------------------------------------- LoRA+ ---


def _toy():
  rng = np.random.default_rng(0)
  base = {'dense': {'kernel': jnp.asarray(rng.normal(size=(6, 4)),
                                          jnp.float32)}}
  batch = {'x': jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
           'y': jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
           'weight': jnp.ones(8, jnp.float32)}

  def loss_fn(params, kwargs, batch, rng):
    del kwargs, rng
    y = layers.dot(batch['x'], params['dense']['kernel'], dtype=jnp.float32)
    return ((y - batch['y']) ** 2).sum(), batch['weight'].sum()

  return base, batch, loss_fn


def _one_step(method, tx, base, batch, loss_fn):
  adapter = method.init(jax.random.PRNGKey(0), base)
  adapter = jax.tree.map(lambda x: x + 0.1, adapter)  # B != 0: A moves too
  state = steps.create(jax.random.PRNGKey(1), adapter, tx)
  new, _ = steps.train_step(state, base, batch, loss_fn=loss_fn,
                            method=method, tx=tx, clip_norm=1.0)
  return adapter, new.adapter


def test_loraplus_ratio_moves_b_exactly_as_multi_transform():
  base, batch, loss_fn = _toy()
  opt = bert_squad_lora.get_config('local_data').optimizer
  opt.update(warmup_steps=0, schedule='constant', lr=1e-2,
             weight_decay=0.01)
  results = {}
  for ratio in (1.0, 4.0):
    method = lora.lora(rank=2, targets=r'dense/kernel', loraplus_ratio=ratio)
    tx = optimizers.optimizer(opt, 10, method)
    results[ratio] = _one_step(method, tx, base, batch, loss_fn)
  # Reference: the same AdamW, built by hand, B at 4x the rate.
  adamw = lambda lr: optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                 weight_decay=opt.weight_decay)
  reference = optax.multi_transform(
      {'a': adamw(1e-2), 'b': adamw(4e-2)},
      lambda tree: jax.tree_util.tree_map_with_path(
          lambda path, _: path[-1].key, tree))
  method = lora.lora(rank=2, targets=r'dense/kernel')
  start, want = _one_step(method, reference, base, batch, loss_fn)
  got = results[4.0][1]['dense']['kernel']
  want = want['dense']['kernel']
  np.testing.assert_array_equal(got['b'], want['b'])
  np.testing.assert_array_equal(got['a'], want['a'])
  # Ratio 1 is plain LoRA (one AdamW), and B moved 4x as far at ratio 4.
  _, plain = _one_step(method, adamw(1e-2), base, batch, loss_fn)
  jax.tree.map(np.testing.assert_array_equal, results[1.0][1], plain)
  moved = lambda r: np.abs(results[r][1]['dense']['kernel']['b'] -
                           start['dense']['kernel']['b'])
  np.testing.assert_allclose(moved(4.0), 4 * moved(1.0), rtol=1e-4)


def test_loraplus_ratio_from_the_config_reaches_the_run(tmp_path):
  config = bert_squad_lora.get_config('runlocal')
  config.peft.loraplus_ratio = 4.0
  config.train.update(steps=2, eval_every=0)
  summary = trainer.train_and_evaluate(config, tmp_path)
  assert summary['peft_method'][0]['loraplus_ratio'] == 4.0
  resolved = json.loads((tmp_path / 'config.json').read_text())
  assert resolved['peft']['loraplus_ratio'] == 4.0
  with pytest.raises(ValueError, match='loraplus_ratio must be > 0'):
    lora.lora(loraplus_ratio=0.0)


# ------------------------------------------------------------ code size ---


def _python_files():
  for folder in ('flaxlora', 'experiments', 'configs'):
    yield from sorted((REPO / folder).rglob('*.py'))


def test_modules_and_functions_stay_small():
  """The house style: no module over 400 lines, no function over 60."""
  too_long = []
  for path in _python_files():
    source = path.read_text()
    if source.count('\n') > 400:
      too_long.append(f'{path.relative_to(REPO)}: {source.count(chr(10))}')
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        if lines > 60:
          too_long.append(f'{path.relative_to(REPO)}:{node.lineno} '
                          f'{node.name}: {lines} lines')
  assert not too_long, too_long


def test_no_library_module_switches_the_matplotlib_backend():
  offenders = [str(p.relative_to(REPO)) for p in (REPO / 'flaxlora').rglob(
      '*.py') if 'matplotlib.use(' in p.read_text()]
  assert not offenders
