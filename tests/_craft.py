"""Build packages whose header says anything, with a valid MAC (and signature).

The writer (`encrypt_model`) refuses hostile input, so tests of the reader
assemble headers by hand here, as the holder of the data key (and, when
asked, of a signing key) could: every field below passes MAC and signature
checks, so only the reader's own rules can reject it.
"""

import os
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

from tfx_encrypt.format import digest as digest_lib
from tfx_encrypt.format import header as header_lib
from tfx_encrypt.format import streaming
from tfx_encrypt.keys import local
from tfx_encrypt.keys.base import WrapContext

SUITE = streaming.AES256_GCM_HKDF_1MB


def craft(out, recipient_pub: str, files: Sequence[Tuple[str, bytes]],
          dirs: Iterable[str] = (), *, context: Optional[Dict[str, str]] = None,
          recipient_key_id: Optional[str] = None,
          signer_priv: Optional[str] = None,
          signer_key_id: Optional[str] = None,
          created: str = '2026-01-01T00:00:00Z',
          fingerprint: Optional[str] = None,
          seal: Optional[Callable[[int, bytes, bytes, bytes], bytes]] = None
          ) -> str:
  """Write the directory package `out` holding `files` ((path, bytes), in
  the order given) and listing `dirs`, encrypted for `recipient_pub`.

  Args:
    out: the package directory to create.
    recipient_pub: the recipient's public key file (X25519 or RSA).
    files: file table entries, verbatim (no path check).
    dirs: the file table's directory list, verbatim.
    context: the header's encryption context, verbatim (no check).
    recipient_key_id: replaces the stanza's key id (the stanza still
      unwraps; only matching by key id fails).
    signer_priv: sign the header with this private key file.
    signer_key_id: the key id the signature block claims (default: the
      signer's own).
    created: the header's creation time.
    fingerprint: the header's fingerprint (default: the right one).
    seal: seal(index, stream_key, aad, plaintext) -> the payload stream
      written (default: streaming.encrypt_bytes); the header's ciphertext
      size and digest describe what it returns, the file table still
      describes `plaintext`.

  Returns:
    str(out).
  """
  out = os.fspath(out)
  ctx = dict(context or {})
  dek, pid = os.urandom(32), os.urandom(16)
  keys = header_lib.DerivedKeys(dek, pid, SUITE)
  cd = header_lib.context_digest(ctx)
  os.makedirs(os.path.join(out, 'payload'))
  table_files, payloads, digests = [], [], []
  for i, (path, data) in enumerate(files):
    aad = header_lib.payload_aad(pid, i, cd)
    ct = (seal(i, keys.stream_key, aad, data) if seal is not None else
          streaming.encrypt_bytes(SUITE, keys.stream_key, aad, data))
    with open(os.path.join(out, 'payload', f'{i:08d}'), 'wb') as f:
      f.write(ct)
    pd = digest_lib.new_hash('sha256')
    pd.update(data)
    digests.append(pd.hexdigest())
    table_files.append({'path': path, 'size': len(data),
                        'digest': pd.hexdigest()})
    cdg = digest_lib.new_hash('sha256')
    cdg.update(ct)
    payloads.append((len(ct), cdg.hexdigest()))
  table = header_lib.canonical_json({'dirs': list(dirs), 'files': table_files})
  stanza = local.LocalKey(recipient_pub).wrap(dek, WrapContext(pid, ctx))
  if recipient_key_id is not None:
    stanza.key_id = recipient_key_id
  h = header_lib.Header(
      suite=SUITE, hash_alg='sha256', package_id=pid, created=created,
      context=ctx, recipients=[stanza], commitment=keys.commitment,
      fingerprint=fingerprint or digest_lib.root_digest('sha256', digests),
      payloads=payloads,
      file_table=streaming.encrypt_bytes(
          SUITE, keys.stream_key, header_lib.file_table_aad(pid, cd), table))
  signer = None
  if signer_priv is not None:
    signer = local.LocalKey(signer_priv)
    h.signer = header_lib.SignerRef(signer.signature_alg,
                                    signer_key_id or signer.signer_id)
  h.mac = h.compute_mac(keys.mac_key)  # over the body, signer included
  if signer is not None:
    sig = signer.sign(h.signature_message())
    if signer.signature_alg == 'ecdsa-p256-sha256':
      sig = header_lib.ecdsa_der_to_raw(sig)
    h.signature = header_lib.SignatureBlock(h.signer.alg, h.signer.key_id,
                                            sig)
  with open(os.path.join(out, 'tfxe.header'), 'wb') as f:
    f.write(h.serialize())
  return out
