"""The lineage of pushed packages as a graph: Graphviz DOT, SVG, PNG.

`lineage_graph(store, artifact_ids)` walks the MLMD events around one or
more EncryptedModel artifacts:

* upstream, from each EncryptedModel to the execution that produced it
  (EncryptPusher, or a `tfx_encrypt.KeyRotation` and through it the
  EncryptPusher run), then every input of every execution met (Model,
  ModelBlessing, Examples, Schema, Statistics, ...) and the executions that
  produced those (Evaluator, Trainer, SchemaGen, StatisticsGen,
  ExampleGen, Transform, Importer, ...), up to `depth` executions deep;
* the ExampleGen's input data (its `input_base` parameter, the one
  execution parameter shown, as in `trace`);
* the other outputs of the EncryptPusher execution (the `PushedModel`);
* downstream, the executions that consumed the EncryptedModel (a key
  rotation, a pusher of your own) and their outputs;
* the push locations (`pushed_destination`, `pushed_version`) of every
  EncryptedModel and PushedModel that was pushed.

`to_dot(graph)` writes it as Graphviz DOT: every string read from MLMD is
made printable (`tfx_encrypt._text`) and escaped for a DOT quoted string;
node names are generated (`a<artifact id>`, `e<execution id>`, `l<n>`), so
nothing from the store is ever DOT syntax. No key material appears: the
labels show key *ids*, digests, URIs and types, picked one by one (no
execution parameter but `input_base`). Output is deterministic (sorted
nodes and edges, no timestamps): the same store gives the same bytes.

`render(dot_text, fmt)` turns DOT into SVG or PNG with Graphviz's `dot`
program (Debian package `graphviz`); without it, `GraphvizNotFoundError`
(a `UsageError`, exit 2) says what to install.
"""

import os
import shutil
import subprocess
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

from tfx_encrypt import _text
from tfx_encrypt import errors
from tfx_encrypt import mlmd_names
from tfx_encrypt.lineage import _query
from tfx_encrypt.lineage._store import LineageError
from tfx_encrypt.lineage._store import NoMatchError
from tfx_encrypt.lineage._store import decode_properties
from tfx_encrypt.lineage._store import package_properties

_Event = metadata_store_pb2.Event
_Execution = metadata_store_pb2.Execution
_Artifact = metadata_store_pb2.Artifact

#: How many executions upstream of an EncryptedModel the graph follows:
#: EncryptPusher, Evaluator / Trainer, SchemaGen / Transform, StatisticsGen,
#: ExampleGen, plus a few key rotations.
DEFAULT_DEPTH = 10
#: At most this many nodes (a store with a huge shared upstream still gives
#: a readable picture, and a bounded amount of work).
MAX_NODES = 400

#: Output formats of `render` (besides DOT itself).
RENDER_FORMATS = ('svg', 'png')
_MAGIC = {'png': b'\x89PNG\r\n\x1a\n', 'svg': b'<?xml'}
_RENDER_TIMEOUT_SEC = 120
_LABEL_LIMIT = 200  # characters of one MLMD string shown in a label
_URI_TAIL = 3  # artifact URIs are shown as their last path components

_EXAMPLE_GEN_INPUT = 'input_base'


class GraphvizNotFoundError(LineageError, errors.UsageError):
  """Graphviz's `dot` program is not installed (CLI exit code 2)."""
  exit_code = 2


class GraphvizError(LineageError):
  """`dot` failed to render the graph (CLI exit code 1)."""


# --------------------------------------------------------------------------
# The graph.
# --------------------------------------------------------------------------


