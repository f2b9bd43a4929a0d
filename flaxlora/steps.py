"""The train state, the train step and the eval step.

    step_fn = steps.jit_train_step(task.loss, method, tx, clip_norm=1.0)
    state, metrics = step_fn(state, base, batch)
    eval_fn = steps.jit_eval_step(task, method)
    outputs = eval_fn(state.adapter, base, batch)

The state is only what training changes: the adapter, its optimizer state,
the step and the rng. The base params are a separate, non-donated argument
of the jitted steps; gradients are taken w.r.t. the adapter alone, so the
optimizer never sees the base and XLA computes no gradient for it. The
method's `before_update` hook runs inside the train step between the
gradient and the update, its `after_step` hook after the update.

Dropout rngs are `fold_in(state.rng, state.step)` (and the micro-batch
number under gradient accumulation), so a run resumed from a checkpoint
draws exactly the numbers an uninterrupted run draws.
"""
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flaxlora.models import layers

Params = Any
# loss_fn(params, kwargs, batch, rng) -> (loss_sum, weight): the sum over
# labelled positions and their count, so sharded and accumulated reductions
# stay exact.
LossFn = Callable[[Params, dict, dict, jax.Array], tuple[jax.Array, jax.Array]]


class TrainState(NamedTuple):
  """What a checkpoint holds (besides the data position).

  Attributes:
    step: int32 scalar, the number of optimizer updates done.
    adapter: the trainable PEFT state (a pytree of fp32 arrays).
    opt_state: the optimizer state of `adapter`.
    rng: the run's base key; per-step keys are folded from it.
  """
  step: jax.Array
  adapter: Any
  opt_state: Any
  rng: jax.Array


def _micro_batches(batch: dict, accum: int) -> dict:
  """[B, ...] -> [accum, B / accum, ...] (row i goes to micro-batch i % accum).

  Interleaving keeps each device's rows on that device when B is sharded.
  """
  def split(x):
    if x.shape[0] % accum:
      raise ValueError(f'train.batch_size ({x.shape[0]} rows) is not a '
                       f'multiple of optimizer.grad_accum_steps={accum}.')
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def loss_and_grads(loss_fn: LossFn, method: Any, base: Params, adapter: Any,
                   batch: dict, rng: jax.Array, accum: int):
  """(loss_sum, weight, grads of loss_sum) over `accum` micro-batches."""
  def one(adapter, micro, rng):
    params, kwargs = method.apply(base, adapter)
    return loss_fn(params, kwargs, micro, rng)

  grad_fn = jax.value_and_grad(one, has_aux=True)
  if accum == 1:
    (loss_sum, weight), grads = grad_fn(adapter, batch, rng)
    return loss_sum, weight, grads

  def body(carry, inputs):
    i, micro = inputs
    (loss_sum, weight), grads = grad_fn(adapter, micro,
                                        jax.random.fold_in(rng, i))
    total = jax.tree.map(jnp.add, carry, (loss_sum, weight, grads))
    return total, None

  zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
           jax.tree.map(jnp.zeros_like, adapter))
  micro = _micro_batches(batch, accum)
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
  return total


