"""ScaLoRA: a high-rank update accumulated from optimally scaled LoRA steps.

Zhang, Yang, Cai, Giannakis, "ScaLoRA: Optimally Scaled Low-Rank Adaptation
for Efficient High-Rank Fine-Tuning", arXiv 2510.23818. In the paper's
notation (W = W_pt + A B', A [m, r], B [n, r]; here kernel [in, out],
a = A [in, R], b = B' [R, out], with LoRA's factor s):

* LoRA's summed updates telescope to A_T B_T', one rank-r subspace. ScaLoRA
  folds the current product into the frozen base and restarts the adapter:
  W_pt,t <- W_pt,t + A B' - A~ B~' (the model is unchanged), so the summed
  update is a sum of different rank-r pieces and grows high-rank. Here the
  base is W + acc, acc' = acc + s (a b - a~ b~), every `merge_every` updates
  (the paper's I; 1: every update) once `restart_warmup` updates are done.
* A~, B~ are A, B with scaled columns (what keeps the optimizer running),
  the scales minimising the L-smooth bound of the next loss: a 2R x 2R
  linear system of inner products (`scaling.scaling`, whose module docstring derives it),
  or, when it has no positive solution, one scale per factor (the scalar
  fallback, closed form from the same inner products), or, when neither
  is positive, no restart for that kernel and update. L (`lipschitz`)
  multiplies the rate of the step, eta: the scheduled rate of this update
  or the peak rate (`lipschitz_rate`); lipschitz=0 sets L eta = 1 at every
  update (L follows 1 / eta through the schedule).
* The restart runs in `before_update` (after the gradient at W_t, before
  the optimizer update): the gradients of the restarted factors are exact
  without a second backward pass, g_a~ = g_a diag(beta), g_b~ = diag(alpha)
  g_b, and AdamW's moments are carried over with the same scaling (the
  paper's moment transfer: Adam's step is equivariant under it),
  m_a~ = m_a diag(beta), v_a~ = v_a diag(beta^2), m_b~ = diag(alpha) m_b,
  v_b~ = diag(alpha^2) v_b: no optimizer reset, the step count kept. A
  scalar restart is the column one with equal scales. Other optimizers are
  refused.
* The hook's metrics: the fraction of targeted kernels restarted by column
  scaling, by scalar scaling and not at all (`restart_column`,
  `restart_scalar`, `restart_none`; an update without a restart due counts
  every kernel as not restarted). The run logs them with the loss.

Choices the paper's text (as available here) leaves open:
1. A coordinate whose term vanishes (B = 0 at LoRA's init) keeps scale 1
   (tests/test_scalora.py::test_free_and_invalid_scalings).
2. The gradient is the run's (clipped, mean, dropout) minibatch gradient.
3. eta is the rate of A (LoRA+'s faster B rate is not used).

State: acc is one fp32 [in, out] copy per targeted kernel (4 bytes per
targeted base weight), kept in the adapter (checkpointed: a resumed run
continues bitwise, test_sigkill_resume_is_bitwise) and frozen by the
method's optimizer (`optax.set_to_zero`: no moments for it) and by
`stop_gradient` in `apply`. With lipschitz > 0 the optimizer state also
holds the rate of the next update (`RateState`). A restart forms one dense
[in, out] increment.

Export: the update is high-rank, so the method's export (a run's `peft/`
folder) is the merged Hugging Face checkpoint (`lora_folder.save_merged`,
W + acc + s A B; config.json and safetensors that transformers loads alone).
On request (`lora_export=True`) it writes instead the best rank-R
approximation (truncated SVD) of acc + s A B as a plain PEFT LoRA folder and
prints its relative error.
"""
import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft.lora import folder as lora_folder
from flaxlora.peft.lora import form as lora_form
from flaxlora.peft.scalora import scaling as scaling_lib

Array = jax.Array
FROZEN = 'frozen'
RATES = ('scheduled', 'peak')
# The hook's metrics: fractions of the targeted kernels per restart kind.
METRICS = tuple(f'restart_{kind}' for kind in scaling_lib.KINDS)
_NO_RESTART = dict(zip(METRICS, np.eye(len(METRICS), dtype=np.float32)[-1]))


