"""Which leaves differ between two trees, and by how much.

    d = diff.diff(adapter_at_step_0, adapter_at_step_100)
    print(d)          # changed leaves (max |a - b|, ||b - a|| / ||a||),
                      # leaves only in one tree, shape mismatches
"""
import dataclasses
import html
from typing import Any

import numpy as np

from flaxlora.inspect import table
from flaxlora.inspect import tree as tree_lib


@dataclasses.dataclass(frozen=True)
class LeafDiff:
  """One leaf present in both trees with equal shapes.

  Attributes:
    path: "/"-joined path.
    max_abs: max |b - a|.
    rel_norm: ||b - a||_F / ||a||_F (inf when a is all zeros and b is not).
  """
  path: str
  max_abs: float
  rel_norm: float


@dataclasses.dataclass(repr=False)
class Diff:
  """Result of `diff`; `changed` holds leaves whose max_abs exceeds atol."""
  changed: list[LeafDiff]
  unchanged: list[str]
  only_a: list[str]
  only_b: list[str]
  mismatched: list[str]

  @property
  def identical(self) -> bool:
    return not (self.changed or self.only_a or self.only_b or self.mismatched)

  def __repr__(self) -> str:
    return (f'Diff({len(self.changed)} changed, {len(self.unchanged)} '
            f'unchanged, {len(self.only_a)} only in a, {len(self.only_b)} '
            f'only in b, {len(self.mismatched)} shape mismatches)')

  def _cells(self) -> list[list[str]]:
    return [[d.path, table.number(d.max_abs), table.number(d.rel_norm)]
            for d in self.changed]

  def __str__(self) -> str:
    parts = [table.text(('changed leaf', 'max |b-a|', '|b-a|/|a|'),
                        self._cells(),
                        f'{len(self.changed)} changed, '
                        f'{len(self.unchanged)} unchanged')]
    for name, paths in (('only in a', self.only_a), ('only in b', self.only_b),
                        ('shape differs', self.mismatched)):
      if paths:
        parts.append(f'{name}: ' + ', '.join(paths))
    return '\n\n'.join(parts)

  def _repr_html_(self) -> str:
    return '<pre>' + html.escape(str(self)) + '</pre>'


def _leaf_diff(path: str, a: np.ndarray, b: np.ndarray) -> LeafDiff:
  delta = b.astype(np.float64) - a.astype(np.float64)
  max_abs = float(np.max(np.abs(delta))) if delta.size else 0.0
  norm_a = float(np.linalg.norm(a.astype(np.float64)))
  norm_d = float(np.linalg.norm(delta))
  if norm_a:
    rel = norm_d / norm_a
  else:
    rel = 0.0 if norm_d == 0 else float('inf')
  return LeafDiff(path, max_abs, rel)


def diff(tree_a: Any, tree_b: Any, atol: float = 0.0) -> Diff:
  """Compares two trees leaf by leaf (matched by path).

  Args:
    tree_a: the reference tree (e.g. params before training).
    tree_b: the other tree.
    atol: a leaf counts as changed when max |b - a| > atol.

  Returns:
    A `Diff`, printable as text and HTML.
  """
  flat_a, flat_b = tree_lib.flatten(tree_a), tree_lib.flatten(tree_b)
  result = Diff([], [], [p for p in flat_a if p not in flat_b],
                [p for p in flat_b if p not in flat_a], [])
  for path, leaf_a in flat_a.items():
    if path not in flat_b:
      continue
    a, b = np.asarray(leaf_a), np.asarray(flat_b[path])
    if a.shape != b.shape:
      result.mismatched.append(f'{path} {a.shape} vs {b.shape}')
      continue
    leaf = _leaf_diff(path, a, b)
    if leaf.max_abs > atol or np.isnan(leaf.max_abs):
      result.changed.append(leaf)
    else:
      result.unchanged.append(path)
  return result
