"""Greedy generation throughput: flaxlora vs transformers, same process.

    python -m experiments.benchmark generate --out /tmp/bench_generate.json
    python -m experiments.benchmark generate --quick     # tiny shapes, seconds
    python -m experiments.benchmark generate --only llama

`--only llama` times a causal LM instead (`run_llama`): a random Llama of
SmolLM2-135M's shape (hidden 576, 30 layers, 9 query / 3 key-value heads,
MLP 1536, vocab 49152, tied output) continuing 8 prompts of 256 tokens by
exactly 64 tokens, transformers fp32 and bf16 autocast vs flaxlora fp32 and
bf16 compute (`causal_decoding`), with the fp32 token agreement.

The default (`--only t5`):

A random T5-small-shaped model (d_model 512, d_ff 2048, 6+6 layers, 8 heads,
d_kv 64, vocab 32128) is built in transformers, saved, and loaded into
flaxlora. Both greedily decode a batch of 8 sources of 256 tokens for exactly
64 new tokens (EOS suppressed with min_new_tokens, so no early stop), both
with a key/value cache, encoder included. Timed: PyTorch fp32, PyTorch under
bf16 autocast, flaxlora fp32 and flaxlora bf16 compute, and flaxlora fp32
with its params split over a 'tensor' mesh of `--cpu_devices` XLA CPU devices
(default: one per core; heads, FFN and vocabulary sharded by the standard
rules): the decode loop is bound by reading the weights, and each core then
reads half of them. One warm-up call (compilation for flaxlora) is excluded
and the median of `--repeats` calls is reported as generated tokens per
second.

The fp32 rows are also split into the encoder (a call that generates one
token) and the decode loop (the rest of a full call, per generated token
after the first): `encoder_s` and `loop_ms_per_step` in the JSON.
"""
import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flaxlora import models
from flaxlora import provenance
from flaxlora import sharding
from flaxlora.models import causal_decoding
from flaxlora.models import decoding
from flaxlora.models import llama
from flaxlora.models import t5

FULL = dict(model=dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8,
                       d_kv=64, vocab_size=32128),
            batch=8, source=256, new_tokens=64)
QUICK = dict(model=dict(d_model=64, d_ff=128, num_layers=2, num_heads=4,
                        d_kv=16, vocab_size=512),
             batch=2, source=32, new_tokens=8)


LLAMA_FULL = dict(model=dict(vocab_size=49152, hidden_size=576,
                             intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3,
                             rope_theta=100000.0, tie_word_embeddings=True),
                  batch=8, source=256, new_tokens=64)
LLAMA_QUICK = dict(model=dict(vocab_size=512, hidden_size=64,
                              intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=True),
                   batch=2, source=32, new_tokens=8)


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  fn()  # warm-up: compilation, caches, allocator
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _torch_model(shape, folder):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = transformers.T5Config(decoder_start_token_id=0, dropout_rate=0.0,
                                 **shape['model'])
  model = transformers.T5ForConditionalGeneration(config).eval()
  model.save_pretrained(folder)
  return model


def _torch_runner(model, ids, mask, new_tokens, autocast: bool):
  import torch  # pylint: disable=g-import-not-at-top
  ids, mask = torch.tensor(ids), torch.tensor(mask)

  def run():
    with torch.inference_mode(), torch.autocast(
        'cpu', dtype=torch.bfloat16, enabled=autocast):
      return model.generate(
          ids, attention_mask=mask, max_new_tokens=new_tokens,
          min_new_tokens=new_tokens, do_sample=False, num_beams=1).numpy()
  return run


def _flax_runner(model, params, ids, mask, new_tokens):
  def run():
    return np.asarray(jax.block_until_ready(decoding.generate(
        model, params, ids, mask, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens)))
  return run


def _tensor_parallel(model, params, devices: int):
  """`params` placed on a (data 1, tensor `devices`) mesh by the standard
  logical-axis rules."""
  mesh = sharding.make_mesh({'data': 1, 'tensor': devices},
                            devices=jax.devices()[:devices])
  shardings = sharding.named_shardings(params, t5.logical_axes(model), mesh,
                                       sharding.resolve_rules(None))
  return jax.device_put(params, shardings)