def _write_merged(folder, model, base, adapter, method, **kwargs):
  """The method's default export: the merged Hugging Face checkpoint."""
  del kwargs  # a merged checkpoint names no base
  print('scalora: the update is high-rank; the export is the merged '
        'Hugging Face checkpoint (W + acc + s A B, transformers loads it '
        'alone); lora_export=True writes its best rank-R PEFT LoRA instead.')
  return lora_folder.save_merged(folder, model, base, adapter, method)


@dataclasses.dataclass(frozen=True)
class ScaLoraConfig:
  """ScaLoRA hyperparameters: LoRA's (`lora`), the restart period, whether
  the run's PEFT folder holds the best rank-R LoRA (`lora_export`), L and
  the rate it multiplies (0: L eta = 1), and the updates before the first
  restart."""
  lora: lora.LoraConfig
  merge_every: int = 1
  lora_export: bool = False
  lipschitz: float = 0.0
  lipschitz_rate: str = 'scheduled'
  restart_warmup: int = 0


class RateState(NamedTuple):
  """The optimizer's updates done and the rate eta of the next one."""
  count: Array
  rate: Array


def _is_node(node: Any) -> bool:
  return isinstance(node, Mapping) and 'acc' in node


def _mm(x, y):
  return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


def _restart(config: ScaLoraConfig, adapter, opt_state, grads, l_eta):
  """Folds, rescales, carries gradients and Adam moments over; metrics."""
  flat = peft_base.flatten(adapter, is_leaf=_is_node)
  flat_g = peft_base.flatten(grads, is_leaf=_is_node)
  new, new_g, cols, kinds = {}, {}, {}, []
  for path, leaf in flat.items():
    g = flat_g[path]
    s = config.lora.scale_for(path)
    alpha, beta, kind = scaling_lib.scaling(leaf['a'], leaf['b'], g['a'],
                                            g['b'], s, l_eta)
    a, b = leaf['a'] * alpha, beta[:, None] * leaf['b']
    acc = leaf['acc'] + s * _mm(leaf['a'] * (1.0 - alpha * beta), leaf['b'])
    new[path] = dict(leaf, a=a, b=b, acc=acc)
    new_g[path] = dict(g, a=g['a'] * beta, b=alpha[:, None] * g['b'])
    cols[path] = {'a': beta[None, :], 'b': alpha[:, None]}
    kinds.append(kind)
  counts = jnp.bincount(jnp.stack(kinds), length=len(METRICS))
  metrics = dict(zip(METRICS, counts.astype(jnp.float32) / len(kinds)))
  return (peft_base.unflatten(new), _scale_moments(opt_state, cols),
          peft_base.unflatten(new_g), metrics)


def _scale_moments(opt_state: Any, cols: Mapping[str, Any]) -> Any:
  """Every Adam state in `opt_state`: mu *= col, nu *= col^2."""
  found = []

  def scale(tree, power):
    flat = peft_base.flatten(tree)
    for path, factor in peft_base.flatten(cols).items():
      if path in flat and hasattr(flat[path], 'shape'):
        flat[path] = flat[path] * factor**power
    return peft_base.unflatten(flat)

  def visit(node):
    if isinstance(node, optax.ScaleByAdamState):
      found.append(node)
      return node._replace(mu=scale(node.mu, 1), nu=scale(node.nu, 2))
    return node

  is_adam = lambda n: isinstance(n, optax.ScaleByAdamState)
  out = jax.tree.map(visit, opt_state, is_leaf=is_adam)
  if not found:
    raise ValueError("scalora: the optimizer state has no Adam moments; "
                     "ScaLoRA's moment transfer is derived for AdamW, set "
                     "optimizer.name='adamw'.")
  return out


def _l_eta(config: ScaLoraConfig, opt_state: Any) -> Array | float:
  """L x eta of the coming update (1 when lipschitz is 0)."""
  if not config.lipschitz:
    return 1.0
  is_rate = lambda n: isinstance(n, RateState)
  rates = [n for n in jax.tree.leaves(opt_state, is_leaf=is_rate)
           if is_rate(n)]
  if len(rates) != 1:
    raise ValueError(
        f'scalora lipschitz={config.lipschitz} multiplies the run\'s rate, '
        'but the optimizer keeps none: build its make_tx with '
        'flaxlora.optimizers.factory (it has .schedule and .peak), or set '
        'lipschitz=0 (L eta = 1).')
  return config.lipschitz * rates[0].rate


