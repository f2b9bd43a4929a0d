"""`train_and_evaluate(config, workdir)`: the whole run, resumable.

    summary = trainer.train_and_evaluate(config, 'workdirs/x')

Builds the model, data, PEFT method and optimizer from the config
(`flaxlora.run_setup`, over `flaxlora.build`, `flaxlora.data.task_data`,
`flaxlora.tasks`, `flaxlora.optimizers`), trains the adapter with the steps of
`flaxlora.steps`, with periodic eval and checkpoints, and leaves in the
workdir
`config.json`, `metrics.jsonl`, `summary.json`, loss/eval plots, orbax
checkpoints (`checkpoints/`), the final adapter (`adapter/`, flaxlora's
format) and a PEFT folder (`peft/`). See `flaxlora.workdir`.

A run restarted in the same workdir resumes from its latest checkpoint and
ends with exactly the adapter of an uninterrupted run: the checkpoint holds
the adapter, optimizer state, step, rng and the data position, and dropout
rngs are folded from (seed, step). A finished run (summary.json present)
is not rerun; a run continued with compatible changes (more steps, a new
learning rate, see `flaxlora.claim`) trains on from its last checkpoint.
Nothing is written before every input is checked; the workdir is locked
while the run trains (`flaxlora.lock`), and SIGINT/SIGTERM stop it after a
checkpoint at the current step (`flaxlora.interrupt`).
"""
import contextlib
import pathlib
import time
from typing import Any

import jax
import numpy as np

from flaxlora import build
from flaxlora import checkpoint
from flaxlora import claim
from flaxlora import distributed
from flaxlora import export
from flaxlora import interrupt
from flaxlora import lock
from flaxlora import metric_writers
from flaxlora import optimizers
from flaxlora import predictions_io
from flaxlora import provenance
from flaxlora import progress as progress_lib
from flaxlora import run_setup
from flaxlora import steps
from flaxlora import validate
from flaxlora import workdir as workdir_lib
from flaxlora.data import pipeline
from flaxlora.models import causal_decoding
from flaxlora.models import decoding
from flaxlora.models import layers
from flaxlora.peft import method_parts
from flaxlora.peft import peft_names

# Steps dispatched ahead of the host. A bound keeps the input pipeline and
# the device overlapped and stops XLA:CPU's collectives from deadlocking:
# with 8 host devices and ~100 steps queued unsynced, a rendezvous waits
# past its 40 s limit and aborts the process.
STEPS_IN_FLIGHT = 2


def eval_outputs(run: run_setup.Run, eval_step: Any,
                 adapter: Any) -> list[dict]:
  """The host eval outputs of every eval batch (see `flaxlora.tasks`)."""
  outputs = []
  for batch in run_setup.loader(run, train=False):
    out = eval_step(adapter, run.base, run_setup.device_batch(run, batch))
    outputs.append(distributed.to_host(out))
  return outputs


def evaluate(run: run_setup.Run, eval_step: Any, adapter: Any,
             predictions_dir: pathlib.Path | None = None
             ) -> dict[str, float]:
  """Eval metrics of `adapter` on the whole eval set.

  With `predictions_dir`, the main process also writes the per-example
  predictions there (`flaxlora.predictions_io`).
  """
  outputs = eval_outputs(run, eval_step, adapter)
  generate = lambda: generate_texts(run, adapter)
  predictions = run.task.predict(run.data, outputs, generate)
  if predictions_dir is not None and run.is_main:
    predictions_io.write(
        predictions_dir, run.task.rows(run.data.eval_records, predictions),
        squad=run.data.kind == 'squad')
  return run.task.score(run.data, outputs, predictions)


def generate_texts(run: run_setup.Run, adapter: Any) -> dict[int, str]:
  """{eval record index: generated text} (seq2seq and causal-LM eval), with
  the config's eval.num_beams, max_new_tokens and length_penalty; a causal
  LM continues the left-padded prompts and stops at the tokenizer's eos."""
  if run.config.task == 'causal_lm':
    decoder = causal_decoding
    eos = run.tokenizer.eos_token_id
    pad = run.tokenizer.pad_token_id
    extra = {'eos_token_id': eos, 'pad_token_id': eos if pad is None else pad}
  else:
    decoder, extra = decoding, {}
  e = run.config.eval
  params, kwargs = run.method.apply(run.base, adapter)
  texts = {}
  ids, mask = run.task.GENERATE_FROM
  for batch in run_setup.loader(run, train=False):
    device = run_setup.device_batch(run, batch)
    tokens = decoder.generate(
        run.model, params, device[ids], device[mask],
        max_new_tokens=e.max_new_tokens, num_beams=e.num_beams,
        length_penalty=e.length_penalty, model_kwargs=kwargs, **extra)
    tokens = distributed.to_host(tokens)
    index = distributed.to_host(device['index'])
    for i, row in zip(index, tokens):
      if i >= 0:
        texts[int(i)] = run.tokenizer.decode(row, skip_special_tokens=True)
  return texts


