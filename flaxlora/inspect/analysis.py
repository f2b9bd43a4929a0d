"""What a LoRA-family adapter learned, computed from its factors.

For a targeted kernel W [in, out] with factors A [in, R], B [R, out] and
scale s, the update dW = s A B is never formed: with reduced QR factorings
A = Q_A R_A and B^T = Q_B R_B,

    dW = Q_A (s R_A R_B^T) Q_B^T,

so dW's singular values are those of the small core C = s R_A R_B^T
([R, R]), its singular vectors are Q_A U_C and Q_B V_C, and
||dW||_F = ||C||_F. Everything below costs O((in + out) R^2) plus one
product W V ([in, out] x [out, R]).

Per layer (`LayerStats`):
  relative_norm   ||dW||_F / ||W||_F.
  singular_values of dW, descending.
  effective_rank  exp(entropy of s_i / sum s) (Roy & Vetterli, 2007): 1 for
                  a rank-one update, R for R equal singular values; 0 for a
                  zero update. `energy_rank` is the threshold variant: the
                  fewest directions holding 99% of ||dW||_F^2.
  projection      ||U^T W V||_F, with U [in, k], V [out, k] dW's top-k
                  singular directions (LoRA paper, Hu et al. 2021, Sec. 7):
                  how much of W lies in the directions dW changes.
  amplification   ||dW||_F / projection: large when dW amplifies directions
                  W barely uses. Compare with `random_projection` (the same
                  for a random k-dim subspace) and `base_top_projection`
                  (W's own top-k directions, i.e. the norm of its top-k
                  singular values).

Dense matrices: W's own SVD (for `base_top_projection`) and DoRA's full
update (the column renormalisation makes it full rank) are formed only for
layers with in * out <= `max_dense_elements`; larger layers report None
there (DoRA then reports the spectrum of its low-rank directional part).
"""
import dataclasses
import re
from typing import Any, Callable, Mapping

import numpy as np

from flaxlora.inspect import table
from flaxlora.inspect import tree as tree_lib
from flaxlora.models import layers
from flaxlora.peft import base as peft_base
from flaxlora.peft import lora
from flaxlora.peft import method_parts

# Above this many elements (in * out) no dense [in, out] matrix is formed.
MAX_DENSE_ELEMENTS = 1 << 22
ENERGY = 0.99
# Singular values below this fraction of the largest count as zero.
_RTOL = 1e-6


@dataclasses.dataclass
class LayerStats:
  """Analysis of one adapted kernel (see the module docstring)."""
  path: str
  shape: tuple[int, int]
  rank: int
  scale: float
  update_norm: float
  base_norm: float | None
  relative_norm: float | None
  singular_values: np.ndarray
  spectrum_of: str
  effective_rank: float
  energy_rank: int
  projection: float | None
  amplification: float | None
  random_projection: float | None
  base_top_projection: float | None
  dense: bool


def _dense_delta(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float,
                 magnitude: np.ndarray) -> np.ndarray:
  """DoRA's full update, [in, out]; the only dense update this module forms."""
  adapted = w + scale * (a @ b)
  return magnitude * adapted / np.linalg.norm(adapted, axis=0) - w


def _spectrum(a: np.ndarray, b: np.ndarray, scale: float):
  """(U [in, k], s [k], V [out, k]) of scale * a @ b from its QR core."""
  q_a, r_a = np.linalg.qr(a)
  q_b, r_b = np.linalg.qr(b.T)
  u, s, vt = np.linalg.svd(scale * (r_a @ r_b.T))
  return q_a @ u, s, q_b @ vt.T


def _ranks(s: np.ndarray) -> tuple[float, int]:
  """(entropy effective rank, 99%-energy rank) of singular values s."""
  if s.size == 0 or s[0] <= 0:
    return 0.0, 0
  s = s[s > _RTOL * s[0]]
  p = s / s.sum()
  energy = np.cumsum(s**2) / np.sum(s**2)
  return float(np.exp(-np.sum(p * np.log(p)))), int(
      np.searchsorted(energy, ENERGY - 1e-12) + 1)


def _dora_norm(w, a, b, scale, magnitude) -> tuple[float, np.ndarray]:
  """||dW||_F of DoRA without forming dW, and its column factor d2 [out].

  dW = W diag(d1) + s A B diag(d2), with d2 = m / c, d1 = d2 - 1 and
  c_j = ||w_j + s A b_j|| expanded as ||w_j||^2 + 2 s (W^T A)_j . b_j +
  s^2 b_j^T (A^T A) b_j, all [out]-sized.
  """
  w_sq = np.sum(w * w, axis=0)
  cross = scale * np.einsum('jr,rj->j', w.T @ a, b)
  low = scale**2 * np.einsum('rj,rs,sj->j', b, a.T @ a, b)
  d2 = magnitude / np.sqrt(np.maximum(w_sq + 2 * cross + low, 1e-30))
  d1 = d2 - 1
  norm_sq = np.sum(d1**2 * w_sq + 2 * d1 * d2 * cross + d2**2 * low)
  return float(np.sqrt(max(norm_sq, 0.0))), d2