def _rate_tracker(rate: Callable[[Array], Array]
                  ) -> optax.GradientTransformation:
  """Passes updates through; its state is `RateState` (eta = rate(count))."""

  def init(params):
    del params
    count = jnp.zeros([], jnp.int32)
    return RateState(count, jnp.asarray(rate(count), jnp.float32))

  def update(updates, state, params=None):
    del params
    count = state.count + 1
    return updates, RateState(count, jnp.asarray(rate(count), jnp.float32))

  return optax.GradientTransformation(init, update)


def _labels(adapter: Any, ratio: float) -> Any:
  out = {}
  for path in peft_base.flatten(adapter, is_leaf=_is_node):
    b = 'lora_b' if ratio != 1.0 else 'other'
    out[path] = {'a': 'other', 'b': b, 'acc': FROZEN}
  return peft_base.unflatten(out)


def _optimizer(config: ScaLoraConfig, make_tx: peft_base.TxFactory
               ) -> optax.GradientTransformation:
  """The run's optimizer for a and b (LoRA+: b at ratio x), none for acc;
  with lipschitz > 0, the rate it multiplies kept in the state."""
  ratio = config.lora.loraplus_ratio
  txs = {'other': make_tx(1.0), FROZEN: optax.set_to_zero()}
  if ratio != 1.0:
    txs['lora_b'] = make_tx(ratio)
  tx = optax.multi_transform(txs, lambda ad: _labels(ad, ratio))
  if not config.lipschitz or not hasattr(make_tx, 'schedule'):
    return tx  # without a schedule, `before_update` says what is missing
  peak = jnp.float32(make_tx.peak)
  rate = (make_tx.schedule if config.lipschitz_rate == 'scheduled'
          else lambda count: peak)
  return optax.chain(tx, _rate_tracker(rate))


def logical_axes(base_axes: Any, adapter: Any) -> Any:
  """a, b as LoRA's; acc takes its kernel's axes."""
  flat_axes = peft_base.flatten(base_axes)
  factors = {p: {k: v for k, v in leaf.items() if k != 'acc'}
             for p, leaf in peft_base.flatten(adapter, is_leaf=_is_node)
             .items()}
  out = peft_base.flatten(lora.adapter_logical_axes(
      base_axes, peft_base.unflatten(factors)), is_leaf=lora.is_lora_node)
  return peft_base.unflatten(
      {p: dict(axes, acc=flat_axes[p]) for p, axes in out.items()})


def total_update(config: ScaLoraConfig, path: str, leaf: Mapping[str, Any]
                 ) -> np.ndarray:
  """acc + s A B [in, out] in float64 (host)."""
  a, b, acc = (np.asarray(leaf[k], np.float64) for k in ('a', 'b', 'acc'))
  return acc + config.lora.scale_for(path) * a @ b


def as_lora(config: ScaLoraConfig, adapter: Any, base: Any = None
            ) -> tuple[peft_base.PeftMethod, dict[str, Any]]:
  """The best rank-R LoRA (scale 1) of each total update; prints the error.
  (`base` is not needed: acc holds the whole update.)"""
  del base
  factors, errors = {}, []
  for path, leaf in peft_base.flatten(adapter, is_leaf=_is_node).items():
    total = total_update(config, path, leaf)
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    rank = config.lora.rank_for(path)
    root = np.sqrt(s[:rank])
    factors[path] = {'a': (u[:, :rank] * root).astype(np.float32),
                     'b': (root[:, None] * vh[:rank]).astype(np.float32)}
    norm = np.linalg.norm(s)
    errors.append(np.linalg.norm(s[rank:]) / norm if norm else 0.0)
  print(f'scalora: rank-{config.lora.rank} PEFT approximation of the '
        f'accumulated update: relative Frobenius error max '
        f'{max(errors):.4f}, mean {np.mean(errors):.4f} over {len(errors)} '
        'kernels (the merged checkpoint is exact).')
  method = lora.lora(rank=config.lora.rank, alpha=float(config.lora.rank),
                     targets=sorted(factors),
                     rank_pattern=dict(config.lora.rank_pattern))
  return method, peft_base.unflatten(factors)


