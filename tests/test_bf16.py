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
from flaxlora import run_setup

# (config, changes, noise): every method on each family that has it, and
# an adapter noise (see `_perturbed`) that moves the logits by 5-100%.
# BERT uses the QA head (start/end logits at every position: a tiny random
# classifier's two logits are too small to measure against); a prompt
# barely moves the tiny random BERT's logits (0.1%), so prompt tuning is
# checked on T5.
CASES = {
    't5_lora': ('t5_lora', {}, 0.05),
    't5_dora': ('t5_lora', {'peft.use_dora': True}, 0.05),
    't5_qlora': ('t5_qlora', {}, 0.05),
    't5_prompt': ('t5_prompt_tuning', {}, 1.0),
    'bert_lora': ('bert_squad_lora', {}, 0.5),
    'bert_qlora': ('bert_squad_lora', {'peft.method': 'qlora'}, 0.5),
}


def _run(name, changes, dtype, short=True):
  config = config_reads.get_config(name, 'runlocal')
  config = config_reads.shorten(config) if short else config
  # No `trainable` copies (heads, embeddings): the adapter is the method's
  # own, so its bf16 path alone makes the effect measured.
  for key, value in {**changes, 'model.dtype': dtype, 'model.dropout': 0.0,
                     'peft.trainable': ''}.items():
    section, _, field = key.partition('.')
    if field:
      config[section][field] = value
    else:
      config[section] = value
  return run_setup.setup(config, pathlib.Path(tempfile.mkdtemp()))


def _logits(run, adapter, batch):
  params, kwargs = run.method.apply(run.base, adapter)
  logits = jax.jit(lambda p, k: run.task._logits(p, k, batch, None))(  # pylint: disable=protected-access
      params, kwargs)
  return np.asarray(logits, np.float32)


def _perturbed(adapter, noise, seed=0):
  """Every adapter leaf moved by N(0, s^2), s = noise * max(its spread, 1)
  (LoRA's B is 0 at init)."""
  leaves, tree = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      x + noise * max(float(np.std(x)), 1.0) *
      jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
      for x, k in zip(leaves, keys)])


# One case in the default suite; `-m slow` runs the rest (~20-30 s each).
@pytest.mark.parametrize('case', [
    pytest.param(c, marks=[] if c == 'bert_lora' else [pytest.mark.slow])
    for c in sorted(CASES)])
def test_bf16_adapter_effect_matches_fp32(case):
  name, changes, noise = CASES[case]
  fp32, bf16 = (_run(name, changes, d) for d in ('float32', 'bfloat16'))
  adapter = jax.device_get(run_setup.init_state(fp32, optax.sgd(0.0))[0]
                           .adapter)
  moved = _perturbed(adapter, noise)
  batch = run_setup.device_batch(fp32, next(run_setup.loader(fp32, True)))
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


def _path_logits(run, params, kwargs, batch, tokens):
  """Logits [B, N, V] at each step of the greedy `tokens` path [B, N]
  (teacher-forced along it)."""
  start = run.model.config.decoder_start_token_id
  decoder = np.concatenate([np.full((tokens.shape[0], 1), start),
                            tokens[:, :-1]], 1).astype(np.int32)
  logits = run.model.apply(
      {'params': params}, batch['input_ids'], batch['attention_mask'],
      jnp.asarray(decoder), jnp.ones_like(jnp.asarray(decoder)),
      deterministic=True, **kwargs)
  return np.asarray(logits, np.float32)


@pytest.mark.slow
def test_bf16_greedy_tokens_agree_with_fp32_where_margins_are_real():
  # pylint: disable=g-import-not-at-top
  from flaxlora import optimizers
  from flaxlora import steps
  from flaxlora.models import decoding
  # pylint: enable=g-import-not-at-top
  fp32, bf16 = (_run('t5_lora', {}, d, short=False)
                for d in ('float32', 'bfloat16'))
  tx = optimizers.optimizer(fp32.config.optimizer, 200, fp32.method)
  state, shardings = run_setup.init_state(fp32, tx)
  step = steps.jit_train_step(fp32.task.loss, fp32.method, tx, 1, shardings)
  loader = run_setup.loader(fp32, train=True)
  for _ in range(200):  # the copy task: a model with real margins
    state, _ = step(state, fp32.base,
                    run_setup.device_batch(fp32, next(loader)))
    # Synced as the trainer syncs (trainer.STEPS_IN_FLIGHT): XLA:CPU's
    # collectives abort with hundreds of steps queued over 8 host devices.
    jax.block_until_ready(state)
  batch = run_setup.device_batch(fp32, next(run_setup.loader(fp32, False)))
  tokens = {}
  for name, run in (('fp32', fp32), ('bf16', bf16)):
    params, kwargs = run.method.apply(run.base, state.adapter)
    tokens[name] = np.asarray(decoding.generate(
        run.model, params, batch['input_ids'], batch['attention_mask'],
        max_new_tokens=8, model_kwargs=kwargs))
  logits = {}
  for name, run in (('fp32', fp32), ('bf16', bf16)):
    params, kwargs = run.method.apply(run.base, state.adapter)
    logits[name] = _path_logits(run, params, kwargs, batch, tokens['fp32'])
  top2 = np.sort(logits['fp32'], -1)[..., -2:]
  margins = top2[..., 1] - top2[..., 0]                     # [B, N]
  # Steps up to the first EOS count (later ones are cut off as padding).
  eos = fp32.model.config.eos_token_id
  done = np.cumsum(tokens['fp32'] == eos, -1) - (tokens['fp32'] == eos) > 0
  # A clear row: every step's margin is 4x bf16's largest logit error.
  error = np.abs(logits['bf16'] - logits['fp32']).max()
  assert error > 0
  sure = np.where(done, np.inf, margins).min(-1) > 4 * error
  assert sure.sum() >= 4, (error, margins.min(-1))
  cut = lambda t: np.where(done, -1, t)  # pylint: disable=g-long-lambda
  np.testing.assert_array_equal(cut(tokens['bf16'])[sure],
                                cut(tokens['fp32'])[sure])
  assert len(np.unique(tokens['fp32'])) > 3  # not one repeated token
