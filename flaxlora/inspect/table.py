"""Plain-text and HTML tables, the one rendering used by every report.

Cells are strings; numeric columns are right-aligned in text.
"""
import html
from typing import Sequence

Cells = Sequence[str]


def human_bytes(n: int) -> str:
  """1536 -> '1.5 KiB'."""
  value = float(n)
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if abs(value) < 1024 or unit == 'GiB':
      return f'{value:.0f} {unit}' if unit == 'B' else f'{value:.1f} {unit}'
    value /= 1024
  raise AssertionError('unreachable')


def number(x: float | None, digits: int = 4) -> str:
  """A float with `digits` significant digits; '-' for None."""
  if x is None:
    return '-'
  return f'{x:.{digits}g}'


def _is_numeric(cell: str) -> bool:
  head = cell.split(' ')[0].replace(',', '').replace('%', '')
  try:
    float(head)
  except ValueError:
    return False
  return True


def text(headers: Cells, rows: Sequence[Cells], title: str = '') -> str:
  """A fixed-width table with a header rule."""
  widths = [len(h) for h in headers]
  for row in rows:
    widths = [max(w, len(c)) for w, c in zip(widths, row)]
  def line(cells, header=False):
    parts = []
    for cell, width in zip(cells, widths):
      right = not header and _is_numeric(cell)
      parts.append(cell.rjust(width) if right else cell.ljust(width))
    return '  '.join(parts).rstrip()
  lines = [title] if title else []
  lines += [line(headers, header=True), '  '.join('-' * w for w in widths)]
  lines += [line(row) for row in rows]
  return '\n'.join(lines)


def html_table(headers: Cells, rows: Sequence[Cells]) -> str:
  """An HTML <table> (cells escaped)."""
  head = ''.join(f'<th style="text-align:left">{html.escape(h)}</th>'
                 for h in headers)
  body = ''.join(
      '<tr>' + ''.join(f'<td style="text-align:left">{html.escape(c)}</td>'
                       for c in row) + '</tr>'
      for row in rows)
  return f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def details(summary_line: str, body_html: str, open_: bool = False) -> str:
  """A collapsible HTML block (<details>)."""
  flag = ' open' if open_ else ''
  return (f'<details{flag}><summary>{html.escape(summary_line)}</summary>'
          f'{body_html}</details>')
