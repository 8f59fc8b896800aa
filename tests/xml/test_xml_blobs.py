"""The blob checks of <launchSecurity>: strict base64 and the GODH certificate fields, under fuzzing."""

from __future__ import annotations

import base64
import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevhook.errors import FormatError
from sevhook.xml.blobs import SEV_CERT_SIZE, check_godh_certificate, decode_base64


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "it is empty"),
        ("  \n ", "it is empty"),
        ("AAA", "its length, 3 characters, is not a multiple of 4 (truncated or mis-padded)"),
        ("AA=A", "'=' padding appears before the end"),
        ("AA-A", "character '-' at position 3 is not base64"),
    ],
)
def test_malformed_base64_says_why(text: str, reason: str) -> None:
    with pytest.raises(FormatError) as caught:
        decode_base64(text)
    assert caught.value.message == reason


def test_whitespace_between_characters_is_allowed() -> None:
    assert decode_base64(" AQID\n BA==\t") == b"\x01\x02\x03\x04"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_base64_round_trip(data: bytes) -> None:
    text = base64.b64encode(data).decode()
    if data:
        assert decode_base64(text) == data


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_decodes_or_raises_format_error(text: str) -> None:
    with contextlib.suppress(FormatError):
        decode_base64(text)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=SEV_CERT_SIZE - 4, max_size=SEV_CERT_SIZE - 4), st.sampled_from([0x1003, 0x1002, 7]))
def test_any_certificate_bytes_give_a_reason_and_never_raise(body: bytes, usage: int) -> None:
    data = (1).to_bytes(4, "little") + body[:4] + usage.to_bytes(4, "little") + body[8:]
    reason = check_godh_certificate(data)
    assert reason is None or isinstance(reason, str)
    if usage != 0x1003:
        assert reason is not None


def test_a_generated_godh_certificate_passes() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from sevhook.sev.certs import SevCertificate, Usage

    cert = SevCertificate.generate(Usage.PDH, ec.generate_private_key(ec.SECP384R1()).public_key())
    assert check_godh_certificate(cert.to_bytes()) is None
