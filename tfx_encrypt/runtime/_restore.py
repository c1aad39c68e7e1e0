"""Decrypt a SavedModel's variables straight into their tensors.

`tf.saved_model.load` restores variables through the checkpoint reader: it
allocates every variable's tensor and reads the variables shard
(`variables/variables.data-*`) into it, one more full copy of the model
after decryption has already written it once. For the common case, an
object-based (TF2) checkpoint of plain numeric variables, `load_model`
decrypts the shard into the tensors themselves:

1. `plan(index_bytes, shard_sizes)` reads `variables.index` (decrypted and
   verified like every file: a LevelDB-style table of `BundleEntryProto`s,
   tensorflow/core/util/tensor_bundle) and returns a `Plan` if every entry
   is an unsliced tensor of a plain numeric dtype (or the checkpoint's
   object graph) and the entries tile each shard exactly; else None, and
   TensorFlow restores the variables from memory files as usual.
2. `Plan.allocate()` allocates each entry's tensor, uninitialized, in
   TensorFlow's own memory (`Empty`, as its restore would), and
   `Plan.writer(shard)` is the decryption's sink: each plaintext chunk is
   copied to where its bytes belong, with `ctypes.memmove`, which releases
   the GIL, so the digest and decryption threads keep running as they do
   around a file write. Decryption checks every segment and both digests
   of the shard as for any file.
3. `Plan.restore(model)`, once every shard passed, matches the checkpoint's
   object graph to the loaded objects the way TensorFlow's restore does
   (node 0 is the root, children by local name through
   `_lookup_dependency`), requires every matched attribute to be the
   `VARIABLE_VALUE` of a variable with the entry's dtype and shape, and
   assigns each variable its tensor: the variable takes the buffer, no
   copy, and TensorFlow owns it alone afterwards, as after its own restore
   (a buffer it does not own, e.g. imported through DLPack, is copied by
   TensorFlow on the variable's first sparse read: a second copy of an
   embedding). Any mismatch raises `NotRestorable` before a variable is
   assigned; the caller writes the decrypted tensors into memory files and
   lets TensorFlow restore them.

TensorFlow never uses a byte of a shard before the whole shard passed its
digests, exactly as with its own restore.
"""

import collections
import ctypes
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

#: The checkpoint's object graph: a scalar string tensor in the shard.
OBJECT_GRAPH_KEY = '_CHECKPOINTABLE_OBJECT_GRAPH'
_TABLE_MAGIC = 0xdb4775248b80fb57
_FOOTER_SIZE = 48
_BLOCK_TRAILER = 5
_DT_STRING = 7
#: Tensor names longer than this are not restored from memory (TensorFlow's
#: own keys are object paths: far shorter); with the data blocks required
#: in order and disjoint, reading an index is linear in its size.
_MAX_KEY = 4096
#: DataType enum values restored from memory: numeric types numpy and
#: DLPack share (bool, bfloat16, quantized and string types are not).
_NUMERIC = {
    1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16,
    6: np.int8, 8: np.complex64, 9: np.int64, 17: np.uint16,
    18: np.complex128, 19: np.float16, 22: np.uint32, 23: np.uint64,
}


class NotRestorable(Exception):
  """This checkpoint (or model) is not restored from memory; the caller
  falls back to TensorFlow's own restore."""


def _varint(data, pos: int, limit: int) -> Tuple[int, int]:
  shift = value = 0
  while pos < limit and shift <= 63:
    b = data[pos]
    pos += 1
    value |= (b & 0x7f) << shift
    if not b & 0x80:
      return value, pos
    shift += 7
  raise NotRestorable('bad varint in the variables index')


def _block(data: bytes, offset: int, size: int) -> memoryview:
  end = offset + size
  if offset < 0 or size < 4 or end + _BLOCK_TRAILER > len(data):
    raise NotRestorable('block out of range in the variables index')
  if data[end] != 0:  # compression type: only uncompressed blocks
    raise NotRestorable('compressed variables index')
  return memoryview(data)[offset:end]


