"""Sharded LoRA training of tiny models, one process of a multi-host run.

`train` is the sharding-aware reference step that `test_sharding.py` runs on
one process and `test_multihost.py` runs in several, through this script:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
  python tests/multihost_worker.py --coordinator 127.0.0.1:PORT \\
      --num_processes 2 --process_id 0 --mesh 2,2,2 --out DIR

Each process writes DIR/result_{family}.npz (losses and the final adapter,
gathered) and, together with the others, an orbax checkpoint DIR/ckpt_t5 of
the train state (adapter and AdamW state).
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from flaxlora import distributed
from flaxlora import sharding
from flaxlora.models import bert
from flaxlora.models import llama
from flaxlora.models import sharded
from flaxlora.models import t5
from flaxlora.peft import lora

STEPS = 5
BATCH = 8  # global
LENGTH = 6
VOCAB = 96  # divisible by every tensor size used (1, 2, 4)


def tiny_model(family: str):
  if family == 'llama':  # 4 query heads over 2 key/value heads
    return llama.build(llama.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
  if family == 't5':
    return t5.build(t5.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=1,
        num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
        feed_forward_proj='gated-gelu'))
  return bert.build(bert.BertConfig(
      vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
      num_attention_heads=4, intermediate_size=64, max_position_embeddings=16,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                    head='classification', num_labels=4)


def global_batches(family: str) -> list[dict[str, np.ndarray]]:
  """STEPS global batches [BATCH, LENGTH], the same on every process."""
  rng = np.random.RandomState(0)
  out = []
  for _ in range(STEPS):
    ids = rng.randint(2, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    mask = (np.arange(LENGTH)[None] < rng.randint(3, LENGTH + 1, (BATCH, 1))
            ).astype(np.int32)
    batch = {'input_ids': ids * mask, 'attention_mask': mask}
    if family == 't5':
      batch['targets'] = rng.randint(2, VOCAB, (BATCH, LENGTH)).astype(
          np.int32)
    elif family == 'bert':  # (llama predicts the next id of input_ids)
      batch['labels'] = rng.randint(0, 4, (BATCH,)).astype(np.int32)
    out.append(batch)
  return out


def loss_fn(model, method, family, adapter, base, batch):
  """Mean cross-entropy of the adapted model over the global batch."""
  params, kw = method.apply(base, adapter)
  if family == 'llama':
    logits = model.apply({'params': params}, batch['input_ids'],
                         batch['attention_mask'], **kw)[:, :-1]
    labels = batch['input_ids'][:, 1:]
  elif family == 't5':
    targets = batch['targets']  # [B, T]; teacher forcing from id 0
    decoder_ids = jnp.concatenate(
        [jnp.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    logits = model.apply({'params': params}, batch['input_ids'],
                         batch['attention_mask'], decoder_ids, **kw)
    labels = targets
  else:
    logits = model.apply({'params': params}, batch['input_ids'],
                         batch['attention_mask'], **kw)
    labels = batch['labels']
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


METHOD = lora.lora(rank=4, alpha=8.0)  # PEFT's default targets: q, v
METHODS = {'llama': lora.lora(rank=4, alpha=8.0,
                              targets=r'.*/(q_proj|v_proj)/kernel')}


def method_for(family: str):
  return METHODS.get(family, METHOD)
TX = optax.adamw(3e-2, weight_decay=0.01)


def state_shardings(family: str, mesh, rules=sharding.RULES):
  """(abstract train state, its shardings, base shardings) on `mesh`.

  Shapes only (`jax.eval_shape`): also the restore target of a checkpoint.
  """
  model = tiny_model(family)
  axes = model_family(family).logical_axes(model)
  abstract_base = jax.eval_shape(
      lambda rng: model_family(family).init(model, rng), jax.random.PRNGKey(0))
  base_shardings = sharding.named_shardings(abstract_base, axes, mesh, rules)
  adapter = jax.eval_shape(method_for(family).init, jax.random.PRNGKey(1),
                           abstract_base)
  adapter_shardings = sharding.named_shardings(
      adapter, lora.adapter_logical_axes(axes, adapter), mesh, rules)
  state = {'adapter': adapter, 'opt_state': jax.eval_shape(TX.init, adapter)}
  shardings = {'adapter': adapter_shardings,
               'opt_state': sharding.optimizer_shardings(
                   TX, adapter, adapter_shardings, mesh)}
  return state, shardings, base_shardings


def train(family: str, mesh, rules=sharding.RULES, steps: int = STEPS,
          host_base=None):
  """LoRA (q, v; rank 4) + AdamW, grads w.r.t. the adapter only.

  Args:
    family: 't5' or 'bert'.
    mesh: the device mesh.
    rules: logical -> mesh axes table.
    steps: train steps.
    host_base: numpy base params to place (saves compiling the sharded
      init); None initialises them with `sharded.init`.

  Returns:
    (losses [steps] numpy, train state {'adapter', 'opt_state'} as global
    arrays, its shardings, the base params).
  """
  model = tiny_model(family)
  _, shardings, base_shardings = state_shardings(family, mesh, rules)
  if host_base is None:
    base, _ = sharded.init(model, jax.random.PRNGKey(0), mesh,
                                       rules)
  else:
    base = distributed.host_to_global(host_base, base_shardings)
  adapter = jax.jit(method_for(family).init, out_shardings=shardings['adapter'])(
      jax.random.PRNGKey(1), base)
  opt_state = jax.jit(TX.init, out_shardings=shardings['opt_state'])(adapter)

  def step(adapter, opt_state, base, batch):
    loss, grads = jax.value_and_grad(
        lambda a: loss_fn(model, method_for(family), family, a, base,
                          batch))(adapter)
    updates, opt_state = TX.update(grads, opt_state, adapter)
    return optax.apply_updates(adapter, updates), opt_state, loss

  batches = global_batches(family)
  batch_shardings = jax.tree.map(
      lambda x: sharding.batch_sharding(mesh, rules, x.ndim), batches[0])
  replicated = NamedSharding(mesh, PartitionSpec())
  # The base is a separate, non-donated argument; only the state is donated.
  step = jax.jit(step, donate_argnums=(0, 1),
                 in_shardings=(shardings['adapter'], shardings['opt_state'],
                               base_shardings, batch_shardings),
                 out_shardings=(shardings['adapter'], shardings['opt_state'],
                                replicated))
  rows = distributed.process_rows(mesh, rules, BATCH)
  losses = []
  for batch in batches[:steps]:
    local = jax.tree.map(lambda x: x[rows], batch)
    adapter, opt_state, loss = step(
        adapter, opt_state, base, distributed.global_batch(local, mesh, rules))
    losses.append(loss)
  state = {'adapter': adapter, 'opt_state': opt_state}
  return np.array(distributed.to_host(losses)), state, shardings, base


def model_family(family: str):
  return {'t5': t5, 'bert': bert, 'llama': llama}[family]


def flat_arrays(tree) -> dict[str, np.ndarray]:
  """{'a/b/c': numpy} of a (gathered) tree, for npz files and comparisons."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--coordinator', required=True)
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--mesh', default='2,2,2', help='data,fsdp,tensor')
  parser.add_argument('--families', default='t5', help='t5,bert')
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  distributed.initialize_distributed(args.coordinator, args.num_processes,
                                     args.process_id)
  sizes = dict(zip(sharding.MESH_AXES, map(int, args.mesh.split(','))))
  mesh = sharding.make_mesh(sizes)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  for family in args.families.split(','):
    losses, state, _, _ = train(family, mesh)
    adapter = flat_arrays(distributed.to_host(state['adapter']))
    if distributed.is_main_process():
      np.savez(os.path.join(args.out, f'result_{family}.npz'), losses=losses,
               devices=jax.device_count(), processes=jax.process_count(),
               **adapter)
    if family == 't5':  # all processes write their own shards
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.join(args.out, 'ckpt_t5'), state)
        checkpointer.wait_until_finished()
  distributed.sync('done')


if __name__ == '__main__':
  main(sys.argv[1:])
