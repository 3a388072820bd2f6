"""Lenient JSON, as ThingsBoard reads device payloads (Gson in lenient mode).

ThingsBoard's own example sends ``{temperature:25}`` (seed 004): a key without quotes. Firmware
and shell scripts written for ThingsBoard rely on that, so :func:`loads` accepts, beyond strict
JSON (RFC 8259):

* unquoted names and unquoted string values (``{mode:eco}``), made of letters, digits and
  ``_ $ . + -``; ``true`` / ``false`` / ``null`` and JSON numbers keep their meaning;
* single-quoted strings (``{'k': 'v'}``), with the same escapes as double-quoted ones;
* comments (``// ...``, ``# ...``, ``/* ... */``) where whitespace may be.

Everything else is strict: no trailing garbage, no NaN or Infinity, no control characters in
strings, bounded depth (:data:`MAX_DEPTH`) and length (:data:`MAX_LENGTH`). Whatever
``json.dumps`` produces parses to the value ``json.loads`` gives (a property test holds it).
The parser is iterative over containers (an explicit stack), so depth is never limited by
the interpreter's recursion limit.
"""

from __future__ import annotations

import re
from typing import Any, Final

from gateway.errors import BadRequest

__all__ = ["MAX_DEPTH", "MAX_LENGTH", "LenientJsonError", "loads"]

MAX_DEPTH: Final = 64
MAX_LENGTH: Final = 1 << 20


class LenientJsonError(BadRequest):
    """The payload is not (lenient) JSON; the message says where and why."""


_WS: Final = re.compile(r"(?:[ \t\r\n]+|//[^\n]*|#[^\n]*|/\*.*?\*/)*", re.DOTALL)
_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_BARE: Final = re.compile(r"[A-Za-z0-9_$.+\-]+")
_ESCAPES: Final = {
    '"': '"',
    "'": "'",
    "\\": "\\",
    "/": "/",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
}
_LITERALS: Final[dict[str, Any]] = {"true": True, "false": False, "null": None}


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str) -> LenientJsonError:
        return LenientJsonError(f"malformed JSON at offset {self.pos}: {why}")

    def skip(self) -> None:
        m = _WS.match(self.text, self.pos)
        if m is not None:
            self.pos = m.end()
        if self.text.startswith("/*", self.pos):
            raise self.fail("unterminated comment")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def string(self, quote: str) -> str:
        text = self.text
        i = self.pos + 1
        out: list[str] = []
        start = i
        while True:
            if i >= len(text):
                self.pos = i
                raise self.fail("unterminated string")
            c = text[i]
            if c == quote:
                out.append(text[start:i])
                self.pos = i + 1
                return "".join(out)
            if c == "\\":
                out.append(text[start:i])
                e = text[i + 1 : i + 2]
                if e == "u":
                    digits = text[i + 2 : i + 6]
                    if len(digits) != 4 or not all(d in "0123456789abcdefABCDEF" for d in digits):
                        self.pos = i
                        raise self.fail("bad \\u escape")
                    code = int(digits, 16)
                    i += 6
                    if 0xD800 <= code < 0xDC00 and text[i : i + 2] == "\\u":
                        low = text[i + 2 : i + 6]
                        if len(low) == 4 and all(d in "0123456789abcdefABCDEF" for d in low):
                            lo = int(low, 16)
                            if 0xDC00 <= lo < 0xE000:
                                code = 0x10000 + ((code - 0xD800) << 10) + (lo - 0xDC00)
                                i += 6
                    out.append(chr(code))
                elif e in _ESCAPES:
                    out.append(_ESCAPES[e])
                    i += 2
                else:
                    self.pos = i
                    raise self.fail("bad escape")
                start = i
                continue
            if c < " ":
                self.pos = i
                raise self.fail("control character in string")
            i += 1

    def scalar(self) -> Any:
        c = self.peek()
        if c in ('"', "'"):
            return self.string(c)
        m = _BARE.match(self.text, self.pos)
        if m is None:
            raise self.fail("a value was expected" if c else "unexpected end of input")
        word = m.group()
        self.pos = m.end()
        if word in _LITERALS:
            return _LITERALS[word]
        num = _NUMBER.fullmatch(word)
        if num is not None:
            if num.group(1) is None and num.group(2) is None:
                return int(word)
            value = float(word)
            if value in (float("inf"), float("-inf")):
                raise self.fail(f"number out of range: {word}")
            return value
        if word[0] in "-+0123456789" and word.lower().lstrip("+-") in ("nan", "infinity"):
            raise self.fail(f"not a JSON number: {word}")
        return word  # an unquoted string, as Gson's lenient mode reads it

    def key(self) -> str:
        c = self.peek()
        if c in ('"', "'"):
            return self.string(c)
        m = _BARE.match(self.text, self.pos)
        if m is None:
            raise self.fail("a name was expected")
        self.pos = m.end()
        return m.group()

    def parse(self) -> Any:
        # stack of (container, pending key for dicts)
        stack: list[tuple[dict[str, Any] | list[Any], str | None]] = []
        self.skip()
        while True:
            c = self.peek()
            value: Any
            if c in ("{", "["):
                if len(stack) >= MAX_DEPTH:
                    raise self.fail(f"nested deeper than {MAX_DEPTH} levels")
                self.pos += 1
                self.skip()
                container: dict[str, Any] | list[Any] = {} if c == "{" else []
                close = "}" if c == "{" else "]"
                if self.peek() == close:
                    self.pos += 1
                    value = container
                else:
                    if isinstance(container, dict):
                        stack.append((container, self._member_key()))
                    else:
                        stack.append((container, None))
                    continue
            else:
                value = self.scalar()
            # attach value to the innermost container, closing as many as end here
            while True:
                if not stack:
                    self.skip()
                    if self.pos != len(self.text):
                        raise self.fail("trailing characters after the value")
                    return value
                top, pending = stack[-1]
                if isinstance(top, dict):
                    assert pending is not None
                    top[pending] = value
                else:
                    top.append(value)
                self.skip()
                c = self.peek()
                close = "}" if isinstance(top, dict) else "]"
                if c == ",":
                    self.pos += 1
                    self.skip()
                    if isinstance(top, dict):
                        stack[-1] = (top, self._member_key())
                    break
                if c == close:
                    self.pos += 1
                    stack.pop()
                    value = top
                    continue
                raise self.fail(f"',' or '{close}' was expected")

    def _member_key(self) -> str:
        key = self.key()
        self.skip()
        if self.peek() != ":":
            raise self.fail("':' was expected")
        self.pos += 1
        self.skip()
        return key


def loads(data: bytes | str) -> Any:
    """Parse a lenient JSON document; :class:`LenientJsonError` (a 4.00) when it is not one."""
    if len(data) > MAX_LENGTH:
        raise LenientJsonError(f"JSON document longer than {MAX_LENGTH} bytes")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LenientJsonError(f"payload is not UTF-8: {e}") from e
    else:
        text = data
    if text.startswith("\ufeff"):
        text = text[1:]
    return _Parser(text).parse()
