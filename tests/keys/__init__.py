"""Key-backend tests (AWS KMS, GCP KMS, Vault, Azure Key Vault, PKCS#11)."""