def _update(a, b, w, scale, magnitude, small):
  """(U, s, V, ||dW||_F, dense, spectrum_of) of a LoRA or DoRA update."""
  if magnitude is None:
    u, s, v = _spectrum(a, b, scale)
    return u, s, v, float(np.sqrt(np.sum(s**2))), False, 'update'
  w = w.astype(np.float64)
  magnitude = np.asarray(magnitude, np.float64).reshape(-1)
  norm, d2 = _dora_norm(w, a, b, scale, magnitude)
  if small:
    u, s, vt = np.linalg.svd(_dense_delta(w, a, b, scale, magnitude),
                             full_matrices=False)
    return u, s, vt.T, norm, True, 'update'
  # Too large to densify: the spectrum of the directional part s A B diag(d2).
  u, s, v = _spectrum(a, b * d2, scale)
  return u, s, v, norm, False, 'low-rank part'


def _projections(w, u, s, v, k, seed):
  """(||U_k^T W V_k||, the same for a random k-dim subspace); None if dW=0."""
  if s.size == 0 or s[0] <= 0:
    return None, None
  u, v = u[:, :k], v[:, :k]
  projection = float(np.linalg.norm(u.T @ (w @ v.astype(w.dtype))))
  rng = np.random.default_rng(seed)
  q_u = np.linalg.qr(rng.standard_normal((w.shape[0], u.shape[1])))[0]
  q_v = np.linalg.qr(rng.standard_normal((w.shape[1], v.shape[1])))[0]
  rand = float(np.linalg.norm(q_u.T @ (w @ q_v.astype(w.dtype))))
  return projection, rand


def layer_stats(a: Any, b: Any, w: Any = None, scale: float = 1.0,
                magnitude: Any = None, *, path: str = '',
                top_k: int | None = None,
                max_dense_elements: int = MAX_DENSE_ELEMENTS,
                seed: int = 0) -> LayerStats:
  """Analyses one adapted kernel.

  Args:
    a: [in, R] factor.
    b: [R, out] factor.
    w: [in, out] base kernel, or None (then only the update's own stats).
    scale: the LoRA scale s (alpha / R, or alpha / sqrt(R) for rsLoRA).
    magnitude: DoRA's [out] magnitude vector, or None for plain LoRA.
    path: the kernel's path, for the report.
    top_k: number of dW's top singular directions to project W on (default
      all R).
    max_dense_elements: see the module docstring.
    seed: rng seed of the random-subspace baseline.
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
    raise ValueError(f'{path or "layer"}: LoRA factors must be a [in, R] and '
                     f'b [R, out]; got {a.shape} and {b.shape}.')
  shape = (a.shape[0], b.shape[1])
  if w is not None:
    w = np.asarray(w)
    if w.shape != shape:
      raise ValueError(f'{path or "layer"}: base kernel has shape {w.shape} '
                       f'but the factors make {shape}.')
  if magnitude is not None and w is None:
    raise ValueError(f'{path or "layer"}: DoRA (magnitude given) needs the '
                     'base kernel w.')
  small = shape[0] * shape[1] <= max_dense_elements
  u, s, v, update_norm, dense, spectrum_of = _update(a, b, w, scale,
                                                     magnitude, small)
  k = min(top_k or a.shape[1], s.size)
  eff, energy = _ranks(s)
  stats = LayerStats(
      path=path, shape=shape, rank=a.shape[1], scale=float(scale),
      update_norm=update_norm, base_norm=None, relative_norm=None,
      singular_values=s, spectrum_of=spectrum_of, effective_rank=eff,
      energy_rank=energy, projection=None, amplification=None,
      random_projection=None, base_top_projection=None, dense=dense)
  if w is None:
    return stats
  stats.base_norm = float(np.linalg.norm(w))
  stats.relative_norm = update_norm / stats.base_norm
  stats.projection, stats.random_projection = _projections(w, u, s, v, k,
                                                           seed)
  if stats.projection:
    stats.amplification = update_norm / stats.projection
  if small:
    w_s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    stats.base_top_projection = float(np.sqrt(np.sum(w_s[:k]**2)))
  return stats


def lora_nodes(adapter: Any) -> dict[str, dict[str, Any]]:
  """{path: {'a', 'b', maybe 'magnitude', 'scale'}} of every LoRA node.

  A LoRA node is a dict holding both an `a` and a `b` leaf; its path is the
  targeted kernel's path (or its module's, then '/kernel' is appended when
  matching the base). A chained adapter (a tuple, see `peft.base.chain`)
  contributes the nodes of each part.
  """
  if isinstance(adapter, (tuple, list)):
    merged = {}
    for part in adapter:
      merged.update(lora_nodes(part))
    return merged
  nodes: dict[str, dict[str, Any]] = {}
  for path, leaf in tree_lib.flatten(adapter).items():
    parent, _, name = path.rpartition('/')
    if name in ('a', 'b', 'magnitude', 'scale'):
      nodes.setdefault(parent, {})[name] = leaf
  return {p: n for p, n in nodes.items() if 'a' in n and 'b' in n}


Scales = float | Mapping[str, float] | Callable[[str], float] | None


def _scale_of(path: str, node: Mapping[str, Any], scales: Scales) -> float:
  if scales is None:
    if 'scale' not in node:
      raise ValueError(
          f'adapter node {path} stores no scale; pass scales= (a float such '
          'as alpha / rank, {path: scale}, or a function of the path).')
    return float(np.asarray(node['scale']))
  if callable(scales):
    return float(scales(path))
  if isinstance(scales, Mapping):
    if path not in scales:
      raise ValueError(f'scales has no entry for {path}; it has '
                       f'{list(scales)[:3]}...')
    return float(scales[path])
  return float(scales)


def _base_kernel(base: Any, path: str) -> Any:
  """W [in, out] at `path` (or `path`/kernel) that the adapter adds to.

  NF4 kernels are dequantised; a prepared kernel that wraps another (PiSSA's
  residual) gives the kernel it computes with, its field `w`.
  """
  for candidate in (path, path + '/kernel'):
    node = base
    for name in candidate.split('/'):
      node = node.get(name) if isinstance(node, Mapping) else None
    if node is not None and not isinstance(node, Mapping):
      if hasattr(node, 'dequantize'):
        return node.dequantize()
      return node.w if isinstance(node, layers.WrapsKernel) else node
  paths = list(tree_lib.flatten(base))[:3]
  raise ValueError(f'adapter targets {path}, which the base params lack; '
                   f'base paths look like {paths}. Pass the base params the '
                   'adapter was trained on.')


def scales_of(method: peft_base.PeftMethod, adapter: Any) -> dict[str, float]:
  """{kernel path: LoRA scale} from a method's configs (chains included)."""
  scales = {}
  for config, part in method_parts.parts(method, adapter):
    if isinstance(config, lora.LoraConfig):
      scales.update({p: config.scale_for(p) for p in lora_nodes(part)})
  return scales


