"""tfx_encrypt.lineage's picture: the graph, its DOT text, Graphviz rendering.

Against a real ML Metadata store (SQLite) holding the records a TFX run
writes (types, executions, INPUT/OUTPUT events with their keys, the
pipeline / run / node contexts), written here by hand so that every string
can be hostile: quotes, backslashes, newlines, DOT syntax, terminal escapes.
The DOT is parsed by Graphviz itself (`dot -Tjson0`) and rendered to SVG and
PNG with the real `dot` (Debian package graphviz: a missing one fails, it
never skips). The same checks on the records of real TFX pipelines are in
test_lineage.py (`test_mariadb_lineage_picture`: CsvExampleGen ->
StatisticsGen -> SchemaGen -> Trainer -> Evaluator -> EncryptPusher into
MariaDB; `test_cli_package_in_an_object_store`).
"""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

metadata_store_pb2 = pytest.importorskip(
    'ml_metadata.proto.metadata_store_pb2')

# pylint: disable=g-import-not-at-top,wrong-import-position
from ml_metadata.metadata_store import metadata_store
from tfx_encrypt import errors
from tfx_encrypt import lineage
# pylint: enable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.tfx

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
_PNG = b'\x89PNG\r\n\x1a\n'

# Hostile strings, as anyone who can write MLMD records (or name a
# directory) could choose them.
EVIL_INPUT = '/data/in"put\\n}; evil [label="x"]; a -> b; {\n\x1b[31mred'
EVIL_MODEL_URI = '/root/Trainer/model/"7"\\l\r\n-> boom'
EVIL_COMPONENT = 'Trainer" shape=none; x -> y [label="'
EVIL_PIPELINE = 'pipe\u202eline'


def _dot_binary():
  dot = shutil.which('dot')
  assert dot, ('Graphviz is not installed (Debian package graphviz; '
               'scripts/ensure_system_packages.sh test installs it)')
  return dot


