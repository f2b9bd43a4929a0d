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
  (1, as in the paper: every update).
* A~, B~ minimise the L-smooth upper bound of the next loss (the paper's
  Assumption 1), i.e. || dW* - dW~ ||_F with dW* = -G / L the full
  fine-tuning step (G the gradient w.r.t. the effective kernel) and dW~ the
  first-order change of a gradient step on A~, B~; restricted to A~, B~ =
  A, B with scaled columns (what keeps the optimizer running), the optimum
  is analytic. With a~ = a diag(alpha), b~ = diag(beta) b, u = alpha^2,
  v = beta^2: dW~ = -lr (sum_i u_i X_i + v_i Y_i), X_i = s^2 a_i a_i' G,
  Y_i = s^2 G b_i' b_i, a linear least-squares problem in (u, v) whose
  2R x 2R normal equations need only inner products of a, b and the LoRA
  gradients g_a = s G b', g_b = s a' G: O((in + out) R^2), no dense G.
* The restart runs in `before_update` (after the gradient at W_t, before
  the optimizer update): the gradients of the restarted factors are exact
  without a second backward pass, g_a~ = g_a diag(beta), g_b~ = diag(alpha)
  g_b, and AdamW's moments are carried over with the same column scaling,
  m_a~ = m_a diag(beta), v_a~ = v_a diag(beta^2), m_b~ = diag(alpha) m_b,
  v_b~ = diag(alpha^2) v_b: no optimizer reset, no warm-up, the step count
  kept. Other optimizers are refused.

Choices the paper's text (as available here) leaves open; each is tested in
tests/test_scalora.py:
1. lr * L = 1: the restarted LoRA step is matched to the full fine-tuning
   step at the same learning rate
   (test_restart_matches_numpy_and_moments_are_transformed).
2. A coordinate whose term vanishes (B = 0 at LoRA's init: Y_i = 0) does not
   change the objective and keeps scale 1; if another coefficient of the
   least-squares optimum is not positive (u, v are squares) or the system
   is singular, no valid scaling exists and the kernel is not restarted
   that update: scales 1, acc and moments unchanged, a plain LoRA step
   (test_free_and_invalid_scalings).
3. The gradient is the run's (clipped, mean, dropout) minibatch gradient;
   the scales do not depend on its overall size.

State: acc is one fp32 [in, out] copy per targeted kernel (4 bytes per
targeted base weight), kept in the adapter (checkpointed: a resumed run
continues bitwise, test_sigkill_resume_is_bitwise) and frozen by the
method's optimizer (`optax.set_to_zero`: no moments for it) and by
`stop_gradient` in `apply`. A restart forms one dense [in, out] increment.

Export: the update is high-rank, so the method's export (a run's `peft/`
folder) is the merged Hugging Face checkpoint (`lora_folder.save_merged`,
W + acc + s A B; config.json and safetensors that transformers loads alone).
On request (`lora_export=True`) it writes instead the best rank-R
approximation (truncated SVD) of acc + s A B as a plain PEFT LoRA folder and
prints its relative error.
"""
import dataclasses
import functools
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft.lora import folder as lora_folder
from flaxlora.peft.lora import form as lora_form

Array = jax.Array
FROZEN = 'frozen'
_HI = jax.lax.Precision.HIGHEST
# A term whose squared norm is below this x the largest one is zero.
_FREE = 1e-12


def _write_merged(folder, model, base, adapter, method, **kwargs):
  """The method's default export: the merged Hugging Face checkpoint."""
  del kwargs  # a merged checkpoint names no base
  print('scalora: the update is high-rank; the export is the merged '
        'Hugging Face checkpoint (W + acc + s A B, transformers loads it '
        'alone); lora_export=True writes its best rank-R PEFT LoRA instead.')
  return lora_folder.save_merged(folder, model, base, adapter, method)


@dataclasses.dataclass(frozen=True)
class ScaLoraConfig:
  """ScaLoRA hyperparameters: LoRA's (`lora`), the restart period, and
  whether the run's PEFT folder holds the best rank-R LoRA (`lora_export`).
  """
  lora: lora.LoraConfig
  merge_every: int = 1
  lora_export: bool = False


