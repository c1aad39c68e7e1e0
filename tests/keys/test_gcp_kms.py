"""GCP KMS backend: real google-cloud-kms client over gRPC against the
loopback protocol fake in tests/fakes/gcp_kms.py (test-only)."""

import base64
import logging

import grpc
import pytest

from tfx_encrypt import errors
from tfx_encrypt import keys
from tfx_encrypt.keys import _retry
from tfx_encrypt.keys.base import Stanza, WrapContext
from tfx_encrypt.keys.gcp_kms import GcpKmsKey, crc32c, parse_uri

DEK = bytes(range(7, 39))
CTX = WrapContext(b'\x03' * 16, {'model': 'demo'})


def test_crc32c_known_vectors():
  assert crc32c(b'123456789') == 0xE3069283
  assert crc32c(b'') == 0
  assert crc32c(b'\x00' * 32) == 0x8A9136AA


def test_crc32c_pure_python_fallback(monkeypatch):
  import sys  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, 'google_crc32c', None)
  assert crc32c(b'123456789') == 0xE3069283
  assert crc32c(b'\xff' * 32) == 0x62A8AB43


def test_uri():
  uri = 'gcp-kms://projects/p-1/locations/europe-west1/keyRings/r/cryptoKeys/k'
  assert parse_uri(uri)['location'] == 'europe-west1'
  key = GcpKmsKey(uri)
  assert key.key_id == uri and key.name == uri[len('gcp-kms://'):]
  assert isinstance(keys.resolve(uri), GcpKmsKey)
  for bad in ('gcp-kms://projects/p/locations/l/keyRings/r',
              uri + '/cryptoKeyVersions/0', uri + '?x=1',
              'gcp-kms://p/l/r/k'):
    with pytest.raises(errors.InvalidKeyUriError):
      GcpKmsKey(bad)
  # A CryptoKeyVersion signs (tests/keys/test_kms_signing.py); it cannot wrap.
  version = GcpKmsKey(uri + '/cryptoKeyVersions/1')
  assert version.version == '1' and version.key_id.endswith('Versions/1')
  with pytest.raises(errors.KeyRoleError, match='drop /cryptoKeyVersions/N'):
    keys.resolve(version.uri, 'recipient')
  with pytest.raises(errors.KeyRoleError, match='names a CryptoKeyVersion'):
    version.wrap(DEK, CTX)   # the Python API without a role check


def test_roundtrip_one_call_each(gcp):
  uri = gcp.add_key()
  stanza = GcpKmsKey(uri).wrap(DEK, CTX)
  assert stanza.type == 'gcp-kms' and stanza.key_id == uri
  assert dict(gcp.calls) == {'Encrypt': 1}
  assert GcpKmsKey(uri).unwrap(stanza, CTX) == DEK
  assert dict(gcp.calls) == {'Encrypt': 1, 'Decrypt': 1}


def test_aad_binds_context(gcp):
  uri = gcp.add_key()
  key = GcpKmsKey(uri)
  stanza = key.wrap(DEK, CTX)
  with pytest.raises(errors.TamperedPackageError, match='encryption context'):
    key.unwrap(stanza, WrapContext(b'\x03' * 16, {'model': 'other'}))
  raw = bytearray(base64.b64decode(stanza.body['ct']))
  raw[-1] ^= 1
  with pytest.raises(errors.TamperedPackageError):
    key.unwrap(Stanza('gcp-kms', uri,
                      {'ct': base64.b64encode(bytes(raw)).decode()}), CTX)
  assert dict(gcp.calls) == {'Encrypt': 1, 'Decrypt': 2}   # not retried


def test_other_key_no_call(gcp):
  a, b = GcpKmsKey(gcp.add_key()), GcpKmsKey(gcp.add_key())
  stanza = a.wrap(DEK, CTX)
  assert not b.matches(stanza)
  with pytest.raises(errors.NoMatchingKeyError):
    b.unwrap(stanza, CTX)
  assert dict(gcp.calls) == {'Encrypt': 1}


def test_typed_errors(gcp):
  uri = gcp.add_key()
  stanza = GcpKmsKey(uri).wrap(DEK, CTX)
  gcp.key(uri).state = 'DISABLED'
  with pytest.raises(errors.KeyDisabledError, match='not enabled'):
    GcpKmsKey(uri).unwrap(stanza, CTX)
  gcp.key(uri).state = 'ENABLED'
  gcp.key(uri).denied = True
  with pytest.raises(errors.KeyAccessDeniedError, match='useToEncrypt'):
    GcpKmsKey(uri).wrap(DEK, CTX)
  with pytest.raises(errors.KeyNotFoundError, match='does not know'):
    GcpKmsKey(uri.replace('key1', 'nokey')).wrap(DEK, CTX)


def test_throttling_and_unavailable_retried(gcp, fast_retry, caplog):
  uri = gcp.add_key()
  gcp.inject(1, grpc.StatusCode.RESOURCE_EXHAUSTED, 'Quota exceeded')
  gcp.inject(1, grpc.StatusCode.UNAVAILABLE, 'try again')
  with caplog.at_level(logging.WARNING, logger='tfx_encrypt'):
    stanza = GcpKmsKey(uri).wrap(DEK, CTX)
  assert dict(gcp.calls) == {'Encrypt': 3}
  assert sum('retrying' in r.getMessage() for r in caplog.records) == 2
  gcp.inject(100, grpc.StatusCode.INTERNAL, 'boom')
  with pytest.raises(errors.BackendUnavailableError, match='4 attempts'):
    GcpKmsKey(uri).unwrap(stanza, CTX)
  assert gcp.calls['Decrypt'] == 4


@pytest.mark.parametrize('where', ['request', 'response'])
def test_crc32c_integrity_failures_are_detected(gcp, fast_retry, where):
  uri = gcp.add_key()
  key = GcpKmsKey(uri)
  stanza = key.wrap(DEK, CTX)
  gcp.corrupt = where
  with pytest.raises(errors.BackendUnavailableError, match='corrupted'):
    key.wrap(DEK, CTX)
  if where == 'response':
    with pytest.raises(errors.BackendUnavailableError, match='corrupted'):
      key.unwrap(stanza, CTX)


def test_server_stopped(gcp, fast_retry):
  uri = gcp.add_key()
  key = GcpKmsKey(uri)
  stanza = key.wrap(DEK, CTX)
  gcp.stop()
  with pytest.raises(errors.BackendUnavailableError, match='gave up'):
    key.unwrap(stanza, CTX)


def test_deadline_policy_is_used(gcp):
  uri = gcp.add_key()
  gcp.inject(1000, grpc.StatusCode.UNAVAILABLE, 'down')
  policy = _retry.RetryPolicy(max_attempts=3, base_delay=0, max_delay=0)
  with pytest.raises(errors.BackendUnavailableError):
    GcpKmsKey(uri, retry=policy).wrap(DEK, CTX)
  assert gcp.calls['Encrypt'] == 3
