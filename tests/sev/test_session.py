"""LAUNCH_START sessions: known answers, owner -> firmware round trips for many policies, every
altered byte of the blob rejected with the right firmware error, and sevctl-compatible files."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import random
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from sevhook.errors import FormatError, SevhookError, UsageError
from sevhook.sev.certs import SEV_CERT_SIZE, SevCertificate, Usage
from sevhook.sev.measurement import compute_measurement
from sevhook.sev.secret import DISK_PASSPHRASE_GUID, SecretTable, unwrap_secret, wrap_secret
from sevhook.sev.session import (
    SESSION_SIZE,
    SEV_RET_BAD_SIGNATURE,
    SEV_RET_INVALID_CERTIFICATE,
    SEV_RET_INVALID_LEN,
    SEV_RET_POLICY_FAILURE,
    LaunchSession,
    SessionBlob,
    SessionRejected,
    build_session_blob,
    create_session,
    open_session,
    read_key_file,
)


@pytest.fixture(scope="module")
def pdh_pair() -> tuple[ec.EllipticCurvePrivateKey, SevCertificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    return key, SevCertificate.generate(Usage.PDH, key.public_key(), 0, 22)


def test_known_answer_zero_inputs() -> None:
    blob = build_session_blob(bytes(16), bytes(16), bytes(16), bytes(16), bytes(16), 0)
    assert blob.wrap_tk.hex() == "2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4"
    assert blob.wrap_mac.hex() == "3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d"
    assert blob.policy_mac.hex() == "aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af"
    raw = blob.to_bytes()
    assert len(raw) == SESSION_SIZE and SessionBlob.parse(raw) == blob
    assert raw[:16] == bytes(16) and raw[0x30:0x40] == bytes(16)


def test_policy_mac_covers_the_exact_32_bit_policy() -> None:
    tik = bytes(range(16))
    policy = 0x1218_0037  # minimum API 0x12.0x18 plus NODBG|NOKS|ES|DOMAIN|SEV
    blob = build_session_blob(b"z" * 48, bytes(16), bytes(16), bytes(16), tik, policy)
    assert blob.policy_mac == hmac.new(tik, policy.to_bytes(4, "little"), hashlib.sha256).digest()
    assert blob.policy_mac != build_session_blob(b"z" * 48, bytes(16), bytes(16), bytes(16), tik, 0x37).policy_mac


def test_round_trip_1000_random_policies_and_secrets(pdh_pair) -> None:
    """Owner -> platform -> owner: session, measurement and secret for 1,000 random policies."""
    key, pdh = pdh_pair
    rng = random.Random(4)
    digest = hashlib.sha256(b"firmware").digest()
    for _ in range(1000):
        policy = rng.getrandbits(32)
        session = create_session(pdh, policy)
        tek, tik = open_session(key, session.godh_cert, session.session, policy)
        assert (tek, tik) == (session.tek, session.tik)
        mnonce = rng.randbytes(16)
        measurement = compute_measurement(tik, 0, 24, 15, policy, digest, mnonce)
        secret = rng.randbytes(rng.randrange(1, 200))
        table = SecretTable(((DISK_PASSPHRASE_GUID, secret),)).build()
        header, ciphertext = wrap_secret(session.tek, session.tik, measurement, table)
        assert unwrap_secret(tek, tik, measurement, header.to_bytes(), ciphertext) == table


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=0xFFFF_FFFF), st.integers(min_value=0, max_value=0xFFFF_FFFF))
def test_a_different_policy_is_refused(pdh_pair, policy: int, other: int) -> None:
    key, pdh = pdh_pair
    session = create_session(pdh, policy)
    if other != policy:
        with pytest.raises(SessionRejected) as caught:
            open_session(key, session.godh_cert, session.session, other)
        assert caught.value.fw_error == SEV_RET_POLICY_FAILURE


def test_every_byte_of_the_blob_is_protected(pdh_pair) -> None:
    key, pdh = pdh_pair
    session = create_session(pdh, 0x5)
    for index in range(SESSION_SIZE):
        altered = bytearray(session.session)
        altered[index] ^= 0x01
        with pytest.raises(SessionRejected) as caught:
            open_session(key, session.godh_cert, bytes(altered), 0x5)
        # the wrap MAC covers nonce (via KIK) and wrap_tk; a changed IV or policy MAC shows as a policy failure
        expected = SEV_RET_POLICY_FAILURE if 0x30 <= index < 0x40 or index >= 0x60 else SEV_RET_BAD_SIGNATURE
        assert caught.value.fw_error == expected, index


def test_another_platform_cannot_open_the_session(pdh_pair) -> None:
    _, pdh = pdh_pair
    session = create_session(pdh, 1)
    with pytest.raises(SessionRejected) as caught:
        open_session(ec.generate_private_key(ec.SECP384R1()), session.godh_cert, session.session, 1)
    assert caught.value.fw_error == SEV_RET_BAD_SIGNATURE


def test_bad_godh_is_invalid_certificate(pdh_pair) -> None:
    key, pdh = pdh_pair
    session = create_session(pdh, 1)
    off_curve = bytearray(session.godh_cert)
    off_curve[0x14] ^= 1
    for godh in (b"", bytes(SEV_CERT_SIZE), bytes(off_curve)):
        with pytest.raises(SessionRejected) as caught:
            open_session(key, godh, session.session, 1)
        assert caught.value.fw_error == SEV_RET_INVALID_CERTIFICATE


def test_wrong_session_length_is_invalid_len(pdh_pair) -> None:
    key, pdh = pdh_pair
    session = create_session(pdh, 1)
    with pytest.raises(SessionRejected) as caught:
        open_session(key, session.godh_cert, session.session[:-1], 1)
    assert caught.value.fw_error == SEV_RET_INVALID_LEN


def test_godh_is_a_fresh_pdh_usage_certificate(pdh_pair) -> None:
    _, pdh = pdh_pair
    first, second = create_session(pdh, 1), create_session(pdh, 1)
    godh = SevCertificate.parse(first.godh_cert)
    assert godh.usage == Usage.PDH and all(s.is_empty for s in godh.signatures)
    assert first.godh_cert != second.godh_cert and first.tek != second.tek and first.session != second.session


def test_session_needs_a_pdh(pdh_pair) -> None:
    key, _ = pdh_pair
    with pytest.raises(FormatError, match="expected PDH"):
        create_session(SevCertificate.generate(Usage.PEK, key.public_key()), 1)
    with pytest.raises(FormatError, match="32 bits"):
        create_session(pdh_pair[1], 1 << 32)


def test_secrets_are_not_in_the_repr(pdh_pair) -> None:
    session = create_session(pdh_pair[1], 3)
    text = repr(session)
    assert session.tek.hex() not in text and repr(session.tek) not in text and "policy=3" in text


def test_sevctl_compatible_files(tmp_path: Path, pdh_pair) -> None:
    key, pdh = pdh_pair
    (tmp_path / "vm_tek.bin").write_bytes(b"old")
    os.chmod(tmp_path / "vm_tek.bin", 0o644)
    session = create_session(pdh, 0x10003)
    paths = session.write_files(tmp_path, "vm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm_godh.b64", "vm_session.b64", "vm_tek.bin", "vm_tik.bin"]
    for path in paths.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    godh = base64.b64decode((tmp_path / "vm_godh.b64").read_bytes())
    blob = base64.b64decode((tmp_path / "vm_session.b64").read_bytes())
    tek, tik = read_key_file(tmp_path / "vm_tek.bin", "TEK"), read_key_file(tmp_path / "vm_tik.bin", "TIK")
    assert open_session(key, godh, blob, 0x10003) == (tek, tik)


def test_write_files_bad_arguments(tmp_path: Path, pdh_pair) -> None:
    session = create_session(pdh_pair[1], 1)
    with pytest.raises(UsageError, match="does not exist"):
        session.write_files(tmp_path / "missing", "vm")
    with pytest.raises(UsageError, match="file-name prefix"):
        session.write_files(tmp_path, "../vm")


def test_read_key_file_errors(tmp_path: Path) -> None:
    (tmp_path / "tk.bin").write_bytes(bytes(32))
    with pytest.raises(FormatError, match=r"32 bytes.*tmp_tk.bin"):
        read_key_file(tmp_path / "tk.bin", "TIK")
    with pytest.raises(UsageError, match="cannot read"):
        read_key_file(tmp_path / "none.bin", "TIK")


def test_launch_session_from_known_parts() -> None:
    session = LaunchSession(bytes(SEV_CERT_SIZE), bytes(SESSION_SIZE), bytes(16), bytes(16), 1)
    assert base64.b64decode(session.session_b64) == bytes(SESSION_SIZE)
    assert base64.b64decode(session.godh_b64) == bytes(SEV_CERT_SIZE)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_session_blob_parse(data: bytes) -> None:
    try:
        assert SessionBlob.parse(data).to_bytes() == data
    except SevhookError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=2200), st.binary(min_size=2080, max_size=2080).map(lambda b: b"\x01\0\0\0" + b)),
       st.binary(max_size=140), st.integers(min_value=-1, max_value=1 << 33))
def test_fuzz_open_session_rejects_garbage(pdh_pair, godh: bytes, blob: bytes, policy: int) -> None:
    """The firmware side parses untrusted GODH and session bytes: only SessionRejected comes out."""
    with pytest.raises(SessionRejected):
        open_session(pdh_pair[0], godh, blob, policy)


def test_a_godh_with_a_bad_point_is_named_as_the_godh(pdh_pair) -> None:
    """The GODH has usage PDH, but the firmware's error must name the owner's GODH, not the platform's PDH."""
    key, pdh = pdh_pair
    session = create_session(pdh, 1)
    godh = bytearray(session.godh_cert)
    godh[0x14] ^= 0x01  # the first byte of qx: the point leaves the curve
    with pytest.raises(SessionRejected) as caught:
        open_session(key, bytes(godh), session.session, 1)
    assert caught.value.message.startswith("invalid GODH certificate: ")
    assert "not a point on its curve" in caught.value.message and "PDH" not in caught.value.message
