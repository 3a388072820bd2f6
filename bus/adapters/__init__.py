"""I/O adapters of the bus (NATS)."""