class _Builder:
  """Collects nodes and edges while the MLMD events are walked."""

  def __init__(self, store: metadata_store.MetadataStore, depth: int):
    self.store = store
    self.depth = depth
    self.nodes: Dict[str, Dict[str, Any]] = {}
    self.edges: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
    self.locations: Dict[Tuple[str, str], str] = {}
    self._artifacts: Dict[int, _Artifact] = {}
    self._executions: Dict[int, _Execution] = {}
    self._events_by_execution: Dict[int, List[Any]] = {}
    self._events_by_artifact: Dict[int, List[Any]] = {}
    self._artifact_types: Dict[int, str] = {}
    self._execution_types: Dict[int, str] = {}
    self.truncated = False

  # -- MLMD reads, cached -------------------------------------------------

  def artifact(self, artifact_id: int) -> Optional[_Artifact]:
    if artifact_id not in self._artifacts:
      found = self.store.get_artifacts_by_id([artifact_id])
      self._artifacts[artifact_id] = found[0] if found else None
    return self._artifacts[artifact_id]

  def execution(self, execution_id: int) -> Optional[_Execution]:
    if execution_id not in self._executions:
      found = self.store.get_executions_by_id([execution_id])
      self._executions[execution_id] = found[0] if found else None
    return self._executions[execution_id]

  def events_of_execution(self, execution_id: int) -> List[Any]:
    if execution_id not in self._events_by_execution:
      self._events_by_execution[execution_id] = sorted(
          self.store.get_events_by_execution_ids([execution_id]),
          key=lambda e: (e.artifact_id, e.type))
    return self._events_by_execution[execution_id]

  def events_of_artifact(self, artifact_id: int) -> List[Any]:
    if artifact_id not in self._events_by_artifact:
      self._events_by_artifact[artifact_id] = sorted(
          self.store.get_events_by_artifact_ids([artifact_id]),
          key=lambda e: (e.execution_id, e.type))
    return self._events_by_artifact[artifact_id]

  def artifact_type(self, a: _Artifact) -> str:
    if a.type:
      return a.type
    if a.type_id not in self._artifact_types:
      self._artifact_types.update(
          _query._type_names(self.store, [a.type_id]))  # pylint: disable=protected-access
    return self._artifact_types.get(a.type_id) or '?'

  def execution_type(self, e: _Execution) -> str:
    if e.type:
      return e.type
    if e.type_id not in self._execution_types:
      self._execution_types.update(
          {t.id: t.name
           for t in self.store.get_execution_types_by_id([e.type_id])})
    return self._execution_types.get(e.type_id) or '?'

  # -- nodes and edges ----------------------------------------------------

  def _room(self) -> bool:
    if len(self.nodes) >= MAX_NODES:
      self.truncated = True
      return False
    return True

  def add_artifact(self, a: _Artifact, focus: bool = False) -> Optional[str]:
    name = f'a{a.id}'
    if name in self.nodes:
      if focus:
        self.nodes[name]['focus'] = True
      return name
    if not self._room():
      return None
    type_name = self.artifact_type(a)
    node = {'name': name, 'kind': 'artifact', 'mlmd_id': a.id,
            'type': type_name, 'uri': a.uri, 'focus': focus,
            'state': _Artifact.State.Name(a.state)}
    short = _short_type(type_name)
    lines = [f'{short} {a.id}']
    if type_name == mlmd_names.ENCRYPTED_MODEL_TYPE:
      props = package_properties(a)
      node['status'] = _query.status(a, props)
      lines.append(_short_uri(a.uri))
      if node['status'] != 'live':
        lines.append(node['status'])
      if props.get(mlmd_names.MODEL_FINGERPRINT_PROPERTY):
        lines.append('fingerprint ' + _short_digest(
            props[mlmd_names.MODEL_FINGERPRINT_PROPERTY]))
      ids = props.get(mlmd_names.RECIPIENT_KEY_IDS_PROPERTY) or []
      for key_id in ids if isinstance(ids, list) else [ids]:
        lines.append('recipient ' + _short_digest(key_id))
      signer = props.get(mlmd_names.SIGNER_ID_PROPERTY)
      lines.append('signer ' + (_short_digest(signer) if signer
                                else 'none (unsigned)'))
      self._push_location(name, props)
    elif type_name == _query.PUSHED_MODEL_TYPE:
      props = decode_properties(a)
      lines.append('pushed' if props.get(mlmd_names.PUSHED_PROPERTY)
                   else 'not pushed')
      self._push_location(name, props, style='dashed')
    elif type_name in _query.BLESSING_TYPES:
      blessed = decode_properties(a, ('blessed',)).get('blessed')
      node['blessed'] = blessed
      lines.append(_short_uri(a.uri))
      lines.append('blessed' if blessed else
                   'NOT blessed' if blessed is not None else 'blessed: ?')
    else:
      props = decode_properties(a)
      if type_name == _query.MODEL_TYPE:
        for key in ('model_name', 'name', 'model_version'):
          if props.get(key) not in (None, ''):
            lines.append(f'{key} {props[key]}')
      elif type_name == _query.EXAMPLES_TYPE and props.get('span') is not None:
        lines.append(f'span {props["span"]}')
      lines.append(_short_uri(a.uri))
    node['label'] = lines
    self.nodes[name] = node
    return name

  def add_execution(self, e: _Execution) -> Optional[str]:
    name = f'e{e.id}'
    if name in self.nodes:
      return name
    if not self._room():
      return None
    entry = _query._execution_entry(self.store, e)  # pylint: disable=protected-access
    type_name = entry['type'] or '?'
    short = _short_type(type_name)
    component = entry.get('component_id')
    lines = [component or short]
    lines.append(f'{short} execution {e.id}' if component and component != short
                 else f'execution {e.id}')
    state = entry['state']
    if state != 'COMPLETE':
      lines.append(state.lower())
    if type_name == mlmd_names.KEY_ROTATION_TYPE:
      props = entry.get('properties') or {}
      lines[0] = f'key rotation ({props.get("operation") or "?"})'
      for what, key in (('added', mlmd_names.ROTATION_ADDED_PROPERTY),
                        ('removed', mlmd_names.ROTATION_REMOVED_PROPERTY)):
        for key_id in props.get(key) or []:
          lines.append(f'{what} {_short_digest(key_id)}')
    self.nodes[name] = {
        'name': name, 'kind': 'execution', 'mlmd_id': e.id,
        'type': type_name, 'component_id': component, 'state': state,
        'pipeline_name': entry.get('pipeline_name'),
        'pipeline_run_id': entry.get('pipeline_run_id'), 'label': lines}
    base = entry.get(_EXAMPLE_GEN_INPUT)
    if base:
      loc = self.add_location(str(base), 'input data',
                              f'{_EXAMPLE_GEN_INPUT} of {short}')
      if loc:
        self.add_edge(loc, name, _EXAMPLE_GEN_INPUT)
    return name

  def add_location(self, where: str, role: str, title: str) -> Optional[str]:
    key = (role, where)
    if key in self.locations:
      return self.locations[key]
    if not self._room():
      return None
    name = f'l{len(self.locations) + 1}'
    self.locations[key] = name
    self.nodes[name] = {'name': name, 'kind': 'location', 'role': role,
                        'uri': where, 'label': [title, where]}
    return name

  def _push_location(self, artifact_name: str, props: Dict[str, Any],
                     style: str = 'solid') -> None:
    if not props.get(mlmd_names.PUSHED_PROPERTY):
      return
    dest = props.get(mlmd_names.PUSHED_DESTINATION_PROPERTY)
    if not dest:
      return
    version = props.get(mlmd_names.PUSHED_VERSION_PROPERTY)
    loc = self.add_location(str(dest), 'pushed',
                            f'pushed version {version}' if version not in (
                                None, '') else 'pushed')
    if loc:
      self.add_edge(artifact_name, loc, 'pushed to', style=style)

  def add_edge(self, src: str, dst: str, label: Optional[str],
               style: str = 'solid') -> None:
    key = (src, dst, label or '')
    if key not in self.edges:
      self.edges[key] = {'from': src, 'to': dst, 'label': label or '',
                         'style': style}

  # -- the walk -----------------------------------------------------------

  def producers(self, artifact_id: int) -> List[int]:
    return sorted({e.execution_id for e in self.events_of_artifact(artifact_id)
                   if e.type in _query._OUTPUT_EVENTS})  # pylint: disable=protected-access

  def consumers(self, artifact_id: int) -> List[int]:
    return sorted({e.execution_id for e in self.events_of_artifact(artifact_id)
                   if e.type in _query._INPUT_EVENTS})  # pylint: disable=protected-access

  def link_outputs(self, execution_id: int, only: Optional[Iterable[int]] = None
                   ) -> List[int]:
    """Edges execution -> its outputs (all, or those in `only`)."""
    ename = f'e{execution_id}'
    keep = set(only) if only is not None else None
    done = []
    keys = _query._event_keys(self.events_of_execution(execution_id))  # pylint: disable=protected-access
    for ev in self.events_of_execution(execution_id):
      if ev.type not in _query._OUTPUT_EVENTS:  # pylint: disable=protected-access
        continue
      if keep is not None and ev.artifact_id not in keep:
        continue
      a = self.artifact(ev.artifact_id)
      if a is None:
        continue
      aname = self.add_artifact(a)
      if aname:
        self.add_edge(ename, aname, keys.get((a.id, False)))
        done.append(a.id)
    return done

  def upstream(self, artifact_id: int) -> None:
    """Breadth first: producers of the artifact, their inputs, ..."""
    frontier = [(artifact_id, 0)]
    seen_executions = set()
    while frontier:
      aid, level = frontier.pop(0)
      if level >= self.depth:
        continue
      for eid in self.producers(aid):
        execution = self.execution(eid)
        if execution is None:
          continue
        ename = self.add_execution(execution)
        if ename is None:
          return
        self.link_outputs(eid, only=[aid])
        if eid in seen_executions:
          continue
        seen_executions.add(eid)
        keys = _query._event_keys(self.events_of_execution(eid))  # pylint: disable=protected-access
        for ev in self.events_of_execution(eid):
          if ev.type not in _query._INPUT_EVENTS:  # pylint: disable=protected-access
            continue
          a = self.artifact(ev.artifact_id)
          if a is None:
            continue
          aname = self.add_artifact(a)
          if aname is None:
            return
          self.add_edge(aname, ename, keys.get((a.id, True)))
          frontier.append((a.id, level + 1))

  def downstream(self, artifact_id: int) -> None:
    """Executions that consumed the EncryptedModel, and their outputs."""
    aname = f'a{artifact_id}'
    for eid in self.consumers(artifact_id):
      execution = self.execution(eid)
      if execution is None:
        continue
      ename = self.add_execution(execution)
      if ename is None:
        return
      keys = _query._event_keys(self.events_of_execution(eid))  # pylint: disable=protected-access
      self.add_edge(aname, ename, keys.get((artifact_id, True)))
      self.link_outputs(eid)


