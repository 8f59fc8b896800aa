"""The software secure processor: root of trust, platform commands, guest state machine and error codes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct

import pytest

from sevhook.errors import UsageError, VerificationError
from sevhook.sev.attestation import AttestationReport
from sevhook.sev.certs import AmdCertificate, SevCertificate, Usage
from sevhook.sev.chain import CertificateChain
from sevhook.sev.measurement import compute_measurement
from sevhook.sev.roots import TrustAnchor, pinned_root
from sevhook.sev.secret import DISK_PASSPHRASE_GUID, SecretTable, wrap_secret
from sevhook.sim.firmware_errors import FirmwareError, SevStatus
from sevhook.sim.guest import GuestContext, GuestRecorder, GuestState
from sevhook.sim.platform import CERT_CHAIN_SIZE, SEV_CERT_SIZE, SoftwarePlatform, init_platform
from sevhook.sim.state import StateDir
from tests.sim.sim_support import make_session

POLICY = 0x1


def launched(platform: SoftwarePlatform, policy: int = POLICY, label: str = "unit",
             data: bytes = b"firmware" * 512) -> tuple[GuestContext, object, bytes]:
    session = make_session(platform, policy)
    guest = platform.launch_start(policy, session.godh_cert, session.session, label=label)
    guest.launch_update_data(data)
    blob = guest.launch_measure()
    return guest, session, blob


def secret_for(session: object, measurement32: bytes, platform: SoftwarePlatform, value: bytes = b"s3cret\0"):
    table = SecretTable(((DISK_PASSPHRASE_GUID, value),)).build()
    header, ciphertext = wrap_secret(session.tek, session.tik, measurement32, table,  # type: ignore[attr-defined]
                                     api_major=platform.config.api_major, api_minor=platform.config.api_minor)
    return header.to_bytes(), ciphertext


def test_chain_verifies_only_with_the_simulated_ark_as_anchor(platform: SoftwarePlatform) -> None:
    chain = CertificateChain.from_full(platform.full_chain())
    ark = AmdCertificate.parse(platform.cert("ark"))
    assert pinned_root(ark) is None  # our own key id, never AMD's
    report = chain.verify([TrustAnchor("sim", ark)])
    assert report.ok
    with pytest.raises(VerificationError):
        chain.verify([])


def test_certificates_carry_the_roles_and_signatures_of_a_real_platform(platform: SoftwarePlatform) -> None:
    pek = SevCertificate.parse(platform.cert("pek"))
    assert {slot.usage for slot in pek.signatures} == {Usage.OCA, Usage.CEK}
    cek = SevCertificate.parse(platform.cert("cek"))
    assert cek.signatures[0].usage == Usage.ASK
    pdh = SevCertificate.parse(platform.cert("pdh"))
    assert pdh.usage == Usage.PDH and (pdh.api_major, pdh.api_minor) == (1, 55)
    pdh.verify_signed_by(pek)


def test_platform_is_created_once_and_reused(tmp_path) -> None:
    state = StateDir(tmp_path / "s")
    first, created = init_platform(state, rsa_bits=2048)
    second, created_again = init_platform(state, rsa_bits=2048)
    assert created and not created_again
    assert first.cert("ark") == second.cert("ark") and first.get_id() == second.get_id()
    assert stat.S_IMODE(os.stat(state.path).st_mode) == 0o700
    for name in ("pdh.key", "pek.key", "ark.key"):
        assert stat.S_IMODE(os.stat(state.file(name)).st_mode) == 0o600


def test_state_directory_readable_by_others_is_refused(tmp_path) -> None:
    path = tmp_path / "open"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    with pytest.raises(UsageError, match="chmod 700"):
        StateDir(path).ensure()


def test_platform_status_and_get_id(platform: SoftwarePlatform) -> None:
    status = platform.platform_status()
    raw = status.to_bytes()
    assert len(raw) == 12
    api_major, api_minor, _state, flags, build, _count = struct.unpack("<BBBIBI", raw)
    assert (api_major, api_minor, build) == (1, 55, 21)
    assert flags & 0x100  # SEV-ES configured
    assert len(platform.get_id()) == 64


def test_pdh_cert_export_reports_the_lengths_it_needs(platform: SoftwarePlatform) -> None:
    with pytest.raises(FirmwareError) as info:
        platform.pdh_cert_export(0, 0)
    assert info.value.status == SevStatus.INVALID_LEN and info.value.lengths == (SEV_CERT_SIZE, CERT_CHAIN_SIZE)
    export = platform.pdh_cert_export()
    assert len(export.pdh) == SEV_CERT_SIZE and len(export.cert_chain) == CERT_CHAIN_SIZE


def test_launch_measurement_secret_and_finish(platform: SoftwarePlatform) -> None:
    data = os.urandom(8192)
    guest, session, blob = launched(platform, data=data, label="unit-ok")
    assert guest.state == GuestState.LSECRET
    expected = compute_measurement(session.tik, 1, 55, 21, POLICY, hashlib.sha256(data).digest(), blob[32:])
    assert blob[:32] == expected
    header, ciphertext = secret_for(session, blob[:32], platform)
    plaintext = guest.launch_secret(header, ciphertext, 0x80C000)
    assert guest.memory[0x80C000] == plaintext
    assert SecretTable.parse(plaintext).entries == ((DISK_PASSPHRASE_GUID, b"s3cret\0"),)
    guest.launch_finish()
    assert guest.state == GuestState.RUNNING
    record = next(r for r in GuestRecorder.all(platform.state) if r["label"] == "unit-ok")
    assert record["state"] == "running"
    assert record["secrets"][0]["table"][0]["guid"] == str(DISK_PASSPHRASE_GUID)
    assert record["secrets"][0]["table"][0]["length"] == 7


def test_each_measure_has_a_fresh_mnonce(platform: SoftwarePlatform) -> None:
    first = launched(platform)[2]
    second = launched(platform)[2]
    assert first[32:] != second[32:] and first[:32] != second[:32]


@pytest.mark.parametrize(
    ("tamper", "status"),
    [
        ("wrap_mac", SevStatus.BAD_SIGNATURE),
        ("policy", SevStatus.POLICY_FAILURE),
        ("godh", SevStatus.INVALID_CERTIFICATE),
        ("other_pdh", SevStatus.BAD_SIGNATURE),
    ],
)
def test_bad_sessions_are_refused_with_the_firmware_code(platform: SoftwarePlatform, tmp_path, tamper: str,
                                                         status: SevStatus) -> None:
    session = make_session(platform)
    godh, blob, policy = session.godh_cert, bytearray(session.session), POLICY
    if tamper == "wrap_mac":
        blob[0x40] ^= 1
    elif tamper == "policy":
        policy = 0x3
    elif tamper == "godh":
        godh = b"\x01" + bytes(SEV_CERT_SIZE - 1)
    else:
        other, _ = init_platform(StateDir(tmp_path / "other"), rsa_bits=2048)
        other_session = make_session(other)
        godh, blob = other_session.godh_cert, bytearray(other_session.session)
    with pytest.raises(FirmwareError) as info:
        platform.launch_start(policy, godh, bytes(blob))
    assert info.value.status == status
    assert info.value.command == "LAUNCH_START"


def test_policy_minimum_api_is_enforced(platform: SoftwarePlatform) -> None:
    too_new = POLICY | (1 << 16) | (56 << 24)  # requires API 1.56, platform runs 1.55
    session = make_session(platform, too_new)
    with pytest.raises(FirmwareError) as info:
        platform.launch_start(too_new, session.godh_cert, session.session)
    assert info.value.status == SevStatus.POLICY_FAILURE
    ok = POLICY | (1 << 16) | (55 << 24)
    session = make_session(platform, ok)
    assert platform.launch_start(ok, session.godh_cert, session.session).state == GuestState.LUPDATE


def test_es_policy_needs_es_support(platform: SoftwarePlatform) -> None:
    no_es = platform.with_config(es=False)
    session = make_session(platform, 0x5)
    with pytest.raises(FirmwareError) as info:
        no_es.launch_start(0x5, session.godh_cert, session.session)
    assert info.value.status == SevStatus.POLICY_FAILURE


def test_state_machine_refuses_commands_out_of_order(platform: SoftwarePlatform) -> None:
    session = make_session(platform)
    guest = platform.launch_start(POLICY, session.godh_cert, session.session)
    for call in (lambda: guest.launch_secret(bytes(52), b"x" * 16, 0), guest.launch_finish,
                 lambda: guest.attestation(bytes(16))):
        with pytest.raises(FirmwareError) as info:
            call()
        assert info.value.status == SevStatus.INVALID_GUEST_STATE
    with pytest.raises(FirmwareError) as info:
        guest.launch_update_vmsa(bytes(4096))  # policy without ES
    assert info.value.status == SevStatus.POLICY_FAILURE
    guest.launch_update_data(b"abc")
    guest.launch_measure()
    for call in (lambda: guest.launch_update_data(b"more"), guest.launch_measure):
        with pytest.raises(FirmwareError) as info:
            call()
        assert info.value.status == SevStatus.INVALID_GUEST_STATE
    guest.launch_finish()
    with pytest.raises(FirmwareError) as info:
        guest.launch_secret(bytes(52), b"x" * 16, 0)
    assert info.value.status == SevStatus.INVALID_GUEST_STATE


@pytest.mark.parametrize("tamper", ["iv", "mac", "ciphertext", "measurement", "length"])
def test_tampered_secrets_are_refused(platform: SoftwarePlatform, tamper: str) -> None:
    guest, session, blob = launched(platform)
    measurement = bytes(32) if tamper == "measurement" else blob[:32]
    header, ciphertext = secret_for(session, measurement, platform)
    header, ciphertext = bytearray(header), bytearray(ciphertext)
    if tamper == "iv":
        header[4] ^= 1
    elif tamper == "mac":
        header[0x20] ^= 1
    elif tamper == "ciphertext":
        ciphertext[0] ^= 1
    guest_len = len(ciphertext) + 16 if tamper == "length" else None
    with pytest.raises(FirmwareError) as info:
        guest.launch_secret(bytes(header), bytes(ciphertext), 0x1000, guest_len)
    expected = SevStatus.INVALID_LEN if tamper == "length" else SevStatus.BAD_MEASUREMENT
    assert info.value.status == expected
    assert not guest.memory and guest.state == GuestState.LSECRET


def test_inject_twice_keeps_both_and_the_latest_at_the_address(platform: SoftwarePlatform) -> None:
    guest, session, blob = launched(platform, label="unit-twice")
    for value in (b"first\0", b"second\0"):
        guest.launch_secret(*secret_for(session, blob[:32], platform, value), 0x2000)
    assert SecretTable.parse(guest.memory[0x2000]).entries[0][1] == b"second\0"
    record = next(r for r in GuestRecorder.all(platform.state) if r["label"] == "unit-twice")
    assert len(record["secrets"]) == 2


def test_old_firmware_uses_the_pre_0_17_forms(platform: SoftwarePlatform) -> None:
    old = platform.with_config(api_major=0, api_minor=16, build_id=3, es=False)
    guest, session, blob = launched(old)
    digest = hashlib.sha256(b"firmware" * 512).digest()
    assert blob[:32] == compute_measurement(session.tik, 0, 16, 3, POLICY, digest, blob[32:])
    header, ciphertext = secret_for(session, blob[:32], old)
    guest.launch_secret(header, ciphertext, 0x3000)


def test_attestation_report_is_signed_by_the_pek(platform: SoftwarePlatform) -> None:
    guest, _session, _blob = launched(platform)
    nonce = os.urandom(16)
    report = AttestationReport.parse(guest.attestation(nonce))
    report.verify(SevCertificate.parse(platform.cert("pek")))
    assert report.mnonce == nonce and report.policy == POLICY


def test_records_never_hold_session_keys(platform: SoftwarePlatform) -> None:
    guest, session, _blob = launched(platform, label="unit-keys")
    text = (platform.state.path / "guests" / "unit-keys.json").read_text()
    for key in (session.tek, session.tik):
        assert key.hex() not in text and json.dumps(list(key)) not in text
    assert "tek" not in repr(guest).lower()
