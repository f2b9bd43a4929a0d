"""Predictions of a trained adapter on new, unlabelled inputs.

    loaded = evaluation.load(workdir, config)          # or `from_peft(...)`
    rows = predict.predict(loaded.run, loaded.adapter,
                           [{'text': 'a gripping, funny film'}])

An input is a dict; which fields it needs follows the run's task:

  classification  'text' (or the config's data.text_field), and 'text_pair'
                  (data.pair_field) for sentence pairs
  squad           'question' and 'context'
  seq2seq (T5)    'source' (data.source_field, or 'text'); a T5 run on SQuAD
                  or classification data takes those tasks' fields instead

and an optional 'id'. Each output row has id, input, prediction and the
task's extras: the class probabilities; the answer's score and character
offsets [start, end) in the context; for T5 the text generated with the
config's eval.num_beams / max_new_tokens / length_penalty.
`from_peft` rebuilds a run from a PEFT folder (LoRA, IA3, prompt or prefix
tuning) and a base checkpoint instead of a workdir.
"""
import pathlib
from typing import Any, Sequence

import jax
import numpy as np

from flaxlora import build
from flaxlora import distributed
from flaxlora import resolved
from flaxlora import run_setup
from flaxlora import sharding
from flaxlora import steps
from flaxlora import tasks
from flaxlora import trainer
from flaxlora.data import sources
from flaxlora.data import task_data
from flaxlora.peft import folders


def _get(row: dict[str, Any], names: Sequence[str], origin: str) -> str:
  for name in names:
    if row.get(name) is not None:
      return str(row[name])
  raise ValueError(f'{origin}: no field {" or ".join(map(repr, names))} '
                   f'(fields: {sorted(row)}); see `flaxlora.predict`.')


def _text(row, d, origin):
  text = _get(row, ('text', d.get('text_field', 'text')), origin)
  pair_field = d.get('pair_field', '') or 'text_pair'
  pair = row.get('text_pair', row.get(pair_field))
  return text, None if pair is None else str(pair)


def records(config: Any, rows: Sequence[dict[str, Any]]) -> list[dict]:
  """The inputs as eval records of the run's task (labels are dummies)."""
  d, kind = config.data, task_data.record_kind(config)
  out = []
  for i, row in enumerate(rows):
    origin = row.get('origin', f'input {i + 1}')
    rid = str(row.get('id', i))
    if kind == 'squad':
      question = _get(row, ('question',), origin)
      context = _get(row, ('context',), origin)
      if config.task == 'squad':
        out.append({'id': rid, 'title': '', 'question': question,
                    'context': context, 'answers': [], 'origin': origin})
        continue
      source = f'question: {question.strip()} context: {context}'
    elif kind == 'classification':
      text, pair = _text(row, d, origin)
      if config.task == 'classification':
        out.append({'id': rid, 'text': text, 'text_pair': pair, 'label': 0,
                    'origin': origin})
        continue
      source = text if pair is None else f'{text} {pair}'
    else:
      source = _get(row, ('source', d.get('source_field', 'source'),
                          'text'), origin)
    out.append({'id': rid, 'source': source, 'target': '',
                'origin': origin})
  return out


def predict(run: run_setup.Run, adapter: Any,
            inputs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One output row per input (see the module docstring)."""
  if not inputs:
    raise ValueError('no inputs to predict on.')
  config = run.config
  recs = records(config, inputs)
  features = task_data.tokenize(recs, config, run.tokenizer)
  run.data = task_data.Data(None, features, recs, task_data.record_kind(
      config))
  eval_step = steps.jit_eval_step(run.task, run.method)
  outputs = trainer.eval_outputs(run, eval_step, adapter)
  generate = lambda: trainer.generate_texts(run, adapter)
  rows = run.task.rows(recs, run.task.predict(run.data, outputs, generate))
  for row in rows:
    row.pop('reference', None)
  return rows


def read_inputs(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """Input rows of a .jsonl, .json (array), .tsv or .csv file."""
  return [dict(row, origin=origin) for origin, row in sources.read_rows(path)]


def read_checkpoint(model_path: str) -> tuple[dict[str, Any], str]:
  """(config.json, local folder) of a base checkpoint (folder, hub id or
  'pkg:' path): what `configs/from_checkpoint.py` builds a config from."""
  _, folder, spec = resolved.checkpoint(model_path, '--model')
  return spec, str(folder)


def peft_base_path(peft_dir: str | pathlib.Path) -> str:
  """The base model a PEFT folder names (base_model_name_or_path)."""
  return folders.read_config(peft_dir).get('base_model_name_or_path') or ''


def _replicated(tree: Any, mesh: Any) -> Any:
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.device_put(jax.tree.map(np.asarray, tree), spec)


def from_peft(config: Any, peft_dir: str | pathlib.Path
              ) -> tuple[run_setup.Run, Any]:
  """(run, adapter) of a PEFT folder on the base `config.model.path`.

  `config` is a full run config (task, model family/head/labels, data
  lengths, eval settings); its peft section is unused: the method comes
  from the folder (`peft.folders.load`: LoRA, IA3, prompt or prefix).
  """
  r = resolved.resolve(config, mesh=sharding.make_mesh({'data': -1}),
                       reads=())
  model, base, base_axes, family = build.model_and_params(
      r, jax.random.PRNGKey(0))
  method, adapter = folders.load(peft_dir, model, base)
  tokenizer = build.tokenizer(r)
  run = run_setup.Run(config, peft_dir, model, family, tokenizer, None,
                      tasks.make(config, model), method, r.mesh, r.rules,
                      base, base_axes, None, None, 0,
                      distributed.is_main_process(), resolved=r)
  return run, _replicated(adapter, r.mesh)
