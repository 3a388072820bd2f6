"""The event log: a port and its adapters (JetStream, in-memory)."""