def _entries(block: memoryview):
  """(key, value) of a table block (prefix-compressed keys)."""
  n = len(block)
  restarts = struct.unpack_from('<I', block, n - 4)[0]
  limit = n - 4 * (restarts + 1)
  if restarts < 1 or limit < 0:
    raise NotRestorable('bad block in the variables index')
  pos, key = 0, b''
  while pos < limit:
    shared, pos = _varint(block, pos, limit)
    unshared, pos = _varint(block, pos, limit)
    vlen, pos = _varint(block, pos, limit)
    if (shared > len(key) or pos + unshared + vlen > limit or
        shared + unshared > _MAX_KEY):
      raise NotRestorable('bad entry in the variables index')
    key = key[:shared] + bytes(block[pos:pos + unshared])
    pos += unshared
    yield key, bytes(block[pos:pos + vlen])
    pos += vlen


def read_index(data: bytes) -> Tuple[object, Dict[str, object]]:
  """(BundleHeaderProto, {tensor name: BundleEntryProto}) of an index."""
  from tensorflow.core.protobuf import tensor_bundle_pb2  # pylint: disable=g-import-not-at-top
  if len(data) < _FOOTER_SIZE or struct.unpack_from(
      '<Q', data, len(data) - 8)[0] != _TABLE_MAGIC:
    raise NotRestorable('not a variables index')
  foot = len(data) - _FOOTER_SIZE
  _, pos = _varint(data, foot, len(data) - 8)  # metaindex offset
  _, pos = _varint(data, pos, len(data) - 8)  # metaindex size
  index_off, pos = _varint(data, pos, len(data) - 8)
  index_size, pos = _varint(data, pos, len(data) - 8)
  header, entries = None, {}
  next_block = 0  # data blocks: in order, disjoint, before the index block
  for _, handle in _entries(_block(data, index_off, index_size)):
    off, p = _varint(handle, 0, len(handle))
    size, _ = _varint(handle, p, len(handle))
    if off < next_block or off + size + _BLOCK_TRAILER > index_off:
      raise NotRestorable('data blocks out of order in the variables index')
    next_block = off + size + _BLOCK_TRAILER
    for key, value in _entries(_block(data, off, size)):
      try:
        if key == b'':
          header = tensor_bundle_pb2.BundleHeaderProto.FromString(value)
        else:
          entries[key.decode('utf-8')] = (
              tensor_bundle_pb2.BundleEntryProto.FromString(value))
      except Exception as e:  # pylint: disable=broad-except
        raise NotRestorable(f'unreadable index entry: {e}') from None
  if header is None:
    raise NotRestorable('no header in the variables index')
  return header, entries


class _Capsule:
  """A DLPack capsule as numpy's `from_dlpack` takes it (CPU memory)."""

  def __init__(self, capsule):
    self._capsule = capsule

  def __dlpack__(self, stream=None):
    del stream
    return self._capsule

  def __dlpack_device__(self):
    return (1, 0)  # kDLCPU


