"""Shared helpers for core tests (no TFX)."""

import os

from tfx_encrypt.keys import local
from tfx_encrypt.keys.base import KeyBackend


class Keys:
  """A set of freshly generated local keys in a directory."""

  def __init__(self, d):
    self.dir = str(d)
    for name, kind in [('x', 'x25519'), ('x2', 'x25519'), ('rsa', 'rsa'),
                       ('ed', 'ed25519'), ('ec', 'ecdsa-p256'),
                       ('evil', 'ed25519')]:
      local.keygen(kind, os.path.join(self.dir, name))

  def pub(self, name):
    return os.path.join(self.dir, name + '.pub.pem')

  def priv(self, name):
    return os.path.join(self.dir, name + '.key.pem')


_RSA_CACHE = {}


def make_tree(root, files):
  """files: {relpath: bytes | int (size of pseudo-random content)}."""
  os.makedirs(root, exist_ok=True)
  for rel, content in files.items():
    p = os.path.join(root, *rel.split('/'))
    os.makedirs(os.path.dirname(p), exist_ok=True)
    if isinstance(content, int):
      content = pattern(content, seed=len(rel))
    with open(p, 'wb') as f:
      f.write(content)
  return str(root)


def pattern(n, seed=0):
  block = bytes((i * 7 + seed) % 256 for i in range(65536)) + os.urandom(16)
  reps = n // len(block) + 1
  return (block * reps)[:n]


def read_tree(root):
  out = {}
  for dirpath, dirs, files in os.walk(root):
    for d in dirs:
      full = os.path.join(dirpath, d)
      if not os.listdir(full):
        out[os.path.relpath(full, root) + '/'] = None
    for f in files:
      full = os.path.join(dirpath, f)
      with open(full, 'rb') as fh:
        out[os.path.relpath(full, root)] = fh.read()
  return out


def leftovers(parent, name):
  """Hidden temp siblings of `name` left in `parent`."""
  return [e for e in os.listdir(parent) if e.startswith('.' + name + '.')]


class CountingKey(KeyBackend):
  """A real local key (a path or a LocalKey) that counts its unwrap calls:
  `calls` (all) and `ok` (successful). Used to prove that a refusal comes
  before any key call, and that a reader makes exactly k calls."""

  def __init__(self, key):
    self.inner = local.LocalKey(key) if isinstance(key, str) else key
    super().__init__(self.inner.uri)
    self.calls = 0
    self.ok = 0

  @property
  def key_id(self):
    return self.inner.key_id

  def matches(self, stanza):
    return self.inner.matches(stanza)

  def wrap(self, dek, context):
    return self.inner.wrap(dek, context)

  def unwrap(self, stanza, context):
    self.calls += 1
    out = self.inner.unwrap(stanza, context)
    self.ok += 1
    return out


def upload_package(local, uri):
  """Copy a local package to `uri`: payload objects, then the header (or the
  bundle) create-only, as a push does."""
  from tfx_encrypt import storage  # pylint: disable=g-import-not-at-top
  if os.path.isfile(local):
    with open(local, 'rb') as f:
      storage.put_create_only(uri, f)
    return
  pdir = os.path.join(local, 'payload')
  for name in sorted(os.listdir(pdir)):
    with open(os.path.join(pdir, name), 'rb') as f:
      storage.put(storage.join(uri, 'payload', name), f)
  with open(os.path.join(local, 'tfxe.header'), 'rb') as f:
    storage.put_create_only(storage.join(uri, 'tfxe.header'), f)