def _is_node(node: Any) -> bool:
  return isinstance(node, Mapping) and 'acc' in node


def _mm(x, y):
  return jnp.matmul(x, y, precision=_HI)


def scaling(a: Array, b: Array, g_a: Array, g_b: Array, scale: float
            ) -> tuple[Array, Array]:
  """The optimal column scales (alpha [R], beta [R]) of one kernel.

  Solves the normal equations of min_{u, v} ||G - sum_i u_i X_i + v_i Y_i||_F
  (module docstring) from inner products of the factors and their gradients.
  A coordinate whose term vanishes (X_i or Y_i = 0) is free and keeps scale
  1; if any other coordinate is not positive (or the system is singular) no
  valid scaling exists and every scale is 1 (no restart).

  Args:
    a: [in, R]; b: [R, out]; g_a [in, R], g_b [R, out]: the loss gradients
      of a and b at the current point.
    scale: s of the product s A B.

  Returns:
    (alpha [R], beta [R]): a~ = a diag(alpha), b~ = diag(beta) b.
  """
  r = a.shape[1]
  k_xx = _mm(a.T, a) * _mm(g_b, g_b.T)                    # [R, R]
  k_yy = _mm(g_a.T, g_a) * _mm(b, b.T)
  k_xy = _mm(a.T, g_a) * _mm(g_b, b.T)
  gram = scale**2 * jnp.block([[k_xx, k_xy], [k_xy.T, k_yy]])  # [2R, 2R]
  h = jnp.concatenate([jnp.sum(g_b * g_b, 1), jnp.sum(g_a * g_a, 0)])
  diag = jnp.diagonal(gram)
  free = diag <= _FREE * jnp.max(diag)
  gram = jnp.where(free[:, None] | free[None, :], jnp.eye(2 * r), gram)
  theta = jnp.linalg.solve(gram, jnp.where(free, 1.0, h))
  valid = jnp.all(jnp.isfinite(theta) & (theta > 0))
  col = jnp.sqrt(jnp.where(valid, theta, 1.0))
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


def _optimizer(ratio: float, make_tx: peft_base.TxFactory
               ) -> optax.GradientTransformation:
  """The run's optimizer for a and b (LoRA+: b at ratio x), none for acc."""
  txs = {'other': make_tx(1.0), FROZEN: optax.set_to_zero()}
  if ratio != 1.0:
    txs['lora_b'] = make_tx(ratio)
  return optax.multi_transform(txs, lambda ad: _labels(ad, ratio))


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
            merge_every: int = 1, lora_export: bool = False
            ) -> peft_base.PeftMethod:
  """ScaLoRA as a `PeftMethod` (see the module docstring).

  Args:
    rank, alpha, targets, dropout, use_rslora, loraplus_ratio: as `lora.lora`
      (A, B start as LoRA's: Kaiming-uniform A, B = 0).
    merge_every: restart every this many updates (1: every update).
    lora_export: the method's export writes the best rank-R PEFT LoRA of the
      total update and prints its error; False: the merged Hugging Face
      checkpoint (exact).

  Returns:
    A PeftMethod whose adapter maps each targeted kernel path to
    {'a': [in, R], 'b': [R, out], 'acc': [in, out]}.
  """
  config = ScaLoraConfig(
      lora.make_config(rank, alpha, targets, dropout, use_rslora=use_rslora,
                       loraplus_ratio=loraplus_ratio), int(merge_every),
      bool(lora_export))
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

  def before_update(adapter, opt_state, grads, base, step):
    del base
    return jax.lax.cond(step % config.merge_every == 0,
                        lambda: _restart(config, adapter, opt_state, grads),
                        lambda: (adapter, opt_state, grads))

  return peft_base.PeftMethod(
      init, apply, config, logical_axes=logical_axes,
      optimizer=functools.partial(_optimizer, config.lora.loraplus_ratio),
      before_update=before_update,
      export=(lora_form.export(ScaLoraConfig, as_lora) if lora_export
              else peft_base.Export(_write_merged, needs_base=True)))
