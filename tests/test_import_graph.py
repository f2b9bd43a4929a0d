"""The import graph points one way: configs -> run layer -> models, PEFT.

Read from the sources (ast), not by importing them: no cycles among
flaxlora's modules, no flaxlora import inside a function (a way to hide a
cycle), `flaxlora.peft` never imports the run layer, `flaxlora.models`
imports neither PEFT nor the run layer, and configs import only
ml_collections, `configs` and the standard library (they load without JAX).
Each check also runs on a planted tree that breaks it, so it can fail.
"""
import ast
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ('flaxlora', 'configs', 'experiments')
# What runs a config (trainer, build, export, steps and what drives them):
# methods and models below it never import it.
RUN_LAYER = ('flaxlora.build', 'flaxlora.trainer', 'flaxlora.export',
             'flaxlora.steps', 'flaxlora.evaluation', 'flaxlora.predict',
             'flaxlora.adapter_bank', 'flaxlora.resolved',
             'flaxlora.sweeps', 'flaxlora.local_launch',
             'flaxlora.sweep_results', 'experiments')
CONFIG_IMPORTS = ('ml_collections', 'configs')


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
  """{dotted module name: file} of the packages under `root`."""
  out = {}
  for package in PACKAGES:
    for path in sorted((root / package).glob('**/*.py')):
      parts = path.relative_to(root).with_suffix('').parts
      if parts[-1] == '__init__':
        parts = parts[:-1]
      out['.'.join(parts)] = path
  return out


def _imports(name: str, path: pathlib.Path, known: set[str]
             ) -> list[tuple[str, bool, int]]:
  """[(imported module, inside a function, line)] of one module.

  `from a.b import c` imports module a.b.c when that is a module, else a.b.
  Relative imports resolve against the module's package.
  """
  tree = ast.parse(path.read_text(), str(path))
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  out = []

  def visit(node: ast.AST, local: bool) -> None:
    for child in ast.iter_child_nodes(node):
      inner = local or isinstance(child, (ast.FunctionDef,
                                          ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        out.extend((a.name, inner, child.lineno) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ''
        if child.level:
          anchor = package.split('.')
          anchor = anchor[:len(anchor) - child.level + 1]
          base = '.'.join(anchor + ([base] if base else []))
        for alias in child.names:
          full = f'{base}.{alias.name}'
          out.append((full if full in known else base, inner, child.lineno))
      visit(child, inner)

  visit(tree, False)
  return out


def _graph(root: pathlib.Path):
  """(modules, {module: [(target, local, line)]}) of the repository's
  packages; targets include third-party names (for the configs rule)."""
  modules = _modules(root)
  known = set(modules)
  return modules, {n: _imports(n, p, known) for n, p in modules.items()}


def _internal(target: str, known) -> bool:
  return target in known


def _under(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + '.') for p in prefixes)


def cycles(root: pathlib.Path) -> list[list[str]]:
  """Import cycles among flaxlora modules (each as a path a -> ... -> a)."""
  modules, edges = _graph(root)
  graph = {n: sorted({t for t, _, _ in e if _under(t, ('flaxlora',))
                      and t in modules and t != n})
           for n, e in edges.items() if _under(n, ('flaxlora',))}
  found, state, stack = [], {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in graph.get(node, ()):
      if state.get(nxt) == 'open':
        found.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = 'done'

  for node in sorted(graph):
    if node not in state:
      visit(node)
  return found


def local_imports(root: pathlib.Path) -> list[str]:
  """flaxlora / configs imports made inside functions, in flaxlora and
  configs (`module:line -> target`)."""
  modules, edges = _graph(root)
  return [f'{n}:{line} -> {t}' for n, e in sorted(edges.items())
          for t, local, line in e
          if local and _under(n, ('flaxlora', 'configs'))
          and _under(t, PACKAGES)]


def forbidden(root: pathlib.Path) -> list[str]:
  """Imports against the layering (`module:line -> target`)."""
  modules, edges = _graph(root)
  bad = []
  for n, e in sorted(edges.items()):
    for t, _, line in e:
      where = f'{n}:{line} -> {t}'
      if _under(n, ('flaxlora.peft',)) and _under(t, RUN_LAYER):
        bad.append(where + ' (peft imports the run layer)')
      if _under(n, ('flaxlora.models',)) and _under(
          t, RUN_LAYER + ('flaxlora.peft',)):
        bad.append(where + ' (models import PEFT or the run layer)')
      top = t.split('.')[0]
      if _under(n, ('configs',)) and top not in CONFIG_IMPORTS and (
          top not in sys.stdlib_module_names):
        bad.append(where + ' (configs import only ml_collections, configs '
                   'and the standard library)')
  return bad


def test_the_graph_sees_the_packages():
  modules, edges = _graph(REPO)
  assert {'flaxlora.peft.lora.kernel', 'flaxlora.peft.registry',
          'flaxlora.trainer', 'configs.common'} <= set(modules)
  targets = {t for t, _, _ in edges['flaxlora.peft.lora.method']}
  assert 'flaxlora.peft.lora.kernel' in targets


def test_no_import_cycles():
  assert not cycles(REPO), cycles(REPO)


def test_no_function_local_imports():
  assert not local_imports(REPO), local_imports(REPO)


def test_imports_point_one_way():
  assert not forbidden(REPO), forbidden(REPO)


def _plant(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for package in PACKAGES:
    (root / package).mkdir(parents=True, exist_ok=True)
    (root / package / '__init__.py').touch()
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return root


@pytest.mark.parametrize('files, check, expected', [
    ({'flaxlora/a.py': 'from flaxlora import b\n',
      'flaxlora/b.py': 'from flaxlora import a\n'},
     cycles, [['flaxlora.a', 'flaxlora.b', 'flaxlora.a']]),
    ({'flaxlora/a.py': 'def f():\n  from flaxlora import b\n',
      'flaxlora/b.py': ''},
     local_imports, ['flaxlora.a:2 -> flaxlora.b']),
    ({'flaxlora/peft/__init__.py': '',
      'flaxlora/peft/x/__init__.py': 'from flaxlora import build\n',
      'flaxlora/build.py': ''},
     forbidden,
     ['flaxlora.peft.x:1 -> flaxlora.build (peft imports the run layer)']),
    ({'flaxlora/models/__init__.py': 'from flaxlora.peft import lora\n',
      'flaxlora/peft/__init__.py': '', 'flaxlora/peft/lora.py': ''},
     forbidden, ['flaxlora.models:1 -> flaxlora.peft.lora (models import '
                 'PEFT or the run layer)']),
    ({'configs/c.py': 'import ml_collections\nimport pathlib\n'
                      'from flaxlora.models import hf_io\n',
      'flaxlora/models/__init__.py': '', 'flaxlora/models/hf_io.py': ''},
     forbidden, ['configs.c:3 -> flaxlora.models.hf_io (configs import only '
                 'ml_collections, configs and the standard library)']),
])
def test_each_check_fails_on_a_planted_import(tmp_path, files, check,
                                              expected):
  assert check(_plant(tmp_path, files)) == expected
