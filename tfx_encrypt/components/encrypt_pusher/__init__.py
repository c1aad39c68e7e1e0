"""The EncryptPusher TFX component.

Attributes are imported lazily (PEP 562) so that Beam workers unpickling a
function from `beam_executor` do not import the component classes.
"""

import importlib

_EXPORTS = {
    'EncryptPusher': 'tfx_encrypt.components.encrypt_pusher.component',
    'BeamEncryptPusher': 'tfx_encrypt.components.encrypt_pusher.component',
    'EncryptPusherSpec': 'tfx_encrypt.components.encrypt_pusher.spec',
    'Executor': 'tfx_encrypt.components.encrypt_pusher.executor',
    'BeamExecutor': 'tfx_encrypt.components.encrypt_pusher.beam_executor',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  attr = 'Executor' if name == 'BeamExecutor' else name
  value = getattr(importlib.import_module(module), attr)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
