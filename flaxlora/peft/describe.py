"""What a PEFT method trains: a table of adapted params and totals.

    print(describe.describe(base, method))   # also renders in notebooks

Shapes come from `jax.eval_shape(method.init, ...)`, so describing a large
model allocates nothing. Adapter leaves the method's optimizer does not move
(ScaLoRA's accumulated update: state, not parameters) count nowhere.
"""
import dataclasses
import html
from typing import Any, Mapping

import jax

from flaxlora.peft import base as peft_base
from flaxlora.peft.lora import kernel as lora_kernel
from flaxlora.peft import method_parts


@dataclasses.dataclass(frozen=True)
class Row:
  """One adapted parameter.

  Attributes:
    path: "/"-joined param path.
    shape: the base parameter's shape.
    rank: LoRA rank R, or 'full' for a fully trained copy.
    added: trainable scalars the adapter adds for it.
  """
  path: str
  shape: tuple[int, ...]
  rank: int | str
  added: int


@dataclasses.dataclass(frozen=True)
class Description:
  """Rows and totals; `str()` is a text table, `_repr_html_` an HTML one."""
  rows: tuple[Row, ...]
  trainable: int
  frozen: int

  @property
  def percent(self) -> float:
    """Trainable share of all params (base + adapter), as PEFT reports it."""
    total = self.trainable + self.frozen
    return 100.0 * self.trainable / total if total else 0.0

  def _cells(self) -> list[tuple[str, str, str, str]]:
    return [(r.path, 'x'.join(map(str, r.shape)), str(r.rank),
             f'{r.added:,}') for r in self.rows]

  def _total_line(self) -> str:
    return (f'trainable {self.trainable:,} | frozen {self.frozen:,} | '
            f'trainable {self.percent:.4f}%')

  def __str__(self) -> str:
    head = ('path', 'shape', 'rank', 'added')
    cells = [head] + self._cells()
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = ['  '.join(c[i].ljust(widths[i]) if i == 0 else
                       c[i].rjust(widths[i]) for i in range(4))
             for c in cells]
    lines.insert(1, '-' * len(lines[0]))
    return '\n'.join(lines + [self._total_line()])

  def _repr_html_(self) -> str:
    head = ''.join(f'<th>{h}</th>' for h in ('path', 'shape', 'rank',
                                             'added'))
    body = ''.join('<tr>' + ''.join(f'<td>{html.escape(c)}</td>' for c in row)
                   + '</tr>' for row in self._cells())
    return (f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            f'</table><p>{html.escape(self._total_line())}</p>')


def _rows(base: Mapping[str, Any], adapter: Any) -> list[Row]:
  if isinstance(adapter, (tuple, list)):
    return [r for a in adapter for r in _rows(base, a)]
  rows = []
  for path, leaf in peft_base.flatten(adapter,
                                      is_leaf=lora_kernel.is_lora_node).items():
    try:
      shape = tuple(peft_base.get(base, path).shape)
    except (KeyError, TypeError):  # a new param (e.g. a prompt), not a copy
      shape = tuple(getattr(leaf, 'shape', ()))
    if lora_kernel.is_lora_node(leaf):
      rank = int(leaf['a'].shape[1])
    else:
      rank = 'full'
    rows.append(Row(path, shape, rank, peft_base.num_params(leaf)))
  return rows


def describe(base: Mapping[str, Any], method: peft_base.PeftMethod,
             rng: jax.Array | None = None) -> Description:
  """Describes what `method` trains on `base` (arrays or ShapeDtypeStructs).

  Args:
    base: base params.
    method: any PEFT method; its adapter's shapes are traced, not computed.
    rng: only needed by methods whose init shapes depend on it (none so far).
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  adapter = jax.eval_shape(method.init, rng, base)
  trained = jax.tree.map(  # a leaf the optimizer does not move: no scalars
      lambda x, moved: x if moved else jax.ShapeDtypeStruct((0,), x.dtype),
      adapter, method_parts.trained_mask(method, adapter))
  rows = sorted(_rows(base, trained), key=lambda r: r.path)
  return Description(tuple(rows), peft_base.num_params(trained),
                     peft_base.num_params(base))
