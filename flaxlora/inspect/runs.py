"""A finished run's base params and final adapter, and its inspection.

    run = runs.load_run('workdirs/t5_runlocal')
    print(runs.inspect_run(run, out_dir='workdirs/t5_runlocal/inspect'))

The base, method and initial adapter are rebuilt by the function the
trainer uses (`build.model_and_method`, same seeds): a `model.init`
(runlocal) base is re-initialised from its seed, a checkpoint base is
reloaded, a QLoRA base is quantised again. The adapter is read from the
workdir's `adapter/` folder (`flaxlora.export`) and placed with the
shardings the trainer gives it.
"""
import dataclasses
import json
import pathlib
from typing import Any

import jax
import ml_collections

from flaxlora import build
from flaxlora import export
from flaxlora import resolved
from flaxlora import sharding
from flaxlora import workdir as workdir_lib
from flaxlora.inspect import analysis
from flaxlora.inspect import diff
from flaxlora.inspect import plots
from flaxlora.inspect import prompts
from flaxlora.inspect import summary

HEATMAP_FILE = 'lora_heatmap.png'
SPECTRA_FILE = 'lora_spectra.png'


@dataclasses.dataclass
class LoadedRun:
  """What `load_run` rebuilds; `init_adapter` is the adapter at step 0."""
  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  model: Any
  family: Any
  tokenizer: Any
  method: Any
  base: Any
  adapter: Any
  init_adapter: Any


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The run's resolved config (workdir/config.json)."""
  path = pathlib.Path(workdir) / workdir_lib.CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist; --workdir must be the '
                            'folder a flaxlora run wrote.')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def _mesh(config: ml_collections.ConfigDict):
  try:
    return sharding.make_mesh(config.mesh)
  except ValueError as e:  # run made on another device count
    print(f'flaxlora.inspect: {e} Using all devices on the data axis.')
    return sharding.make_mesh({'data': -1})


def load_run(workdir: str | pathlib.Path) -> LoadedRun:
  """Rebuilds a run's model, base params, method and final adapter."""
  workdir = pathlib.Path(workdir)
  adapter_dir = workdir / workdir_lib.ADAPTER_DIR
  if not (adapter_dir / export.ADAPTER_FILE).is_file():
    raise FileNotFoundError(
        f'{adapter_dir / export.ADAPTER_FILE} does not exist; the run in '
        f'{workdir} has not finished (it is written with summary.json).')
  config = read_config(workdir)
  r = resolved.resolve(config, mesh=_mesh(config), reads=())
  tokenizer = build.tokenizer(r)
  b = build.model_and_method(r, tokenizer)
  init_adapter = b.method.init(b.adapter_rng, b.base)
  like = jax.eval_shape(lambda: init_adapter)
  shardings = sharding.named_shardings(
      like, b.method.logical_axes(b.base_axes, like), r.mesh, r.rules)
  adapter = jax.device_put(export.load_adapter(adapter_dir, like), shardings)
  return LoadedRun(workdir, config, b.model, b.family, tokenizer, b.method,
                   b.base, adapter, init_adapter)


def _has_lora(adapter: Any) -> bool:
  return bool(analysis.lora_nodes(adapter))


def _has_prompt(adapter: Any) -> bool:
  parts = adapter if isinstance(adapter, (tuple, list)) else [adapter]
  return any(isinstance(p, dict) and 'prompt' in p for p in parts)


def inspect_run(run: LoadedRun, out_dir: str | pathlib.Path | None = None,
                *, leaves: bool = False, top_k: int | None = None,
                max_dense_elements: int = analysis.MAX_DENSE_ELEMENTS,
                num_tokens: int = 5) -> str:
  """Summary, diff from init and adapter analyses of a run, as text.

  Args:
    run: from `load_run`.
    out_dir: where to write the heat map and spectra PNGs (None: no plots).
    leaves: include one line per parameter (long for real models).
    top_k: directions for the amplification projection (default: rank).
    max_dense_elements: see `analysis`.
    num_tokens: nearest tokens per prompt vector (prompt tuning).
  """
  s = summary.summary(run.base, run.adapter, method_names=run.method)
  sections = [s.text(leaves), str(diff.diff(run.init_adapter, run.adapter))]
  if _has_lora(run.adapter):
    report = analysis.analyze(run.base, run.adapter, run.method, top_k=top_k,
                              max_dense_elements=max_dense_elements)
    sections.append(str(report))
    if out_dir is not None:
      out_dir = pathlib.Path(out_dir)
      out_dir.mkdir(parents=True, exist_ok=True)
      plots.heatmap(report, path=out_dir / HEATMAP_FILE)
      plots.spectra(report, path=out_dir / SPECTRA_FILE)
      sections.append(f'wrote {out_dir / HEATMAP_FILE} and '
                      f'{out_dir / SPECTRA_FILE}')
  if _has_prompt(run.adapter):
    sections.append(str(prompts.analyze_prompt(
        run.base, run.adapter, k=num_tokens, tokenizer=run.tokenizer)))
  return '\n\n'.join(sections)
