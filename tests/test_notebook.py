"""The inspection notebook is committed clean and runs top to bottom."""
import pathlib

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

NOTEBOOK = (pathlib.Path(__file__).resolve().parents[1] / 'experiments' /
            'notebooks' / 'inspect_adapters.ipynb')


def test_notebook_is_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code, 'the notebook has no code cells'
  dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count]
  assert not dirty, (f'code cells {dirty} of {NOTEBOOK.name} hold outputs; '
                     'clear them (jupyter nbconvert --clear-output --inplace)')


def test_notebook_executes(tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel inherits the environment: conftest's 8 CPU devices, and no
  # workdir given, so the notebook trains its own tiny run.
  monkeypatch.delenv('FLAXLORA_WORKDIR', raising=False)
  monkeypatch.setenv('TMPDIR', str(tmp_path))
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name='python3',
      resources={'metadata': {'path': str(NOTEBOOK.parent)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  errors = [o for o in outputs if o.output_type == 'error']
  assert not errors
  text = '\n'.join(o.get('text', '') for o in outputs)
  html = '\n'.join(o.get('data', {}).get('text/html', '') for o in outputs)
  assert '8 devices' in text
  assert 'LoRA updates' in text and 'changed' in text
  assert '<details>' in html  # the summary's HTML table rendered
  pngs = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert len(pngs) >= 2  # heat map and spectra
  assert list(tmp_path.glob('flaxlora_inspect_*/lora_heatmap.png'))
