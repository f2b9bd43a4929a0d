"""Many adapters on one base: one mixed batch vs one adapter per call.

    python -m experiments.benchmark multi --out /tmp/bench_multi.json
    python -m experiments.benchmark multi --quick     # tiny shapes, seconds

Eight LoRA adapters (ranks 4, 8, 16 in turn, alpha 16, with random
non-zero factors) on one randomly initialised base. Each workload serves 64
rows, 8 per adapter, two ways: `mixed`, one call of 64 rows over a
`multi` bank (each row names its adapter), and `sequential`, 8 calls of 8
rows, each with one adapter applied the usual way (`method.apply`, what a
user does with one adapter per call). Warm-up calls (every compilation)
are excluded; the passes of all runners are interleaved (A, B, A, B...) so
that a changing machine load hits them alike, and the median of
`--repeats` passes is reported as examples/s. The base model alone is
timed the same two ways (64 rows in one call, 8 calls of 8): `ceiling`,
their ratio, is the most batching can give on this machine, and
`bank_overhead` is the mixed call's time over the base's at 64 rows.

  t5_generate: T5-small shape (d_model 512, d_ff 2048, 6+6 layers, 8 heads,
    vocab 32128), q/v adapters, greedy `decoding.generate` of exactly 32
    new tokens (EOS suppressed) from 64-token sources.
  bert_classification: MiniLM-like BERT (hidden 384, 6 layers, 12 heads,
    intermediate 1536, vocab 30522), query/value adapters plus a trained
    classifier copy per adapter, 128-token inputs, 2 labels.

`lowrank_ms` times the one choice inside `multi.MultiLoraKernel`: x W plus
the per-row low-rank term x a[k] b[k] of one [64, T, 512] -> 512 kernel at
R = 16, by gathering each row's factors (what `multi` does for T > 1), by
one product over all K * R columns masked to each row's slot (`onehot`,
what it does for T = 1) and by
`jax.lax.ragged_dot` over rows sorted by adapter (skyrl-tx's grouping),
for T = 64 (an encoder call) and T = 1 (a decode step); `base_only` is
x W alone.
"""
import argparse
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from flaxlora.models import bert
from flaxlora.models import decoding
from flaxlora.models import t5
from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft import multi
from flaxlora.peft import trainable

FULL = dict(
    t5=dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8, d_kv=64,
            vocab_size=32128),
    bert=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, vocab_size=30522),
    adapters=8, rows_each=8, source=64, new_tokens=32, bert_length=128,
    ranks=(4, 8, 16))
QUICK = dict(
    t5=dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
            vocab_size=512),
    bert=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, vocab_size=512),
    adapters=4, rows_each=2, source=16, new_tokens=4, bert_length=16,
    ranks=(2, 4))


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int
                 ) -> dict[str, float]:
  """Median seconds of each runner; passes interleaved (A, B, A, B...) so
  that a changing load on the machine hits every runner alike."""
  for fn in fns.values():
    fn()  # warm-up: every compilation
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def _adapters(method_for, base, count, ranks):
  """[(method, adapter)] with N(0, 0.02) factors, ranks cycling."""
  pairs = []
  for i in range(count):
    method = method_for(ranks[i % len(ranks)])
    adapter = method.init(jax.random.PRNGKey(i), base)
    leaves, tree = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.PRNGKey(1000 + i), len(leaves))
    pairs.append((method, jax.tree.unflatten(tree, [
        x + 0.02 * jax.random.normal(k, x.shape)
        for x, k in zip(leaves, keys)])))
  return pairs


def _compare(name, pairs, base, run, rows, repeats):
  """Times mixed (one call over a bank) vs sequential (one per adapter),
  and the base model alone both ways (the most batching can give).

  run(params, row_slice) -> host outputs of those rows.
  """
  count, each = len(pairs), rows // len(pairs)
  bank = multi.stack(pairs, base)
  ids = np.repeat(np.arange(count, dtype=np.int32), each)
  mixed = lambda: run(multi.apply(base, bank, ids)[0], slice(0, rows))
  singles = [m.apply(base, a)[0] for m, a in pairs]
  parts = [slice(k * each, (k + 1) * each) for k in range(count)]
  sequential = lambda: [run(p, part) for p, part in zip(singles, parts)]
  agree = float(np.mean(np.concatenate(sequential()) == mixed()))
  seconds = _interleaved({
      'mixed': mixed, 'sequential': sequential,
      'base_batched': lambda: run(base, slice(0, rows)),
      'base_split': lambda: [run(base, part) for part in parts]}, repeats)
  result = {'seconds': seconds,
            'examples_per_s': {k: rows / v for k, v in seconds.items()},
            'ratio': seconds['sequential'] / seconds['mixed'],
            'ceiling': seconds['base_split'] / seconds['base_batched'],
            'bank_overhead': seconds['mixed'] / seconds['base_batched'],
            'agreement': agree}
  print(f'{name:20s} mixed {rows / seconds["mixed"]:8.1f} ex/s, sequential '
        f'{rows / seconds["sequential"]:8.1f} ex/s, ratio '
        f'{result["ratio"]:.2f}x (base alone: ceiling '
        f'{result["ceiling"]:.2f}x; mixed / base {result["bank_overhead"]:.2f}'
        f'), outputs equal {agree:.3f}', flush=True)
  return result


