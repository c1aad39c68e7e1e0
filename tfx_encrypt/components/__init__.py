"""TFX components of tfx-encrypt (need the `tfx` extra).

    from tfx_encrypt.components import EncryptPusher, BeamEncryptPusher

Attributes are imported lazily (PEP 562), so importing a submodule (e.g. in a
Beam worker) does not pull in every component.
"""

import importlib

_EXPORTS = {
    'EncryptPusher': 'tfx_encrypt.components.encrypt_pusher.component',
    'BeamEncryptPusher': 'tfx_encrypt.components.encrypt_pusher.component',
    'EncryptedModel': 'tfx_encrypt.types',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
