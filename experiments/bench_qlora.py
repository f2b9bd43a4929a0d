r"""QLoRA vs LoRA: bytes of the frozen base, train-step memory and step time.

  python -m experiments.benchmark qlora [--quick] [--out qlora.json]
  python -m experiments.bench_qlora --quick

Measures, side by side in one process:
  1. NF4 bytes of quantised kernels vs their fp32 bytes, from real arrays
     (one T5-small-shaped block's kernels; the whole tiny model in --quick);
  2. the whole frozen base of T5-small and T5-base shapes, fp32 vs QLoRA
     (kernels NF4, embeddings/norms fp32), from `jax.eval_shape` (no arrays);
  3. peak memory of a jitted train step (XLA's memory analysis of the
     compiled step: arguments + outputs + temporaries - aliased) and
  4. median step time on CPU, for QLoRA and LoRA on the same model, batch
     and adapter (r=8 on q, v; AdamW; grads w.r.t. the adapter only).
"""
import argparse
import json
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxlora.models import t5
from flaxlora.peft import lora
from flaxlora.peft import qlora
from flaxlora.peft.qlora import nf4

SHAPES = {
    't5-small': dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048,
                     num_layers=6, num_heads=8),
    't5-base': dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072,
                    num_layers=12, num_heads=12),
    'tiny': dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128,
                 num_layers=2, num_heads=4),
}
TARGETS = r'.*/(q|v)/kernel'


def _bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def kernel_ratio(base: Any) -> dict[str, float]:
  """NF4 bytes / fp32 bytes of every kernel of `base` (real arrays)."""
  quantized = nf4.quantize_params(base)
  nodes = [v for v in jax.tree.leaves(quantized, is_leaf=nf4.is_nf4)
           if nf4.is_nf4(v)]
  fp32 = sum(4 * n.shape[0] * n.shape[1] for n in nodes)
  packed = sum(n.nbytes() for n in nodes)
  return {'kernels': len(nodes), 'fp32_bytes': fp32, 'nf4_bytes': packed,
          'ratio': packed / fp32}


def abstract_base(name: str) -> tuple[Any, Any]:
  """(model, ShapeDtypeStruct params) of a T5 shape, without arrays."""
  model = t5.build(t5.T5Config(**SHAPES[name], dropout_rate=0.0))
  ids = jnp.ones((1, 1), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, ids, ids)
  return model, jax.tree.map(lambda b: getattr(b, 'value', b),
                             variables['params'],
                             is_leaf=lambda b: hasattr(b, 'value'))


def whole_base(name: str) -> dict[str, float]:
  """fp32 vs QLoRA bytes of the whole frozen base (eval_shape)."""
  _, abstract = abstract_base(name)
  quantized = jax.eval_shape(nf4.quantize_params, abstract)
  fp32, q = _bytes(abstract), _bytes(quantized)
  return {'params': int(sum(np.prod(x.shape) for x in
                            jax.tree.leaves(abstract))),
          'fp32_bytes': fp32, 'qlora_bytes': q, 'ratio': q / fp32}


def _step_fn(model, method, tx):
  def loss(adapter, base, batch):
    params, kw = method.apply(base, adapter)
    logits = model.apply({'params': params}, batch['ids'], batch['mask'],
                         batch['dec'], **kw).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch['labels'][..., None],
                                         -1))

  def step(adapter, opt_state, base, batch):
    value, grads = jax.value_and_grad(loss)(adapter, base, batch)
    updates, opt_state = tx.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, value

  return jax.jit(step, donate_argnums=(0, 1))


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes +
          m.temp_size_in_bytes - m.alias_size_in_bytes)
  return {'argument_bytes': int(m.argument_size_in_bytes),
          'temp_bytes': int(m.temp_size_in_bytes), 'peak_bytes': int(peak)}