def _split(one_token_runners: dict[str, Callable[[], Any]],
           full_seconds: dict[str, float], new_tokens: int,
           repeats: int) -> dict[str, dict[str, float]]:
  """Encoder seconds (a one-token call) and decode-loop ms per later step."""
  split = {}
  for name, run in one_token_runners.items():
    first = _median_seconds(run, repeats)
    loop = (full_seconds[name] - first) / max(new_tokens - 1, 1)
    split[name] = {'encoder_s': first, 'loop_ms_per_step': 1e3 * loop}
    print(f'{name:22s} encoder + 1 token {first:7.3f} s, loop '
          f'{1e3 * loop:8.2f} ms/step', flush=True)
  ratio = (split['torch_fp32']['loop_ms_per_step'] /
           split['flaxlora_fp32']['loop_ms_per_step'])
  print(f'fp32 decode loop alone, flaxlora vs torch: {ratio:.2f}x')
  return split


def run_benchmark(shape: dict[str, Any], repeats: int,
                  cpu_devices: int = 1) -> dict[str, Any]:
  """Times the runners on `shape`; returns a JSON-able dict."""
  rng = np.random.RandomState(0)
  batch, source, new = shape['batch'], shape['source'], shape['new_tokens']
  ids = rng.randint(2, shape['model']['vocab_size'], (batch, source))
  mask = np.ones_like(ids)
  with tempfile.TemporaryDirectory() as folder:
    torch_model = _torch_model(shape, folder)
    model, params, config = models.load(folder)
  runners = {
      'torch_fp32': _torch_runner(torch_model, ids, mask, new, False),
      'torch_bf16_autocast': _torch_runner(torch_model, ids, mask, new, True),
      'flaxlora_fp32': _flax_runner(model, params, ids, mask, new),
      'flaxlora_bf16': _flax_runner(t5.build(config, dtype=jnp.bfloat16),
                                    params, ids, mask, new),
  }
  if cpu_devices > 1:
    runners['flaxlora_fp32_tp'] = _flax_runner(
        model, _tensor_parallel(model, params, cpu_devices), ids, mask, new)
  # Same greedy tokens in fp32 (the generated part; HF adds the start token).
  tokens = runners['flaxlora_fp32']()
  same = float(np.mean(runners['torch_fp32']()[:, 1:] == tokens))
  same_tp = (float(np.mean(runners['flaxlora_fp32_tp']() == tokens))
             if cpu_devices > 1 else None)
  results = {'model': 't5', 'shape': shape, 'repeats': repeats,
             'fp32_token_agreement': same,
             'tp_devices': cpu_devices,
             'fp32_tp_token_agreement_with_fp32': same_tp,
             'cpu_count': os.cpu_count(), 'jax_backend': jax.default_backend(),
             'seconds': {}, 'tokens_per_s': {}, 'ms_per_step': {}}
  for name, run in runners.items():
    seconds = _median_seconds(run, repeats)
    results['seconds'][name] = seconds
    results['tokens_per_s'][name] = batch * new / seconds
    results['ms_per_step'][name] = 1e3 * seconds / new
    print(f'{name:22s} {batch * new / seconds:9.1f} tokens/s '
          f'{1e3 * seconds / new:8.2f} ms/step', flush=True)
  results['split'] = _split(
      {'torch_fp32': _torch_runner(torch_model, ids, mask, 1, False),
       'flaxlora_fp32': _flax_runner(model, params, ids, mask, 1)},
      results['seconds'], new, repeats)
  tps = results['tokens_per_s']
  results['ratios'] = {
      f'{ours}/{theirs}': tps[ours] / tps[theirs]
      for ours in ('flaxlora_fp32', 'flaxlora_bf16', 'flaxlora_fp32_tp')
      for theirs in ('torch_fp32', 'torch_bf16_autocast') if ours in tps}
  for key, ratio in results['ratios'].items():
    print(f'{key:40s} {ratio:6.2f}x')
  print(f'fp32 greedy token agreement with transformers: {same:.3f}')
  if same_tp is not None:
    print(f'fp32 tensor-parallel tokens equal to one device: {same_tp:.3f}')
  return results