def make_config(rank: int = 8, alpha: float = 16.0,
                targets: str | Iterable[str] | None = None,
                dropout: float = 0.0, use_rslora: bool = False,
                loraplus_ratio: float = 1.0, merge_every: int = 1,
                lora_export: bool = False, lipschitz: float = 0.0,
                lipschitz_rate: str = 'scheduled', restart_warmup: int = 0
                ) -> ScaLoraConfig:
  """Validates arguments into a `ScaLoraConfig`; see `scalora`."""
  for name, value, least in (('merge_every', merge_every, 1),
                             ('restart_warmup', restart_warmup, 0)):
    if isinstance(value, bool) or int(value) != value or value < least:
      raise ValueError(f'scalora {name} must be an int >= {least}, got '
                       f'{value!r}.')
  if not lipschitz >= 0:
    raise ValueError(f'scalora lipschitz must be >= 0 (0: L eta = 1), got '
                     f'{lipschitz!r}.')
  if lipschitz_rate not in RATES:
    raise ValueError(f'scalora lipschitz_rate must be one of {RATES}, got '
                     f'{lipschitz_rate!r}.')
  return ScaLoraConfig(
      lora.make_config(rank, alpha, targets, dropout, use_rslora=use_rslora,
                       loraplus_ratio=loraplus_ratio), int(merge_every),
      bool(lora_export), float(lipschitz), lipschitz_rate,
      int(restart_warmup))


def scalora(rank: int = 8, alpha: float = 16.0,
            targets: str | Iterable[str] | None = None, dropout: float = 0.0,
            use_rslora: bool = False, loraplus_ratio: float = 1.0,
            merge_every: int = 1, lora_export: bool = False,
            lipschitz: float = 0.0, lipschitz_rate: str = 'scheduled',
            restart_warmup: int = 0) -> peft_base.PeftMethod:
  """ScaLoRA as a `PeftMethod` (see the module docstring).

  Args:
    rank, alpha, targets, dropout, use_rslora, loraplus_ratio: as `lora.lora`
      (A, B start as LoRA's: Kaiming-uniform A, B = 0).
    merge_every: restart every this many updates (the paper's I).
    lora_export: the method's export writes the best rank-R PEFT LoRA of the
      total update and prints its error; False: the merged Hugging Face
      checkpoint (exact).
    lipschitz: L, which with eta divides the squared scales (theta =
      K^-1 h / (L eta)); 0: L eta = 1 at every update.
    lipschitz_rate: eta: 'scheduled' (the rate of the coming update) or
      'peak' (optimizer.lr).
    restart_warmup: no restart during the first this many updates.

  Returns:
    A PeftMethod whose adapter maps each targeted kernel path to
    {'a': [in, R], 'b': [R, out], 'acc': [in, out]}.
  """
  config = make_config(rank, alpha, targets, dropout, use_rslora,
                       loraplus_ratio, merge_every, lora_export, lipschitz,
                       lipschitz_rate, restart_warmup)
  inner = lora.lora(rank, alpha, targets, dropout, use_rslora=use_rslora)

  def init(rng, base):
    flat = peft_base.flatten(inner.init(rng, base), is_leaf=lora.is_lora_node)
    return peft_base.unflatten({
        p: dict(leaf, acc=jnp.zeros(peft_base.get(base, p).shape,
                                    jnp.float32))
        for p, leaf in flat.items()})

  def apply(base, adapter):
    flat = peft_base.flatten(adapter, is_leaf=_is_node)
    factors = peft_base.unflatten(
        {p: {'a': n['a'], 'b': n['b']} for p, n in flat.items()})
    shifted = peft_base.replace(base, {p: peft_base.get(base, p) +
                                       jax.lax.stop_gradient(n['acc'])
                                       for p, n in flat.items()})
    return inner.apply(shifted, factors)

  def before_update(adapter, opt_state, grads, base, step):
    del base
    due = (step >= config.restart_warmup) & (step % config.merge_every == 0)
    l_eta = _l_eta(config, opt_state)
    return jax.lax.cond(
        due, lambda: _restart(config, adapter, opt_state, grads, l_eta),
        lambda: (adapter, opt_state, grads, _NO_RESTART))

  return peft_base.PeftMethod(
      init, apply, config, logical_axes=logical_axes,
      optimizer=functools.partial(_optimizer, config),
      before_update=before_update,
      export=(lora_form.export(ScaLoraConfig, as_lora) if lora_export
              else peft_base.Export(_write_merged, needs_base=True)))
