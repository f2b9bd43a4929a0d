"""LoRA train-step benchmark: flaxlora vs PEFT + PyTorch, side by side.

    python -m experiments.benchmark lora            # full (minutes)
    python -m experiments.benchmark lora --quick    # tiny shapes, seconds
    python -m experiments.bench_lora --out /tmp/bench_lora.json

One process times a LoRA train step (forward, backward, AdamW) on
  * a T5-small-shaped random model (d_model 512, d_ff 2048, 6+6 layers,
    8 heads, vocab 32128; batch 8, source 256, target 64; r=8, alpha 16 on
    q, v; model dropout 0.1), as flaxlora fp32, flaxlora mixed (bf16
    compute, fp32 adapter and optimizer), flaxlora full fine-tuning, PEFT
    fp32 and PEFT under bf16 autocast;
  * a MiniLM-shaped BERT classifier (hidden 384, 6 layers, 12 heads; batch
    32, length 128; r=8 on query, value; classifier head trained), flaxlora
    vs PEFT, fp32.
The `*_fp32_dp` rows run the same flaxlora fp32 step data-parallel over
`--cpu_devices` XLA CPU devices (default: one per core; the batch split over
a 'data' mesh, as `experiments.run --cpu_devices` trains): XLA:CPU runs each
batched attention product on one thread, so one device per core lets two of
them run at once. The plain rows use one device.
It prints medians, speed ratios, peak RSS and achieved FLOP/s as a fraction
of a measured fp32 matmul peak, and writes everything to JSON. Step flops
come from XLA's cost analysis of the flaxlora step (PEFT does the same math,
so its FLOP/s uses the same count).
"""
import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import jax.numpy as jnp
import numpy as np
import optax
import psutil

from flaxlora import host_memory
from flaxlora import sharding
from flaxlora.models import bert
from flaxlora.models import t5
from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft import trainable


@dataclasses.dataclass(frozen=True)
class Shapes:
  """Model and batch sizes of one benchmark size."""
  t5: dict[str, Any]
  t5_batch: tuple[int, int, int]        # B, S, T
  bert: dict[str, Any]
  bert_batch: tuple[int, int]           # B, T
  rank: int = 8


FULL = Shapes(
    t5=dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
            num_heads=8, dropout_rate=0.1),
    t5_batch=(8, 256, 64),
    bert=dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
              num_attention_heads=12, intermediate_size=1536,
              max_position_embeddings=512),
    bert_batch=(32, 128))
QUICK = Shapes(
    t5=dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2,
            num_heads=4, dropout_rate=0.1),
    t5_batch=(2, 32, 8),
    bert=dict(vocab_size=256, hidden_size=64, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=64),
    bert_batch=(4, 32), rank=4)


