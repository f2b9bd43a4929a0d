"""ScaLoRA: a high-rank update accumulated from optimally scaled LoRA steps.

ScaLoRA (Zhang, Yang, Cai, Giannakis, arXiv 2510.23818) notes that LoRA's
summed updates telescope to the last A B, so they stay in one rank-R
subspace. Every `merge_every` updates (1, every update, as in the paper) it
folds the current product into the frozen weight and restarts the adapter
from A, B with scaled columns, A~ = A diag(alpha), B~ = diag(beta) B:

    W_eff = W + acc + s A B = W + acc' + s A~ B~,  acc' = acc + s (A B - A~ B~)

so the model is unchanged by a restart while `acc` (the accumulated update)
becomes a sum of different rank-R pieces: it grows high-rank.

The scaling (choices this module makes where the paper's text was not
available to check are marked *): at update t, with the gradient G of the
loss w.r.t. the effective kernel [in, out], a gradient step on the restarted
factors changes the kernel by, to first order,
-lr s^2 (G B~' B~ + A~ A~' G) = -lr (sum_i u_i X_i + v_i Y_i) with
u = alpha^2, v = beta^2, X_i = s a_i (s a_i' G) and Y_i = s (s G b_i') b_i.
alpha, beta minimise || G - sum_i u_i X_i + v_i Y_i ||_F, i.e. the restarted
LoRA step is the best column-scaled match of the full fine-tuning step at
the same learning rate (the paper's L-smooth bound with L = 1/lr*). This is a
2R x 2R linear system whose entries are inner products of A, B and of the
LoRA gradients g_A = s G B', g_B = s A' G, never of G itself: O((in + out)
R^2) per kernel. A column whose coefficient is not positive (or whose terms
vanish, e.g. B = 0 at init) keeps scale 1*.

The restart needs the gradient at the current point and the gradient of the
restarted factors, which is exact without a second backward pass:
g_A~ = g_A diag(beta), g_B~ = diag(alpha) g_B. It therefore runs in the
method's `before_update` hook (between the gradient and the optimizer
update). AdamW's moments follow the same column scaling, as the paper
derives from this equivariance (no optimizer reset, no warm-up):
m_A~ = m_A diag(beta), v_A~ = v_A diag(beta^2), m_B~ = diag(alpha) m_B,
v_B~ = diag(alpha^2) v_B.

Memory: `acc` is one fp32 copy of every targeted kernel, kept in the adapter
(so it is checkpointed and a resumed run continues exactly) and frozen by the
method's optimizer (`optax.set_to_zero`: no moments for it) and by
`stop_gradient` in `apply`. Each restart forms one dense [in, out] increment.

Export: the update is high-rank, so the served form is the merged checkpoint
(`peft_io.save_merged(folder, model, base, adapter, method)`, W + acc + s A B).
The method's PEFT export writes the best rank-R approximation (truncated SVD)
of acc + s A B as a plain LoRA folder and prints its relative error.
"""
import dataclasses
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft import lora_form

Array = jax.Array
FROZEN = 'frozen'
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ScaLoraConfig:
  """ScaLoRA hyperparameters: LoRA's (`lora`) and the restart period."""
  lora: lora.LoraConfig
  merge_every: int = 1


def _is_node(node: Any) -> bool:
  return isinstance(node, Mapping) and 'acc' in node


def _mm(x, y):
  return jnp.matmul(x, y, precision=_HI)


def scaling(a: Array, b: Array, g_a: Array, g_b: Array, scale: float
            ) -> tuple[Array, Array]:
  """The optimal column scales (alpha [R], beta [R]) for one kernel.

  Args:
    a: [in, R]; b: [R, out]; g_a, g_b: the loss gradients of a and b.
    scale: s of the product s A B.
  """
  r = a.shape[1]
  k_xx = (_mm(a.T, a) * _mm(g_b, g_b.T))                    # [R, R]
  k_yy = (_mm(g_a.T, g_a) * _mm(b, b.T))
  k_xy = (_mm(a.T, g_a) * _mm(g_b, b.T))
  gram = scale**2 * jnp.block([[k_xx, k_xy], [k_xy.T, k_yy]])  # [2R, 2R]
  h = jnp.concatenate([jnp.sum(g_b * g_b, 1), jnp.sum(g_a * g_a, 0)])
  diag = jnp.diagonal(gram)
  ridge = 1e-6 * jnp.max(diag) + 1e-30
  theta = jnp.linalg.solve(gram + ridge * jnp.eye(2 * r), h)
  ok = (theta > 0) & (diag > 1e-12 * jnp.max(diag))
  col = jnp.where(ok, jnp.sqrt(jnp.where(ok, theta, 1.0)), 1.0)
  return col[:r], col[r:]


