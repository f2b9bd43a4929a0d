"""Compiled temporary bytes of a tiny model's gradient, in its own process.

    python tests/memory_worker.py --family t5 --remat block --target cpu

prints one JSON line {"temp_bytes": N}: `memory_analysis()` of the gradient
(w.r.t. every param) of a squared-logits loss, compiled ahead of time for
one device of `--target`: 'cpu', or a TPU topology such as 'v5e:2x2'
(compiled by libtpu's TPU compiler on this CPU machine; nothing runs).

Why a process of its own: XLA:CPU's default scheduler orders for
concurrency, not memory, and schedules the recomputation that remat adds
early, so its temp bytes hide what remat saves; this process sets
`--xla_cpu_enable_concurrency_optimized_scheduler=false` (a process-wide
flag) before jax starts. TPU topologies need libtpu (`pip install
libtpu`).
"""
import argparse
import json
import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') +
    ' --xla_cpu_enable_concurrency_optimized_scheduler=false')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Other processes on this machine may hold libtpu's lock file; compiling
# ahead of time touches no TPU, so several may load it.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from flaxlora.models import bert  # pylint: disable=g-import-not-at-top
from flaxlora.models import t5  # pylint: disable=g-import-not-at-top

# Small, but with attention scores that dominate the activations.
T5_CONFIG = t5.T5Config(
    vocab_size=64, d_model=64, d_kv=16, d_ff=256, num_layers=6,
    num_decoder_layers=6, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, dropout_rate=0.0,
    feed_forward_proj='gated-gelu', tie_word_embeddings=False)
BERT_CONFIG = bert.BertConfig(
    vocab_size=64, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
    intermediate_size=256, max_position_embeddings=128,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
BATCH, LENGTH = 16, 128


def device(target: str) -> jax.Device:
  if target == 'cpu':
    return jax.devices('cpu')[0]
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return topologies.get_topology_desc(platform='tpu',
                                      topology_name=target).devices[0]


def temp_bytes(family: str, remat: str, target: str) -> int:
  placed = jax.sharding.SingleDeviceSharding(device(target))
  if family == 't5':
    model = t5.build(T5_CONFIG, remat=remat)
    init = lambda: t5.init(model, jax.random.PRNGKey(0))
    apply = lambda p, ids: model.apply({'params': p}, ids, ids, ids)
  else:
    model = bert.build(BERT_CONFIG, head=None, remat=remat)
    init = lambda: bert.init(model, jax.random.PRNGKey(0))
    apply = lambda p, ids: model.apply({'params': p}, ids)[0]

  def loss(params, ids):
    return jnp.mean(jnp.square(apply(params, ids).astype(jnp.float32)))

  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,  # pylint: disable=g-long-lambda
                                            sharding=placed)
  params = jax.tree.map(abstract, jax.eval_shape(init))
  ids = abstract(jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32))
  compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--family', choices=('t5', 'bert'), required=True)
  parser.add_argument('--remat', required=True)
  parser.add_argument('--target', default='cpu')
  args = parser.parse_args()
  print(json.dumps({'temp_bytes': temp_bytes(args.family, args.remat,
                                             args.target)}))


if __name__ == '__main__':
  main()
