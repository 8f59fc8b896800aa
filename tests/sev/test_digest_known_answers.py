"""Known answers for the launch digests: sevctl's measurement and VMSA vectors and sev-snp-measure's OVMF
footers (tests/data/vectors), checked through the crypto helper's measurement formula."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from sevhook.sev.cpu_types import CPU_TYPES, CpuModel, cpu_model
from sevhook.sev.kernel_hashes import KernelHashes, kernel_hashes_table
from sevhook.sev.launch_digest import measure_sev, sev_launch_digest, seves_launch_digest
from sevhook.sev.measurement import LaunchMeasurement, compute_measurement
from sevhook.sev.ovmf import GuestRegion, OvmfFooter, SnpSectionType
from sevhook.sev.vmsa import BSP_EIP, HostKernel, Vmsa, vcpu_vmsas

MNONCE = base64.b64decode("wxP6tRHCFrFQWxsuqZA8QA==")
MILAN = 0x00A00F11


@pytest.fixture()
def sevctl(shared: Path) -> Path:
    return shared / "vectors" / "sevctl"


@pytest.fixture()
def snp_fixtures(shared: Path) -> Path:
    return shared / "vectors" / "sev-snp-measure"


def _measure(sevctl: Path, launch_digest: bytes, policy: int) -> str:
    tik = (sevctl / "measurement_tik1.bin").read_bytes()
    return base64.b64encode(compute_measurement(tik, 1, 40, 40, policy, launch_digest, MNONCE)).decode()


def test_firmware_only_digest_is_sha256_of_the_image(sevctl: Path) -> None:
    firmware = sevctl / "OVMF.amdsev.trimmed.fd"
    digest = sev_launch_digest(firmware)
    assert digest == hashlib.sha256(firmware.read_bytes()).digest()
    expected = LaunchMeasurement.parse("oMDewIouJSpbpNRHj7Mk3p08H2dPZQdsZMU14qIymBnDE/q1EcIWsVBbGy6pkDxA")
    assert _measure(sevctl, digest, 0x03) == base64.b64encode(expected.measurement).decode()
    assert expected.mnonce == MNONCE


def test_firmware_bytes_and_path_agree(sevctl: Path) -> None:
    firmware = sevctl / "OVMF.amdsev.trimmed.fd"
    assert sev_launch_digest(firmware.read_bytes()) == sev_launch_digest(str(firmware))


def test_ovmfx64_digest(snp_fixtures: Path) -> None:
    digest = sev_launch_digest(snp_fixtures / "ovmf_OvmfX64_suffix.bin")
    assert digest.hex() == "b4c021e085fb83ceffe6571a3d357b4a98773c83c474e47f76c876708fe316da"


def test_sevctl_kernel_vector(sevctl: Path) -> None:
    digest = sev_launch_digest(
        sevctl / "OVMF.amdsev.trimmed.fd",
        kernel=sevctl / "measurement_vmlinuz-fake",
        initrd=sevctl / "measurement_initrd-fake",
        cmdline="foo bar baz fake kernel=cmdline",
    )
    assert _measure(sevctl, digest, 0x03) == "h3auYbWQnVW7EGLWN4Hf9SN0oEYMPU2sK4bLnefWPws="


def test_sevctl_seves_vector_from_files_and_built(sevctl: Path) -> None:
    firmware = sevctl / "OVMF.amdsev.trimmed.fd"
    vmsas = [sevctl / "vmsa0.bin"] + [sevctl / "vmsa1.bin"] * 3
    from_files = sev_launch_digest(firmware, vmsas=vmsas)
    built = seves_launch_digest(firmware, 4, cpu_model("EPYC-Milan").signature, host_kernel=HostKernel.OLD)
    assert from_files == built
    assert _measure(sevctl, built, 0x05) == "tsLCcIIPrm3TWcyaOFfvUVEjRLGQzEnGlznRioMOCU4="
    assert seves_launch_digest(firmware, 4, MILAN, host_kernel=HostKernel.V6_10) != built


def test_built_vmsas_equal_sevctl_pages(sevctl: Path) -> None:
    footer = OvmfFooter.read(sevctl / "OVMF.amdsev.trimmed.fd")
    bsp, ap = vcpu_vmsas(2, footer.require_reset_eip(), CpuModel(25, 1, 1).signature, 0, HostKernel.OLD)
    assert bsp.to_bytes() == (sevctl / "vmsa0.bin").read_bytes()
    assert ap.to_bytes() == (sevctl / "vmsa1.bin").read_bytes()
    assert Vmsa.parse((sevctl / "vmsa0.bin").read_bytes()) == bsp
    assert Vmsa.parse((sevctl / "vmsa1.bin").read_bytes()) == ap
    assert bsp.eip == BSP_EIP and ap.eip == 0x0080B004


def test_host_kernel_610_sets_only_mxcsr_and_fcw(sevctl: Path) -> None:
    old = (sevctl / "vmsa1.bin").read_bytes()
    new = Vmsa(0x0080B004, MILAN, 0, HostKernel.V6_10).to_bytes()
    differing = [offset for offset in range(4096) if old[offset] != new[offset]]
    assert differing == [0x408, 0x409, 0x410, 0x411]
    assert new[0x408:0x40C] == (0x1F80).to_bytes(4, "little") and new[0x410:0x412] == (0x037F).to_bytes(2, "little")
    assert Vmsa.parse(new).host_kernel is HostKernel.V6_10


def test_kernel_hashes_table(sevctl: Path) -> None:
    kernel, initrd = sevctl / "measurement_vmlinuz-fake", sevctl / "measurement_initrd-fake"
    table = kernel_hashes_table(kernel, initrd, "a b")
    assert len(table) == 176 and table[168:] == bytes(8)
    assert table[16:18] == (168).to_bytes(2, "little")
    parsed = KernelHashes.parse(table)
    assert parsed.kernel == hashlib.sha256(kernel.read_bytes()).digest()
    assert parsed.initrd == hashlib.sha256(initrd.read_bytes()).digest()
    assert parsed.cmdline == hashlib.sha256(b"a b\0").digest()
    assert parsed.to_bytes() == table
    no_initrd = KernelHashes.from_inputs(kernel)
    assert no_initrd.initrd == hashlib.sha256(b"").digest()
    assert no_initrd.cmdline == hashlib.sha256(b"\0").digest() == KernelHashes.from_inputs(kernel, None, "").cmdline
    page = parsed.page(0xC00)
    assert len(page) == 4096 and page[0xC00 : 0xC00 + 176] == table and not any(page[:0xC00])


def test_explain_components(sevctl: Path) -> None:
    firmware = sevctl / "OVMF.amdsev.trimmed.fd"
    result = measure_sev(firmware, sevctl / "measurement_vmlinuz-fake", cmdline="x",
                         vmsas=[sevctl / "vmsa0.bin"])
    names = [component.name for component in result.components]
    assert names == ["firmware", "kernel-hashes table", "VMSA 0"]
    assert result.components[0].digest == hashlib.sha256(firmware.read_bytes()).digest()
    assert result.explain()[-1].endswith(result.digest.hex())


def test_footers_of_the_fixtures(sevctl: Path, snp_fixtures: Path) -> None:
    trimmed = OvmfFooter.read(sevctl / "OVMF.amdsev.trimmed.fd")
    assert trimmed.hash_table == GuestRegion(0x80CC00, 0x400)
    assert trimmed.secret_area == GuestRegion(0x80C000, 0xC00)
    assert trimmed.reset_eip == 0x80B004 and trimmed.snp_sections == ()
    amdsev = OvmfFooter.read(snp_fixtures / "ovmf_AmdSev_suffix.bin")
    assert amdsev.hash_table == GuestRegion(0x810C00, 0x400)
    kinds = [section.kind for section in amdsev.snp_sections]
    assert kinds == [1, 1, 2, 3, 4, SnpSectionType.SNP_KERNEL_HASHES, 1]
    assert amdsev.snp_sections[5].gpa == 0x810000 and amdsev.snp_sections[5].size == 0x1000
    ovmfx64 = OvmfFooter.read(snp_fixtures / "ovmf_OvmfX64_suffix.bin")
    assert ovmfx64.hash_table is None and ovmfx64.secret_area is None and ovmfx64.reset_eip == 0x80B004
    assert SnpSectionType.SNP_KERNEL_HASHES not in [section.kind for section in ovmfx64.snp_sections]


def test_cpu_signatures() -> None:
    assert cpu_model("EPYC-v4").signature == 0x00800F12
    assert cpu_model("epyc-milan-v2").signature == MILAN
    assert cpu_model("EPYC-Rome").signature == 0x00830F10
    assert cpu_model("EPYC-Genoa").signature == 0x00A10F10
    assert cpu_model("EPYC-Turin").signature == 0x00B00F00
    assert CpuModel(6, 0x55, 7).signature == 0x00050657  # Intel-style family < 16: no extended family
    assert all(name.startswith("EPYC") for name in CPU_TYPES)
