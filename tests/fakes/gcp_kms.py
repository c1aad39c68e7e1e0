"""TEST-ONLY fake of the Cloud KMS gRPC API (Encrypt, Decrypt,
AsymmetricSign, GetPublicKey).

It speaks the real wire protocol (``google.cloud.kms.v1.KeyManagementService``
over gRPC, request/response messages from google-cloud-kms), so the backend
is exercised through the real client library on a loopback port. It is not
Cloud KMS: keys are random AES-256-GCM keys in memory, and the ciphertext
format is its own. Signing key versions (``add_signing_key``) are real
`cryptography` EC P-256 / Ed25519 private keys: AsymmetricSign signs the
``digest.sha256`` (DER ECDSA) or the ``data`` (Ed25519), GetPublicKey answers
the PEM with its CRC32C. It reproduces the behaviours the backend relies on:
CRC32C integrity fields, additional authenticated data, key states,
permission errors, and the status codes of throttling and outages.
"""

import collections
import concurrent.futures
import os
import threading
from typing import Dict, List, Optional

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.cloud.kms_v1 import types as kms_types

SERVICE = 'google.cloud.kms.v1.KeyManagementService'


def _crc32c(data: bytes) -> int:
  import google_crc32c  # pylint: disable=g-import-not-at-top
  return int(google_crc32c.value(bytes(data)))


class FakeKey:

  def __init__(self):
    self.secret = os.urandom(32)
    self.state = 'ENABLED'        # or 'DISABLED', 'DESTROYED'
    self.denied = False           # PERMISSION_DENIED for every use
    self.private = None           # a signing key version's private key
    self.algorithm = 'GOOGLE_SYMMETRIC_ENCRYPTION'


class FakeSigningKey(FakeKey):
  """An asymmetric signing CryptoKeyVersion with a real private key."""

  def __init__(self, algorithm: str = 'EC_SIGN_P256_SHA256'):
    super().__init__()
    self.algorithm = algorithm
    if algorithm == 'EC_SIGN_P256_SHA256':
      self.private = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == 'EC_SIGN_ED25519':
      self.private = ed25519.Ed25519PrivateKey.generate()
    else:   # e.g. EC_SIGN_P384_SHA384: a key type the backend refuses
      self.private = ec.generate_private_key(ec.SECP384R1())

  def public_pem(self) -> str:
    return self.private.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo).decode('ascii')