def lineage_graph(store: metadata_store.MetadataStore,
                  artifact_ids: Sequence[int],
                  *, depth: int = DEFAULT_DEPTH) -> Dict[str, Any]:
  """The lineage of EncryptedModel artifacts as nodes and edges.

  Args:
    store: an ML Metadata store (e.g. from `open_sqlite`).
    artifact_ids: ids of `tfx_encrypt.EncryptedModel` artifacts (e.g. from
      `encrypted_models`); their graphs are merged (shared upstream nodes
      appear once).
    depth: how many executions upstream to follow.

  Returns:
    {'focus': [artifact ids], 'nodes': [...], 'edges': [...], 'truncated':
    bool}. A node has `name` (the DOT node name), `kind` ('artifact',
    'execution' or 'location': the ExampleGen's input data, a push
    destination), `label` (its lines), and, for MLMD nodes, `mlmd_id`,
    `type`, `state`, `uri` (artifacts), `component_id` / `pipeline_name` /
    `pipeline_run_id` (executions), `blessed` (blessings), `status`
    (EncryptedModel). An edge has `from`, `to` (node names), `label` (the
    event's key: `model`, `examples`, `model_blessing`, ...; `input_base`,
    `pushed to`) and `style`. Sorted, so the result is deterministic.

  Raises:
    NoMatchError: an id is not an EncryptedModel artifact.
  """
  builder = _Builder(store, depth)
  ids = sorted({int(i) for i in artifact_ids})
  if not ids:
    raise NoMatchError('no EncryptedModel artifact to draw')
  for artifact_id in ids:
    a = builder.artifact(artifact_id)
    if a is None:
      raise NoMatchError(f'no artifact with id {artifact_id} in ML Metadata')
    type_name = builder.artifact_type(a)
    if type_name != mlmd_names.ENCRYPTED_MODEL_TYPE:
      raise NoMatchError(f'artifact {artifact_id} is a {type_name}, not a '
                         f'{mlmd_names.ENCRYPTED_MODEL_TYPE}')
    builder.add_artifact(a, focus=True)
  for artifact_id in ids:
    builder.upstream(artifact_id)
    # The EncryptPusher's other outputs: its PushedModel.
    for eid in builder.producers(artifact_id):
      if f'e{eid}' in builder.nodes:
        builder.link_outputs(eid)
    builder.downstream(artifact_id)
  nodes = sorted(builder.nodes.values(), key=_node_order)
  edges = sorted(builder.edges.values(),
                 key=lambda e: (_name_order(e['from']), _name_order(e['to']),
                                e['label']))
  return {'focus': ids, 'nodes': nodes, 'edges': edges,
          'truncated': builder.truncated}


