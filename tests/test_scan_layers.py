"""`model.scan_layers`: the blocks as one scan over their stacked params.

The scanned model computes what the unrolled one computes (logits, and the
gradients w.r.t. a LoRA adapter whose kernels sit in every block), under
every remat policy and in every family, over the same params; its program
holds one block whatever the depth; dropout draws per-layer keys from the
call's rng; layers whose params differ (a rank_pattern, targets that pick
some layers) are refused in one line.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from flaxlora import sharding
from flaxlora.models import bert
from flaxlora.models import gpt2
from flaxlora.models import layers
from flaxlora.models import llama
from flaxlora.models import remat
from flaxlora.models import t5
from flaxlora.peft import lora

TINY = {
    't5': t5.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=3,
        num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
        relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj='gated-gelu', tie_word_embeddings=False),
    'bert': bert.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3,
        num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0),
    'llama': llama.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8),
    'gpt2': gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32,
                            n_layer=3, n_head=4, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0),
}
FAMILIES = {'t5': t5, 'bert': bert, 'llama': llama, 'gpt2': gpt2}
# LoRA on every attention and MLP kernel of each family.
TARGETS = {'t5': r'.*/(q|k|v|o|wi_0|wi_1|wo)/kernel',
           'bert': r'.*/(attention|mlp)/\w+/kernel',
           'llama': r'.*_proj/kernel',
           'gpt2': r'.*/(c_attn|c_proj|c_fc)/kernel'}
IDS = np.random.RandomState(0).randint(2, 64, (2, 7)).astype(np.int32)


def _build(family, config=None, **kwargs):
  config = TINY[family] if config is None else config
  if family == 'bert':
    kwargs['head'] = None
  return FAMILIES[family].build(config, **kwargs)


def _logits(family, model, params, rng=None, **kwargs):
  """The model's output on IDS (decoder ids for T5 too); dropout on when
  `rng` is given."""
  mask = np.ones_like(IDS)
  mask[1, 5:] = 0
  inputs = (IDS, mask, IDS[:, :4]) if family == 't5' else (IDS, mask)
  rngs = {} if rng is None else {'dropout': rng}
  out = model.apply({'params': params}, *inputs, deterministic=rng is None,
                    rngs=rngs, **kwargs)
  return out[0] if family == 'bert' else out


def _perturbed_lora(family, base, **kwargs):
  """A LoRA method over `base` and an adapter with B != 0, so that the
  adapter changes the output."""
  method = lora.lora(rank=4, alpha=8.0, targets=TARGETS[family], **kwargs)
  adapter = method.init(jax.random.PRNGKey(1), base)
  leaves, treedef = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape)
            for x, k in zip(leaves, keys)]
  return method, jax.tree.unflatten(treedef, leaves)


def _close(got, want):
  """Equal to float32 rounding: 1e-5 of the largest value."""
  np.testing.assert_allclose(got, want, rtol=1e-5,
                             atol=1e-5 * float(np.max(np.abs(want))))


def _value_and_grad(family, model, base, method, adapter, rng=None):

  def loss(adapter):
    params, kwargs = method.apply(base, adapter)
    logits = _logits(family, model, params, rng, **kwargs)
    # Against a random target: BERT's states leave a layer norm, whose
    # mean square alone is constant.
    target = np.random.RandomState(7).normal(size=logits.shape)
    return jnp.mean(jnp.square(logits - target)), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      adapter)
  return logits, grads


# Every remat policy for T5, one for each other family (the rest: slow).
@pytest.mark.parametrize('family, policy', helpers.default_or_slow(
    [(f, p) for f in sorted(FAMILIES) for p in remat.POLICIES],
    [('t5', p) for p in remat.POLICIES] +
    [(f, 'block') for f in ('bert', 'gpt2', 'llama')]))
def test_scan_equals_unrolled(family, policy):
  unrolled = _build(family, remat=policy)
  scanned = _build(family, remat=policy, scan_layers=True)
  base = FAMILIES[family].init(unrolled, jax.random.PRNGKey(0))
  # The params layout is the unrolled one: init is unrolled.
  same_init = FAMILIES[family].init(scanned, jax.random.PRNGKey(0))
  assert jax.tree.structure(same_init) == jax.tree.structure(base)
  method, adapter = _perturbed_lora(family, base)
  want, want_grads = _value_and_grad(family, unrolled, base, method, adapter)
  got, got_grads = _value_and_grad(family, scanned, base, method, adapter)
  _close(got, want)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    _close(g, w)
  # Not trivially equal: the adapter changes the output.
  plain = _logits(family, scanned, base)
  assert float(jnp.max(jnp.abs(plain - got))) > 1e-3


def test_t5_prefix_goes_to_each_scanned_block():
  unrolled, scanned = _build('t5'), _build('t5', scan_layers=True)
  params = t5.init(unrolled, jax.random.PRNGKey(0))
  c = TINY['t5']
  width = c.num_heads * c.d_kv
  prefix_kv = {
      'encoder': jax.random.normal(jax.random.PRNGKey(3),
                                   (c.num_layers, 2, 3, width)),
      'decoder': jax.random.normal(jax.random.PRNGKey(4),
                                   (c.num_decoder_layers, 2, 3, width))}
  want = _logits('t5', unrolled, params, prefix_kv=prefix_kv)
  got = _logits('t5', scanned, params, prefix_kv=prefix_kv)
  _close(got, want)
  assert float(jnp.max(jnp.abs(got - _logits('t5', scanned, params)))) > 1e-3


@pytest.mark.parametrize('policy', ['none', 'block'])
def test_dropout_draws_per_layer_keys_from_the_rng(policy):
  config = dataclasses.replace(TINY['t5'], dropout_rate=0.1)
  model = _build('t5', config, remat=policy, scan_layers=True)
  base = t5.init(model, jax.random.PRNGKey(0))
  method, adapter = _perturbed_lora('t5', base, dropout=0.1)
  run = lambda rng: _value_and_grad('t5', model, base, method, adapter, rng)
  first, again = run(jax.random.PRNGKey(5)), run(jax.random.PRNGKey(5))
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  off, other = run(None), run(jax.random.PRNGKey(6))
  assert float(jnp.max(jnp.abs(first[0] - off[0]))) > 1e-3
  assert float(jnp.max(jnp.abs(first[0] - other[0]))) > 1e-3


@pytest.mark.parametrize('kwargs, where', [
    ({'rank_pattern': {r'encoder/block_1/.*': 2}},
     r'encoder/block_1 .*attention/\w/kernel/a is \[32, 2\]'),
    ({'targets': r'decoder/block_0/.*/q/kernel'},
     r'decoder/block_1 .*attention/q/kernel/a is missing'),
])
def test_layers_that_differ_are_refused_in_one_line(kwargs, where):
  model = _build('t5', scan_layers=True)
  base = t5.init(model, jax.random.PRNGKey(0))
  method = lora.lora(**{'rank': 4, 'targets': TARGETS['t5'], **kwargs})
  params, _ = method.apply(base, method.init(jax.random.PRNGKey(1), base))
  with pytest.raises(ValueError, match=where) as error:
    _logits('t5', model, params)
  message = str(error.value)
  assert '\n' not in message
  assert 'model.scan_layers=False' in message


def _program(depth, scan_layers):
  """The lowered train step (LoRA gradients) of a T5 with `depth` + `depth`
  blocks, as text."""
  config = dataclasses.replace(TINY['t5'], num_layers=depth,
                               num_decoder_layers=depth)
  model = _build('t5', config, remat='block', scan_layers=scan_layers)
  base = jax.eval_shape(lambda: t5.init(model, jax.random.PRNGKey(0)))
  method = lora.lora(rank=4, targets=TARGETS['t5'])
  adapter = jax.eval_shape(lambda: method.init(jax.random.PRNGKey(1), base))

  def loss(adapter, base):
    params, _ = method.apply(base, adapter)
    return jnp.mean(jnp.square(_logits('t5', model, params)))

  return jax.jit(jax.grad(loss)).lower(adapter, base).as_text()


def test_the_scanned_program_does_not_grow_with_depth():
  u2, u6 = _program(2, False), _program(6, False)
  s2, s6 = _program(2, True), _program(6, True)
  assert 'stablehlo.while' in s2 and 'stablehlo.while' in s6
  assert 'stablehlo.while' not in u6
  dots = lambda text: text.count('stablehlo.dot_general')
  assert dots(s6) == dots(s2) and dots(u6) > 2.5 * dots(u2)
  # What still grows with the depth: stacking each layer's params, slicing
  # the gradients back, and the LoRA adapter's own per-layer leaves.
  assert len(s6) - len(s2) < 0.25 * (len(u6) - len(u2))
  assert len(u6) > 2.5 * len(u2)


def _primitives(jaxpr, inside_scan=False):
  """Names of the primitives of a jaxpr and its sub-jaxprs, those inside a
  scan's body marked with a leading 'scan/'."""
  names = []
  for eqn in jaxpr.eqns:
    names.append(('scan/' if inside_scan else '') + eqn.primitive.name)
    for sub in jax.core.jaxprs_in_params(eqn.params):
      names += _primitives(sub, inside_scan or eqn.primitive.name == 'scan')
  return names


def test_activation_constraints_apply_inside_the_loop():
  model = _build('t5', scan_layers=True)
  params = jax.eval_shape(lambda: t5.init(model, jax.random.PRNGKey(0)))
  mesh = sharding.make_mesh({'data': -1})
  with layers.activation_sharding(mesh, sharding.RULES):
    jaxpr = jax.make_jaxpr(lambda p: _logits('t5', model, p))(params)
  names = _primitives(jaxpr.jaxpr)
  # The blocks' own constraints (attention heads, MLP hidden states, each
  # block's output), in both stacks' loops.
  assert names.count('scan/sharding_constraint') >= 4, names
