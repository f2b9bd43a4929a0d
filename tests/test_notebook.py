"""The inspection notebook runs top to bottom, and `experiments.inspect_run`
inspects the run it trained (one shrunken runlocal run serves both)."""
import os
import pathlib
import subprocess
import sys

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'experiments' / 'notebooks' / 'inspect_adapters.ipynb'


def test_notebook_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code, 'the notebook has no code cells'
  dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count]
  assert not dirty, (f'code cells {dirty} of {NOTEBOOK.name} hold outputs; '
                     'clear them (jupyter nbconvert --clear-output --inplace)')


def _execute(workdir: pathlib.Path, monkeypatch) -> list:
  """Runs the notebook (the kernel inherits conftest's 8 CPU devices);
  returns every code cell output."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  monkeypatch.setenv('FLAXLORA_WORKDIR', str(workdir))  # trains into it
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name='python3',
      resources={'metadata': {'path': str(NOTEBOOK.parent)}})
  client.execute()
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]


@pytest.mark.slow  # ~50 s: a whole run inside a Jupyter kernel
def test_notebook_executes_and_cli_inspects_its_run(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  outputs = _execute(workdir, monkeypatch)
  assert not [o for o in outputs if o.output_type == 'error']
  text = '\n'.join(o.get('text', '') for o in outputs)
  html = '\n'.join(o.get('data', {}).get('text/html', '') for o in outputs)
  assert '8 devices' in text
  assert 'P(fsdp, None)' in text  # the FSDP run's kernels are split
  assert 'LoRA updates' in text and 'changed' in text
  assert '<details>' in html  # the summary's HTML table rendered
  assert sum('image/png' in o.get('data', {}) for o in outputs) >= 2
  assert (workdir / 'summary.json').is_file()

  out = tmp_path / 'plots'
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.inspect_run', f'--workdir={workdir}',
       f'--out={out}'], cwd=ROOT, capture_output=True, text=True,
      timeout=600, env=dict(os.environ), check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'totals by module' in result.stdout
  assert 'encoder/block_0/attention/q/kernel' in result.stdout
  assert 'LoRA updates (32 layers)' in result.stdout
  for name in ('lora_heatmap.png', 'lora_spectra.png'):
    assert (out / name).read_bytes()[:4] == b'\x89PNG'