def _address(tensor) -> int:
  """The address of a CPU tensor's buffer (TensorFlow owns it)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  view = np.from_dlpack(_Capsule(tf.experimental.dlpack.to_dlpack(tensor)))
  return view.ctypes.data  # the view (a reference to the buffer) goes now


def _memmove(dest: int, mv: memoryview) -> None:
  """Copy `mv` to address `dest` without holding the GIL (ctypes releases
  it around foreign calls), so the other decryption stages keep running,
  as they do around a file write."""
  n = len(mv)
  if not n:
    return
  try:
    src = ctypes.addressof(ctypes.c_char.from_buffer(mv))
  except TypeError:  # a read-only buffer: copy it first
    mv = memoryview(bytearray(mv))
    src = ctypes.addressof(ctypes.c_char.from_buffer(mv))
  ctypes.memmove(dest, src, n)


class Plan:
  """Where each byte of each shard goes (see the module docstring)."""

  def __init__(self, layout: Dict[int, List[Tuple[int, str]]],
               entries: Dict[str, object], shard_names: Sequence[str]):
    self.shard_names = list(shard_names)
    self._entries = entries
    self._layout = layout  # shard id -> [(offset, key)] in offset order
    self._tensors: Dict[str, object] = {}
    self._graph = bytearray(entries[OBJECT_GRAPH_KEY].size)
    self._spans: Dict[int, List[Tuple[int, int, int]]] = {}
    self._written: Dict[int, List[int]] = {}

  def allocate(self) -> None:
    """Allocate every variable's tensor, uninitialized (TensorFlow's own
    memory, as its restore would); call before decrypting."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    graph_at = ctypes.addressof(ctypes.c_char.from_buffer(self._graph)) if (
        self._graph) else 0
    with tf.init_scope(), tf.device('/CPU:0'):
      for shard, items in self._layout.items():
        spans = []
        for off, key in items:
          e = self._entries[key]
          if key == OBJECT_GRAPH_KEY:
            spans.append((off, e.size, graph_at))
            continue
          t = tf.raw_ops.Empty(shape=[d.size for d in e.shape.dim],
                               dtype=tf.dtypes.as_dtype(e.dtype), init=False)
          self._tensors[key] = t
          spans.append((off, e.size, _address(t) if e.size else 0))
        self._spans[shard] = spans

  def writer(self, shard: int) -> Callable[[memoryview], None]:
    """The plaintext sink of shard `shard`: its bytes, in order, into the
    tensors (and the object graph) they belong to."""
    spans = self._spans[shard]
    # The closure holds the tensors it writes into: whatever happens to the
    # plan, no write can reach freed memory while a decryption runs.
    held = [self._tensors[key] for _, key in self._layout[shard]
            if key != OBJECT_GRAPH_KEY]
    state = [0, 0]  # shard offset reached, current span
    self._written[shard] = state

    def write(mv: memoryview) -> None:
      assert held is not None
      pos, k = state
      while len(mv):
        while k < len(spans) and pos >= spans[k][0] + spans[k][1]:
          k += 1
        if k >= len(spans):
          raise ValueError('more plaintext than the variables index lists')
        off, size, dest = spans[k]
        n = min(off + size - pos, len(mv))
        _memmove(dest + pos - off, mv[:n])
        mv, pos = mv[n:], pos + n
      state[0], state[1] = pos, k
    return write

  def shard_pieces(self, shard: int):
    """Shard `shard` as it was decrypted, piece by piece (the fallback)."""
    for _, key in self._layout[shard]:
      if key == OBJECT_GRAPH_KEY:
        yield memoryview(self._graph)
      elif self._entries[key].size:
        yield memoryview(self._tensors[key].numpy().reshape(-1).view(
            np.uint8))

  def release(self) -> None:
    self._tensors.clear()

  def _object_graph(self):
    from tensorflow.core.protobuf import trackable_object_graph_pb2  # pylint: disable=g-import-not-at-top
    raw = bytes(self._graph)
    # A scalar string tensor in a bundle: varint64 length, a 4-byte
    # checksum of the lengths, the bytes.
    n, pos = _varint(raw, 0, len(raw))
    if pos + 4 + n != len(raw):
      raise NotRestorable('bad object graph entry')
    try:
      return trackable_object_graph_pb2.TrackableObjectGraph.FromString(
          bytes(raw[pos + 4:]))
    except Exception as e:  # pylint: disable=broad-except
      raise NotRestorable(f'unreadable object graph: {e}') from None

  def match(self, root) -> List[Tuple[object, str]]:
    """(variable, checkpoint key) for every variable TensorFlow's restore
    would assign, matched the way it matches (node 0 is the root, children
    by local name through `_lookup_dependency`); NotRestorable if anything
    is not a plain variable value of the right dtype and shape."""
    from tensorflow.python.ops import resource_variable_ops  # pylint: disable=g-import-not-at-top
    graph = self._object_graph()
    nodes = graph.nodes
    objects = {0: root}
    queue = collections.deque([0])
    out, seen_keys, seen_vars = [], set(), set()
    while queue:
      nid = queue.popleft()
      obj, node = objects[nid], nodes[nid]
      if node.slot_variables or node.HasField('registered_saver'):
        raise NotRestorable('slot variables or a registered saver')
      for child in node.children:
        if not 0 <= child.node_id < len(nodes):
          raise NotRestorable('bad node id in the object graph')
        try:
          found = obj._lookup_dependency(child.local_name)  # pylint: disable=protected-access
        except Exception as e:  # pylint: disable=broad-except
          raise NotRestorable(f'lookup failed: {e}') from None
        if found is None:
          continue  # not in the loaded model: TensorFlow defers it too
        if child.node_id in objects:
          if objects[child.node_id] is not found:
            raise NotRestorable('one node, two objects')
          continue
        objects[child.node_id] = found
        queue.append(child.node_id)
      for attr in node.attributes:
        if attr.name != 'VARIABLE_VALUE':
          raise NotRestorable(f'attribute {attr.name!r}')
        entry = self._entries.get(attr.checkpoint_key)
        if entry is None or attr.checkpoint_key in seen_keys:
          raise NotRestorable('attribute without a (single) entry')
        if not isinstance(obj, resource_variable_ops.BaseResourceVariable):
          raise NotRestorable(f'{type(obj).__name__} is not a variable')
        if (obj.dtype.as_datatype_enum != entry.dtype or
            tuple(obj.shape.as_list() if obj.shape.rank is not None else ())
            != tuple(d.size for d in entry.shape.dim)):
          raise NotRestorable('dtype or shape differs from the checkpoint')
        if id(obj) in seen_vars:  # TensorFlow would restore it once
          raise NotRestorable('one variable, two checkpoint values')
        seen_keys.add(attr.checkpoint_key)
        seen_vars.add(id(obj))
        out.append((obj, attr.checkpoint_key))
    # As `assert_existing_objects_matched` after TensorFlow's restore: every
    # variable of the loaded model gets a value, or TensorFlow restores it
    # (and raises as it would).
    try:
      from tensorflow.python.checkpoint import trackable_view  # pylint: disable=g-import-not-at-top
      every = trackable_view.TrackableView(root).descendants()
    except Exception as e:  # pylint: disable=broad-except
      raise NotRestorable(f'cannot list the model\'s objects: {e}') from None
    for obj in every:
      if (isinstance(obj, resource_variable_ops.BaseResourceVariable) and
          id(obj) not in seen_vars):
        raise NotRestorable('a variable of the model has no checkpoint value')
    return out

  def restore(self, root) -> int:
    """Assign every matched variable its tensor; the number assigned.
    Call once the shards are decrypted and verified."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    for shard, spans in self._spans.items():  # every byte written
      total = sum(size for _, size, _ in spans)
      if self._written.get(shard, [None])[0] != total:
        raise NotRestorable('a shard was not decrypted completely')
    pairs = self.match(root)
    with tf.init_scope():
      for var, key in pairs:
        var.assign(self._tensors[key], read_value=False)
    n = len(pairs)
    del pairs
    self.release()  # the variables hold the only references now
    return n


def plan(index_bytes: bytes, shard_sizes: Dict[str, int],
         prefix: str = 'variables/variables') -> Optional[Plan]:
  """A Plan for this checkpoint, or None if it is not restorable from
  memory (see the module docstring). `shard_sizes`: relpath -> size of
  the model's data shards."""
  if struct.pack('=H', 1) != struct.pack('<H', 1):
    return None  # bundles are restored from memory on little-endian hosts
  try:
    return _plan(index_bytes, shard_sizes, prefix)
  except Exception:  # pylint: disable=broad-except
    return None  # anything unexpected: TensorFlow's own restore decides


