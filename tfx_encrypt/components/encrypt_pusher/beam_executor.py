"""EncryptPusher Beam executor (work in progress)."""

from tfx.dsl.components.base import base_beam_executor

from tfx_encrypt.components.encrypt_pusher import executor


class Executor(executor.Executor, base_beam_executor.BaseBeamExecutor):
  """EncryptPusher executor that fans encryption out to Beam workers."""
