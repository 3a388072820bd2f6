"""The bus: NATS accounts, permissions, credentials and the auth callout (PRODUCT.md section 10)."""