def _plan(index_bytes: bytes, shard_sizes: Dict[str, int],
          prefix: str) -> Optional[Plan]:
  try:
    header, entries = read_index(index_bytes)
  except NotRestorable:
    return None
  if header.endianness != 0 or not 1 <= header.num_shards <= 100000:
    return None
  names = [f'{prefix}.data-{i:05d}-of-{header.num_shards:05d}'
           for i in range(header.num_shards)]
  if set(names) != set(shard_sizes):
    return None
  if OBJECT_GRAPH_KEY not in entries:
    return None
  layout: Dict[int, List[Tuple[int, str]]] = {i: [] for i in range(
      header.num_shards)}
  for key, e in entries.items():
    if (e.slices or not 0 <= e.shard_id < header.num_shards or e.size < 0 or
        e.offset < 0):
      return None
    if key == OBJECT_GRAPH_KEY:
      if e.dtype != _DT_STRING or e.shape.dim or e.size < 5:
        return None
    else:
      dtype = _NUMERIC.get(e.dtype)
      if dtype is None or any(d.size < 0 for d in e.shape.dim):
        return None
      count = 1
      for d in e.shape.dim:
        count *= d.size
      if count * np.dtype(dtype).itemsize != e.size:
        return None
    layout[e.shard_id].append((e.offset, key))
  for i, items in layout.items():
    items.sort()
    at = 0
    for off, key in items:  # the entries tile the shard exactly
      if off != at:
        return None
      at += entries[key].size
    if at != shard_sizes[names[i]]:
      return None
  return Plan(layout, entries, names)