def t5_generate(shape, repeats):
  config = t5.T5Config(dropout_rate=0.0, **shape['t5'])
  model = t5.build(config)
  base = t5.init(model, jax.random.PRNGKey(0))
  pairs = _adapters(lambda r: lora.lora(rank=r, alpha=16, targets='t5'),
                    base, shape['adapters'], shape['ranks'])
  rows = shape['adapters'] * shape['rows_each']
  rng = np.random.RandomState(0)
  ids = rng.randint(2, config.vocab_size, (rows, shape['source']))
  mask = np.ones_like(ids)
  new = shape['new_tokens']

  def run(params, part):
    return np.asarray(decoding.generate(
        model, params, ids[part], mask[part], max_new_tokens=new,
        min_new_tokens=new))
  return _compare('t5_generate', pairs, base, run, rows, repeats)


def bert_classification(shape, repeats):
  config = bert.BertConfig(hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, **shape['bert'])
  model = bert.build(config, head='classification', num_labels=2)
  base = bert.init(model, jax.random.PRNGKey(0))
  pairs = _adapters(lambda r: peft_base.chain(
      lora.lora(rank=r, alpha=16, targets='bert'),
      trainable.trainable(r'classifier/.*')), base, shape['adapters'],
                    shape['ranks'])
  rows = shape['adapters'] * shape['rows_each']
  rng = np.random.RandomState(0)
  ids = rng.randint(1, config.vocab_size, (rows, shape['bert_length']))
  forward = jax.jit(lambda params, ids: jnp.argmax(
      model.apply({'params': params}, ids, jnp.ones_like(ids)), -1))

  def run(params, part):
    return np.asarray(forward(params, ids[part]))
  return _compare('bert_classification', pairs, base, run, rows, repeats)


def _library(low_rank):
  """One of `multi`'s two forms of the low-rank term, at scale 1."""
  return lambda x, a, b, slot: low_rank(
      x, a, b, slot, jnp.ones(slot.shape, jnp.float32), jnp.float32)


def _ragged(x, a, b, slot):
  """Rows sorted by adapter, one `ragged_dot` group per adapter."""
  rows, length, width = x.shape
  token_slot = jnp.repeat(slot, length)
  order = jnp.argsort(token_slot)
  sizes = jnp.bincount(token_slot, length=a.shape[0]).astype(jnp.int32)
  h = jax.lax.ragged_dot(x.reshape(-1, width)[order], a, sizes)
  y = jax.lax.ragged_dot(h, b, sizes)[jnp.argsort(order)]
  return y.reshape(rows, length, -1)


def lowrank_ms(repeats: int, adapters=8, rows=64, width=512, rank=16
               ) -> dict[str, float]:
  """ms per call of x W plus the per-row low-rank term, by each way."""
  rng = np.random.RandomState(0)
  a = jnp.asarray(rng.randn(adapters, width, rank), jnp.float32)
  b = jnp.asarray(rng.randn(adapters, rank, width), jnp.float32)
  w = jnp.asarray(rng.randn(width, width), jnp.float32)
  slot = jnp.asarray(np.repeat(np.arange(adapters), rows // adapters))
  out = {}
  for length in (64, 1):
    x = jnp.asarray(rng.randn(rows, length, width), jnp.float32)
    calls = 10 if length > 1 else 200
    fns = {}
    for name, fn in (('base_only', lambda x, a, b, slot: 0.0),
                     ('gather', _library(multi.gathered_low_rank)),
                     ('onehot', _library(multi.one_hot_low_rank)),
                     ('ragged_dot', _ragged)):
      f = jax.jit(lambda x, a, b, slot, fn=fn: x @ w + fn(x, a, b, slot))
      fns[name] = lambda f=f, x=x: [f(x, a, b, slot).block_until_ready()
                                    for _ in range(calls)]
    for name, sec in _interleaved(fns, repeats).items():
      out[f'{name}_T{length}'] = 1e3 * sec / calls
      print(f'x W + low-rank term {name:10s} T={length:3d} '
            f'{out[f"{name}_T{length}"]:8.3f} ms', flush=True)
  return out


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      prog='python -m experiments.benchmark multi', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help='tiny shapes, for a smoke run in seconds')
  parser.add_argument('--repeats', type=int, default=3,
                      help='timed passes per runner (median reported)')
  parser.add_argument('--out', default=None,
                      help='write the results as JSON to this file')
  args = parser.parse_args(argv)
  shape = QUICK if args.quick else FULL
  results = {'shape': shape, 'repeats': args.repeats,
             'cpu_count': os.cpu_count(),
             'jax_backend': jax.default_backend(),
             'lowrank_ms': (lowrank_ms(1, adapters=4, rows=8, width=64,
                                       rank=4) if args.quick
                            else lowrank_ms(args.repeats)),
             't5_generate': t5_generate(shape, args.repeats),
             'bert_classification': bert_classification(shape, args.repeats)}
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2)
    print(f'wrote {args.out}')
  return results


if __name__ == '__main__':
  main()
