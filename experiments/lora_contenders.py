"""The two sides of `experiments.benchmark lora`, built from one config.

    step = lora_contenders.FlaxStep(config, devices=1, scratch=folder)
    step()                      # one trainer train step on a fixed batch
    step = lora_contenders.TorchStep(config, scratch=folder, autocast=False)
    step()                      # the same update in PyTorch + PEFT

`FlaxStep` is the trainer's: `run_setup.setup` (data, mesh, model, base,
method, task), `optimizers.optimizer`, `run_setup.init_state` and
`run_setup.train_step_fn` (the task's `(sum, weight)` loss, the method's
apply and after_step, the config's clipping and accumulation, dropout rngs
folded from the step), on the first batch of the trainer's own loader. Per
step: forward with dropout, backward w.r.t. the adapter, the exact mean
gradient, its global norm and clipping, AdamW (bias-corrected, decoupled
weight decay, the config's schedule), after_step.

`TorchStep` starts from the same model and adapter: the flaxlora base is
saved as a Hugging Face folder (`models.save`) and its initial adapter as a
PEFT folder (`export.save_peft`, what a run exports), loaded with
transformers and `peft.PeftModel.from_pretrained(is_trainable=True)`.
Per step, on the same batch: forward with the same dropout rates (under
bf16 autocast for the bf16 row), the same weighted cross-entropy (sum of
per-token or per-row losses times the batch's weights over their sum, in
fp32; micro-batch by micro-batch under accumulation, rows split as the
trainer splits them), backward, `clip_grad_norm_` to the config's norm,
`torch.optim.AdamW` with the config's lr/betas/eps/weight decay, a
transformers schedule of the config's shape.
"""
import os
import pathlib
from typing import Any

import jax
import numpy as np

from flaxlora import distributed
from flaxlora import export
from flaxlora import models
from flaxlora import optimizers
from flaxlora import run_setup

# config.optimizer.schedule -> transformers' schedule of the same shape.
TORCH_SCHEDULES = {
    'linear': 'get_linear_schedule_with_warmup',
    'cosine': 'get_cosine_schedule_with_warmup',
    'constant': 'get_constant_schedule_with_warmup',
}


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost.get('flops', 0.0))


class FlaxStep:
  """The trainer's train step of `config`, on a fixed batch.

  Attributes:
    run: the trainer's `run_setup.Run` (mesh over the first `devices` devices).
    state: the current `steps.TrainState` (donated to each step).
    batch: the global batch every step trains on (the loader's first).
    flops: XLA's flop count of one step (all devices).
  """

  def __init__(self, config: Any, devices: int, scratch: str | os.PathLike):
    self.run = run_setup.setup(config, scratch,
                             devices=jax.devices()[:devices])
    tx = optimizers.optimizer(config.optimizer, self.run.total_steps,
                              self.run.method)
    self.state, shardings = run_setup.init_state(self.run, tx)
    host = next(run_setup.loader(self.run, train=True))
    self.batch = distributed.global_batch(host, self.run.mesh, self.run.rules)
    step_fn = run_setup.train_step_fn(self.run, tx, shardings)
    self._compiled = step_fn.lower(self.state, self.run.base,
                                   self.batch).compile()
    self.flops = _flops(self._compiled) * devices  # cost analysis: per device

  def __call__(self) -> dict:
    """One step; blocks until the new state and metrics exist."""
    self.state, metrics = self._compiled(self.state, self.run.base,
                                         self.batch)
    return jax.block_until_ready((self.state, metrics))[1]


def torch_model(run: Any, folder: pathlib.Path):
  """The run's base and initial adapter as a trainable PEFT model."""
  import peft  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  host_base = distributed.to_host(run.base)
  adapter = distributed.to_host(run.method.init(run.adapter_rng, run.base))
  models.save(folder / 'base', run.model, host_base)
  export.save_peft(folder / 'peft', run.model, host_base, adapter,
                   run.method)
  architecture = run.family.config_to_hf(run.model)['architectures'][0]
  hf_model = getattr(transformers, architecture).from_pretrained(
      str(folder / 'base'))
  return peft.PeftModel.from_pretrained(hf_model, str(folder / 'peft'),
                                        is_trainable=True)


