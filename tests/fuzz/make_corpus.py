"""Writes the hand-made seeds of ``tests/fuzz/corpus/`` (by hand:
``.venv/bin/python tests/fuzz/make_corpus.py``). Inputs found by fuzzing are added to the folder
as files as they are found; this script never deletes any."""

from __future__ import annotations

from pathlib import Path

import cbor2

CORPUS = Path(__file__).parent / "corpus"


def frame(code: int, token: bytes, options: list[tuple[int, bytes]], payload: bytes = b"") -> bytes:
    body, last = bytearray(), 0
    for number, value in sorted(options):
        delta, length = number - last, len(value)
        assert delta < 13 and length < 13  # the seeds keep to short forms
        body += bytes([(delta << 4) | length]) + value
        last = number
    if payload:
        body += b"\xff" + payload
    assert len(body) < 269
    if len(body) < 13:
        head = bytes([(len(body) << 4) | len(token)])
    else:
        head = bytes([0xD0 | len(token), len(body) - 13])
    return head + bytes([code]) + token + bytes(body)


SIGN_UP = frame(
    2,
    b"\x01",
    [(11, b"oic"), (11, b"sec"), (11, b"account"), (12, b"\x27\x10")],
    cbor2.dumps({"di": "x", "accesstoken": 1}),
)

SEEDS = {
    # aiocoap raised UnicodeDecodeError out of data_received: the connection died, "internal error"
    "w13-uri-path-not-utf8": frame(2, b"\x01", [(11, b"\xff\xfe")]),
    # aiocoap read the whole body before looking at the token length
    "w13-token-length-9": bytes([0x09, 0x01]) + b"123456789",
    "w13-payload-marker-without-payload": bytes([0x10, 0x01, 0xFF]),
    "w13-len15-4gib-announced": bytes([0xF0, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]),
    "w13-option-delta-15": bytes([0x21, 0x01, 0x07, 0xF1, 0x00]),
    # the rendering coroutine of the first request was never awaited (RuntimeWarning)
    "w18-same-token-twice": SIGN_UP + SIGN_UP,
    "w18-request-then-format-error": SIGN_UP + bytes([0x09, 0x01]) + b"123456789",
    "w14-unknown-critical-option": frame(2, b"\x02", [(11, b"a"), (13, b"x")]),
    "w15-empty-messages": bytes([0x00, 0x00]) * 3 + SIGN_UP,
    "w15-reserved-code-class-6": bytes([0x00, 0xC1]),
    "sign-up-wrong-types": SIGN_UP,
    # aiocoap aborted, then answered the Ping with a deprecated call (DeprecationWarning)
    "w9-ping-with-critical-option": bytes([0x11, 0xE2, 0x07, 0x10]),
}

if __name__ == "__main__":
    CORPUS.mkdir(exist_ok=True)
    for name, data in SEEDS.items():
        (CORPUS / f"{name}.bin").write_bytes(data)
