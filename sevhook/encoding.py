"""Strict base64, the encoding of every blob sevhook reads (dhCert, session, QMP and broker
fields): whitespace is allowed, anything else that is not exact base64 is refused with the reason."""

from __future__ import annotations

import binascii
import re

from sevhook.errors import FormatError

_WHITESPACE = re.compile(r"[ \t\r\n]+")
_ALPHABET = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def decode_base64(text: str) -> bytes:
    """Decode exact base64; FormatError says what is wrong with it (never which secret bytes)."""
    compact = _WHITESPACE.sub("", text)
    if not compact:
        raise FormatError("it is empty")
    bad = re.search(r"[^A-Za-z0-9+/=]", compact)
    if bad:
        raise FormatError(f"character '{bad.group()}' at position {bad.start() + 1} is not base64")
    if not _ALPHABET.fullmatch(compact):
        raise FormatError("'=' padding appears before the end")
    if len(compact) % 4:
        raise FormatError(f"its length, {len(compact)} characters, is not a multiple of 4 (truncated or mis-padded)")
    try:
        return binascii.a2b_base64(compact, strict_mode=True)
    except binascii.Error as exc:
        raise FormatError(f"it does not decode ({exc})") from exc