def _llama_runners(shape, folder, ids, mask):
  """{name: run() -> new tokens [B, L]} of transformers and flaxlora."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      bos_token_id=1, eos_token_id=2, pad_token_id=2,
      **shape['model'])).eval()
  hf.save_pretrained(folder)
  model, params, config = models.load(folder)
  new = shape['new_tokens']
  t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)

  def torch_run(autocast):
    def run():
      with torch.inference_mode(), torch.autocast(
          'cpu', dtype=torch.bfloat16, enabled=autocast):
        out = hf.generate(t_ids, attention_mask=t_mask, max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, num_beams=1)
      return out[:, ids.shape[1]:].numpy()
    return run

  def flax_run(m):
    def run():
      return np.asarray(jax.block_until_ready(causal_decoding.generate(
          m, params, ids, mask, max_new_tokens=new, min_new_tokens=new)))
    return run

  return {'torch_fp32': torch_run(False), 'torch_bf16_autocast':
          torch_run(True), 'flaxlora_fp32': flax_run(model),
          'flaxlora_bf16': flax_run(llama.build(config, dtype=jnp.bfloat16))}


def run_llama(shape: dict[str, Any], repeats: int) -> dict[str, Any]:
  """Times greedy decoding of a causal LM (see the module docstring)."""
  rng = np.random.RandomState(0)
  batch, new = shape['batch'], shape['new_tokens']
  ids = rng.randint(3, shape['model']['vocab_size'], (batch, shape['source']))
  mask = np.ones_like(ids)
  with tempfile.TemporaryDirectory() as folder:
    runners = _llama_runners(shape, folder, ids, mask)
  same = float(np.mean(runners['torch_fp32']() ==
                       runners['flaxlora_fp32']()))
  results = {'model': 'llama', 'shape': shape, 'repeats': repeats,
             'fp32_token_agreement': same, 'cpu_count': os.cpu_count(),
             'seconds': {}, 'tokens_per_s': {}}
  for name, run in runners.items():
    seconds = _median_seconds(run, repeats)
    results['seconds'][name] = seconds
    results['tokens_per_s'][name] = batch * new / seconds
    print(f'{name:22s} {batch * new / seconds:9.1f} tokens/s', flush=True)
  tps = results['tokens_per_s']
  results['ratios'] = {
      f'{ours}/{theirs}': tps[ours] / tps[theirs]
      for ours in ('flaxlora_fp32', 'flaxlora_bf16')
      for theirs in ('torch_fp32', 'torch_bf16_autocast')}
  results['fastest_vs_fastest'] = (
      max(tps['flaxlora_fp32'], tps['flaxlora_bf16']) /
      max(tps['torch_fp32'], tps['torch_bf16_autocast']))
  for key, ratio in results['ratios'].items():
    print(f'{key:40s} {ratio:6.2f}x')
  print(f'fastest vs fastest: {results["fastest_vs_fastest"]:.2f}x; fp32 '
        f'greedy token agreement with transformers: {same:.3f}')
  return results


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      prog='python -m experiments.benchmark generate', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help='tiny shapes, for a smoke run in seconds')
  parser.add_argument('--repeats', type=int, default=3,
                      help='timed calls per runner (median reported)')
  parser.add_argument('--out', default=None,
                      help='write the results as JSON to this file')
  parser.add_argument('--cpu_devices', type=int, default=os.cpu_count() or 1,
                      help='XLA CPU devices of the flaxlora_fp32_tp runner '
                      '(default: one per core); 1 drops it')
  parser.add_argument('--only', choices=('t5', 'llama'), default='t5',
                      help='the model to time (see above)')
  args = parser.parse_args(argv)
  if args.only == 'llama':
    results = run_llama(LLAMA_QUICK if args.quick else LLAMA_FULL,
                        args.repeats)
  else:
    if args.cpu_devices > 1:  # before JAX starts its CPU backend
      jax.config.update('jax_num_cpu_devices', args.cpu_devices)
    results = run_benchmark(QUICK if args.quick else FULL, args.repeats,
                            args.cpu_devices)
  results.update(provenance.record())
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2)
    print(f'wrote {args.out}')
  return results


if __name__ == '__main__':
  main()
