"""TEST-ONLY: a throwaway self-signed certificate for loopback HTTPS fakes."""

import datetime
import ipaddress
import os
import ssl
from typing import Tuple


def make_self_signed(directory: str) -> Tuple[str, str]:
  """Writes cert.pem / key.pem for 127.0.0.1 and localhost into `directory`.

  Returns:
    (cert_path, key_path). The certificate is its own CA, so clients trust
    it by pointing their CA bundle (VAULT_CACERT, connection_verify) at
    cert_path.
  """
  from cryptography import x509  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives import hashes, serialization  # pylint: disable=g-import-not-at-top
  from cryptography.hazmat.primitives.asymmetric import ec  # pylint: disable=g-import-not-at-top
  from cryptography.x509.oid import NameOID  # pylint: disable=g-import-not-at-top

  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                       'tfx-encrypt test fake (loopback)')])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (
      x509.CertificateBuilder()
      .subject_name(name).issuer_name(name)
      .public_key(key.public_key())
      .serial_number(x509.random_serial_number())
      .not_valid_before(now - datetime.timedelta(minutes=5))
      .not_valid_after(now + datetime.timedelta(days=1))
      .add_extension(x509.SubjectAlternativeName([
          x509.DNSName('localhost'),
          x509.IPAddress(ipaddress.ip_address('127.0.0.1'))]), critical=False)
      .add_extension(x509.BasicConstraints(ca=True, path_length=None),
                     critical=True)
      .add_extension(x509.KeyUsage(
          digital_signature=True, key_cert_sign=True, crl_sign=False,
          content_commitment=False, key_encipherment=False,
          data_encipherment=False, key_agreement=False, encipher_only=False,
          decipher_only=False), critical=True)
      .add_extension(x509.ExtendedKeyUsage(
          [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
      .add_extension(x509.SubjectKeyIdentifier.from_public_key(
          key.public_key()), critical=False)
      .sign(key, hashes.SHA256()))
  cert_path = os.path.join(directory, 'cert.pem')
  key_path = os.path.join(directory, 'key.pem')
  with open(cert_path, 'wb') as f:
    f.write(cert.public_bytes(serialization.Encoding.PEM))
  with open(key_path, 'wb') as f:
    f.write(key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
  os.chmod(key_path, 0o600)
  return cert_path, key_path


def server_context(cert_path: str, key_path: str) -> ssl.SSLContext:
  ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  ctx.minimum_version = ssl.TLSVersion.TLSv1_2
  ctx.load_cert_chain(cert_path, key_path)
  return ctx
