r"""Per-device memory of sharded T5 LoRA training, measured and computed.

  python -m experiments.bench_sharding [--out=DIR] [--sizes=1,2,4,8]

1. Measured: a T5-small-shaped model (random weights, never loaded) with
   LoRA (R=8 on q, v) and AdamW, on 1, 2, 4, 8 simulated CPU devices with
   FSDP. Per-device parameter bytes come from the shardings; peak memory from
   XLA's `memory_analysis()` of the compiled train step, lowered on abstract
   arrays (nothing is allocated).
2. Computed: what T5-base/large/3B/11B need per device under a few meshes,
   from the param shapes (`jax.eval_shape`) and the sharding rules: fp32 base,
   + LoRA adapter and its AdamW moments, + a bf16 copy of the base.

Prints markdown tables; with --out also writes DIR/sharding.md and .json.
"""
import argparse
import json
import math
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from flaxlora import sharding
from flaxlora.models import t5
from flaxlora.peft import lora

MiB = 2**20
GiB = 2**30
# Hugging Face configs of the original T5 checkpoints (v1.0, tied, relu).
T5_SIZES = {
    't5-small': dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                     num_heads=8),
    't5-base': dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12,
                    num_heads=12),
    't5-large': dict(d_model=1024, d_kv=64, d_ff=4096, num_layers=24,
                     num_heads=16),
    't5-3b': dict(d_model=1024, d_kv=128, d_ff=16384, num_layers=24,
                  num_heads=32),
    't5-11b': dict(d_model=1024, d_kv=128, d_ff=65536, num_layers=24,
                   num_heads=128),
}
# (data, fsdp, tensor) meshes of the computed table.
TABLE_MESHES = ((1, 1, 1), (1, 8, 1), (1, 2, 4), (1, 8, 4), (1, 64, 4))
METHOD = lora.lora(rank=8, alpha=16.0)
TX = optax.adamw(1e-3)


def abstract_t5(name: str):
  """(model, abstract fp32 params, logical axes) of a T5 size."""
  model = t5.build(t5.T5Config(**T5_SIZES[name]), dtype=jnp.bfloat16)
  params = jax.eval_shape(lambda r: t5.init(model, r), jax.random.PRNGKey(0))
  return model, params, t5.logical_axes(model)


