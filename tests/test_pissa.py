"""PiSSA from a config, through the trainer: the run trains over the residual
base (its output at step 0 is the base model's), and its PEFT folder is a
plain LoRA of rank 2R that HF PEFT serves over the ORIGINAL base."""
import json
import pathlib

import jax
import numpy as np
import pytest

import helpers
from configs import bert_sentiment_lora
from configs import common
from flaxlora import export
from flaxlora import models
from flaxlora import optimizers
from flaxlora import run_setup
from flaxlora import trainer
from flaxlora.inspect import analysis
from flaxlora.peft import base as peft_base
from flaxlora.peft import hf_folder
from flaxlora.peft import lora
from flaxlora.peft import trainable
from flaxlora.peft.lora import pissa

BATCH = helpers.batch(vocab=common.TINY_BERT['vocab_size'])
QUERY = ('encoder', 'layer_0', 'attention', 'query', 'kernel')


def _config(init):
  config = bert_sentiment_lora.get_config('runlocal')
  config.peft.update(init=init, rank=4, alpha=8.0)
  config.train.update(steps=6, eval_every=0, log_every=3,
                      checkpoint_every=0)
  config.optimizer.update(warmup_steps=0)
  config.eval.max_examples = 16
  return config


def _logits(run, adapter=None, base=None):
  if adapter is None:
    params = run.base if base is None else base
  else:
    params, _ = run.method.apply(run.base if base is None else base, adapter)
  return np.asarray(run.model.apply({'params': params}, *BATCH))


def _at(tree, path=QUERY):
  for key in path:
    tree = tree[key]
  return tree


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{init: (setup Run, trained adapter, workdir)} of 6-step runs."""
  out = {}
  for init in ('pissa', 'default'):
    workdir = tmp_path_factory.mktemp(init)
    trainer.train_and_evaluate(_config(init), workdir / 'run')
    run = run_setup.setup(_config(init), workdir / 'again')
    like = jax.eval_shape(run.method.init, run.adapter_rng, run.base)
    out[init] = (run, export.load_adapter(workdir / 'run' / 'adapter', like),
                 workdir / 'run')
  return out


def test_at_step_zero_the_run_computes_the_base_model(runs):
  run, _, _ = runs['pissa']
  original = runs['default'][0].base  # the same seed, no prepare_base
  tx = optimizers.optimizer(run.config.optimizer, run.total_steps,
                            run.method)
  state, _ = run_setup.init_state(run, tx)
  w = np.asarray(_at(original), np.float64)
  node = _at(run.base)
  assert pissa.is_pissa(node)  # the trainer applied prepare_base
  leaf = _at(state.adapter[0])
  u, s, vh = np.linalg.svd(w, full_matrices=False)
  top = (u[:, :4] * s[:4]) @ vh[:4]
  # init took W's top-4 SVD part, and the base is the residual.
  np.testing.assert_allclose(2.0 * np.asarray(leaf['a'], np.float64) @
                             np.asarray(leaf['b'], np.float64), top,
                             atol=1e-5)
  np.testing.assert_allclose(node.w, w - top, atol=1e-5)
  # The tiny random BERT's logits are ~1e-2: fp32 agreement is ~1e-9, the
  # bug this guards against (the adapter added to the original W) ~7e-5.
  base_logits = _logits(runs['default'][0])
  assert helpers.max_diff(_logits(run, state.adapter), base_logits) < 1e-7
  plain = runs['default'][0]
  assert helpers.max_diff(_logits(plain, state.adapter), base_logits) > 1e-5


def test_inspect_analyses_the_update_over_the_residual(runs):
  run, adapter, _ = runs['pissa']
  prepared = run.method.prepare_base(run.base)  # idempotent
  report = analysis.analyze(prepared, adapter, run.method)
  residual = jax.tree.map(lambda x: x.w if pissa.is_pissa(x) else x,
                          prepared, is_leaf=pissa.is_pissa)
  path = '/'.join(QUERY)
  assert report.by_path[path].relative_norm == analysis.analyze(
      residual, adapter, run.method).by_path[path].relative_norm
  original = runs['default'][0].base
  assert report.by_path[path].relative_norm != analysis.analyze(
      original, adapter, run.method).by_path[path].relative_norm


def test_the_run_trains_pissa_not_default(runs):
  pissa_run, pissa_adapter, workdir = runs['pissa']
  default_run, default_adapter, _ = runs['default']
  ours = _logits(pissa_run, pissa_adapter)
  assert helpers.max_diff(ours, _logits(default_run, default_adapter)) > 1e-3
  assert helpers.max_diff(ours, _logits(default_run)) > 1e-3
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['peft_method'][0]['init'] == 'pissa'


def test_the_peft_folder_serves_the_run_over_the_original_base(runs,
                                                               tmp_path):
  torch = pytest.importorskip('torch')
  peft = pytest.importorskip('peft')
  transformers = pytest.importorskip('transformers')
  run, adapter, workdir = runs['pissa']
  original = runs['default'][0].base
  folder = pathlib.Path(workdir) / 'peft'
  config = json.loads((folder / hf_folder.CONFIG_FILE).read_text())
  assert (config['r'], config['lora_alpha'], config['init_lora_weights']) \
      == (8, 16.0, True)
  models.save(tmp_path / 'base', run.model, jax.device_get(original))
  hf = transformers.BertForSequenceClassification.from_pretrained(
      str(tmp_path / 'base')).eval()
  with torch.no_grad():
    theirs = helpers.torch_outputs(
        peft.PeftModel.from_pretrained(hf, str(folder)).eval(),
        *BATCH)['logits']
  ours = _logits(run, adapter)
  assert helpers.max_diff(ours, theirs) < 1e-4
  assert helpers.max_diff(ours, _logits(runs['default'][0])) > 1e-3


@pytest.mark.parametrize('kw', [
    dict(use_rslora=True, rank_pattern={r'.*layer_1.*': 2},
         alpha_pattern={r'.*layer_0/attention/value/kernel': 3.0}),
    dict(use_dora=True)])
def test_the_export_keeps_the_scale_and_dora(runs, tmp_path, kw):
  """rsLoRA with patterns (alpha x sqrt(2)) and DoRA also convert exactly;
  the export reads a prepared base or the original one alike."""
  torch = pytest.importorskip('torch')
  peft = pytest.importorskip('peft')
  transformers = pytest.importorskip('transformers')
  run = runs['default'][0]
  method = peft_base.chain(
      lora.lora(rank=3, alpha=5.0, targets='bert', init='pissa', **kw),
      trainable.trainable(r'classifier/.*'))  # PEFT's SEQ_CLS saves it
  adapter = method.init(jax.random.PRNGKey(0), run.base)
  adapter = jax.tree.map(lambda t: t + 0.3 * jax.random.normal(
      jax.random.PRNGKey(1), t.shape), adapter)
  params, _ = method.apply(run.base, adapter)
  ours = np.asarray(run.model.apply({'params': params}, *BATCH))
  models.save(tmp_path / 'base', run.model, jax.device_get(run.base))
  for name, base in (('raw', run.base), ('prepared',
                                         method.prepare_base(run.base))):
    export.save_peft(tmp_path / name, run.model, base, adapter, method)
    hf = transformers.BertForSequenceClassification.from_pretrained(
        str(tmp_path / 'base')).eval()
    with torch.no_grad():
      theirs = helpers.torch_outputs(
          peft.PeftModel.from_pretrained(hf, str(tmp_path / name)).eval(),
          *BATCH)['logits']
    assert helpers.max_diff(ours, theirs) < 1e-4, name
  assert helpers.max_diff(ours, _logits(run)) > 1e-3
