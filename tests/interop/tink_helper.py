"""Google Tink's side of the streaming-AEAD interop tests.

Runs INSIDE .venv-tink (tink 1.16.1 + protobuf>=5.29); it imports only tink
and the standard library, never tfx_encrypt, so it is an independent
implementation of the stream format (docs/FORMAT.md §6).

The keyset is one AesGcmHkdfStreamingKey with the caller's 32-byte key_value
(our stream key / Tink's ikm) and the parameters of Tink's AES256_GCM_HKDF_1MB
template: ciphertext_segment_size=1048576, derived_key_size=32,
hkdf_hash_type=SHA256, output prefix RAW.

Commands (keys and associated data are hex; data goes through files):

  tink_helper.py encrypt KEY_HEX AAD_HEX PLAINTEXT_FILE CIPHERTEXT_FILE
  tink_helper.py decrypt KEY_HEX AAD_HEX CIPHERTEXT_FILE PLAINTEXT_FILE
      Exit 0 on success; exit 1 with a message on stderr when Tink rejects
      the ciphertext (decrypt) or fails.
  tink_helper.py batch < JOBS_JSON
      JOBS_JSON is a list of {"op": "encrypt"|"decrypt", "key": hex,
      "aad": hex, "in": path, "out": path}. Runs every job (a failing job
      does not stop the batch) and prints a JSON list with one
      {"ok": bool, "error": str|null} per job, in order. Exit 0 when the
      batch ran, 2 on a malformed job list.
  tink_helper.py template
      Prints Tink's own AES256_GCM_HKDF_1MB template parameters and the
      version of tink as JSON, so the tests can check the keyset here
      matches the template.
"""

import json
import sys

import tink
from tink import streaming_aead
from tink.proto import aes_gcm_hkdf_streaming_pb2
from tink.proto import common_pb2
from tink.proto import tink_pb2

TYPE_URL = 'type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey'
SEGMENT_SIZE = 1 << 20
DERIVED_KEY_SIZE = 32
CHUNK = 1 << 16  # feed Tink's streams in pieces, as a real writer would

streaming_aead.register()


def _secret_token():
  """SecretKeyAccess token, wherever this tink version keeps it."""
  try:
    from tink import secret_key_access  # pylint: disable=g-import-not-at-top
    return secret_key_access.TOKEN
  except ImportError:
    return None


def keyset_handle(key_value: bytes):
  if len(key_value) != 32:
    raise ValueError(f'key_value must be 32 bytes, got {len(key_value)}')
  key = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(
      version=0,
      key_value=key_value,
      params=aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingParams(
          ciphertext_segment_size=SEGMENT_SIZE,
          derived_key_size=DERIVED_KEY_SIZE,
          hkdf_hash_type=common_pb2.SHA256))
  keyset = tink_pb2.Keyset(
      primary_key_id=1,
      key=[
          tink_pb2.Keyset.Key(
              key_data=tink_pb2.KeyData(
                  type_url=TYPE_URL,
                  value=key.SerializeToString(),
                  key_material_type=tink_pb2.KeyData.SYMMETRIC),
              status=tink_pb2.ENABLED,
              key_id=1,
              output_prefix_type=tink_pb2.RAW)
      ])
  serialized = keyset.SerializeToString()
  token = _secret_token()
  if token is not None and hasattr(tink, 'proto_keyset_format'):
    return tink.proto_keyset_format.parse(serialized, token)
  from tink import cleartext_keyset_handle  # pylint: disable=g-import-not-at-top
  return cleartext_keyset_handle.read(tink.BinaryKeysetReader(serialized))


def primitive(key_hex: str):
  return keyset_handle(bytes.fromhex(key_hex)).primitive(
      streaming_aead.StreamingAead)


def encrypt(key_hex: str, aad_hex: str, src: str, dst: str) -> None:
  sa = primitive(key_hex)
  with open(src, 'rb') as fin, open(dst, 'wb') as fout:
    with sa.new_encrypting_stream(fout, bytes.fromhex(aad_hex)) as enc:
      while True:
        chunk = fin.read(CHUNK)
        if not chunk:
          break
        enc.write(chunk)


def decrypt(key_hex: str, aad_hex: str, src: str, dst: str) -> None:
  sa = primitive(key_hex)
  with open(src, 'rb') as fin, open(dst, 'wb') as fout:
    with sa.new_decrypting_stream(fin, bytes.fromhex(aad_hex)) as dec:
      while True:
        chunk = dec.read(CHUNK)
        if not chunk:
          break
        fout.write(chunk)


OPS = {'encrypt': encrypt, 'decrypt': decrypt}


def run_job(job) -> dict:
  try:
    OPS[job['op']](job['key'], job['aad'], job['in'], job['out'])
  except Exception as e:  # pylint: disable=broad-except
    return {'ok': False, 'error': f'{type(e).__name__}: {e}'}
  return {'ok': True, 'error': None}


def template_info() -> dict:
  tmpl = streaming_aead.streaming_aead_key_templates.AES256_GCM_HKDF_1MB
  fmt = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKeyFormat.FromString(
      tmpl.value)
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  return {
      'tink_version': importlib.metadata.version('tink'),
      'type_url': tmpl.type_url,
      'key_size': fmt.key_size,
      'ciphertext_segment_size': fmt.params.ciphertext_segment_size,
      'derived_key_size': fmt.params.derived_key_size,
      'hkdf_hash_type': common_pb2.HashType.Name(fmt.params.hkdf_hash_type),
      'ours_matches_template': (
          tmpl.type_url == TYPE_URL and
          fmt.params.ciphertext_segment_size == SEGMENT_SIZE and
          fmt.params.derived_key_size == DERIVED_KEY_SIZE and
          fmt.params.hkdf_hash_type == common_pb2.SHA256 and
          fmt.key_size == 32),
  }


def main(argv) -> int:
  if len(argv) == 6 and argv[1] in OPS:
    result = run_job({'op': argv[1], 'key': argv[2], 'aad': argv[3],
                      'in': argv[4], 'out': argv[5]})
    if not result['ok']:
      print(f'tink {argv[1]} failed: {result["error"]}', file=sys.stderr)
      return 1
    return 0
  if len(argv) == 2 and argv[1] == 'batch':
    try:
      jobs = json.load(sys.stdin)
      if not isinstance(jobs, list) or not all(
          isinstance(j, dict) and j.get('op') in OPS and
          all(isinstance(j.get(k), str) for k in ('key', 'aad', 'in', 'out'))
          for j in jobs):
        raise ValueError('expected a list of {op, key, aad, in, out} jobs')
    except ValueError as e:
      print(f'tink_helper batch: bad job list: {e}', file=sys.stderr)
      return 2
    json.dump([run_job(j) for j in jobs], sys.stdout)
    return 0
  if len(argv) == 2 and argv[1] == 'template':
    json.dump(template_info(), sys.stdout)
    return 0
  print(__doc__, file=sys.stderr)
  return 2


if __name__ == '__main__':
  sys.exit(main(sys.argv))
