"""Bounded retries with exponential backoff and full jitter for key backends.

Remote key services (AWS KMS, GCP KMS, Vault, Azure Key Vault) throttle and
have transient failures. Every remote backend disables its SDK's own retry
machinery and calls the service through :func:`RetryPolicy.call`, so that

* the number of requests a successful wrap/unwrap sends is exactly one, and
  can be counted at the server;
* throttling (HTTP 429, ``ThrottlingException``, gRPC ``RESOURCE_EXHAUSTED``),
  5xx responses and connection failures are retried with exponential
  backoff and *full jitter* (sleep ``uniform(0, min(max_delay,
  base_delay * 2**n))``, as in the AWS Architecture Blog's "Exponential
  Backoff And Jitter");
* the total time spent is bounded: at most ``max_attempts`` attempts, and no
  new attempt is started once ``deadline`` seconds have passed since the
  first one (plus at most one per-request timeout for the attempt in flight).

When the attempts are exhausted the last transient error is raised as
:class:`~tfx_encrypt.errors.BackendUnavailableError` (or the typed error the
backend attached to it).

The defaults can be changed without code through environment variables, read
each time a backend builds its policy:

=============================  =======  ====================================
``TFXE_RETRY_MAX_ATTEMPTS``    6        attempts in total, including the first
``TFXE_RETRY_DEADLINE``        20       seconds; no attempt starts after this
``TFXE_RETRY_BASE_DELAY``      0.2      seconds; first backoff cap
``TFXE_RETRY_MAX_DELAY``       5        seconds; cap of any single backoff
``TFXE_RETRY_REQUEST_TIMEOUT`` 10       seconds; connect/read timeout per request
=============================  =======  ====================================
"""

import logging
import os
import random
import time
from typing import Callable, Optional, TypeVar

from tfx_encrypt import errors

_LOG = logging.getLogger('tfx_encrypt.keys')

T = TypeVar('T')


class TransientError(Exception):
  """Raised inside a retried call for a failure worth retrying.

  Attributes:
    reason: short, secret-free description ("throttled (ThrottlingException)",
      "HTTP 503", "connection refused").
    final: the typed error to raise if no attempt is left; by default a
      BackendUnavailableError built from `reason`.
  """

  def __init__(self, reason: str,
               final: Optional[errors.KeyBackendError] = None):
    super().__init__(reason)
    self.reason = reason
    self.final = final


def _env_float(name: str, default: float) -> float:
  value = os.environ.get(name)
  if value is None or value == '':
    return default
  try:
    result = float(value)
  except ValueError as e:
    raise errors.UsageError(
        f'environment variable {name} must be a number, got {value!r}') from e
  if result < 0:
    raise errors.UsageError(f'environment variable {name} must be >= 0')
  return result


class RetryPolicy:
  """Exponential backoff with full jitter, bounded in attempts and time."""

  def __init__(self,
               max_attempts: int = 6,
               deadline: float = 20.0,
               base_delay: float = 0.2,
               max_delay: float = 5.0,
               request_timeout: float = 10.0,
               *,
               sleep: Callable[[float], None] = time.sleep,
               clock: Callable[[], float] = time.monotonic,
               rng: Optional[random.Random] = None):
    if max_attempts < 1:
      raise errors.UsageError('retry max_attempts must be at least 1')
    self.max_attempts = int(max_attempts)
    self.deadline = float(deadline)
    self.base_delay = float(base_delay)
    self.max_delay = float(max_delay)
    self.request_timeout = float(request_timeout)
    self._sleep = sleep
    self._clock = clock
    self._rng = rng or random.Random()

  @classmethod
  def from_env(cls) -> 'RetryPolicy':
    """The default policy, adjusted by the ``TFXE_RETRY_*`` variables."""
    return cls(
        max_attempts=max(1, int(_env_float('TFXE_RETRY_MAX_ATTEMPTS', 6))),
        deadline=_env_float('TFXE_RETRY_DEADLINE', 20.0),
        base_delay=_env_float('TFXE_RETRY_BASE_DELAY', 0.2),
        max_delay=_env_float('TFXE_RETRY_MAX_DELAY', 5.0),
        request_timeout=_env_float('TFXE_RETRY_REQUEST_TIMEOUT', 10.0) or 10.0)

  def backoff(self, retry_number: int) -> float:
    """Full-jitter delay before retry `retry_number` (1 for the first)."""
    cap = min(self.max_delay, self.base_delay * (2 ** (retry_number - 1)))
    return self._rng.uniform(0.0, cap)

  def call(self, fn: Callable[[], T], *, what: str) -> T:
    """Run `fn`, retrying while it raises :class:`TransientError`.

    Args:
      fn: the single remote call. Any non-transient exception it raises
        propagates unchanged (it should already be a typed error).
      what: secret-free description for logs and errors, e.g.
        "AWS KMS Encrypt with aws-kms://arn:...".

    Returns:
      What `fn` returns.

    Raises:
      KeyBackendError: `TransientError.final` of the last attempt, or a
        BackendUnavailableError, once attempts or time are exhausted.
    """
    start = self._clock()
    attempt = 0
    while True:
      attempt += 1
      try:
        return fn()
      except TransientError as e:
        elapsed = self._clock() - start
        delay = self.backoff(attempt)
        if attempt >= self.max_attempts or elapsed + delay > self.deadline:
          final = e.final or errors.BackendUnavailableError(
              f'{what} failed: {e.reason}')
          final_msg = (
              f'{final} (gave up after {attempt} attempt'
              f'{"s" if attempt != 1 else ""} in {elapsed:.1f} s; the '
              'retry budget is set by TFXE_RETRY_MAX_ATTEMPTS and '
              'TFXE_RETRY_DEADLINE)')
          raise type(final)(final_msg) from e
        _LOG.warning('%s: %s; retrying in %.2f s (attempt %d of %d)', what,
                     e.reason, delay, attempt + 1, self.max_attempts)
        if delay > 0:
          self._sleep(delay)


def default_policy() -> RetryPolicy:
  return RetryPolicy.from_env()


def redact(text: str, *secrets: Optional[str]) -> str:
  """`text` with every non-empty secret replaced by '***'.

  Backends pass server messages through this before putting them into an
  exception or a log record, as a second line of defence: they never
  format a token or PIN on purpose.
  """
  for secret in secrets:
    if secret and len(secret) >= 3:
      text = text.replace(secret, '***')
  return text


def short(text: object, limit: int = 300) -> str:
  """A server-provided message, on one line and at most `limit` chars."""
  s = ' '.join(str(text).split())
  return s if len(s) <= limit else s[:limit - 3] + '...'


def import_sdk(module: str, scheme: str, extra: str):
  """Imports a backend's client library, with an install hint if missing."""
  import importlib  # pylint: disable=g-import-not-at-top
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise errors.InvalidKeyUriError(
        f'the {scheme!r} key backend needs {module} ({e.name or e} is not '
        f"installed): pip install 'tfx-encrypt[{extra}]'") from e