def _restart(config: ScaLoraConfig, adapter, opt_state, grads):
  """Folds, rescales, and carries gradients and Adam moments over."""
  flat = peft_base.flatten(adapter, is_leaf=_is_node)
  flat_g = peft_base.flatten(grads, is_leaf=_is_node)
  new, new_g, cols = {}, {}, {}
  for path, leaf in flat.items():
    g = flat_g[path]
    s = config.lora.scale_for(path)
    alpha, beta = scaling(leaf['a'], leaf['b'], g['a'], g['b'], s)
    a, b = leaf['a'] * alpha, beta[:, None] * leaf['b']
    acc = leaf['acc'] + s * _mm(leaf['a'] * (1.0 - alpha * beta), leaf['b'])
    new[path] = dict(leaf, a=a, b=b, acc=acc)
    new_g[path] = dict(g, a=g['a'] * beta, b=alpha[:, None] * g['b'])
    cols[path] = {'a': beta[None, :], 'b': alpha[:, None]}
  return (peft_base.unflatten(new), _scale_moments(opt_state, cols),
          peft_base.unflatten(new_g))


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


def _labels(adapter: Any, ratio: float) -> Any:
  out = {}
  for path, leaf in peft_base.flatten(adapter, is_leaf=_is_node).items():
    b = 'lora_b' if ratio != 1.0 else 'other'
    out[path] = {'a': 'other', 'b': b, 'acc': FROZEN}
  return peft_base.unflatten(out)


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


def as_lora(config: ScaLoraConfig, adapter: Any
            ) -> tuple[peft_base.PeftMethod, dict[str, Any]]:
  """The best rank-R LoRA (scale 1) of each total update; prints the error.
  """
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


def scalora(rank: int = 8, alpha: float = 16.0,
            targets: str | Iterable[str] | None = None, dropout: float = 0.0,
            use_rslora: bool = False, loraplus_ratio: float = 1.0,
            merge_every: int = 1) -> peft_base.PeftMethod:
  """ScaLoRA as a `PeftMethod` (see the module docstring).

  Args:
    rank, alpha, targets, dropout, use_rslora, loraplus_ratio: as `lora.lora`
      (A, B start as LoRA's: Kaiming-uniform A, B = 0).
    merge_every: restart every this many updates (1: every update).

  Returns:
    A PeftMethod whose adapter maps each targeted kernel path to
    {'a': [in, R], 'b': [R, out], 'acc': [in, out]}.
  """
  config = ScaLoraConfig(
      lora.make_config(rank, alpha, targets, dropout, use_rslora=use_rslora,
                       loraplus_ratio=loraplus_ratio), int(merge_every))
  if isinstance(merge_every, bool) or not config.merge_every >= 1:
    raise ValueError(f'scalora merge_every must be an int >= 1 (1: every '
                     f'update), got {merge_every!r}.')
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

  def optimizer(make_tx):
    txs = {'other': make_tx(1.0), FROZEN: optax.set_to_zero()}
    if config.lora.loraplus_ratio != 1.0:
      txs['lora_b'] = make_tx(config.lora.loraplus_ratio)
    return optax.multi_transform(
        txs, lambda ad: _labels(ad, config.lora.loraplus_ratio))

  def before_update(adapter, opt_state, grads, base, step):
    del base
    return jax.lax.cond(step % config.merge_every == 0,
                        lambda: _restart(config, adapter, opt_state, grads),
                        lambda: (adapter, opt_state, grads))

  return peft_base.PeftMethod(
      init, apply, config, logical_axes=logical_axes, optimizer=optimizer,
      before_update=before_update,
      export=lora_form.export(ScaLoraConfig, as_lora))