class PeakRss:
  """Samples this process's RSS in a thread; `peak` is the max seen (bytes)."""

  def __init__(self, interval: float = 0.005):
    self.interval, self.peak = interval, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._process = psutil.Process()

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._process.memory_info().rss)
      time.sleep(self.interval)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def time_steps(step: Callable[[], Any], steps: int, warmup: int
               ) -> dict[str, Any]:
  """Median seconds of `step()` (which blocks) after `warmup` calls."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {'median_s': statistics.median(times), 'times_s': times}


def matmul_peak(n: int) -> dict[str, float]:
  """Measured fp32 matmul FLOP/s of JAX and torch on [n, n] x [n, n].

  The fastest of 7 runs: on a shared machine that is the closest to peak.
  """
  import torch  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  jax_t = min(time_steps(lambda: mm(x).block_until_ready(), 7, 2)['times_s'])
  tx = torch.randn(n, n)
  torch_t = min(time_steps(lambda: tx @ tx, 7, 2)['times_s'])
  return {'jax_flops_per_s': 2 * n**3 / jax_t,
          'torch_flops_per_s': 2 * n**3 / torch_t}


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get('flops', 0.0))


def _xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def flax_step(model, base, method, loss_inputs, *, full: bool,
              devices: int = 1):
  """A jitted train step closure for flaxlora; returns (step, flops).

  With full=True the whole params tree trains (full fine-tuning) and the
  method is not used. With devices > 1 the batch is split over a 'data' mesh
  of the first `devices` devices and everything else is replicated.
  """
  tx = optax.adamw(1e-4)
  rng = jax.random.PRNGKey(1)
  trained = base if full else method.init(rng, base)
  frozen = None if full else base

  def loss_fn(trained, frozen, batch, rng):
    params = trained if full else method.apply(frozen, trained)[0]
    *inputs, labels = batch
    out = model.apply({'params': params}, *inputs, deterministic=False,
                      rngs={'dropout': rng})
    return _xent(out, labels)

  def step(trained, opt_state, frozen, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(trained, frozen, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state, loss

  mesh = sharding.make_mesh({'data': -1}, devices=jax.devices()[:devices])
  replicated = NamedSharding(mesh, PartitionSpec())
  loss_inputs = jax.device_put(loss_inputs,
                               NamedSharding(mesh, PartitionSpec('data')))
  trained, frozen = jax.device_put((trained, frozen), replicated)
  jitted = jax.jit(step, donate_argnums=(0, 1), out_shardings=replicated)
  state = [trained, jax.device_put(tx.init(trained), replicated), 0]
  compiled = jitted.lower(state[0], state[1], frozen, loss_inputs,
                          rng).compile()

  def run():
    state[2] += 1
    state[0], state[1], loss = compiled(state[0], state[1], frozen,
                                        loss_inputs,
                                        jax.random.fold_in(rng, state[2]))
    loss.block_until_ready()

  return run, _flops(compiled) * devices  # cost analysis: one device's


def _t5_batch(shapes: Shapes, seed: int = 0):
  b, s, t = shapes.t5_batch
  rng = np.random.RandomState(seed)
  v = shapes.t5['vocab_size']
  return (rng.randint(2, v, (b, s)), np.ones((b, s), np.int64),
          rng.randint(2, v, (b, t)), rng.randint(2, v, (b, t)))


def _bert_batch(shapes: Shapes, seed: int = 0):
  b, t = shapes.bert_batch
  rng = np.random.RandomState(seed)
  return (rng.randint(1, shapes.bert['vocab_size'], (b, t)),
          np.ones((b, t), np.int64), rng.randint(0, 2, (b,)))


def flax_t5(shapes: Shapes, variant: str, devices: int = 1):
  """variant: 'fp32', 'mixed' (bf16 compute, bf16 frozen base), 'full', or
  'nodrop' (fp32 LoRA with model dropout 0: measures dropout's share);
  devices: data-parallel over this many devices."""
  mixed = variant == 'mixed'
  config = dict(shapes.t5, dropout_rate=0.0) if variant == 'nodrop' else (
      shapes.t5)
  model = t5.build(t5.T5Config(**config),
                   dtype=jnp.bfloat16 if mixed else jnp.float32)
  base = t5.init(model, jax.random.PRNGKey(0))
  if mixed:  # frozen weights are only read in bf16; store them so, once
    base = jax.tree.map(lambda w: w.astype(jnp.bfloat16), base)
  src, src_mask, dec, labels = (jnp.asarray(a, jnp.int32)
                                for a in _t5_batch(shapes))
  method = lora.lora(rank=shapes.rank, alpha=16, targets='t5')
  return flax_step(model, base, method, (src, src_mask, dec, labels),
                   full=variant == 'full', devices=devices)


def flax_bert(shapes: Shapes, variant: str, devices: int = 1):
  """variant: 'fp32' (LoRA + trained head) or 'full'; devices: as flax_t5."""
  model = bert.build(bert.BertConfig(**shapes.bert), head='classification',
                     num_labels=2)
  base = bert.init(model, jax.random.PRNGKey(0))
  ids, mask, labels = (jnp.asarray(a, jnp.int32)
                       for a in _bert_batch(shapes))
  method = peft_base.chain(
      lora.lora(rank=shapes.rank, alpha=16, targets='bert'),
      trainable.trainable(r'classifier/.*'))
  return flax_step(model, base, method, (ids, mask, labels),
                   full=variant == 'full', devices=devices)


def _torch_step(model, batch_fn, autocast: bool):
  import torch  # pylint: disable=g-import-not-at-top
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                          lr=1e-4)
  model.train()

  def run():
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
      loss = model(**batch_fn()).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  return run


def peft_t5(shapes: Shapes, autocast: bool):
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(
      transformers.T5Config(**shapes.t5, decoder_start_token_id=0))
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=shapes.rank, lora_alpha=16, target_modules=['q', 'v'],
      task_type='SEQ_2_SEQ_LM'))
  src, src_mask, _, labels = (torch.tensor(a) for a in _t5_batch(shapes))
  batch = dict(input_ids=src, attention_mask=src_mask, labels=labels)
  return _torch_step(model, lambda: batch, autocast)


def peft_bert(shapes: Shapes, autocast: bool):
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = transformers.BertForSequenceClassification(
      transformers.BertConfig(**shapes.bert, num_labels=2))
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=shapes.rank, lora_alpha=16, target_modules=['query', 'value'],
      task_type='SEQ_CLS'))  # SEQ_CLS also trains the classifier
  ids, mask, labels = (torch.tensor(a) for a in _bert_batch(shapes))
  batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
  return _torch_step(model, lambda: batch, autocast)


def measure(contenders: dict[str, Callable[[], Any]], steps: int,
            warmup: int) -> dict[str, Any]:
  """Builds all contenders, then times them round-robin.

  Interleaving the steps (A, B, C, A, B, C, ...) spreads the load of a
  shared machine evenly over the contenders. Memory of a contender is the
  peak RSS growth while it is built and warmed up (params, optimizer state,
  peak activations).
  """
  built = {}
  for name, build in contenders.items():
    gc.collect()
    before = psutil.Process().memory_info().rss
    with PeakRss() as rss:
      made = build()
      step, flops = made if isinstance(made, tuple) else (made, None)
      for _ in range(warmup):
        step()
    built[name] = (step, flops, (rss.peak - before) / 2**20)
    print(f'  built {name:<18} +{built[name][2]:7.0f} MB', flush=True)
  times = {name: [] for name in built}
  for _ in range(steps):
    for name, (step, _, _) in built.items():
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  results = {}
  for name, (_, flops, memory) in built.items():
    results[name] = {'median_s': statistics.median(times[name]),
                     'min_s': min(times[name]), 'times_s': times[name],
                     'peak_rss_growth_mb': memory, 'step_flops': flops}
    print(f'  {name:<18} median {results[name]["median_s"] * 1e3:9.1f} ms',
          flush=True)
  return results


def _ratio(results, slow: str, fast: str, stat: str = 'median_s'
           ) -> float | None:
  if slow in results and fast in results:
    return results[slow][stat] / results[fast][stat]
  return None


def summarize(results: dict[str, Any], peak: dict[str, float]
              ) -> dict[str, Any]:
  """Speed-ups (slow time / fast time; > 1: flaxlora faster), the LoRA
  step time as a fraction of full fine-tuning's, dropout's share of the
  step, and FLOP/s as a fraction of the matmul peak."""
  fastest = lambda names: min((n for n in names if n in results),
                              key=lambda n: results[n]['median_s'],
                              default=None)
  flax_best = fastest(['t5/flax_fp32', 't5/flax_mixed'])
  peft_best = fastest(['t5/peft_fp32', 't5/peft_bf16'])
  summary = {
      't5_flax_fp32_vs_peft_fp32': _ratio(results, 't5/peft_fp32',
                                          't5/flax_fp32'),
      't5_fastest_vs_fastest': (_ratio(results, peft_best, flax_best)
                                if flax_best and peft_best else None),
      't5_fastest': {'flax': flax_best, 'peft': peft_best},
      't5_lora_over_full_step': _ratio(results, 't5/flax_fp32',
                                       't5/flax_full'),
      'bert_flax_fp32_vs_peft_fp32': _ratio(results, 'bert/peft_fp32',
                                            'bert/flax_fp32'),
      # The same step data-parallel over one XLA CPU device per core.
      't5_flax_fp32_dp_vs_peft_fp32': _ratio(results, 't5/peft_fp32',
                                             't5/flax_fp32_dp'),
      'bert_flax_fp32_dp_vs_peft_fp32': _ratio(results, 'bert/peft_fp32',
                                               'bert/flax_fp32_dp'),
      'bert_lora_over_full_step': _ratio(results, 'bert/flax_fp32',
                                         'bert/flax_full'),
      # Fastest steps: the least disturbed by other load on the machine.
      't5_flax_fp32_vs_peft_fp32_min': _ratio(results, 't5/peft_fp32',
                                              't5/flax_fp32', 'min_s'),
      'bert_flax_fp32_vs_peft_fp32_min': _ratio(results, 'bert/peft_fp32',
                                                'bert/flax_fp32', 'min_s'),
      't5_model_dropout_share_of_lora_step': (
          1.0 - 1.0 / _ratio(results, 't5/flax_fp32', 't5/flax_fp32_nodrop')
          if 't5/flax_fp32_nodrop' in results else None),
  }
  for name, numbers in results.items():
    model = name.split('/')[0]
    # PEFT does the math of flaxlora's LoRA step: count it with its flops.
    flops = numbers['step_flops'] or results.get(f'{model}/flax_fp32',
                                                 {}).get('step_flops')
    if flops:
      rate = flops / numbers['median_s']
      key = 'torch' if 'peft' in name else 'jax'
      numbers['flops_per_s'] = rate
      numbers['fraction_of_matmul_peak'] = rate / peak[f'{key}_flops_per_s']
  return summary


def _parse(argv):
  parser = argparse.ArgumentParser(
      prog='bench_lora', description=__doc__,
      formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='tiny shapes')
  parser.add_argument('--steps', type=int, default=None,
                      help='timed steps per contender (default 5; quick 3)')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--only', choices=('t5', 'bert'), default=None)
  parser.add_argument('--cpu_devices', type=int, default=os.cpu_count() or 1,
                      help='XLA CPU devices of the *_fp32_dp rows (default: '
                      'one per core); 1 drops those rows')
  parser.add_argument('--prng', default='unsafe_rbg',
                      choices=('threefry2x32', 'rbg', 'unsafe_rbg'),
                      help="JAX PRNG of the models' dropout masks; on CPU "
                      'unsafe_rbg draws them ~10%% faster than threefry')
  parser.add_argument('--out', default='bench_lora.json', help='JSON file')
  return parser.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
  args = _parse(sys.argv[1:] if argv is None else argv)
  jax.config.update('jax_default_prng_impl', args.prng)
  dp = args.cpu_devices
  if dp > 1:  # before JAX starts its CPU backend
    jax.config.update('jax_num_cpu_devices', dp)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  shapes = QUICK if args.quick else FULL
  steps = args.steps or (3 if args.quick else 5)
  size = 256 if args.quick else 1024
  peak = matmul_peak(size)
  print(f'fp32 matmul peak: jax {peak["jax_flops_per_s"] / 1e9:.1f} GFLOP/s,'
        f' torch {peak["torch_flops_per_s"] / 1e9:.1f} GFLOP/s; '
        f'{os.cpu_count()} CPUs (shared machines make numbers noisy)')
  groups = {
      't5': {
          't5/flax_fp32': lambda: flax_t5(shapes, 'fp32'),
          't5/flax_mixed': lambda: flax_t5(shapes, 'mixed'),
          't5/flax_full': lambda: flax_t5(shapes, 'full'),
          't5/flax_fp32_nodrop': lambda: flax_t5(shapes, 'nodrop'),
          't5/peft_fp32': lambda: peft_t5(shapes, False),
          't5/peft_bf16': lambda: peft_t5(shapes, True),
      },
      'bert': {
          'bert/flax_fp32': lambda: flax_bert(shapes, 'fp32'),
          'bert/flax_full': lambda: flax_bert(shapes, 'full'),
          'bert/peft_fp32': lambda: peft_bert(shapes, False),
      },
  }
  if dp > 1:
    groups['t5']['t5/flax_fp32_dp'] = lambda: flax_t5(shapes, 'fp32', dp)
    groups['bert']['bert/flax_fp32_dp'] = lambda: flax_bert(shapes, 'fp32',
                                                            dp)
  results = {}
  for group, contenders in groups.items():
    if args.only in (None, group):
      print(f'{group}:', flush=True)
      results.update(measure(contenders, steps, args.warmup))
      gc.collect()
  later = matmul_peak(size)  # the load may have changed meanwhile
  peak = {k: max(v, later[k]) for k, v in peak.items()}
  summary = summarize(results, peak)
  report = {'shapes': dataclasses.asdict(shapes), 'quick': args.quick,
            'steps': steps, 'prng': args.prng, 'cpus': os.cpu_count(),
            'cpu_devices_of_dp_rows': dp,
            'host_memory_kept': host_memory.kept(),
            'matmul_peak': peak, 'results': results, 'summary': summary}
  print(json.dumps(summary, indent=2))
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=2)
  print(f'wrote {args.out}')
  return report


if __name__ == '__main__':
  main()