def train_and_evaluate(config: Any, workdir: str | pathlib.Path, *,
                       overwrite: bool = False) -> dict[str, Any]:
  """Trains and evaluates per `config`, writing to `workdir`; see module doc.

  Returns:
    The summary (also written to summary.json).
  """
  workdir = claim.check_path(workdir)
  validate.config_values(config)
  # Refuse a workdir of another config, or one in use, before building
  # anything; claim it only once the inputs proved valid (a bad config
  # leaves it untouched).
  trained = (checkpoint.steps_on_disk(workdir / workdir_lib.CHECKPOINT_DIR)
             or [None])[-1]
  changed = claim.prepare(workdir, config, overwrite=overwrite, write=False,
                          trained_step=trained)
  finished = workdir_lib.read_summary(workdir)
  if finished is not None and not overwrite and not changed:
    print(f'flaxlora: {workdir} holds a finished run (summary.json); '
          'nothing to do. Pass --overwrite to run it again.')
    return finished
  started = time.time()
  held = lock.Lock(workdir)
  held.check_free()
  run = run_setup.setup(config, workdir)
  run.started = started
  if not run.is_main:  # multi-host runs lock once, on the main process
    held = contextlib.nullcontext()
  if trained is not None and not overwrite:
    trained = _check_resumable(run)
  with held, interrupt.Guard() as guard:
    claim.prepare(workdir, config, overwrite=overwrite, write=run.is_main,
                  trained_step=trained, total_steps=run.total_steps)
    distributed.sync('flaxlora_workdir')
    return _train(run, guard)


def _check_resumable(run: run_setup.Run) -> int | None:
  """Before the workdir is claimed: the step of the newest intact
  checkpoint, which `_train` restores (errors.UserError: none reads)."""
  tx = optimizers.optimizer(run.config.optimizer, run.total_steps,
                            run.method)
  return checkpoint.check_restorable(
      run.workdir / workdir_lib.CHECKPOINT_DIR, jax.eval_shape(
          lambda r, b: steps.create(run.state_rng, run.method.init(r, b), tx),
          run.adapter_rng, run.base))


def _train(run: run_setup.Run, guard: interrupt.Guard) -> dict[str, Any]:
  """The train loop with eval, checkpoints, logging and the final export;
  a SIGINT/SIGTERM caught by `guard` stops it after a checkpoint."""
  c = run.config
  tx = optimizers.optimizer(c.optimizer, run.total_steps, run.method)
  state, state_shardings = run_setup.init_state(run, tx)
  ckpt, train_loader, start, state = _restore(run, state)
  log = workdir_lib.MetricsLog(
      run.workdir, start, write=run.is_main,
      writer=metric_writers.create(c, run.workdir, run.is_main))
  if run.is_main:
    print(f'flaxlora: mesh {dict(run.mesh.shape)} over {run.mesh.size} '
          f'{run.mesh.devices.flat[0].platform} devices', flush=True)
  step_fn = run_setup.train_step_fn(run, tx, state_shardings)
  eval_step = steps.jit_eval_step(run.task, run.method,
                                  run_setup.activation_sharding(run))
  lr = optimizers.schedule(c.optimizer, run.total_steps)
  progress = progress_lib.Progress(run.total_steps)
  pending, last_eval, train_loss = [], None, float('nan')
  for step in range(start + 1, run.total_steps + 1):
    batch = run_setup.device_batch(run, next(train_loader))
    state, metrics = step_fn(state, run.base, batch)
    pending.append((step, metrics['loss']))
    if len(pending) > STEPS_IN_FLIGHT:
      pending[-1 - STEPS_IN_FLIGHT][1].block_until_ready()
    final = step == run.total_steps
    # Step 1 is always logged: the loss to compare later losses with.
    do_log = final or step == 1 or step % max(c.train.log_every, 1) == 0
    do_eval = final or (c.train.eval_every and step % c.train.eval_every == 0)
    do_save = final or do_eval or (c.train.checkpoint_every and
                                   step % c.train.checkpoint_every == 0)
    if do_log or do_save:
      train_loss = progress_lib.check_finite(pending, ckpt, c.optimizer.lr)
    if do_log:
      record = {'loss': train_loss, **steps.logged(metrics),
                'lr': lr(step - 1), **progress.update(step)}
      log.log(step, 'train', record)
      print(progress.line(step, train_loss), flush=True)
    tic = time.perf_counter()
    if do_eval:
      try:
        last_eval = evaluate(run, eval_step, state.adapter, run.workdir)
      except BaseException:  # keep the trained steps; a restart evaluates
        ckpt.save(step, state, train_loader.state())
        raise
      log.log(step, 'eval', last_eval)
      print(f'eval step {step}: ' + ', '.join(
          f'{k} {v:.4f}' for k, v in last_eval.items()), flush=True)
    if do_save:
      ckpt.save(step, state, train_loader.state(),
                metrics=last_eval if do_eval else None)
    progress.exclude(time.perf_counter() - tic)
    if guard.stop(do_log or do_save):
      progress_lib.check_finite(pending, ckpt, c.optimizer.lr)
      if not do_save:
        ckpt.save(step, state, train_loader.state())
      raise guard.error(step, ckpt.directory)
  if last_eval is None:  # resumed after the last step: eval once more
    last_eval = evaluate(run, eval_step, state.adapter, run.workdir)
  return _finish(run, state, ckpt, log, last_eval)