def _parse_dot(dot_text):
  """Graphviz's own parse of the DOT text: ({name: attrs}, [(from, to,
  attrs)]); any syntax error fails here."""
  proc = subprocess.run([_dot_binary(), '-Tjson0'],
                        input=dot_text.encode(), capture_output=True,
                        timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr.decode()
  parsed = json.loads(proc.stdout)
  objects = parsed.get('objects', [])
  names = {o['_gvid']: o['name'] for o in objects}
  nodes = {o['name']: o for o in objects}
  edges = [(names[e['tail']], names[e['head']], e)
           for e in parsed.get('edges', [])]
  return parsed, nodes, edges


def _svg_texts(svg: bytes):
  root = ET.fromstring(svg)
  return [''.join(t.itertext()) for t in root.iter('{http://www.w3.org/2000/svg}text')]


class _Store:
  """A hand-written MLMD store with TFX's record shapes."""

  def __init__(self, path):
    config = metadata_store_pb2.ConnectionConfig()
    config.sqlite.filename_uri = path
    config.sqlite.connection_mode = 3  # READWRITE_OPENCREATE
    self.store = metadata_store.MetadataStore(config)
    self.path = path
    self._types = {}
    ctx_types = {}
    for name in ('pipeline', 'pipeline_run', 'node'):
      ctx_types[name] = self.store.put_context_type(
          metadata_store_pb2.ContextType(name=name))
    self.contexts = []
    for kind, name in (('pipeline', EVIL_PIPELINE),
                       ('pipeline_run', 'run-1')):
      [cid] = self.store.put_contexts([metadata_store_pb2.Context(
          type_id=ctx_types[kind], name=name)])
      self.contexts.append(metadata_store_pb2.Context(
          id=cid, type_id=ctx_types[kind], name=name))
    self._ctx_types = ctx_types

  def _type(self, name, kind):
    key = (kind, name)
    if key not in self._types:
      if kind == 'artifact':
        self._types[key] = self.store.put_artifact_type(
            metadata_store_pb2.ArtifactType(name=name))
      else:
        self._types[key] = self.store.put_execution_type(
            metadata_store_pb2.ExecutionType(name=name))
    return self._types[key]

  def artifact(self, type_name, uri, **custom):
    a = metadata_store_pb2.Artifact(type_id=self._type(type_name, 'artifact'),
                                    uri=uri,
                                    state=metadata_store_pb2.Artifact.LIVE)
    for k, v in custom.items():
      if isinstance(v, int):
        a.custom_properties[k].int_value = v
      else:
        a.custom_properties[k].string_value = v
    [a.id] = self.store.put_artifacts([a])
    return a

  def execution(self, type_name, node, inputs, outputs, **custom):
    e = metadata_store_pb2.Execution(
        type_id=self._type(type_name, 'execution'),
        last_known_state=metadata_store_pb2.Execution.COMPLETE)
    for k, v in custom.items():
      e.custom_properties[k].string_value = v
    events = []
    for kind, pairs in ((metadata_store_pb2.Event.INPUT, inputs),
                        (metadata_store_pb2.Event.OUTPUT, outputs)):
      for key, a in pairs:
        ev = metadata_store_pb2.Event(type=kind)
        ev.path.steps.add().key = key
        ev.path.steps.add().index = 0
        events.append((a, ev))
    [cid] = self.store.put_contexts([metadata_store_pb2.Context(
        type_id=self._ctx_types['node'], name=f'{EVIL_PIPELINE}.{node}')])
    node_ctx = metadata_store_pb2.Context(
        id=cid, type_id=self._ctx_types['node'],
        name=f'{EVIL_PIPELINE}.{node}')
    eid, _, _ = self.store.put_execution(e, events,
                                         self.contexts + [node_ctx])
    return eid


@pytest.fixture(scope='module')
def hand_store(tmp_path_factory):
  """ExampleGen -> StatisticsGen -> SchemaGen -> Trainer -> Evaluator ->
  EncryptPusher -> (EncryptedModel, PushedModel), then a key rotation."""
  s = _Store(str(tmp_path_factory.mktemp('graph') / 'metadata.sqlite'))
  pre = 'tfx.components.'
  examples = s.artifact('Examples', '/root/CsvExampleGen/examples/1', span=0)
  s.execution(pre + 'example_gen.csv_example_gen.component.CsvExampleGen',
              'CsvExampleGen', [], [('examples', examples)],
              input_base=EVIL_INPUT)
  stats = s.artifact('ExampleStatistics', '/root/StatisticsGen/statistics/2')
  s.execution(pre + 'statistics_gen.component.StatisticsGen', 'StatisticsGen',
              [('examples', examples)], [('statistics', stats)])
  schema = s.artifact('Schema', '/root/SchemaGen/schema/3')
  s.execution(pre + 'schema_gen.component.SchemaGen', 'SchemaGen',
              [('statistics', stats)], [('schema', schema)])
  model = s.artifact('Model', EVIL_MODEL_URI)
  run = s.artifact('ModelRun', '/root/Trainer/model_run/4')
  s.execution(pre + 'trainer.component.Trainer', EVIL_COMPONENT,
              [('examples', examples), ('schema', schema)],
              [('model', model), ('model_run', run)])
  evaluation = s.artifact('ModelEvaluation', '/root/Evaluator/evaluation/5')
  blessing = s.artifact('ModelBlessing', '/root/Evaluator/blessing/5',
                        blessed=1)
  s.execution(pre + 'evaluator.component.Evaluator', 'Evaluator',
              [('examples', examples), ('model', model)],
              [('evaluation', evaluation), ('blessing', blessing)])
  recipient = 'sha256:' + 'ab' * 32
  signer = 'sha256:' + 'cd' * 32
  common = dict(pushed=1, pushed_destination='/srv/models/taxi/1700000000',
                pushed_version='1700000000', encrypted=1,
                package_id='0f' * 16, model_fingerprint='sha256:' + '12' * 32,
                recipient_key_ids=json.dumps([recipient]), signer_id=signer)
  encrypted = s.artifact('tfx_encrypt.EncryptedModel',
                         '/root/encrypt_pusher/encrypted_model/6', **common)
  pushed = s.artifact('PushedModel', '/root/encrypt_pusher/pushed_model/6',
                      **{k: v for k, v in common.items()
                         if k.startswith('pushed')})
  pusher = s.execution(
      'tfx_encrypt.components.encrypt_pusher.component.EncryptPusher',
      'encrypt_pusher', [('model', model), ('model_blessing', blessing)],
      [('encrypted_model', encrypted), ('pushed_model', pushed)])
  # A rewrap in place: KeyRotation, old artifact in, new one out.
  key_b = 'sha256:' + 'ef' * 32
  rewrapped = s.artifact(
      'tfx_encrypt.EncryptedModel', '/srv/models/taxi/1700000000',
      **dict(common, recipient_key_ids=json.dumps([key_b])))
  rotation = s.execution(lineage.KEY_ROTATION_TYPE, 'rewrap',
                         [('encrypted_model', encrypted)],
                         [('encrypted_model', rewrapped)],
                         operation='rewrap',
                         added_key_ids=json.dumps([key_b]),
                         removed_key_ids=json.dumps([recipient]))
  ids = dict(examples=examples.id, stats=stats.id, schema=schema.id,
             model=model.id, run=run.id, evaluation=evaluation.id,
             blessing=blessing.id, encrypted=encrypted.id, pushed=pushed.id,
             rewrapped=rewrapped.id, pusher=pusher, rotation=rotation,
             recipient=recipient, signer=signer, key_b=key_b)
  return s, ids


def _by_type(graph, kind, type_suffix):
  return [n for n in graph['nodes'] if n['kind'] == kind and
          (n.get('type') or '').endswith(type_suffix)]


def test_graph_follows_the_pipeline(hand_store):
  s, ids = hand_store
  graph = lineage.lineage_graph(s.store, [ids['encrypted']])
  assert graph['focus'] == [ids['encrypted']] and not graph['truncated']
  names = {n['name']: n for n in graph['nodes']}
  types = sorted((n['kind'], (n.get('type') or n.get('role')).rsplit('.', 1)[-1])
                 for n in graph['nodes'])
  assert types == sorted([
      ('artifact', 'EncryptedModel'), ('artifact', 'EncryptedModel'),
      ('artifact', 'ExampleStatistics'), ('artifact', 'Examples'),
      ('artifact', 'Model'), ('artifact', 'ModelBlessing'),
      ('artifact', 'PushedModel'), ('artifact', 'Schema'),
      ('execution', 'CsvExampleGen'), ('execution', 'EncryptPusher'),
      ('execution', 'Evaluator'), ('execution', 'KeyRotation'),
      ('execution', 'SchemaGen'), ('execution', 'StatisticsGen'),
      ('execution', 'Trainer'), ('location', 'input data'),
      ('location', 'pushed')])
  # Outputs off the path to the package (ModelRun, ModelEvaluation) are not
  # drawn.
  assert f'a{ids["run"]}' not in names and f'a{ids["evaluation"]}' not in names
  [gen] = _by_type(graph, 'execution', 'CsvExampleGen')
  [trainer] = _by_type(graph, 'execution', 'Trainer')
  [evaluator] = _by_type(graph, 'execution', 'Evaluator')
  [stat_gen] = _by_type(graph, 'execution', 'StatisticsGen')
  [schema_gen] = _by_type(graph, 'execution', 'SchemaGen')
  [rotation] = _by_type(graph, 'execution', 'KeyRotation')
  pusher = names[f'e{ids["pusher"]}']
  [data] = [n for n in graph['nodes'] if n.get('role') == 'input data']
  [push] = [n for n in graph['nodes'] if n.get('role') == 'pushed']
  assert data['uri'] == EVIL_INPUT
  assert push['uri'] == '/srv/models/taxi/1700000000'
  assert trainer['component_id'] == EVIL_COMPONENT
  assert pusher['pipeline_name'] == EVIL_PIPELINE
  a = {k: f'a{ids[k]}' for k in ('examples', 'stats', 'schema', 'model',
                                 'blessing', 'encrypted', 'pushed',
                                 'rewrapped')}
  edges = {(e['from'], e['to'], e['label']) for e in graph['edges']}
  assert edges == {
      (data['name'], gen['name'], 'input_base'),
      (gen['name'], a['examples'], 'examples'),
      (a['examples'], stat_gen['name'], 'examples'),
      (stat_gen['name'], a['stats'], 'statistics'),
      (a['stats'], schema_gen['name'], 'statistics'),
      (schema_gen['name'], a['schema'], 'schema'),
      (a['examples'], trainer['name'], 'examples'),
      (a['schema'], trainer['name'], 'schema'),
      (trainer['name'], a['model'], 'model'),
      (a['examples'], evaluator['name'], 'examples'),
      (a['model'], evaluator['name'], 'model'),
      (evaluator['name'], a['blessing'], 'blessing'),
      (a['model'], pusher['name'], 'model'),
      (a['blessing'], pusher['name'], 'model_blessing'),
      (pusher['name'], a['encrypted'], 'encrypted_model'),
      (pusher['name'], a['pushed'], 'pushed_model'),
      (a['encrypted'], push['name'], 'pushed to'),
      (a['pushed'], push['name'], 'pushed to'),
      (a['encrypted'], rotation['name'], 'encrypted_model'),
      (rotation['name'], a['rewrapped'], 'encrypted_model'),
      (a['rewrapped'], push['name'], 'pushed to'),
  }
  assert names[a['blessing']]['blessed'] == 1
  assert 'blessed' in names[a['blessing']]['label']
  assert names[a['encrypted']]['focus'] is True
  assert rotation['label'][0] == 'key rotation (rewrap)'


def test_graph_of_a_rotated_package_goes_back_through_the_rotation(hand_store):
  s, ids = hand_store
  graph = lineage.lineage_graph(s.store, [ids['rewrapped']])
  kinds = {n.get('type', '').rsplit('.', 1)[-1] for n in graph['nodes']}
  assert {'KeyRotation', 'EncryptPusher', 'Trainer', 'Evaluator',
          'CsvExampleGen'} <= kinds
  both = lineage.lineage_graph(s.store, [ids['rewrapped'], ids['encrypted']])
  assert both['focus'] == sorted([ids['rewrapped'], ids['encrypted']])
  # Shared upstream nodes appear once.
  assert len({n['name'] for n in both['nodes']}) == len(both['nodes'])


def test_dot_is_escaped_and_graphviz_parses_exactly_the_graph(hand_store):
  s, ids = hand_store
  graph = lineage.lineage_graph(s.store, [ids['encrypted']])
  dot_text = lineage.to_dot(graph)
  assert dot_text == lineage.lineage_dot(s.store, [ids['encrypted']])
  # Nothing from MLMD became DOT syntax: Graphviz sees exactly our nodes
  # and edges, and every label is the printable text of the MLMD string.
  parsed, nodes, edges = _parse_dot(dot_text)
  assert set(nodes) == {n['name'] for n in graph['nodes']}
  assert sorted((f, t, e.get('label', '')) for f, t, e in edges) == sorted(
      (e['from'], e['to'], e['label']) for e in graph['edges'])
  for n in graph['nodes']:
    # (what Graphviz then draws is checked in the SVG, below)
    assert nodes[n['name']]['label'] == '\\n'.join(
        lineage._graph.dot_escape(line).replace('\\"', '"')  # pylint: disable=protected-access
        for line in n['label'])
  assert parsed['name'] == 'tfx_encrypt_lineage'
  # No raw control character or bidi override reaches the DOT text.
  for bad in ('\x1b', '\r', '\u202e'):
    assert bad not in dot_text
  assert dot_text.count('\n') == len(dot_text.splitlines())
  # Deterministic: the same store, the same bytes.
  assert lineage.lineage_dot(s.store, [ids['encrypted']]) == dot_text


def test_svg_and_png_show_the_labels(hand_store):
  s, ids = hand_store
  dot_text = lineage.lineage_dot(s.store, [ids['encrypted']])
  svg = lineage.render(dot_text, 'svg')
  assert svg.startswith(b'<?xml') and b'<svg' in svg
  texts = _svg_texts(svg)
  # What Graphviz draws is the printable form of each MLMD string.
  assert '/data/in"put\\n}; evil [label="x"]; a -> b; {\\x0a\\x1b[31mred' in (
      texts)
  assert '.../Trainer/model/"7"\\l\\x0d\\x0a-> boom' in texts
  assert EVIL_COMPONENT in texts
  for expected in ('CsvExampleGen', 'StatisticsGen', 'SchemaGen',
                   'Evaluator', 'encrypt_pusher', 'blessed',
                   'pushed version 1700000000', '/srv/models/taxi/1700000000',
                   f'EncryptedModel {ids["encrypted"]}',
                   f'Model {ids["model"]}', f'ModelBlessing {ids["blessing"]}',
                   'recipient sha256:' + 'ab' * 6 + '...',
                   'signer sha256:' + 'cd' * 6 + '...',
                   'key rotation (rewrap)'):
    assert expected in texts, expected
  png = lineage.render(dot_text, 'png')
  assert png.startswith(_PNG) and len(png) > 1000
  assert b'IEND' in png[-16:]


def test_no_key_material_in_the_picture(hand_store):
  """Labels carry key ids, never what an execution parameter holds."""
  s, ids = hand_store
  # An execution parameter that is not input_base is never shown.
  secret = 'pin-value=1234-not-shown'
  [execution] = s.store.get_executions_by_id([ids['pusher']])
  execution.custom_properties['signer'].string_value = secret
  s.store.put_executions([execution])
  dot_text = lineage.lineage_dot(s.store, [ids['encrypted']])
  assert secret not in dot_text and 'signer' not in dot_text.replace(
      'signer sha256', '')


def test_render_without_graphviz_says_what_to_install(monkeypatch):
  monkeypatch.setenv('TFXE_DOT', 'tfxe-no-such-dot-binary')
  with pytest.raises(lineage.GraphvizNotFoundError) as e:
    lineage.render('digraph g {}', 'png')
  assert isinstance(e.value, errors.UsageError)
  assert 'apt-get install graphviz' in str(e.value)
  assert '\n' not in str(e.value)


def test_render_refuses_other_formats():
  with pytest.raises(errors.UsageError):
    lineage.render('digraph g {}', 'pdf')


def test_graph_refuses_other_artifacts(hand_store):
  s, ids = hand_store
  with pytest.raises(lineage.NoMatchError, match='is a Model'):
    lineage.lineage_graph(s.store, [ids['model']])
  with pytest.raises(lineage.NoMatchError, match='no artifact'):
    lineage.lineage_graph(s.store, [10**9])


def _cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'tfx_encrypt', 'lineage',
                         *args], capture_output=True, cwd=_ROOT, timeout=300,
                        check=False, env=dict(os.environ, **(env or {})))


