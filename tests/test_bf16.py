"""bf16 (the dtype of every TPU/GPU run) against fp32, with tolerances from
the size of what is tested: for T5 and BERT with LoRA, DoRA, QLoRA and
prompt tuning, the change an adapter makes to the logits computed in bf16
must match the fp32 change to within 10% of its size (a bf16 path that drops
the adapter term is off by 100%)."""
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import config_reads
from flaxlora import trainer

# (config, changes): every method on each family that has it.
CASES = {
    't5_lora': ('t5_lora', {}),
    't5_qlora': ('t5_qlora', {}),
    't5_prompt': ('t5_prompt_tuning', {}),
    'bert_lora': ('bert_sentiment_lora', {}),
    'bert_dora': ('bert_sentiment_lora', {'peft.use_dora': True}),
    'bert_qlora': ('bert_sentiment_qlora', {}),
    'bert_prompt': ('bert_sentiment_prompt', {}),
}


def _run(name, changes, dtype):
  config = config_reads.shorten(config_reads.get_config(name, 'runlocal'))
  for key, value in {**changes, 'model.dtype': dtype,
                     'model.dropout': 0.0}.items():
    section, field = key.split('.')
    config[section][field] = value
  return trainer.setup(config, pathlib.Path(tempfile.mkdtemp()))


def _logits(run, adapter, batch):
  params, kwargs = run.method.apply(run.base, adapter)
  logits = jax.jit(lambda p, k: run.task._logits(p, k, batch, None))(  # pylint: disable=protected-access
      params, kwargs)
  return np.asarray(logits, np.float32)


def _perturbed(adapter, seed=0):
  """Every adapter leaf moved by noise of half its spread (0.05 for a zero
  leaf, e.g. LoRA's B at init)."""
  leaves, tree = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      x + max(0.5 * float(np.std(x)), 0.05) *
      jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
      for x, k in zip(leaves, keys)])


@pytest.mark.parametrize('case', sorted(CASES))
def test_bf16_adapter_effect_matches_fp32(case):
  name, changes = CASES[case]
  fp32, bf16 = (_run(name, changes, d) for d in ('float32', 'bfloat16'))
  adapter = jax.device_get(trainer.init_state(fp32, optax.sgd(0.0))[0]
                           .adapter)
  moved = _perturbed(adapter)
  batch = trainer._device_batch(fp32, next(trainer.loader(fp32, True)))  # pylint: disable=protected-access
  effect = _logits(fp32, moved, batch) - _logits(fp32, adapter, batch)
  effect_bf16 = _logits(bf16, moved, batch) - _logits(bf16, adapter, batch)
  size = np.linalg.norm(effect)
  # The adapter's change is a real part of the logits...
  assert size > 0.02 * np.linalg.norm(_logits(fp32, adapter, batch)), case
  # ... and bf16 computes it to within 10% of its size.
  ratio = np.linalg.norm(effect_bf16 - effect) / size
  assert ratio < 0.1, (case, ratio)
  # bf16 really ran in bf16 (not an fp32 model under another name).
  assert np.abs(effect_bf16 - effect).max() > 0, case
