"""Shared helpers for core tests (no TFX)."""

import os

from tfx_encrypt.keys import local


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