def torch_inputs(task: str, batch: dict) -> tuple[dict, Any, Any]:
  """(model kwargs, labels, loss weights) of a flaxlora batch, as tensors.

  Weights are the trainer's: seq2seq decoder_attention_mask * row weight
  ([B, T]), classification the row weight ([B]), causal_lm the next
  token's loss_mask * row weight ([B, T]).
  """
  import torch  # pylint: disable=g-import-not-at-top
  t = lambda name: torch.from_numpy(np.asarray(batch[name], np.int64))
  weight = np.asarray(batch['weight'], np.float32)
  if task == 'seq2seq':
    names = ('input_ids', 'attention_mask', 'decoder_input_ids',
             'decoder_attention_mask')
    weights = batch['decoder_attention_mask'] * weight[:, None]
    return ({n: t(n) for n in names}, t('labels'),
            torch.from_numpy(weights.astype(np.float32)))
  if task == 'classification':
    names = ('input_ids', 'attention_mask', 'token_type_ids')
    return {n: t(n) for n in names}, t('label'), torch.from_numpy(weight)
  if task == 'causal_lm':  # position t predicts token t + 1 (last: none)
    ids = np.asarray(batch['input_ids'], np.int64)
    labels = np.concatenate([ids[:, 1:], ids[:, -1:]], axis=1)
    weights = np.asarray(batch['loss_mask'], np.float32) * weight[:, None]
    weights = np.concatenate([weights[:, 1:], 0 * weights[:, -1:]], axis=1)
    return ({n: t(n) for n in ('input_ids', 'attention_mask')},
            torch.from_numpy(labels), torch.from_numpy(weights))
  raise ValueError(f'task={task!r}: the PyTorch side of the benchmark runs '
                   "'seq2seq', 'classification' and 'causal_lm'.")


class TorchStep:
  """PEFT + PyTorch doing the train step of `config` (see module doc)."""

  def __init__(self, config: Any, scratch: str | os.PathLike,
               autocast: bool):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    o = config.optimizer
    if o.name != 'adamw':
      raise ValueError(f'optimizer.name={o.name!r}: the PyTorch side of the '
                       "benchmark runs 'adamw'.")
    folder = pathlib.Path(scratch)
    run = run_setup.setup(config, folder, devices=jax.devices()[:1])
    self.model = torch_model(run, folder)
    self.model.train()
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    self.opt = torch.optim.AdamW(self.params, lr=o.lr, betas=(o.b1, o.b2),
                                 eps=o.eps, weight_decay=o.weight_decay)
    warmup = {'num_warmup_steps': o.warmup_steps}
    if o.schedule != 'constant':
      warmup['num_training_steps'] = run.total_steps
    self.schedule = getattr(transformers, TORCH_SCHEDULES[o.schedule])(
        self.opt, **warmup)
    self.clip = optimizers.clip_norm(o) or float('inf')
    self.accum = o.grad_accum_steps
    self.autocast = autocast
    self.inputs, self.labels, self.weights = torch_inputs(
        config.task, next(run_setup.loader(run, train=True)))

  def _micro(self, i: int):
    """Micro-batch i: rows i, i + accum, ... (the trainer's split)."""
    pick = lambda x: x[i::self.accum]
    return ({k: pick(v) for k, v in self.inputs.items()},
            pick(self.labels), pick(self.weights))

  def __call__(self) -> float:
    """One step; returns the mean loss."""
    import torch  # pylint: disable=g-import-not-at-top
    total = self.weights.sum().clamp(min=1.0)
    loss = 0.0
    self.opt.zero_grad(set_to_none=True)
    for i in range(self.accum):
      inputs, labels, weights = self._micro(i)
      with torch.autocast('cpu', dtype=torch.bfloat16,
                          enabled=self.autocast):
        logits = self.model(**inputs).logits
      ce = torch.nn.functional.cross_entropy(
          logits.float().flatten(0, -2), labels.flatten(), reduction='none')
      part = (ce * weights.flatten()).sum() / total
      part.backward()
      loss += part.item()
    torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()
    self.schedule.step()
    return loss