def _name_order(name: str) -> Tuple[int, int]:
  return ('lae'.index(name[0]), int(name[1:]))


def _node_order(node: Dict[str, Any]) -> Tuple[int, int]:
  return _name_order(node['name'])


# --------------------------------------------------------------------------
# Labels and DOT.
# --------------------------------------------------------------------------


def _short_type(type_name: str) -> str:
  """'tfx.components.trainer.component.Trainer' -> 'Trainer',
  'tfx_encrypt.EncryptedModel' -> 'EncryptedModel'."""
  return (type_name or '?').rsplit('.', 1)[-1] or type_name


def _short_uri(uri: str) -> str:
  """The last few path components of an artifact URI (the pipeline root
  before them is the same for every artifact of a run)."""
  uri = uri or ''
  parts = uri.rstrip('/').split('/')
  if len(parts) <= _URI_TAIL + 1:
    return uri
  return '.../' + '/'.join(parts[-_URI_TAIL:])


def _short_digest(value: Any) -> str:
  """'sha256:5360f37d...' cut to 'sha256:5360f37d1b2c...': enough to tell
  keys and models apart in a picture (the table and JSON show them whole)."""
  text = str(value)
  head, sep, tail = text.rpartition(':')
  if sep and len(tail) > 16 and all(c in '0123456789abcdefABCDEF'
                                    for c in tail):
    return f'{head}:{tail[:12]}...'
  return text


