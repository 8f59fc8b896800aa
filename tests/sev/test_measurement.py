"""Launch measurements: the sev-tool/virtee and sevctl known answers, the pre-0.17 form, the
48-byte/base64 transport form, and verification that notices any changed input."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevhook.errors import FormatError, SevhookError
from sevhook.sev.measurement import LaunchMeasurement, compute_measurement, verify_measurement

TIK = bytes.fromhex("66320db73158a35a255d051758e95ed4")
MNONCE = bytes.fromhex("4fbe0bedbad6c86ae8f68971d103e554")
EMPTY_DIGEST = hashlib.sha256(b"").digest()
SEVCTL_MNONCE = "wxP6tRHCFrFQWxsuqZA8QA=="


def test_known_answer_api_0_18() -> None:
    value = compute_measurement(TIK, 0, 0x12, 0x0F, 0, EMPTY_DIGEST, MNONCE)
    assert value.hex() == "6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea"


def test_sevctl_known_answer_from_launch_digest(vectors: Path) -> None:
    tik = (vectors / "sevctl" / "measurement_tik1.bin").read_bytes()
    digest = base64.b64decode("xkvRAfyaSizgonxAjZIAkR8TmolUabBKQKb6KJCDDSM=")
    mnonce = base64.b64decode(SEVCTL_MNONCE)
    value = compute_measurement(tik, 1, 40, 40, 0x03, digest, mnonce)
    assert LaunchMeasurement(value, mnonce).b64 == "lswbxWxI9gckya16JQvdFtpYmNO4b+3inAPpqsgoBI7DE/q1EcIWsVBbGy6pkDxA"


def test_sevctl_known_answer_from_firmware(vectors: Path) -> None:
    tik = (vectors / "sevctl" / "measurement_tik1.bin").read_bytes()
    digest = hashlib.sha256((vectors / "sevctl" / "OVMF.amdsev.trimmed.fd").read_bytes()).digest()
    reported = LaunchMeasurement.parse("oMDewIouJSpbpNRHj7Mk3p08H2dPZQdsZMU14qIymBnDE/q1EcIWsVBbGy6pkDxA")
    assert verify_measurement(reported, tik, 1, 40, 40, 0x03, digest)


def test_pre_0_17_form_has_no_version_bytes() -> None:
    old = compute_measurement(TIK, 0, 16, 0x0F, 0x1, EMPTY_DIGEST, MNONCE)
    assert old == hmac.new(TIK, (1).to_bytes(4, "little") + EMPTY_DIGEST + MNONCE, hashlib.sha256).digest()
    assert old != compute_measurement(TIK, 0, 17, 0x0F, 0x1, EMPTY_DIGEST, MNONCE)
    # build id does not enter the older form
    assert old == compute_measurement(TIK, 0, 16, 0x01, 0x1, EMPTY_DIGEST, MNONCE)


def test_every_changed_input_is_a_mismatch() -> None:
    good = LaunchMeasurement(compute_measurement(TIK, 1, 51, 3, 0x30005, EMPTY_DIGEST, MNONCE), MNONCE)
    args = {"tik": TIK, "api_major": 1, "api_minor": 51, "build_id": 3, "policy": 0x30005,
            "launch_digest": EMPTY_DIGEST}
    assert verify_measurement(good, **args)
    assert verify_measurement(good.b64, **args) and verify_measurement(good.to_bytes(), **args)
    changes = {"tik": bytes(16), "api_major": 0, "api_minor": 52, "build_id": 4, "policy": 0x5,
               "launch_digest": hashlib.sha256(b"x").digest()}
    for name, value in changes.items():
        assert not verify_measurement(good, **{**args, name: value}), name
    raw = good.to_bytes()
    for index in range(len(raw)):
        altered = raw[:index] + bytes([raw[index] ^ 0x04]) + raw[index + 1 :]
        assert not verify_measurement(LaunchMeasurement.parse(altered), **args), index


def test_parse_forms() -> None:
    raw = bytes(range(48))
    b64 = base64.b64encode(raw)
    for form in (raw, b64, b64.decode(), b64.decode() + "\n"):
        parsed = LaunchMeasurement.parse(form)
        assert parsed.to_bytes() == raw and parsed.measurement == raw[:32] and parsed.mnonce == raw[32:]


@pytest.mark.parametrize("data,message",
                         [("", "0 bytes"), ("AAAA", "3 bytes"), ("@@@@", "base64"), (bytes(47), "base64|bytes")])
def test_bad_measurements(data, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        LaunchMeasurement.parse(data)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"launch_digest": bytes(31)}, "launch digest"), ({"mnonce": bytes(15)}, "mnonce"),
     ({"api_major": 256}, "out of range"), ({"policy": 1 << 32}, "out of range")],
)
def test_bad_inputs(kwargs, message: str) -> None:
    args = {"tik": TIK, "api_major": 1, "api_minor": 0, "build_id": 1, "policy": 0, "launch_digest": EMPTY_DIGEST,
            "mnonce": MNONCE}
    with pytest.raises(FormatError, match=message):
        compute_measurement(**{**args, **kwargs})


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=100), st.text(max_size=100)))
def test_fuzz_measurement_parse(data) -> None:
    try:
        LaunchMeasurement.parse(data)
    except SevhookError:
        pass
