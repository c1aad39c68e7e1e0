"""The notebooks in notebooks/ run top to bottom (as nbmake would).

Each runs in a fresh kernel with TMPDIR pointing at the test's temporary
directory, where the notebooks write everything (`tempfile.mkdtemp`).
notebooks/pipeline.ipynb runs a real TFX pipeline with InteractiveContext
and must show the lineage picture twice (the API's PNG and the CLI's).
"""

import base64
import pathlib

import pytest

pytestmark = [pytest.mark.tfx, pytest.mark.slow]

NOTEBOOKS = sorted(
    (pathlib.Path(__file__).resolve().parents[1] / 'notebooks').glob('*.ipynb'))
_PNG = b'\x89PNG\r\n\x1a\n'


def test_there_are_notebooks():
  assert [p.name for p in NOTEBOOKS] == ['pipeline.ipynb', 'tour.ipynb']


def _execute(path, tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  nb = nbformat.read(str(path), as_version=4)
  monkeypatch.setenv('TMPDIR', str(tmp_path))
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name='python3',
      resources={'metadata': {'path': str(tmp_path)}})
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == 'code'
            for o in c.get('outputs', []) if o.get('output_type') == 'error']
  assert not errors, errors
  return nb


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
  nb = _execute(path, tmp_path, monkeypatch)
  if path.name == 'pipeline.ipynb':
    _check_pipeline_notebook(nb, tmp_path)


def _check_pipeline_notebook(nb, tmp_path):
  """The lineage picture is shown, twice, and the pipeline blessed and
  pushed the model."""
  pngs = [base64.b64decode(o['data']['image/png'])
          for c in nb.cells if c.cell_type == 'code'
          for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
  assert len(pngs) == 2 and all(p.startswith(_PNG) for p in pngs)
  # The CLI wrote the same picture as the API drew.
  assert pngs[0] == pngs[1]
  text = '\n'.join(''.join(o.get('text', ''))
                   for c in nb.cells if c.cell_type == 'code'
                   for o in c.get('outputs', []))
  assert 'blessed: 1' in text
  assert 'pushed: 1' in text
  [work] = [p for p in tmp_path.iterdir() if p.name.startswith('tfxe-pipeline-')]
  assert (work / 'lineage.png').read_bytes() == pngs[1]
  assert (work / 'pipeline_root' / 'metadata.sqlite').exists()