def dot_escape(value: Any) -> str:
  """One string from MLMD, safe inside a DOT double-quoted string.

  Controls, line separators and bidi overrides are first made printable
  (`\\xNN`, `\\uNNNN`: `tfx_encrypt._text`), so no string can start a new
  line or a DOT statement; then backslashes are doubled (Graphviz reads
  `\\n`, `\\l`, `\\N`, `\\G`, ... in labels as escapes) and double quotes
  escaped. The result is shown by Graphviz exactly as the printable text.
  """
  text = _text.printable(value, limit=_LABEL_LIMIT)
  return text.replace('\\', '\\\\').replace('"', '\\"')


def _label(lines: Sequence[Any]) -> str:
  # '\n' between lines is DOT's own line break (centred), written after
  # each line has been escaped.
  return '\\n'.join(dot_escape(line) for line in lines)


_STYLE = {
    'execution': 'shape=box, style="rounded,filled", fillcolor="#d7e6fb"',
    'artifact': 'shape=note, style=filled, fillcolor="#fdf3d0"',
    'focus': ('shape=note, style=filled, fillcolor="#f7c9c9", penwidth=2'),
    'location': 'shape=folder, style=filled, fillcolor="#dcf0d8"',
}


def to_dot(graph: Dict[str, Any], title: Optional[str] = None) -> str:
  """The graph as Graphviz DOT text (deterministic, escaped)."""
  out = ['digraph tfx_encrypt_lineage {',
         '  graph [rankdir=TB, fontname="Helvetica", fontsize=12, '
         'labelloc=t, nodesep=0.25, ranksep=0.35];',
         '  node [fontname="Helvetica", fontsize=10];',
         '  edge [fontname="Helvetica", fontsize=9, color="#555555"];']
  if title is None:
    title = 'Lineage of ' + ', '.join(
        f'EncryptedModel {i}' for i in graph['focus'])
  if graph.get('truncated'):
    title += f' (cut at {MAX_NODES} nodes)'
  out.append(f'  label="{dot_escape(title)}";')
  for node in graph['nodes']:
    style = _STYLE['focus' if node.get('focus') else node['kind']]
    out.append(f'  {node["name"]} [label="{_label(node["label"])}", '
               f'{style}];')
  for edge in graph['edges']:
    attrs = [f'label="{dot_escape(edge["label"])}"'] if edge['label'] else []
    if edge.get('style', 'solid') != 'solid':
      attrs.append(f'style={edge["style"]}')
    out.append(f'  {edge["from"]} -> {edge["to"]}' +
               (f' [{", ".join(attrs)}]' if attrs else '') + ';')
  out.append('}')
  return '\n'.join(out) + '\n'