def train_steps(name: str, batch: int, source: int, target: int,
                repeats: int) -> dict[str, dict[str, float]]:
  """Memory and median step time of LoRA and QLoRA on one T5 shape."""
  model = t5.build(t5.T5Config(**SHAPES[name], dropout_rate=0.0))
  base = t5.init(model, jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  v = SHAPES[name]['vocab_size']
  data = {'ids': rng.randint(2, v, (batch, source)).astype(np.int32),
          'mask': np.ones((batch, source), np.int32),
          'dec': rng.randint(2, v, (batch, target)).astype(np.int32),
          'labels': rng.randint(2, v, (batch, target)).astype(np.int32)}
  tx = optax.adamw(1e-3)
  results = {}
  for label, method in (('lora', lora.lora(8, 16, TARGETS)),
                        ('qlora', qlora.qlora(8, 16, TARGETS))):
    frozen = method.prepare_base(base)
    adapter = method.init(jax.random.PRNGKey(1), frozen)
    opt_state = tx.init(adapter)
    step = _step_fn(model, method, tx)
    compiled = step.lower(adapter, opt_state, frozen, data).compile()
    adapter, opt_state, _ = step(adapter, opt_state, frozen, data)  # warm-up
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      adapter, opt_state, value = step(adapter, opt_state, frozen, data)
      value.block_until_ready()
      times.append(time.perf_counter() - start)
    results[label] = dict(_memory(compiled), base_bytes=_bytes(frozen),
                          step_s=statistics.median(times))
  return results


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(prog='bench_qlora', description=__doc__,
                                   formatter_class=argparse.
                                   RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help='tiny shapes, seconds')
  parser.add_argument('--out', default='', help='write results as JSON')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args(argv)
  step_shape = 'tiny' if args.quick else 't5-small'
  sizes = (2, 32, 8) if args.quick else (4, 128, 32)
  # 1. Real arrays: the tiny model, or the kernels of one T5-small block.
  _, abstract = abstract_base(step_shape)
  model = t5.build(t5.T5Config(**SHAPES[step_shape], dropout_rate=0.0))
  if args.quick:
    arrays = t5.init(model, jax.random.PRNGKey(0))
  else:
    block = abstract['encoder']['block_0']
    arrays = jax.tree.map(lambda s: 0.05 * jax.random.normal(
        jax.random.PRNGKey(0), s.shape), block)
  results = {'kernels_from_arrays': kernel_ratio(arrays),
             'whole_base': {n: whole_base(n) for n in ('t5-small', 't5-base')},
             'train_step': {'shape': step_shape, 'batch': sizes[0],
                            'source': sizes[1], 'target': sizes[2],
                            **train_steps(step_shape, *sizes, args.repeats)}}
  _print(results)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2)
  return results


def _print(r: dict[str, Any]) -> None:
  k = r['kernels_from_arrays']
  print(f'NF4 kernels (real arrays, {k["kernels"]} kernels): '
        f'{k["nf4_bytes"] / 2**20:.2f} MiB vs fp32 '
        f'{k["fp32_bytes"] / 2**20:.2f} MiB = {k["ratio"]:.4f}x')
  for name, w in r['whole_base'].items():
    print(f'{name} whole frozen base ({w["params"] / 1e6:.1f}M params): '
          f'fp32 {w["fp32_bytes"] / 2**20:.1f} MiB, QLoRA '
          f'{w["qlora_bytes"] / 2**20:.1f} MiB = {w["ratio"]:.3f}x')
  t = r['train_step']
  print(f'train step ({t["shape"]}, batch {t["batch"]}, source '
        f'{t["source"]}, target {t["target"]}, r=8 q,v, AdamW):')
  for label in ('lora', 'qlora'):
    s = t[label]
    print(f'  {label:5s}  base {s["base_bytes"] / 2**20:8.1f} MiB  peak '
          f'{s.get("peak_bytes", 0) / 2**20:8.1f} MiB  step '
          f'{s["step_s"] * 1e3:8.1f} ms')
  peak = t['qlora'].get('peak_bytes', 0) / max(
      1, t['lora'].get('peak_bytes', 1))
  print(f'  qlora/lora: peak {peak:.3f}x, step time '
        f'{t["qlora"]["step_s"] / t["lora"]["step_s"]:.2f}x')


if __name__ == '__main__':
  main()