def train_step(state: TrainState, base: Params, batch: dict, *,
               loss_fn: LossFn, method: Any, tx: optax.GradientTransformation,
               accum: int = 1, clip_norm: float = 0.0
               ) -> tuple[TrainState, dict]:
  """One optimizer update of the adapter; base params stay untouched.

  Args:
    state: the TrainState (donated by `jit_train_step`).
    base: frozen base params (not donated, never differentiated).
    batch: the global batch (arrays [B, ...]).
    loss_fn: see `LossFn`.
    method: the PEFT method (`apply`, its `before_update` and `after_step`
      hooks).
    tx: the optimizer (`optimizers.optimizer`).
    accum: micro-batches per update (gradient accumulation).
    clip_norm: clip the mean gradient to this global norm (0: no clipping).

  Returns:
    (new state, {'loss', 'weight', 'grad_norm', and the method's metrics})
    where loss is the mean over labelled positions of the whole batch and
    grad_norm the norm before clipping.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  loss_sum, weight, grads = loss_and_grads(loss_fn, method, base,
                                           state.adapter, batch, rng, accum)
  # Dividing summed grads by the total weight gives the exact mean gradient.
  denominator = jnp.maximum(weight, 1.0)
  grads = jax.tree.map(lambda g: g / denominator, grads)
  grad_norm = optax.global_norm(grads)
  if clip_norm:
    grads, _ = optax.clip_by_global_norm(clip_norm).update(
        grads, optax.EmptyState())
  adapter, opt_state, grads, method_metrics = method.before_update(
      state.adapter, state.opt_state, grads, base, state.step)
  updates, opt_state = tx.update(grads, opt_state, adapter)
  adapter = optax.apply_updates(adapter, updates)
  adapter, opt_state = method.after_step(adapter, opt_state, base,
                                         state.step + 1)
  new_state = TrainState(state.step + 1, adapter, opt_state, state.rng)
  metrics = {'loss': loss_sum / denominator, 'weight': weight,
             'grad_norm': grad_norm}
  if set(method_metrics) & set(metrics):
    raise ValueError(f'the PEFT method reports metrics named '
                     f'{sorted(set(method_metrics) & set(metrics))}, which '
                     "the train step's own metrics use; rename them.")
  return new_state, {**metrics, **method_metrics}


def logged(metrics: dict) -> dict:
  """What a run logs of a train step's metrics besides its loss: the
  gradient norm and the method's own metrics (`before_update`'s)."""
  return {k: v for k, v in metrics.items() if k not in ('loss', 'weight')}


def _sharding_activations(fn: Callable, activation_sharding: Any) -> Callable:
  """`fn` traced under `layers.activation_sharding(mesh, rules)` when
  `activation_sharding` is (mesh, rules); `fn` itself for None."""
  if activation_sharding is None:
    return fn

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with layers.activation_sharding(*activation_sharding):
      return fn(*args, **kwargs)
  return traced


def jit_train_step(loss_fn: LossFn, method: Any,
                   tx: optax.GradientTransformation, accum: int = 1,
                   state_shardings: Any = None, clip_norm: float = 0.0,
                   activation_sharding: Any = None):
  """`train_step` jitted; the state is donated, the base is not.

  With `state_shardings`, the new state keeps the layout of the old one, so
  a restored checkpoint and a fresh state run the same program. With
  `activation_sharding` = (mesh, rules), the models' activations are
  constrained by the rules (`layers.constrain`).
  """
  step = functools.partial(train_step, loss_fn=loss_fn, method=method, tx=tx,
                           accum=accum, clip_norm=clip_norm)
  out = None if state_shardings is None else (state_shardings, None)
  return jax.jit(_sharding_activations(step, activation_sharding),
                 donate_argnums=(0,), out_shardings=out)


def eval_step(adapter: Any, base: Params, batch: dict, *, task: Any,
              method: Any) -> dict:
  """The task's eval outputs ([B, ...] arrays) plus the batch's 'index' and
  'weight' (weight 0 marks padding rows)."""
  params, kwargs = method.apply(base, adapter)
  out = task.eval_outputs(params, kwargs, batch)
  out.update(index=batch['index'], weight=batch['weight'])
  return out


def jit_eval_step(task: Any, method: Any, activation_sharding: Any = None):
  """`eval_step` jitted: `(adapter, base, batch) -> outputs` (for
  `activation_sharding` see `jit_train_step`)."""
  step = functools.partial(eval_step, task=task, method=method)
  return jax.jit(_sharding_activations(step, activation_sharding))


def create(rng: jax.Array, adapter: Any,
           tx: optax.GradientTransformation) -> TrainState:
  """A fresh state at step 0."""
  return TrainState(jnp.zeros((), jnp.int32), adapter, tx.init(adapter), rng)