def lineage_dot(store: metadata_store.MetadataStore,
                artifact_ids: Sequence[int], **kwargs) -> str:
  """`to_dot(lineage_graph(store, artifact_ids))`."""
  return to_dot(lineage_graph(store, artifact_ids, **kwargs))


# --------------------------------------------------------------------------
# Rendering with Graphviz.
# --------------------------------------------------------------------------

GRAPHVIZ_HINT = ("Graphviz's dot program is not installed (needed for "
                 '--format svg/png): sudo apt-get install graphviz (or your '
                 "system's graphviz package); --format dot works without it")


def find_dot() -> str:
  """The path of Graphviz's `dot` ($TFXE_DOT overrides), or
  GraphvizNotFoundError."""
  override = os.environ.get('TFXE_DOT')
  found = shutil.which(override or 'dot')
  if not found:
    raise GraphvizNotFoundError(GRAPHVIZ_HINT)
  return found


def render(dot_text: str, fmt: str) -> bytes:
  """DOT text rendered by Graphviz's `dot` as 'svg' or 'png' bytes.

  Raises:
    GraphvizNotFoundError: `dot` is not installed.
    GraphvizError: `dot` failed, or did not write the format asked for.
  """
  if fmt not in RENDER_FORMATS:
    raise errors.UsageError(f'cannot render {fmt!r}: one of '
                            f'{", ".join(RENDER_FORMATS)}')
  dot = find_dot()
  try:
    proc = subprocess.run([dot, f'-T{fmt}'], input=dot_text.encode('utf-8'),
                          capture_output=True, timeout=_RENDER_TIMEOUT_SEC,
                          check=False)
  except FileNotFoundError as e:
    raise GraphvizNotFoundError(GRAPHVIZ_HINT) from e
  except subprocess.TimeoutExpired as e:
    raise GraphvizError(f'{dot} -T{fmt} took more than '
                        f'{_RENDER_TIMEOUT_SEC} s') from e
  if proc.returncode != 0 or not proc.stdout.lstrip().startswith(_MAGIC[fmt]):
    reason = proc.stderr.decode('utf-8', 'replace').strip().splitlines()
    raise GraphvizError(
        f'{dot} -T{fmt} failed (exit {proc.returncode})' +
        (f': {_text.printable(reason[0])}' if reason else ''))
  return proc.stdout