class FakeGcpKms:
  """An in-process gRPC server on 127.0.0.1:<free port>."""

  def __init__(self):
    self.keys: Dict[str, FakeKey] = {}
    self.calls = collections.Counter()
    self.faults: List[List] = []   # [count, grpc.StatusCode, message]
    self.corrupt = None            # None | 'request' | 'response'
    self._lock = threading.Lock()
    handlers = {
        'Encrypt': grpc.unary_unary_rpc_method_handler(
            self._encrypt,
            request_deserializer=kms_types.EncryptRequest.deserialize,
            response_serializer=kms_types.EncryptResponse.serialize),
        'Decrypt': grpc.unary_unary_rpc_method_handler(
            self._decrypt,
            request_deserializer=kms_types.DecryptRequest.deserialize,
            response_serializer=kms_types.DecryptResponse.serialize),
        'AsymmetricSign': grpc.unary_unary_rpc_method_handler(
            self._asymmetric_sign,
            request_deserializer=kms_types.AsymmetricSignRequest.deserialize,
            response_serializer=kms_types.AsymmetricSignResponse.serialize),
        'GetPublicKey': grpc.unary_unary_rpc_method_handler(
            self._get_public_key,
            request_deserializer=kms_types.GetPublicKeyRequest.deserialize,
            response_serializer=kms_types.PublicKey.serialize),
    }
    self._server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=4))
    self._server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, handlers),))
    self.port = self._server.add_insecure_port('127.0.0.1:0')
    self.endpoint = f'127.0.0.1:{self.port}'
    self._server.start()

  # -- test API ---------------------------------------------------------------
  def add_key(self, project='proj', location='global', ring='ring',
              key=None) -> str:
    key = key or f'key{len(self.keys) + 1}'
    name = (f'projects/{project}/locations/{location}/keyRings/{ring}/'
            f'cryptoKeys/{key}')
    self.keys[name] = FakeKey()
    return 'gcp-kms://' + name

  def add_signing_key(self, algorithm: str = 'EC_SIGN_P256_SHA256',
                      project='proj', location='global', ring='ring',
                      key=None, version: int = 1) -> str:
    """A signing key version; returns its ``.../cryptoKeyVersions/N`` URI."""
    key = key or f'signer{len(self.keys) + 1}'
    name = (f'projects/{project}/locations/{location}/keyRings/{ring}/'
            f'cryptoKeys/{key}/cryptoKeyVersions/{version}')
    self.keys[name] = FakeSigningKey(algorithm)
    return 'gcp-kms://' + name

  def key(self, uri: str) -> FakeKey:
    return self.keys[uri[len('gcp-kms://'):]]

  def inject(self, count: int, code: grpc.StatusCode, message: str) -> None:
    with self._lock:
      self.faults.append([count, code, message])

  def reset(self) -> None:
    with self._lock:
      self.calls.clear()
      self.faults.clear()
      self.corrupt = None

  def stop(self) -> None:
    self._server.stop(grace=None).wait()

  # -- service ----------------------------------------------------------------
  def _begin(self, method: str, context) -> None:
    with self._lock:
      self.calls[method] += 1
      for f in self.faults:
        if f[0] > 0:
          f[0] -= 1
          context.abort(f[1], f[2])

  def _lookup(self, name: str, permission: str, context) -> FakeKey:
    key = self.keys.get(name)
    if key is not None and key.denied:
      context.abort(grpc.StatusCode.PERMISSION_DENIED,
                    f"Permission '{permission}' denied on resource '{name}' "
                    '(or it may not exist).')
    if key is None:
      context.abort(grpc.StatusCode.NOT_FOUND, f'CryptoKey {name} not found.')
    if key.state != 'ENABLED':
      version = name if key.private is not None else (
          f'{name}/cryptoKeyVersions/1')
      context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                    f'{version} is not enabled, current '
                    f'state is: {key.state}.')
    return key

  @staticmethod
  def _check_crc(data: bytes, crc: Optional[int], field: str, context):
    if crc is not None and crc != _crc32c(data):
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f'The checksum in field {field}_crc32c did not match the '
                    f'data in field {field}.')
    return crc is not None

  def _encrypt(self, request, context):
    self._begin('Encrypt', context)
    key = self._lookup(request.name,
                       'cloudkms.cryptoKeyVersions.useToEncrypt', context)
    pt_ok = self._check_crc(request.plaintext, request.plaintext_crc32c,
                            'plaintext', context)
    aad_ok = self._check_crc(request.additional_authenticated_data,
                             request.additional_authenticated_data_crc32c,
                             'additional_authenticated_data', context)
    nonce = os.urandom(12)
    ct = b'FK1' + nonce + AESGCM(key.secret).encrypt(
        nonce, request.plaintext,
        request.name.encode() + b'\0' + request.additional_authenticated_data)
    crc = _crc32c(ct)
    if self.corrupt == 'request':
      pt_ok = False
    elif self.corrupt == 'response':
      crc ^= 1
    return kms_types.EncryptResponse(
        name=request.name + '/cryptoKeyVersions/1', ciphertext=ct,
        ciphertext_crc32c=crc, verified_plaintext_crc32c=pt_ok,
        verified_additional_authenticated_data_crc32c=aad_ok,
        protection_level=kms_types.ProtectionLevel.SOFTWARE)

  def _decrypt(self, request, context):
    self._begin('Decrypt', context)
    key = self._lookup(request.name,
                       'cloudkms.cryptoKeyVersions.useToDecrypt', context)
    self._check_crc(request.ciphertext, request.ciphertext_crc32c,
                    'ciphertext', context)
    self._check_crc(request.additional_authenticated_data,
                    request.additional_authenticated_data_crc32c,
                    'additional_authenticated_data', context)
    ct = request.ciphertext
    try:
      if not ct.startswith(b'FK1') or len(ct) < 3 + 12 + 16:
        raise InvalidTag()
      pt = AESGCM(key.secret).decrypt(
          ct[3:15], ct[15:],
          request.name.encode() + b'\0' +
          request.additional_authenticated_data)
    except InvalidTag:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    'Decryption failed: the ciphertext is invalid.')
    crc = _crc32c(pt)
    if self.corrupt == 'response':
      crc ^= 1
    return kms_types.DecryptResponse(
        plaintext=pt, plaintext_crc32c=crc, used_primary=True,
        protection_level=kms_types.ProtectionLevel.SOFTWARE)

  def _signing_key(self, name: str, permission: str, context) -> FakeKey:
    key = self._lookup(name, permission, context)
    if key.private is None:
      context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                    f'Operation requested for {name} is not supported for '
                    f'key with purpose ENCRYPT_DECRYPT.')
    return key

  def _get_public_key(self, request, context):
    self._begin('GetPublicKey', context)
    key = self._signing_key(request.name,
                            'cloudkms.cryptoKeyVersions.viewPublicKey', context)
    pem = key.public_pem()
    crc = _crc32c(pem.encode('utf-8'))
    if self.corrupt == 'response':
      crc ^= 1
    return kms_types.PublicKey(
        pem=pem, pem_crc32c=crc, name=request.name,
        algorithm=kms_types.CryptoKeyVersion.CryptoKeyVersionAlgorithm[
            key.algorithm],
        protection_level=kms_types.ProtectionLevel.SOFTWARE)

  def _asymmetric_sign(self, request, context):
    self._begin('AsymmetricSign', context)
    key = self._signing_key(request.name,
                            'cloudkms.cryptoKeyVersions.useToSign', context)
    verified_digest = verified_data = False
    if key.algorithm == 'EC_SIGN_ED25519':
      if request.digest.sha256 or not request.data:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      'EC_SIGN_ED25519 keys sign data, not a digest.')
      verified_data = self._check_crc(request.data, request.data_crc32c,
                                      'data', context)
      sig = key.private.sign(request.data)
    else:
      digest = request.digest.sha256
      if len(digest) != 32 or request.data:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      'The digest must be a SHA-256 digest for this key '
                      'version.')
      verified_digest = self._check_crc(digest, request.digest_crc32c,
                                        'digest', context)
      sig = key.private.sign(digest, ec.ECDSA(utils.Prehashed(
          hashes.SHA256())))
    crc = _crc32c(sig)
    if self.corrupt == 'request':
      verified_digest = verified_data = False
    elif self.corrupt == 'response':
      crc ^= 1
    return kms_types.AsymmetricSignResponse(
        signature=sig, signature_crc32c=crc, name=request.name,
        verified_digest_crc32c=verified_digest,
        verified_data_crc32c=verified_data,
        protection_level=kms_types.ProtectionLevel.SOFTWARE)
