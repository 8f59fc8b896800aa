"""The secret-area rules: one reader of the firmware's SEV secret area (OVMF footer table), and every
place that registers or injects a secret refuses firmware whose area cannot hold the secret table."""

from __future__ import annotations

import base64
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from sevhook.sev.secret import SecretTable
from sevhook.sev.secret_area import NoSecretArea, check_injection_target, read_secret_area, require_secret_area

VECTORS = Path(__file__).resolve().parents[1] / "data" / "vectors"
AMDSEV = VECTORS / "sev-snp-measure" / "ovmf_AmdSev_suffix.bin"
OVMFX64 = VECTORS / "sev-snp-measure" / "ovmf_OvmfX64_suffix.bin"
SEVHOOK = [sys.executable, "-m", "sevhook.cli"]


def test_the_area_is_read_from_the_footer_table() -> None:
    area = read_secret_area(AMDSEV)
    assert area is not None and area.base != 0 and area.size == 0xC00
    stock = read_secret_area(OVMFX64)  # a stock build: the entry exists but is empty, as Debian's OVMF.fd
    assert stock is not None and (stock.base, stock.size) == (0, 0)
    assert read_secret_area(bytes(4096)) is None  # no footer table at all


def test_a_usable_area_is_accepted() -> None:
    assert require_secret_area(AMDSEV, 0xC00).size == 0xC00


@pytest.mark.parametrize(("firmware", "needed", "words"), [
    (OVMFX64, 64, "empty SEV launch-secret area"),
    (bytes(4096), 64, "has no SEV launch-secret area"),
    (AMDSEV, 0xC01, "smaller than the 3073-byte secret table"),
])
def test_an_unusable_area_is_refused_naming_the_firmware(firmware: Path | bytes, needed: int, words: str) -> None:
    with pytest.raises(NoSecretArea) as caught:
        require_secret_area(firmware, needed)
    message = caught.value.message
    assert words in message and "OvmfPkg/AmdSev" in message
    if isinstance(firmware, Path):
        assert str(firmware) in message


def test_injection_checks_the_loader_file() -> None:
    packet = base64.b64encode(bytes(96)).decode()
    check_injection_target(str(AMDSEV), packet)
    check_injection_target(None, packet)  # no <loader> path: nothing to read
    with pytest.raises(NoSecretArea, match="guest address 0x0"):
        check_injection_target(str(OVMFX64), packet)


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SEVHOOK, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_broker_add_guest_refuses_secrets_for_firmware_without_an_area(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "broker")]
    assert run("broker", "init", *data).returncode == 0
    passphrase = tmp_path / "pass"
    passphrase.write_text("correct horse\n")
    refused = run("broker", "add-guest", "stock", "--firmware", OVMFX64, "--disk-passphrase", passphrase, *data)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert str(OVMFX64) in refused.stderr and "OvmfPkg/AmdSev" in refused.stderr
    assert "stock" not in run("broker", "list-guests", *data).stdout
    big = tmp_path / "big"
    big.write_bytes(bytes(0xC00))  # the table's headers make it larger than the 0xC00-byte area
    refused = run("broker", "add-guest", "big", "--firmware", AMDSEV, "--secret", f"{uuid.uuid4()}:{big}", *data)
    assert refused.returncode != 0 and "secret" in refused.stderr
    accepted = run("broker", "add-guest", "amdsev", "--firmware", AMDSEV, "--disk-passphrase", passphrase, *data)
    assert accepted.returncode == 0, accepted.stderr
    assert len(SecretTable(((uuid.uuid4(), b"correct horse\0"),)).build()) < 0xC00
    # rolling the guest forward onto a firmware without an area is refused the same way, and changes nothing
    rolled = run("broker", "update-guest", "amdsev", "--add-firmware", OVMFX64, *data)
    assert rolled.returncode != 0 and str(OVMFX64) in rolled.stderr and "OvmfPkg/AmdSev" in rolled.stderr
    assert run("broker", "list-guests", "--json", *data).stdout.count('"digest"') == 1


def test_broker_add_guest_refuses_an_es_only_policy_without_vmsas(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path / "broker")]
    assert run("broker", "init", *data).returncode == 0
    refused = run("broker", "add-guest", "es", "--firmware", AMDSEV, "--policy", "0x5", *data)
    assert refused.returncode == 2 and "SEV-ES" in refused.stderr and "owner measure --mode seves" in refused.stderr
    mixed = run("broker", "add-guest", "mixed", "--firmware", AMDSEV, "--policy", "0x1", "--policy", "0x5", *data)
    assert mixed.returncode == 0, mixed.stderr  # the plain SEV digest serves the non-ES policy


def test_validate_warns_about_a_loader_without_a_secret_area(tmp_path: Path) -> None:
    def domain(loader: Path) -> Path:
        path = tmp_path / f"{loader.stem}.xml"
        path.write_text(f"""<domain type='kvm' xmlns:sevhook='http://sevhook.org/xmlns/libvirt/1.0'>
  <name>w</name><memory unit='MiB'>128</memory>
  <os><type arch='x86_64' machine='q35'>hvm</type><loader readonly='yes' type='pflash'>{loader}</loader></os>
  <launchSecurity type='sev'><policy>0x0003</policy></launchSecurity>
  <metadata><sevhook:attestation><sevhook:broker url='http://127.0.0.1:8700'/><sevhook:guest id='w'/>
  </sevhook:attestation></metadata>
</domain>""")
        return path

    stock = run("validate", domain(OVMFX64))
    assert stock.returncode == 0 and "warning" in stock.stdout + stock.stderr
    assert "OvmfPkg/AmdSev" in stock.stdout + stock.stderr
    amdsev = run("validate", domain(AMDSEV))
    assert "secret area" not in amdsev.stdout + amdsev.stderr