def test_cli_formats(hand_store, tmp_path):
  s, ids = hand_store
  store = ['--mlmd-sqlite', s.path, '--all']
  proc = _cli(*store, '--format', 'dot')
  assert proc.returncode == 0, proc.stderr
  text = proc.stdout.decode()
  _, nodes, _ = _parse_dot(text)
  assert f'a{ids["encrypted"]}' in nodes and f'a{ids["rewrapped"]}' in nodes
  assert text == lineage.lineage_dot(s.store, [ids['encrypted'],
                                               ids['rewrapped']])
  proc = _cli(*store, '--format', 'svg')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(b'<?xml')
  assert 'Evaluator' in _svg_texts(proc.stdout)
  out = tmp_path / 'lineage.png'
  proc = _cli(*store, '--format', 'png', '--output', str(out))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == b''
  assert out.read_bytes().startswith(_PNG)
  assert [p.name for p in tmp_path.iterdir()] == ['lineage.png']
  # An existing file is never replaced without --force, and only a picture
  # with it.
  proc = _cli(*store, '--format', 'png', '--output', str(out))
  assert proc.returncode == 2 and proc.stderr.count(b'\n') == 1, proc.stderr
  proc = _cli(*store, '--format', 'svg', '--output', str(out), '--force')
  assert proc.returncode == 0, proc.stderr
  assert out.read_bytes().startswith(b'<?xml')
  other = tmp_path / 'notes.txt'
  other.write_text('mine')
  proc = _cli(*store, '--format', 'dot', '-o', str(other), '--force')
  assert proc.returncode == 2, proc.stderr
  assert other.read_text() == 'mine'
  # png needs a file; --json and another --format conflict.
  proc = _cli(*store, '--format', 'png')
  assert proc.returncode == 2 and b'--output' in proc.stderr
  proc = _cli(*store, '--format', 'dot', '--json')
  assert proc.returncode == 2
  # JSON to a file.
  proc = _cli(*store, '--format', 'json', '-o', str(tmp_path / 't.json'))
  assert proc.returncode == 0, proc.stderr
  assert len(json.loads((tmp_path / 't.json').read_text())) == 2


def test_cli_without_graphviz_says_what_to_install_in_one_line(hand_store,
                                                              tmp_path):
  s, _ = hand_store
  out = tmp_path / 'x.png'
  for fmt in ('svg', 'png'):
    proc = _cli('--mlmd-sqlite', s.path, '--format', fmt, '-o', str(out),
                env={'TFXE_DOT': 'tfxe-no-such-dot-binary'})
    assert proc.returncode == errors.UsageError.exit_code == 2
    assert proc.stdout == b''
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and 'apt-get install graphviz' in lines[0], lines
    assert not out.exists()
  # dot text needs no Graphviz.
  proc = _cli('--mlmd-sqlite', s.path, '--format', 'dot',
              env={'TFXE_DOT': 'tfxe-no-such-dot-binary'})
  assert proc.returncode == 0, proc.stderr
