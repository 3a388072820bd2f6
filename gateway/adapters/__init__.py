"""Adapters of :mod:`gateway` to outside systems.

:mod:`gateway.adapters.coap` turns device connections (CoAP over TCP / TLS, RFC 8323) into plain
typed values for the sans-IO core. Its aiocoap glue and work-arounds live in
:mod:`gateway.adapters.coap_wire`, the only module that imports aiocoap.
"""