def _shard_bytes(abstract, axes, mesh, dtype=None) -> int:
  """Bytes one device holds of `abstract` when split by the rules."""
  total = 0
  for leaf, spec in zip(jax.tree.leaves(abstract), jax.tree.leaves(axes)):
    mesh_spec = sharding.logical_to_spec(spec, sharding.RULES,
                                         shape=leaf.shape, mesh=mesh)
    parts = [math.prod(mesh.shape[a] for a in (
        p if isinstance(p, tuple) else (p,))) if p else 1 for p in mesh_spec]
    parts += [1] * (len(leaf.shape) - len(parts))
    size = math.prod(d // n for d, n in zip(leaf.shape, parts))
    total += size * np.dtype(dtype or leaf.dtype).itemsize
  return total


def memory_row(name: str, mesh) -> dict:
  """Per-device bytes of base, adapter + AdamW state and a bf16 base copy."""
  _, params, axes = abstract_t5(name)
  adapter = jax.eval_shape(METHOD.init, jax.random.PRNGKey(1), params)
  adapter_axes = lora.adapter_logical_axes(axes, adapter)
  base = _shard_bytes(params, axes, mesh)
  # AdamW keeps two moments per adapter value: 3x the adapter.
  trainable = 3 * _shard_bytes(adapter, adapter_axes, mesh)
  bf16 = _shard_bytes(params, axes, mesh, jnp.bfloat16)
  return dict(model=name, mesh=tuple(mesh.shape.values()),
              devices=mesh.size, params=sum(
                  x.size for x in jax.tree.leaves(params)),
              base_fp32=base, adapter_adamw=trainable, base_bf16=bf16,
              total=base + trainable + bf16)


def computed_table() -> list[dict]:
  rows = []
  for name in T5_SIZES:
    if name == 't5-small':
      continue
    for shape in TABLE_MESHES:
      mesh = AbstractMesh(shape, sharding.MESH_AXES)
      try:
        rows.append(memory_row(name, mesh))
      except ValueError as e:  # a dimension the mesh does not divide
        rows.append(dict(model=name, mesh=shape, devices=math.prod(shape),
                         error=str(e).split(';')[0]))
  return rows


def _train_step(model):
  def loss_fn(adapter, base, batch):
    params, kw = METHOD.apply(base, adapter)
    targets = batch['targets']
    decoder_ids = jnp.concatenate(
        [jnp.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    logits = model.apply({'params': params}, batch['input_ids'],
                         batch['attention_mask'], decoder_ids, **kw)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets).mean()

  def step(adapter, opt_state, base, batch):
    loss, grads = jax.value_and_grad(loss_fn)(adapter, base, batch)
    updates, opt_state = TX.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss
  return step


def measured_row(devices: int, batch: int, source: int, target: int) -> dict:
  """Compiles the T5-small LoRA step on `devices` devices (FSDP) and reads
  XLA's per-device memory analysis. Nothing is allocated."""
  mesh = sharding.make_mesh({'fsdp': devices},
                            devices=jax.devices()[:devices])
  model, params, axes = abstract_t5('t5-small')
  rules = sharding.RULES
  base_sh = sharding.named_shardings(params, axes, mesh, rules)
  adapter = jax.eval_shape(METHOD.init, jax.random.PRNGKey(1), params)
  adapter_sh = sharding.named_shardings(
      adapter, lora.adapter_logical_axes(axes, adapter), mesh, rules)
  opt_sh = sharding.optimizer_shardings(TX, adapter, adapter_sh, mesh)
  opt_state = jax.eval_shape(TX.init, adapter)
  shapes = {'input_ids': (batch, source), 'attention_mask': (batch, source),
            'targets': (batch, target)}
  batch_sh = {k: sharding.batch_sharding(mesh, rules, 2) for k in shapes}
  args = (sharding.abstract_sharded(adapter, adapter_sh),
          sharding.abstract_sharded(opt_state, opt_sh),
          sharding.abstract_sharded(params, base_sh),
          {k: jax.ShapeDtypeStruct(s, jnp.int32, sharding=batch_sh[k])
           for k, s in shapes.items()})
  step = jax.jit(_train_step(model), donate_argnums=(0, 1),
                 out_shardings=(adapter_sh, opt_sh,
                                NamedSharding(mesh, PartitionSpec())))
  stats = step.lower(*args).compile().memory_analysis()
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes -
          stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  return dict(devices=devices, base_fp32=_shard_bytes(params, axes, mesh),
              arguments=stats.argument_size_in_bytes,
              temp=stats.temp_size_in_bytes, peak=peak)


def to_markdown(measured: list[dict], computed: list[dict],
                shapes: str) -> str:
  lines = ['### Measured: T5-small LoRA step with FSDP (XLA memory analysis)',
           '', f'Batch {shapes}; per device, MiB.', '',
           '| devices | fp32 params | step arguments | temporaries | peak |',
           '|---|---|---|---|---|']
  for r in measured:
    lines.append(f"| {r['devices']} | {r['base_fp32'] / MiB:.1f} | "
                 f"{r['arguments'] / MiB:.1f} | {r['temp'] / MiB:.1f} | "
                 f"{r['peak'] / MiB:.1f} |")
  lines += ['', '### Computed: per-device GiB (LoRA R=8 on q, v; AdamW)', '',
            '| model | params | mesh (data, fsdp, tensor) | fp32 base | '
            '+ adapter & AdamW | + bf16 base copy | total |',
            '|---|---|---|---|---|---|---|']
  for r in computed:
    if 'error' in r:
      lines.append(f"| {r['model']} | | {r['mesh']} | {r['error']} | | | |")
      continue
    lines.append(
        f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['mesh']} | "
        f"{r['base_fp32'] / GiB:.3f} | {r['adapter_adamw'] / GiB:.4f} | "
        f"{r['base_bf16'] / GiB:.3f} | {r['total'] / GiB:.3f} |")
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=None, help='folder for the results')
  parser.add_argument('--sizes', default='1,2,4,8',
                      help='device counts of the measured table')
  parser.add_argument('--batch', default='8,128,32',
                      help='global batch B,S,T of the measured step')
  args = parser.parse_args(argv)
  # Simulated CPU devices; read when JAX starts its backend (first use),
  # so this works unless the caller already used JAX.
  os.environ.setdefault('XLA_FLAGS',
                        '--xla_force_host_platform_device_count=8')
  sizes = [int(n) for n in args.sizes.split(',')]
  if max(sizes) > jax.device_count():
    raise ValueError(f'--sizes={args.sizes} needs {max(sizes)} devices, '
                     f'there are {jax.device_count()}; set XLA_FLAGS='
                     '--xla_force_host_platform_device_count=8 (CPU).')
  batch, source, target = (int(n) for n in args.batch.split(','))
  measured = [measured_row(n, batch, source, target) for n in sizes]
  computed = computed_table()
  text = to_markdown(measured, computed, f'B={batch}, S={source}, T={target}')
  print(text)
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'sharding.md').write_text(text)
    (out / 'sharding.json').write_text(json.dumps(
        dict(measured=measured, computed=computed), indent=1, default=str))
  return measured, computed


if __name__ == '__main__':
  main(sys.argv[1:])
