"""Our own RFC 8323 (CoAP over TCP / TLS) connection: a sans-IO core and its asyncio driver.

:mod:`~gateway.wire.connection` holds the state of one connection (bytes and ticks in, events
and bytes out), on the framing of :mod:`gateway.adapters.coap_frames`; :mod:`~gateway.wire.signals`
and :mod:`~gateway.wire.observe` are its pure codecs and rules; :mod:`~gateway.wire.protocol`
feeds it from an ``asyncio.Protocol``; :mod:`~gateway.wire.messages` converts the gateway's
``CoapRequest`` / ``CoapResponse`` values. Nothing here imports aiocoap
(``tests/test_layering.py``).

Where the work-arounds of the aiocoap glue this replaced (``coap_wire``, removed) live here: W2
(no-CSM peers), W3 (every notification, in order, ``StalePolicy.DELIVER``), W4
(``cancel_observation``), W8 (``keepalive_interval``, ``opening_timeout``, ``message_timeout``),
W9 (our Pong), W13 / W15 (format errors abort), W14 (``check_request_options``), W19 (no Block-
wise in our CSM, ``messages.block_wise_problem``), W20 (``MessageTooLarge``) in the connection;
W6 (writes to a closing transport dropped), W7 (back-pressure, ``max_write_buffer``) and W16
(FIN and drain after Abort) in the driver; W12 in :mod:`~gateway.wire.messages`. W1, W5, W10,
W11, W17 belong to whoever creates the listeners and TLS contexts (the driver works with
``create_server`` and ``connect_accepted_socket`` alike); W18 has no counterpart (events are
delivered synchronously).
"""
