"""multi: a batch whose rows each name a LoRA adapter (or the base) equals
running each adapter alone, on tiny BERT (classification, QA) and T5
(logits, greedy and beam `generate`); new assignments and swapped slot values
do not recompile.

The reference for each row is its adapter alone, merged into dense kernels
W + scale A B (`merge.merge`, one compiled program for all of them), run on
the whole batch; every test also asserts that the adapters change outputs.
Adapters differ in rank, alpha and targets, and one carries a trained copy of
the classifier (modules to save), so padding, missing targets (zero factors)
and per-row heads are all exercised.
"""
import jax
import numpy as np
import pytest

import helpers
from flaxlora import adapter_bank
from flaxlora import export
from flaxlora.models import bert
from flaxlora.models import decoding
from flaxlora.models import t5
from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft import merge
from flaxlora.peft import multi
from flaxlora.peft import trainable
from flaxlora.peft.lora import folder as lora_folder

T5_CONFIG = t5.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48,
                        num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8,
                        relative_attention_max_distance=16, dropout_rate=0.0)
BERT_CONFIG = bert.BertConfig(**helpers.TINY_BERT, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0, num_labels=3)
IDS = np.array([0, 1, -1, 2, 1, 0], np.int32)  # -1: the base model


def _random(method, base, seed, std=0.3):
  """method.init's layout with every leaf perturbed (init has B = 0)."""
  adapter = method.init(jax.random.PRNGKey(seed), base)
  leaves, tree = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
  return jax.tree.unflatten(tree, [
      x + std * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _methods(family):
  if family == 'bert':
    return [
        peft_base.chain(lora.lora(rank=4, alpha=8, targets='bert'),
                        trainable.trainable(r'classifier/.*')),
        lora.lora(rank=2, alpha=3, targets=r'.*/attention/(key|output)/kernel'),
        lora.lora(rank=3, alpha=5, targets=r'.*/mlp/intermediate/kernel',
                  rank_pattern={r'.*layer_0.*': 1}),
    ]
  return [
      lora.lora(rank=4, alpha=8, targets='t5'),
      lora.lora(rank=2, alpha=4, targets=r'.*attention/(k|o)/kernel'),
      lora.lora(rank=3, alpha=6, targets=r'.*/mlp/(wi|wo)/kernel',
                use_rslora=True),
  ]


def _expected(outs, ids):
  """Row b of outs[ids[b]] for every output leaf."""
  leaves = {k: jax.tree.leaves(v) for k, v in outs.items()}
  return [np.stack([np.asarray(leaves[int(k)][j])[b]
                    for b, k in enumerate(ids)])
          for j in range(len(leaves[-1]))]


@pytest.fixture(scope='module', params=['classification', 'qa'])
def bert_case(request):
  model = bert.build(BERT_CONFIG, head=request.param)
  base = bert.init(model, jax.random.PRNGKey(0))
  methods = _methods('bert')
  if request.param == 'qa':  # the QA model has qa_outputs, no classifier
    methods[0] = peft_base.chain(lora.lora(rank=4, alpha=8, targets='bert'),
                                 trainable.trainable(r'qa_outputs/.*'))
  pairs = [(m, _random(m, base, i)) for i, m in enumerate(methods)]
  inputs = helpers.batch(b=len(IDS))
  return model, base, pairs, inputs


def test_bert_rows_equal_their_adapter_alone(bert_case):
  model, base, pairs, inputs = bert_case
  forward = jax.jit(lambda params: model.apply({'params': params}, *inputs))
  outs = {-1: forward(base)}
  for k, (method, adapter) in enumerate(pairs):
    outs[k] = forward(merge.merge(base, adapter, method))
  bank = multi.stack(pairs, base)
  got = jax.tree.leaves(forward(multi.apply(base, bank, IDS)[0]))
  for g, want in zip(got, _expected(outs, IDS)):
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
  for k in range(len(pairs)):  # each changes its rows 100x the tolerance
    assert helpers.max_diff(jax.tree.leaves(outs[k])[0],
                            jax.tree.leaves(outs[-1])[0]) > 1e-3


def test_bert_no_recompile_on_new_ids_or_swapped_adapter(bert_case):
  model, base, pairs, inputs = bert_case
  forward = jax.jit(lambda base, bank, ids: model.apply(
      {'params': multi.apply(base, bank, ids)[0]}, *inputs))
  bank = multi.stack(pairs, base, slots=4)
  first = np.asarray(jax.tree.leaves(forward(base, bank, IDS))[0])
  shuffled = IDS[::-1].copy()
  forward(base, bank, shuffled)
  # Slot 3 was empty; slot 1 gets other values (lower rank, fewer targets).
  swap = lora.lora(rank=1, alpha=2, targets=r'.*/attention/key/kernel')
  swapped = _random(swap, base, 7)
  bank = multi.put(bank, 1, swap, swapped, base)
  bank = multi.put(bank, 3, *pairs[0], base)
  ids = np.array([1, 3, -1, 1, 0, 3], np.int32)
  got = np.asarray(jax.tree.leaves(forward(base, bank, ids))[0])
  assert forward._cache_size() == 1  # pylint: disable=protected-access
  alone = np.asarray(jax.tree.leaves(model.apply(
      {'params': merge.merge(base, swapped, swap)}, *inputs))[0])
  np.testing.assert_allclose(got[[0, 3]], alone[[0, 3]], rtol=1e-5,
                             atol=1e-5)
  one = np.asarray(jax.tree.leaves(model.apply(
      {'params': merge.merge(base, pairs[0][1], pairs[0][0])}, *inputs))[0])
  np.testing.assert_allclose(got[[1, 4, 5]], one[[1, 4, 5]], rtol=1e-5,
                             atol=1e-5)  # slots 0 and 3 hold adapter one
  np.testing.assert_allclose(got[2], first[2], rtol=1e-5, atol=1e-5)
  two = np.asarray(jax.tree.leaves(model.apply(
      {'params': merge.merge(base, pairs[1][1], pairs[1][0])}, *inputs))[0])
  assert helpers.max_diff(got[[0, 3]], two[[0, 3]]) > 1e-3  # slot 1 new


def _t5_setup():
  model = t5.build(T5_CONFIG)
  base = t5.init(model, jax.random.PRNGKey(0))
  pairs = [(m, _random(m, base, i, std=0.5))
           for i, m in enumerate(_methods('t5'))]
  rng = np.random.RandomState(0)
  ids = rng.randint(2, 64, (len(IDS), 7)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  return model, base, pairs, ids, mask


@pytest.fixture(scope='module')
def t5_case():
  return _t5_setup()


def test_t5_logits_rows_equal_their_adapter_alone(t5_case):
  model, base, pairs, ids, mask = t5_case
  decoder = ids[:, :4]
  forward = jax.jit(lambda params: model.apply({'params': params}, ids, mask,
                                               decoder))
  outs = {-1: forward(base)}
  for k, (method, adapter) in enumerate(pairs):
    outs[k] = forward(merge.merge(base, adapter, method))
    assert helpers.max_diff(outs[k], outs[-1]) > 1e-2
  bank = multi.stack(pairs, base)
  got = forward(multi.apply(base, bank, IDS)[0])
  np.testing.assert_allclose(got, _expected(outs, IDS)[0], rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('num_beams', [1, 2])
def test_t5_generate_rows_equal_their_adapter_alone(t5_case, num_beams):
  model, base, pairs, ids, mask = t5_case
  gen = lambda params: np.asarray(decoding.generate(
      model, params, ids, mask, max_new_tokens=6, num_beams=num_beams))
  outs = {-1: gen(base)}
  for k, (method, adapter) in enumerate(pairs):
    outs[k] = gen(merge.merge(base, adapter, method))
  assert any(np.any(outs[k] != outs[-1]) for k in range(len(pairs)))
  bank = multi.stack(pairs, base)
  np.testing.assert_array_equal(gen(multi.apply(base, bank, IDS)[0]),
                                _expected(outs, IDS)[0])


def test_t5_generate_no_recompile(t5_case):
  model, base, pairs, ids, mask = t5_case
  gen = lambda bank, rows: np.asarray(decoding.generate(
      model, multi.apply(base, bank, rows)[0], ids, mask, max_new_tokens=6))
  bank = multi.stack(pairs, base)
  gen(bank, IDS)
  before = decoding.compiled_count()
  gen(bank, np.roll(IDS, 1))
  swap = lora.lora(rank=2, alpha=4, targets=r'.*/attention/k/kernel')
  swapped = _random(swap, base, 9, std=0.5)
  got = gen(multi.put(bank, 2, swap, swapped, base), np.full(len(IDS), 2))
  assert decoding.compiled_count() == before
  alone = np.asarray(decoding.generate(
      model, merge.merge(base, swapped, swap), ids, mask, max_new_tokens=6))
  np.testing.assert_array_equal(got, alone)


def test_load_folders_peft_and_flaxlora(tmp_path, bert_case):
  model, base, pairs, inputs = bert_case
  if model.head != 'classification':
    pytest.skip('one head is enough for the folder round trip')
  lora_folder.save_peft(tmp_path / 'peft', model, base, pairs[0][1],
                        pairs[0][0])
  export.save_adapter(tmp_path / 'own', pairs[1][1], {
      'family': 'bert', 'peft': {
          'method': 'lora', 'rank': 2, 'alpha': 3.0,
          'targets': r'.*/attention/(key|output)/kernel', 'trainable': ''}})
  names, bank = adapter_bank.load({'one': tmp_path / 'peft',
                               'two': tmp_path / 'own'}, model, base)
  rows = multi.row_ids(['two', None, 'one', 'one', None, 'two'], names)
  got = model.apply({'params': multi.apply(base, bank, rows)[0]}, *inputs)
  want = multi.apply(base, multi.stack(pairs[:2], base), rows)[0]
  np.testing.assert_allclose(got, model.apply({'params': want}, *inputs),
                             rtol=1e-5, atol=1e-5)
  # An adapter trained over mean-pooled states is not served by a [CLS] model.
  export.save_adapter(tmp_path / 'mean', pairs[1][1], {
      'family': 'bert', 'pooling': 'mean',
      'peft': export.read_spec(tmp_path / 'own')['peft']})
  with pytest.raises(ValueError, match="trained with model.pooling='mean'"):
    adapter_bank.load({'mean': tmp_path / 'mean'}, model, base)
  names, _ = adapter_bank.load({'mean': tmp_path / 'mean'},
                           model.clone(pooling='mean'), base)
  assert names == ('mean',)


def test_errors_name_the_fix(bert_case):
  _, base, pairs, _ = bert_case
  bank = multi.stack(pairs[1:2], base)
  wide = lora.lora(rank=4, targets=r'.*/attention/key/kernel')
  with pytest.raises(ValueError, match='rank='):
    multi.put(bank, 0, wide, wide.init(jax.random.PRNGKey(0), base), base)
  with pytest.raises(ValueError, match='lora_paths='):
    multi.put(bank, 0, *pairs[0], base)
  with pytest.raises(ValueError, match='slots'):
    multi.put(bank, 5, *pairs[1], base)
  with pytest.raises(ValueError, match='not in the bank'):
    multi.row_ids(['x'], ('one',))
  dora = lora.lora(rank=2, targets='bert', use_dora=True)
  with pytest.raises(ValueError, match='DoRA'):
    multi.stack([(dora, dora.init(jax.random.PRNGKey(0), base))], base)


@pytest.mark.parametrize('length', [1, 5])
def test_both_low_rank_forms_equal_numpy_and_decode_takes_one_hot(
    length, monkeypatch):
  rng = np.random.RandomState(0)
  a, b = rng.randn(3, 6, 2), rng.randn(3, 2, 4)  # K=3 slots, R=2
  x, slot = rng.randn(4, length, 6), np.array([2, 0, 1, 2])
  scale = np.array([0.5, 1.0, 0.0, 2.0])
  want = np.stack([s * (x[r] @ a[k] @ b[k])
                   for r, (k, s) in enumerate(zip(slot, scale))])
  for form in (multi.gathered_low_rank, multi.one_hot_low_rank):
    got = form(*map(np.float32, (x, a, b)), slot, np.float32(scale),
               np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(want).max() > 0.1
  # The kernel picks by length: one token per row is a decode step.
  taken = []
  for name in ('gathered_low_rank', 'one_hot_low_rank'):
    form = getattr(multi, name)
    monkeypatch.setattr(multi, name, lambda *args, f=form, n=name: (
        taken.append(n), f(*args))[1])
  kernel = multi.MultiLoraKernel(
      w=np.float32(rng.randn(6, 4)), ids=np.int32(slot),
      a=np.float32(a), b=np.float32(b), scale=np.float32([0.5, 1.0, 2.0]))
  kernel.dot(np.float32(x), dtype=np.float32)
  assert taken == ['one_hot_low_rank' if length == 1 else 'gathered_low_rank']
