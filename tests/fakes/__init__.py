"""TEST-ONLY fakes and helpers for the key-backend tests.

Nothing in this package is used by the library. The servers here speak
just enough of each service's wire protocol (GCP KMS gRPC, Vault transit
HTTP API, Azure Key Vault REST) for the *real* client libraries to talk to
them over loopback; they are not implementations of those services and
hold no real keys. AWS KMS is tested against moto's standalone server and
PKCS#11 against SoftHSM2 instead (see docs/BACKENDS.md).
"""
