"""The README's ```python blocks run (issue #16).

Preamble (what the test sets up before the blocks run):
  * a tiny random T5 and a tiny random BERT with a classification head,
    saved as local Hugging Face folders (`models.save`); every hub id the
    blocks load ('google-t5/t5-small', 'bert-base-uncased') is replaced by
    the matching local folder, so no network is needed;
  * the blocks run in order in one namespace (a block may use names an
    earlier block defined, as a reader would) inside a temporary working
    directory (files a block writes land there).
A block that raises fails the test, naming the block and its first line.
"""
import os
import pathlib
import re

import jax
import pytest

from flaxlora import models

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
BLOCK = re.compile(r'^```python\n(.*?)^```', re.M | re.S)
TINY_T5 = dict(model_type='t5', vocab_size=64, d_model=32, d_kv=8, d_ff=48,
               num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, decoder_start_token_id=0)
TINY_BERT = dict(model_type='bert', vocab_size=99, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=64)


def python_blocks(text: str) -> list[str]:
  """The sources of the ```python blocks of a markdown text, in order."""
  return BLOCK.findall(text)


def _save(folder, family, spec, **head):
  config = models.FAMILIES[family].config_from_hf(spec)
  model = models.FAMILIES[family].build(config, **head)
  params = models.FAMILIES[family].init(model, jax.random.PRNGKey(0))
  models.save(folder, model, params)
  return str(folder)


def local_checkpoints(folder: pathlib.Path) -> dict[str, str]:
  """{hub id the README uses: a tiny local folder standing in for it}."""
  return {
      'google-t5/t5-small': _save(folder / 't5', 't5', TINY_T5),
      'bert-base-uncased': _save(folder / 'bert', 'bert', TINY_BERT,
                                 head='classification', num_labels=2),
  }


def run_blocks(text: str, folder: pathlib.Path) -> int:
  """Runs `text`'s python blocks (see the module docstring); returns how
  many ran."""
  blocks = python_blocks(text)
  substitutes = local_checkpoints(folder)
  namespace = {'__name__': '__readme__'}
  for number, source in enumerate(blocks, start=1):
    for hub_id, local in substitutes.items():
      source = source.replace(repr(hub_id), repr(local))
    first = source.strip().splitlines()[0]
    try:
      code = compile(source, f'README.md python block {number}', 'exec')
      exec(code, namespace)  # pylint: disable=exec-used
    except Exception as e:  # pylint: disable=broad-except
      raise AssertionError(f'README python block {number} (starting '
                           f'{first!r}) raised {type(e).__name__}: {e}'
                           ) from e
  return len(blocks)


def test_python_blocks_are_found():
  text = 'a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x\n```\n'
  assert python_blocks(text) == ['x = 1\n', 'y = x\n']


def test_a_raising_block_fails(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(AssertionError, match=r'block 2 .*NameError'):
    run_blocks('```python\nx = 1\n```\n```python\nundefined_name\n```\n',
               tmp_path)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  assert run_blocks(README.read_text(), tmp_path) >= 3
  assert os.listdir(tmp_path)  # the local checkpoints (and block outputs)
