"""Figures of an adapter analysis (matplotlib, Agg; no pyplot state).

    fig = plots.heatmap(report, path='workdir/lora_heatmap.png')
    fig = plots.spectra(report, path='workdir/lora_spectra.png')

Each function returns a `matplotlib.figure.Figure` and, given `path`, also
writes it as a PNG.
"""
import math
import os
import re
from typing import Sequence

import numpy as np
from matplotlib import figure as figure_lib

from flaxlora import figures
from flaxlora.inspect import analysis

_LAYER = re.compile(r'(block|layer)_(\d+)')


def split_path(path: str) -> tuple[str, str]:
  """'encoder/block_1/attention/q/kernel' -> ('encoder/block_1',
  'attention/q'); paths without a numbered layer map to ('', path)."""
  parts = path.split('/')
  if parts[-1] == 'kernel':
    parts = parts[:-1]
  for i, part in enumerate(parts):
    if _LAYER.fullmatch(part):
      return '/'.join(parts[:i + 1]), '/'.join(parts[i + 1:])
  return '', '/'.join(parts)


def _layer_order(name: str) -> tuple:
  match = _LAYER.search(name)
  prefix = name[:match.start()] if match else name
  return (prefix, int(match.group(2)) if match else -1)


def _save(fig: figure_lib.Figure, path: str | os.PathLike | None) -> None:
  if path is not None:
    figures.save(fig, path, dpi=100)


def heatmap_grid(report: analysis.Report, value: str = 'relative_norm'
                 ) -> tuple[list[str], list[str], np.ndarray]:
  """(layers, modules, [layers, modules] values; NaN where untargeted)."""
  cells = {}
  for layer in report.layers:
    cells[split_path(layer.path)] = getattr(layer, value)
  layers = sorted({k[0] for k in cells}, key=_layer_order)
  modules = sorted({k[1] for k in cells})
  grid = np.full((len(layers), len(modules)), np.nan)
  for (row, col), v in cells.items():
    grid[layers.index(row), modules.index(col)] = np.nan if v is None else v
  return layers, modules, grid


def heatmap(report: analysis.Report, path: str | os.PathLike | None = None,
            value: str = 'relative_norm',
            title: str = '||dW||_F / ||W||_F') -> figure_lib.Figure:
  """Layer x module heat map of a per-layer statistic (default relative norm).

  Args:
    report: from `analysis.analyze`.
    path: where to write a PNG, or None.
    value: a numeric `LayerStats` field.
    title: figure title.
  """
  if not report.layers:
    raise ValueError('heatmap: the report has no layers; check the include '
                     'regex passed to analysis.analyze.')
  layers, modules, grid = heatmap_grid(report, value)
  fig = figures.new(1.2 + 0.9 * len(modules), 1.2 + 0.45 * len(layers))
  ax = fig.add_subplot()
  image = ax.imshow(np.ma.masked_invalid(grid), aspect='auto', cmap='viridis')
  ax.set_xticks(range(len(modules)), modules, rotation=45, ha='right')
  ax.set_yticks(range(len(layers)), [l or '(global)' for l in layers])
  for (i, j), v in np.ndenumerate(grid):
    if not np.isnan(v):
      ax.text(j, i, f'{v:.2g}', ha='center', va='center', fontsize=7,
              color='w')
  fig.colorbar(image, ax=ax)
  ax.set_title(title)
  _save(fig, path)
  return fig


def spectra(report: analysis.Report, paths: Sequence[str] | None = None,
            path: str | os.PathLike | None = None,
            max_layers: int = 12) -> figure_lib.Figure:
  """Singular values of selected updates (log scale), one line per layer.

  Args:
    report: from `analysis.analyze`.
    paths: kernel paths to draw (default: the first `max_layers`).
    path: where to write a PNG, or None.
    max_layers: cap on the default selection.
  """
  chosen = (report.layers[:max_layers] if paths is None else
            [report.by_path[p] for p in paths if p in report.by_path])
  if paths is not None and len(chosen) != len(paths):
    missing = [p for p in paths if p not in report.by_path]
    raise ValueError(f'spectra: paths {missing} are not in the report; it '
                     f'has {list(report.by_path)[:3]}...')
  fig = figures.new(7, 4)
  ax = fig.add_subplot()
  for layer in chosen:
    s = layer.singular_values
    s = np.where(s > 0, s, np.nan)  # zeros cannot be drawn on a log axis
    ax.plot(np.arange(1, len(s) + 1), s, marker='o', markersize=3,
            label=layer.path)
  ax.set_yscale('log')
  ax.set_xlabel('index i')
  ax.set_ylabel('singular value of dW')
  ax.legend(fontsize=6, ncol=max(1, math.ceil(len(chosen) / 12)))
  ax.set_title('spectra of the updates')
  _save(fig, path)
  return fig
