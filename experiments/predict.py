r"""Predicts with a trained adapter on new inputs.

  python -m experiments.predict --workdir=workdirs/sst2 --text='a fine film'
  python -m experiments.predict --workdir=workdirs/squad \
      --text='Who wrote it?' --context='It was written by Ann.'
  python -m experiments.predict --workdir=W --input=inputs.jsonl \
      --output=predictions.jsonl [--step=N|best] [--config.eval.num_beams=4]
  python -m experiments.predict --peft=W/peft [--model=PATH] --text='...'

Inputs: --text (with --context for extractive QA) or --input, a .jsonl /
.json / .tsv / .csv file whose fields follow the task (`flaxlora.predict`).
Output: one JSON line per input (id, input, prediction; class
probabilities; answer score and character offsets; generated text with the
config's beam settings) to --output, or to stdout.
From a PEFT folder (--peft; LoRA, IA3, prompt or prefix tuning), the base is
--model or the folder's base_model_name_or_path, its tokenizer that folder's;
the task follows the model (BERT classification/QA head, or T5 text-to-text).
"""
import pathlib
import sys

from absl import app
from absl import flags

from configs import from_checkpoint
from experiments import cli as cli_lib

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished run.')
_STEP = flags.DEFINE_string('step', 'final',
                            "Adapter of --workdir: 'final', 'best' or a "
                            'checkpoint step.')
_PEFT = flags.DEFINE_string('peft', None, 'A PEFT folder (instead of '
                            '--workdir).')
_MODEL = flags.DEFINE_string('model', None, 'Base model folder or hub id of '
                             '--peft (default: the folder\'s base).')
_INPUT = flags.DEFINE_string('input', None, 'Inputs: .jsonl/.json/.tsv/.csv.')
_TEXT = flags.DEFINE_string('text', None, 'One input text (QA: question).')
_CONTEXT = flags.DEFINE_string('context', None, 'QA context of --text.')
_OUTPUT = flags.DEFINE_string('output', None, 'JSONL file (default: stdout).')
_OVERRIDES = []


def _load():
  # pylint: disable=g-import-not-at-top
  from flaxlora import evaluation
  from flaxlora import predict
  from flaxlora.inspect import runs
  if _PEFT.value:
    model = _MODEL.value or predict.peft_base_path(_PEFT.value)
    if not model:
      raise app.UsageError(f'{_PEFT.value} names no base model; pass '
                           '--model=PATH.')
    spec, folder = predict.read_checkpoint(model)
    config = evaluation.override(
        from_checkpoint.get_config(model, spec, folder), _OVERRIDES)
    return predict.from_peft(config, _PEFT.value)
  workdir = pathlib.Path(_WORKDIR.value)
  config = evaluation.override(runs.read_config(workdir), _OVERRIDES)
  step = _STEP.value if _STEP.value in ('final', 'best') else int(_STEP.value)
  loaded = evaluation.load(workdir, config, step)
  return loaded.run, loaded.adapter


def _inputs():
  from flaxlora import predict  # pylint: disable=g-import-not-at-top
  if _INPUT.value:
    return predict.read_inputs(_INPUT.value)
  row = {'text': _TEXT.value, 'source': _TEXT.value}
  if _CONTEXT.value is not None:
    row = {'question': _TEXT.value, 'context': _CONTEXT.value}
  return [row]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if bool(_WORKDIR.value) == bool(_PEFT.value):
    raise app.UsageError('pass --workdir=RUN or --peft=FOLDER (one of them).')
  if bool(_INPUT.value) == (_TEXT.value is not None):
    raise app.UsageError('pass --input=FILE or --text=TEXT (one of them).')
  cli_lib.quiet_logs()
  # pylint: disable=g-import-not-at-top
  from flaxlora import atomic
  from flaxlora import predict
  from flaxlora import predictions_io
  inputs = _inputs()
  run, adapter = _load()
  text = predictions_io.jsonl(predict.predict(run, adapter, inputs))
  if not run.is_main:
    return
  if _OUTPUT.value:
    atomic.write_file(_OUTPUT.value, text)
    print(f'flaxlora.predict: {len(inputs)} predictions in {_OUTPUT.value}',
          file=sys.stderr)
  else:
    sys.stdout.write(text)


def cli(argv=None) -> int:
  """`main` on `argv` (default sys.argv); see `cli_lib.run_with_overrides`."""
  return cli_lib.run_with_overrides(main, _OVERRIDES, argv)


if __name__ == '__main__':
  sys.exit(cli())
