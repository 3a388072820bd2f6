"""The CoAP gateway: devices connect here."""