class Report:
  """A list of `LayerStats`, printable as text and as HTML."""

  HEADERS = ('path', 'shape', 'R', 'scale', '|dW|', '|dW|/|W|', 'eff rank',
             '99% rank', 'top s', 'proj', 'amplif', 'rand proj',
             'W top-k')

  def __init__(self, layers: list[LayerStats]):
    self.layers = layers
    self.by_path = {layer.path: layer for layer in layers}

  def _cells(self) -> list[list[str]]:
    n = table.number
    return [[l.path, str(l.shape), str(l.rank), n(l.scale),
             n(l.update_norm), n(l.relative_norm), n(l.effective_rank, 3),
             str(l.energy_rank),
             n(float(l.singular_values[0]) if l.singular_values.size else None),
             n(l.projection), n(l.amplification), n(l.random_projection),
             n(l.base_top_projection)] for l in self.layers]

  def __str__(self) -> str:
    return table.text(self.HEADERS, self._cells(),
                      f'LoRA updates ({len(self.layers)} layers)')

  def _repr_html_(self) -> str:
    return table.html_table(self.HEADERS, self._cells())


def analyze(base: Any, adapter: Any,
            scales: Scales | peft_base.PeftMethod = None, *,
            top_k: int | None = None,
            max_dense_elements: int = MAX_DENSE_ELEMENTS,
            include: str = '.*') -> Report:
  """`layer_stats` for every LoRA node of `adapter` against `base`.

  Args:
    base: the frozen base params the adapter was trained on.
    adapter: a LoRA-family adapter (nodes {'a', 'b', ['magnitude']}).
    scales: the PEFT method that made the adapter (its configs give each
      target's scale), or the scales themselves (see `_scale_of`); None reads
      a 'scale' leaf stored in each node.
    top_k: directions for the projection (default: each layer's rank).
    max_dense_elements: see the module docstring.
    include: regex (`fullmatch`) over kernel paths to analyse.
  """
  if isinstance(scales, peft_base.PeftMethod):
    scales = scales_of(scales, adapter)
  nodes = lora_nodes(adapter)
  if not nodes:
    raise ValueError('the adapter has no LoRA nodes (dicts with leaves a and '
                     f'b); its leaves: {list(tree_lib.flatten(adapter))[:4]}.')
  layers = []
  for path, node in nodes.items():
    if not re.fullmatch(include, path):
      continue
    layers.append(layer_stats(
        node['a'], node['b'], _base_kernel(base, path),
        _scale_of(path, node, scales), node.get('magnitude'), path=path,
        top_k=top_k, max_dense_elements=max_dense_elements))
  return Report(layers)
