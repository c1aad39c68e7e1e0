"""The retry policy shared by the remote key backends (no network)."""

import logging
import random

import pytest

from tfx_encrypt import errors
from tfx_encrypt.keys import _retry


class FakeClock:

  def __init__(self):
    self.now = 0.0
    self.sleeps = []

  def clock(self):
    return self.now

  def sleep(self, s):
    self.sleeps.append(s)
    self.now += s


def _policy(clock, **kw):
  return _retry.RetryPolicy(sleep=clock.sleep, clock=clock.clock,
                            rng=random.Random(7), **kw)


def test_success_first_time_is_one_call():
  clock = FakeClock()
  calls = []
  assert _policy(clock).call(lambda: calls.append(1) or 'ok', what='x') == 'ok'
  assert calls == [1] and clock.sleeps == []


def test_full_jitter_backoff_is_capped():
  policy = _retry.RetryPolicy(base_delay=0.5, max_delay=2.0,
                              rng=random.Random(1))
  for n in range(1, 20):
    cap = min(2.0, 0.5 * 2 ** (n - 1))
    for _ in range(20):
      assert 0.0 <= policy.backoff(n) <= cap
  # Full jitter: delays are spread over [0, cap], not clustered at the cap.
  samples = [policy.backoff(10) for _ in range(500)]
  assert min(samples) < 0.2 and max(samples) > 1.8


def test_transient_errors_retried_until_success(caplog):
  clock = FakeClock()
  attempts = []

  def fn():
    attempts.append(1)
    if len(attempts) < 3:
      raise _retry.TransientError('throttled (ThrottlingException)')
    return 'done'

  with caplog.at_level(logging.WARNING, logger='tfx_encrypt'):
    assert _policy(clock).call(fn, what='AWS KMS Encrypt') == 'done'
  assert len(attempts) == 3 and len(clock.sleeps) == 2
  assert 'retrying' in caplog.records[0].getMessage()


def test_attempts_are_bounded_and_final_error_is_typed():
  clock = FakeClock()
  attempts = []

  def fn():
    attempts.append(1)
    raise _retry.TransientError(
        'HTTP 503', errors.BackendUnavailableError('KMS is down'))

  with pytest.raises(errors.BackendUnavailableError) as ei:
    _policy(clock, max_attempts=5).call(fn, what='x')
  assert len(attempts) == 5
  assert 'KMS is down' in str(ei.value)
  assert 'gave up after 5 attempts' in str(ei.value)
  assert 'TFXE_RETRY_MAX_ATTEMPTS' in str(ei.value)


def test_deadline_bounds_total_time():
  clock = FakeClock()

  def fn():
    clock.now += 1.0   # each attempt takes a second
    raise _retry.TransientError('slow')

  with pytest.raises(errors.BackendUnavailableError):
    _policy(clock, max_attempts=1000, deadline=10.0, base_delay=1.0,
            max_delay=2.0).call(fn, what='x')
  assert clock.now <= 10.0 + 1.0


def test_other_errors_are_not_retried():
  clock = FakeClock()
  attempts = []

  def fn():
    attempts.append(1)
    raise errors.KeyAccessDeniedError('denied')

  with pytest.raises(errors.KeyAccessDeniedError):
    _policy(clock).call(fn, what='x')
  assert attempts == [1]


def test_from_env(monkeypatch):
  monkeypatch.setenv('TFXE_RETRY_MAX_ATTEMPTS', '3')
  monkeypatch.setenv('TFXE_RETRY_DEADLINE', '2.5')
  monkeypatch.setenv('TFXE_RETRY_BASE_DELAY', '0.01')
  monkeypatch.setenv('TFXE_RETRY_MAX_DELAY', '0.1')
  monkeypatch.setenv('TFXE_RETRY_REQUEST_TIMEOUT', '4')
  p = _retry.RetryPolicy.from_env()
  assert (p.max_attempts, p.deadline, p.base_delay, p.max_delay,
          p.request_timeout) == (3, 2.5, 0.01, 0.1, 4.0)
  monkeypatch.setenv('TFXE_RETRY_DEADLINE', 'soon')
  with pytest.raises(errors.UsageError, match='TFXE_RETRY_DEADLINE'):
    _retry.RetryPolicy.from_env()


def test_defaults_are_bounded(monkeypatch):
  for k in ('TFXE_RETRY_MAX_ATTEMPTS', 'TFXE_RETRY_DEADLINE',
            'TFXE_RETRY_BASE_DELAY', 'TFXE_RETRY_MAX_DELAY',
            'TFXE_RETRY_REQUEST_TIMEOUT'):
    monkeypatch.delenv(k, raising=False)
  p = _retry.RetryPolicy.from_env()
  assert p.max_attempts == 6 and p.deadline == 20.0


def test_redact_and_short():
  assert _retry.redact('token abc123 leaked abc123', 'abc123') == (
      'token *** leaked ***')
  assert _retry.redact('x', None, '') == 'x'
  assert _retry.short('a\n  b', 10) == 'a b'
  assert len(_retry.short('y' * 1000, 50)) == 50
