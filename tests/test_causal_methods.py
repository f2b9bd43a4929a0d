"""Every PEFT method trains on the decoder-only families through a config.

configs/llama_lora.py:runlocal (and gpt2_lora.py:runlocal for LoRA) with
its peft section swapped: a few trainer steps must lower the train loss
from the first batch, change the adapter, and the adapted model must
decode (greedy, with the method's model kwargs).

The default suite trains one method of each way of adapting the model
(kernels: LoRA; scales: IA3; a soft prompt; a key/value prefix), and LoRA
on GPT-2; the LoRA variants, which go through the same adapted-kernel path
of the family, run in the slow suite (each has its own tests on T5/BERT).
"""
import pathlib
import tempfile

import jax
import numpy as np
import pytest

import config_reads
import helpers
from flaxlora import optimizers
from flaxlora import run_setup
from flaxlora import steps
from flaxlora import trainer

PROJECTIONS = (r'.*/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)'
               r'/kernel')
_LORA = dict(method='lora', rank=4, alpha=8.0, targets=PROJECTIONS)
# name -> (peft section, learning rate)
METHODS = {
    'lora': (_LORA, 1e-2),
    'rslora': (dict(_LORA, use_rslora=True), 1e-2),
    'dora': (dict(_LORA, use_dora=True), 1e-2),
    'pissa': (dict(_LORA, init='pissa'), 1e-2),
    'loraplus': (dict(_LORA, loraplus_ratio=4.0), 1e-2),
    'qlora': (dict(_LORA, method='qlora'), 1e-2),
    'nblora': (dict(method='nblora', rank=4, bound=1.0, norm='frobenius',
                    targets=PROJECTIONS), 1e-2),
    'scalora': (dict(_LORA, method='scalora', merge_every=1), 1e-2),
    'ia3': (dict(method='ia3'), 3e-2),  # the family's preset (PEFT's)
    'prompt': (dict(method='prompt_tuning', num_tokens=4,
                    init='vocab_sample'), 3e-2),
    'prefix': (dict(method='prefix_tuning', num_tokens=4, projection=False),
               3e-2),
}
DEFAULT = ('lora', 'ia3', 'prompt', 'prefix')


def _config(name, peft, lr):
  config = config_reads.shorten(config_reads.get_config(name, 'runlocal'))
  config.peft = peft
  config.optimizer.update(lr=lr, warmup_steps=0, schedule='constant')
  return config


def _train(config, num_steps=6):
  """(first and last loss on one fixed batch, adapter before and after,
  run, trained adapter)."""
  run = run_setup.setup(config, pathlib.Path(tempfile.mkdtemp()))
  tx = optimizers.optimizer(config.optimizer, num_steps, run.method)
  state, shardings = run_setup.init_state(run, tx)
  before = jax.device_get(state.adapter)
  step = steps.jit_train_step(run.task.loss, run.method, tx, 1, shardings,
                              clip_norm=1.0)
  batch = run_setup.device_batch(  # pylint: disable=protected-access
      run, next(run_setup.loader(run, train=True)))
  losses = []
  for _ in range(num_steps):  # the same batch: its loss must fall
    state, metrics = step(state, run.base, batch)
    losses.append(float(metrics['loss']))
  return losses, before, jax.device_get(state.adapter), run, state.adapter


@pytest.mark.parametrize('method', helpers.default_or_slow(
    [(m,) for m in sorted(METHODS)], [(m,) for m in DEFAULT]))
def test_every_method_trains_and_decodes_on_llama(method):
  peft, lr = METHODS[method]
  losses, before, after, run, adapter = _train(
      _config('llama_lora', peft, lr))
  assert losses[-1] < losses[0], losses
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
  assert any(jax.tree.leaves(changed)), method
  texts = trainer.generate_texts(run, adapter)
  assert len(texts) == len(run.data.eval_records)


def test_lora_trains_on_gpt2():
  losses, *_ = _train(_config('gpt2_lora', dict(
      method='lora', rank=4, alpha=8.0, targets=r'.*/attn/c_attn/kernel'),
                              1e-2))
  assert losses[-1] < losses[0], losses