def _restore(run: run_setup.Run, state: steps.TrainState
             ) -> tuple[checkpoint.Checkpointer, pipeline.Loader, int,
                        steps.TrainState]:
  """(checkpointer, train loader, start step, state): restored from the
  newest checkpoint of the workdir when there is one."""
  c = run.config
  ckpt = checkpoint.Checkpointer(
      run.workdir / workdir_lib.CHECKPOINT_DIR, keep=c.checkpoint.keep,
      best_metric=c.checkpoint.best_metric, best_mode=c.checkpoint.best_mode)
  train_loader = run_setup.loader(run, train=True)
  restored = ckpt.restore_latest(state)
  if restored is None:
    return ckpt, train_loader, 0, state
  start, state, data_state = restored
  train_loader.restore(data_state)
  print(f'flaxlora: resuming from step {start} ({ckpt.directory})')
  return ckpt, train_loader, start, state


def _finish(run: run_setup.Run, state: Any, ckpt: checkpoint.Checkpointer,
            log: workdir_lib.MetricsLog, last_eval: dict) -> dict[str, Any]:
  """Exports the adapter, writes summary.json and plots (main process)."""
  c = run.config
  # Collectives: every process gathers, only the main one writes.
  adapter = distributed.to_host(state.adapter)
  # Exports are float32 from the stored base (a bfloat16 base upcast).
  host_base = (build.stored(distributed.to_host(run.base), np.float32)
               if run.method.export.needs_base else None)
  summary = {'step': run.total_steps, **{f'eval_{k}': v for k, v in
                                         last_eval.items()}}
  train = [r for r in log.records if r['split'] == 'train']
  if train:
    summary['train_loss'] = train[-1]['loss']
  best = c.checkpoint.best_metric
  evals = [r for r in log.records if r['split'] == 'eval' and best in r]
  if best and evals:
    pick = max if c.checkpoint.best_mode == 'max' else min
    top = pick(evals, key=lambda r: r[best])
    summary.update({f'best_{best}': top[best], 'best_step': top['step']})
  summary['trainable_params'] = method_parts.trained_params(
      run.method, adapter)
  summary['base_params'] = layers.num_params(run.base)
  # What really trained: the method's resolved hyperparameters, and the
  # model, dtypes, mesh and data the run resolved once (`flaxlora.resolved`).
  summary['peft_method'] = method_parts.config_dicts(run.method)
  summary['resolved'] = run.resolved.record()
  # Wall seconds of this invocation, from step `seconds_from` (a resume's).
  summary.update(seconds=round(time.time() - run.started, 1),
                 seconds_from=log.resume_step)
  ckpt.close()
  if run.is_main:
    spec = {'peft': c.peft.to_dict(), 'family': c.model.family,
            'model': c.model.path or 'model.init', 'task': c.task,
            'pooling': c.model.get('pooling', 'cls')}
    export.save_adapter(run.workdir / workdir_lib.ADAPTER_DIR, adapter, spec)
    _save_peft(run, host_base, adapter)
    summary.update(provenance.record())  # hardware, date, commit
    workdir_lib.write_summary(run.workdir, summary)
    workdir_lib.plot(run.workdir)
  log.close()
  distributed.sync('flaxlora_finish')
  if run.is_main:
    print(workdir_lib.result_line(
        summary, run.workdir, time.time() - run.started,
        not export.peft_missing(run.model, run.method)), flush=True)
  return summary


def _save_peft(run: run_setup.Run, host_base: Any, adapter: Any) -> None:
  """The adapter as a Hugging Face PEFT folder, when it has one."""
  if missing := export.peft_missing(run.model, run.method):
    print(f'flaxlora: no PEFT folder: {missing}.')
    return
  reference = (run.config.peft_export.base_model_name_or_path or
               peft_names.base_model_reference(run.config.model.path))
  export.save_peft(run.workdir / workdir_lib.PEFT_DIR, run.model, host_base,
                   adapter, run.method, base_model_name_or_path=reference)
