"""The README's and the docs pages' ```python blocks run; method pages
name their factory's arguments.

Each page's blocks run in order in one fresh namespace (a block may use
names an earlier block of the same page defined, as a reader would), in a
subprocess of their own, in a temporary working directory. Before they
run, every hub id a block loads ('google-t5/t5-small', 'bert-base-uncased')
is replaced by a tiny random local checkpoint of that family, so no
network is needed. A block that raises fails the test, naming the page,
the block and its first line. Blocks that cannot run offline in seconds
are ```bash or ```text.

    python tests/test_docs.py PAGE SUBSTITUTIONS_JSON   # what the test runs
"""
import importlib
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').rglob('*.md'))]
BLOCK = re.compile(r'^```python\n(.*?)^```', re.M | re.S)
# "**Factory**: `flaxlora.peft.lora.lora`" on a method page.
FACTORY = re.compile(r'^\*\*Factory\*\*: `([\w.]+)`', re.M)
# A row of a method page's arguments table: "| `rank` | ...".
ARGUMENT = re.compile(r'^\| `(\w+)` \|', re.M)
TINY_T5 = dict(model_type='t5', vocab_size=64, d_model=32, d_kv=8, d_ff=48,
               num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               relative_attention_max_distance=16, decoder_start_token_id=0)
TINY_BERT = dict(model_type='bert', vocab_size=99, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=64)


def python_blocks(text: str) -> list[str]:
  """The sources of the ```python blocks of a markdown text, in order."""
  return BLOCK.findall(text)


def run_blocks(name: str, text: str, substitutes: dict[str, str]) -> int:
  """Runs `text`'s python blocks in one namespace; returns how many ran.

  Raises:
    AssertionError: naming the block that raised, and its first line.
  """
  namespace = {'__name__': '__docs__'}
  blocks = python_blocks(text)
  for number, source in enumerate(blocks, start=1):
    for hub_id, local in substitutes.items():
      source = source.replace(repr(hub_id), repr(local))
    first = source.strip().splitlines()[0]
    try:
      exec(compile(source, f'{name} python block {number}', 'exec'),  # pylint: disable=exec-used
           namespace)
    except Exception as e:  # pylint: disable=broad-except
      raise AssertionError(f'{name} python block {number} (starting '
                           f'{first!r}) raised {type(e).__name__}: {e}'
                           ) from e
  return len(blocks)


def _save(folder: pathlib.Path, family: str, spec: dict, **head) -> str:
  import jax  # pylint: disable=import-outside-toplevel
  from flaxlora import models  # pylint: disable=import-outside-toplevel
  config = models.FAMILIES[family].config_from_hf(spec)
  model = models.FAMILIES[family].build(config, **head)
  params = models.FAMILIES[family].init(model, jax.random.PRNGKey(0))
  models.save(folder, model, params)
  return str(folder)


@pytest.fixture(scope='module')
def substitutes(tmp_path_factory) -> dict[str, str]:
  """{hub id the pages use: a tiny local folder standing in for it}."""
  folder = tmp_path_factory.mktemp('checkpoints')
  return {
      'google-t5/t5-small': _save(folder / 't5', 't5', TINY_T5),
      'bert-base-uncased': _save(folder / 'bert', 'bert', TINY_BERT,
                                 head='classification', num_labels=2),
  }


def test_python_blocks_are_found():
  text = 'a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x\n```\n'
  assert python_blocks(text) == ['x = 1\n', 'y = x\n']


def test_a_raising_block_fails():
  with pytest.raises(AssertionError, match=r'page python block 2 .*NameError'):
    run_blocks('page', '```python\nx = 1\n```\n```python\nundefined_name\n'
               '```\n', {})


def test_substitutes_replace_hub_ids():
  text = "```python\npath = 'google-t5/t5-small'\n```\n"
  assert run_blocks('page', text, {'google-t5/t5-small': '/x'}) == 1


@pytest.mark.parametrize(
    'page', [p for p in PAGES if python_blocks(p.read_text())],
    ids=lambda p: str(p.relative_to(ROOT)))
def test_page_python_blocks_run(page, substitutes, tmp_path):
  env = dict(os.environ, HF_HUB_OFFLINE='1',
             PYTHONPATH=os.pathsep.join(
                 [str(ROOT), *filter(None, [os.environ.get('PYTHONPATH')])]))
  result = subprocess.run(
      [sys.executable, __file__, str(page), json.dumps(substitutes)],
      cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]


def method_pages() -> list[pathlib.Path]:
  return [p for p in sorted((ROOT / 'docs' / 'methods').glob('*.md'))
          if FACTORY.search(p.read_text())]


def _factory(page: pathlib.Path):
  """The object a method page's "**Factory**: `module.name`" line names."""
  module, _, attr = FACTORY.search(page.read_text()).group(1).rpartition('.')
  return getattr(importlib.import_module(module), attr)


def test_every_registered_method_has_a_page():
  from flaxlora.peft import registry  # pylint: disable=import-outside-toplevel
  documented = {_factory(p) for p in method_pages()}
  for name in registry.names():
    if name == 'trainable':  # documented with every method (modules to save)
      continue
    factory = registry.get(name).factory
    assert factory in documented, (
        f'peft method {name!r} has no docs/methods page naming its factory '
        '"**Factory**: `flaxlora.peft.<package>.<factory>`"')


@pytest.mark.parametrize('page', method_pages(), ids=lambda p: p.stem)
def test_method_page_names_the_factory_arguments(page):
  text = page.read_text()
  factory = _factory(page)
  documented = ARGUMENT.findall(text)
  assert documented == list(inspect.signature(factory).parameters), (
      f'{page.name}: its arguments table ({documented}) must list '
      f'{factory.__name__}\'s arguments in order')


def test_the_contract_test_follows_the_adding_a_method_checklist():
  steps = re.findall(r'^(\d+)\. \*\*', (ROOT / 'docs' /
                                         'adding_a_method.md').read_text(),
                     re.M)
  contract = (ROOT / 'tests' / 'test_method_contract.py').read_text()
  marked = re.findall(r'# Checklist (\d+)\b', contract)
  assert steps == [str(n) for n in range(1, len(steps) + 1)]
  assert marked == steps, (
      'tests/test_method_contract.py must mark each step of '
      'docs/adding_a_method.md\'s checklist, in order, with "# Checklist N"')


if __name__ == '__main__':
  _page = pathlib.Path(sys.argv[1])
  print(run_blocks(str(_page.relative_to(ROOT)), _page.read_text(),
                   json.loads(sys.argv[2])), 'blocks ran')


# A repository path as code, docs and tests cite it: "flaxlora/build.py"
# (not a command's output, "--json=experiments/results/plan/x.json").
CITED = re.compile(r'(?<![\w/.-])(?<!--json=)'
                   r'((?:flaxlora|experiments|configs|tests|docs)'
                   r'/[\w/.-]+\.(?:py|md|json|yml))')
# Files that plant made-up paths on purpose.
PLANTING = {'tests/test_import_graph.py', 'tests/test_docs.py'}


def test_cited_files_exist():
  sources = [p for d in ('flaxlora', 'experiments', 'configs', 'tests', 'docs')
             for p in (ROOT / d).rglob('*') if p.suffix in ('.py', '.md')]
  sources.append(ROOT / 'README.md')
  missing = sorted(
      f'{source.relative_to(ROOT)}: {cited}'
      for source in sources if str(source.relative_to(ROOT)) not in PLANTING
      for cited in CITED.findall(source.read_text())
      if not (ROOT / cited.rstrip('.')).exists())
  assert not missing, missing
