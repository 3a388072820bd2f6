"""Adapters of :mod:`gateway` to outside systems.

:mod:`gateway.adapters.coap` turns device connections (CoAP over TCP / TLS, RFC 8323) into plain
typed values for the sans-IO core, on :mod:`gateway.adapters.coap_tcp` (listeners, admission,
device links) and our own RFC 8323 connection (:mod:`gateway.wire`). The simple devices' UDP
profile (:mod:`gateway.adapters.coap_udp`) is the only module here that imports aiocoap, on its
public API only (``tests/test_layering.py``).
"""
