"""The software secure processor: its own root of trust (ARK and ASK in AMD's RSA format, CEK, OCA, PEK
and PDH as SEV certificates, chained as on real parts), the platform commands (PLATFORM_STATUS,
PDH_CERT_EXPORT, GET_ID) and LAUNCH_START, which opens the owner's session and creates a guest context.

The ARK carries our own random key id, never AMD's, so a simulated chain can only be trusted through
an explicit trust anchor (its ARK file), never mistaken for real hardware."""

from __future__ import annotations

import base64
import os
import struct
import time
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sevhook.errors import SevhookError, UsageError
from sevhook.sev.certs import AmdCertificate, SevCertificate, Signature, Usage
from sevhook.sev.policy import SevPolicy
from sevhook.sev.session import SessionRejected, open_session
from sevhook.sev.sizes import CERT_CHAIN_SIZE, SEV_CERT_SIZE
from sevhook.sim.firmware_errors import FirmwareError, SevStatus
from sevhook.sim.guest import GuestContext, GuestRecorder
from sevhook.sim.state import StateDir

PLATFORM_ID_SIZE = 64
CONFIG_FILE = "platform.json"
CERT_FILES = {"ark": "ark.cert", "ask": "ask.cert", "cek": "cek.cert", "oca": "oca.cert", "pek": "pek.cert",
              "pdh": "pdh.cert"}
KEY_FILES = {"ark": "ark.key", "ask": "ask.key", "cek": "cek.key", "oca": "oca.key", "pek": "pek.key",
             "pdh": "pdh.key"}


class PlatformState:
    UNINIT = 0
    INIT = 1
    WORKING = 2


@dataclass(frozen=True)
class PlatformConfig:
    """What an owner may want to vary to rehearse against old and new firmware."""

    api_major: int = 1
    api_minor: int = 55
    build_id: int = 21
    es: bool = True
    cbitpos: int = 51
    reduced_phys_bits: int = 1
    max_guests: int = 509
    max_es_guests: int = 100

    def __post_init__(self) -> None:
        for name in ("api_major", "api_minor", "build_id"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFF:
                raise UsageError(f"platform {name.replace('_', '-')} {value} must be 0..255 (one byte)")
        if not 32 <= self.cbitpos <= 63:
            raise UsageError(f"cbitpos {self.cbitpos} must be 32..63")
        if not 0 <= self.reduced_phys_bits <= 63:
            raise UsageError(f"reduced-phys-bits {self.reduced_phys_bits} must be 0..63")

    @classmethod
    def from_json(cls, value: dict) -> PlatformConfig:
        known = {key: value[key] for key in cls.__dataclass_fields__ if key in value}
        return cls(**known)


@dataclass(frozen=True)
class PlatformStatus:
    """PLATFORM_STATUS (`sev_user_data_status`, 12 bytes as /dev/sev returns it)."""

    api_major: int
    api_minor: int
    state: int
    owner: int
    config_es: bool
    build_id: int
    guest_count: int

    @property
    def flags(self) -> int:
        return self.owner | (0x100 if self.config_es else 0)

    def to_bytes(self) -> bytes:
        return struct.pack("<BBBIBI", self.api_major, self.api_minor, self.state, self.flags, self.build_id,
                           self.guest_count)


@dataclass(frozen=True)
class PdhCertExport:
    """PDH_CERT_EXPORT's two buffers: the PDH and PEK||OCA||CEK."""

    pdh: bytes
    cert_chain: bytes


def unsigned_copy(certificate: bytes) -> bytes:
    """A SEV certificate with both signature slots emptied (the layout real firmware exports its CEK in)."""
    parsed = SevCertificate.parse(certificate, "CEK certificate")
    return replace(parsed, signatures=(Signature.empty(), Signature.empty())).to_bytes()


def _private_pem(key: object) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class RootOfTrust:
    """Freshly generated keys and certificates (kept in memory only until written)."""

    keys: dict[str, object] = field(repr=False)
    certs: dict[str, bytes] = field(repr=False)
    platform_id: bytes = field(repr=False)

    @classmethod
    def generate(cls, config: PlatformConfig, rsa_bits: int = 4096) -> RootOfTrust:
        if rsa_bits not in (2048, 4096):
            raise UsageError(f"--rsa-bits {rsa_bits}: AMD root certificates are RSA-2048 or RSA-4096")
        ark_key = rsa.generate_private_key(65537, rsa_bits)
        ask_key = rsa.generate_private_key(65537, rsa_bits)
        ec_keys = {name: ec.generate_private_key(ec.SECP384R1()) for name in ("cek", "oca", "pek", "pdh")}
        ark_id, ask_id = os.urandom(16), os.urandom(16)
        ark = AmdCertificate.build(ark_id, ark_id, Usage.ARK, ark_key.public_key()).sign(ark_key)
        ask = AmdCertificate.build(ask_id, ark_id, Usage.ASK, ask_key.public_key()).sign(ark_key)
        api = (config.api_major, config.api_minor)
        cek = SevCertificate.generate(Usage.CEK, ec_keys["cek"].public_key(), *api).sign(Usage.ASK, ask_key)
        oca = SevCertificate.generate(Usage.OCA, ec_keys["oca"].public_key(), *api).sign(Usage.OCA, ec_keys["oca"])
        pek = (
            SevCertificate.generate(Usage.PEK, ec_keys["pek"].public_key(), *api)
            .sign(Usage.OCA, ec_keys["oca"])
            .sign(Usage.CEK, ec_keys["cek"])
        )
        pdh = SevCertificate.generate(Usage.PDH, ec_keys["pdh"].public_key(), *api).sign(Usage.PEK, ec_keys["pek"])
        certs = {"ark": ark.to_bytes(), "ask": ask.to_bytes(), "cek": cek.to_bytes(), "oca": oca.to_bytes(),
                 "pek": pek.to_bytes(), "pdh": pdh.to_bytes()}
        keys: dict[str, object] = {"ark": ark_key, "ask": ask_key, **ec_keys}
        return cls(keys, certs, os.urandom(PLATFORM_ID_SIZE))

    def write(self, state: StateDir, config: PlatformConfig) -> None:
        for name, key in self.keys.items():
            state.write_private(KEY_FILES[name], _private_pem(key))
        for name, cert in self.certs.items():
            state.write_private(CERT_FILES[name], cert)
        state.write_private("platform_id.bin", self.platform_id)
        write_config(state, config)


def write_config(state: StateDir, config: PlatformConfig) -> None:
    state.write_json(CONFIG_FILE, {"version": 1, **asdict(config)})


def is_initialised(state: StateDir) -> bool:
    return state.exists(CONFIG_FILE) and all(state.exists(name) for name in CERT_FILES.values())


def init_platform(
    state: StateDir, config: PlatformConfig | None = None, force: bool = False, rsa_bits: int = 4096
) -> tuple[SoftwarePlatform, bool]:
    """Create the platform once (keys, certificates, id); later calls reuse it and, when `config` is
    given, only update the configuration. Returns (platform, created)."""
    with state.lock():
        created = force or not is_initialised(state)
        if created:
            config = config or PlatformConfig()
            RootOfTrust.generate(config, rsa_bits).write(state, config)
        elif config is not None:
            write_config(state, config)
    return SoftwarePlatform(state), created


def load_or_init(state: StateDir) -> SoftwarePlatform:
    """The platform of a state directory, created with defaults the first time (what the QEMU stand-in
    does when libvirt starts it with no chance to run `sevhook sim platform init` first)."""
    state.ensure()
    if is_initialised(state):
        return SoftwarePlatform(state)
    return init_platform(state)[0]


class SoftwarePlatform:
    """One simulated secure processor, backed by a state directory. Private keys are loaded lazily."""

    def __init__(self, state: StateDir, config: PlatformConfig | None = None) -> None:
        self.state = state
        self.config = config or PlatformConfig.from_json(state.read_json(CONFIG_FILE))

    def with_config(self, **changes: object) -> SoftwarePlatform:
        """The same keys with a different firmware version/ES setting, for this process only."""
        return SoftwarePlatform(self.state, replace(self.config, **changes))

    # certificates and ids ------------------------------------------------------------------------
    def cert(self, name: str) -> bytes:
        return self.state.read_bytes(CERT_FILES[name])

    @cached_property
    def platform_id(self) -> bytes:
        return self.state.read_bytes("platform_id.bin")

    def _private_key(self, name: str) -> object:
        try:
            return serialization.load_pem_private_key(self.state.read_bytes(KEY_FILES[name]), None)
        except ValueError as exc:
            raise SevhookError(f"{self.state.file(KEY_FILES[name])}: unreadable private key; "
                               "re-create the platform with `sevhook sim platform init --force`") from exc

    @cached_property
    def pdh_private_key(self) -> ec.EllipticCurvePrivateKey:
        return self._private_key("pdh")  # type: ignore[return-value]

    @cached_property
    def pek_private_key(self) -> ec.EllipticCurvePrivateKey:
        return self._private_key("pek")  # type: ignore[return-value]

    # platform commands ---------------------------------------------------------------------------
    def platform_status(self) -> PlatformStatus:
        guests = self.live_guest_count()
        return PlatformStatus(
            self.config.api_major, self.config.api_minor,
            PlatformState.WORKING if guests else PlatformState.INIT, 0, self.config.es, self.config.build_id, guests,
        )

    def pdh_cert_export(self, pdh_len: int = SEV_CERT_SIZE, chain_len: int = CERT_CHAIN_SIZE) -> PdhCertExport:
        """Buffers too small give INVALID_LEN with the lengths needed (QEMU asks once with zero lengths).
        The CEK comes out unsigned, as real firmware exports it: the ASK-signed copy is AMD's KDS's."""
        if pdh_len < SEV_CERT_SIZE or chain_len < CERT_CHAIN_SIZE:
            raise FirmwareError("PDH_CERT_EXPORT", SevStatus.INVALID_LEN,
                                f"needs {SEV_CERT_SIZE} and {CERT_CHAIN_SIZE} bytes",
                                (SEV_CERT_SIZE, CERT_CHAIN_SIZE))
        return PdhCertExport(self.cert("pdh"), self.cert("pek") + self.cert("oca") + self.unsigned_cek())

    def unsigned_cek(self) -> bytes:
        """The CEK as PDH_CERT_EXPORT returns it: both signature slots empty (usage 0x1000, algorithm 0,
        zeroed signature), the signed region unchanged so the PEK's CEK signature still verifies."""
        return unsigned_copy(self.cert("cek"))

    def signed_cek(self) -> bytes:
        """The ASK-signed CEK, what AMD's KDS serves for this chip id (`/cek/id/{chip id}`)."""
        return self.cert("cek")

    def get_id(self) -> bytes:
        return self.platform_id

    @property
    def chip_id_hex(self) -> str:
        """GET_ID as AMD's KDS names the chip in its URLs: upper-case hex (virtee's `Identifier`)."""
        return self.platform_id.hex().upper()

    def full_chain(self) -> bytes:
        """PDH||PEK||OCA||CEK||ASK||ARK with the KDS's signed CEK, as `sevctl export --full` writes it."""
        return b"".join(self.cert(name) for name in ("pdh", "pek", "oca", "cek", "ask", "ark"))

    def qmp_capabilities(self) -> dict[str, object]:
        """QEMU's query-sev-capabilities answer for this platform."""
        export = self.pdh_cert_export()
        return {
            "pdh": base64.b64encode(export.pdh).decode(),
            "cert-chain": base64.b64encode(export.cert_chain).decode(),
            "cpu0-id": base64.b64encode(self.get_id()).decode(),
            "cbitpos": self.config.cbitpos,
            "reduced-phys-bits": self.config.reduced_phys_bits,
        }

    # guests ---------------------------------------------------------------------------------------
    def allocate_handle(self) -> int:
        with self.state.lock():
            path = self.state.file("next_handle")
            handle = int(path.read_text()) if path.exists() else 1
            self.state.write_private("next_handle", f"{handle + 1}\n".encode())
        return handle

    def live_guest_count(self) -> int:
        return sum(1 for record in GuestRecorder.all(self.state) if record.get("alive"))

    def launch_start(
        self, policy: int, godh_cert: bytes | None, session: bytes | None, label: str | None = None,
        handle: int = 0,
    ) -> GuestContext:
        """LAUNCH_START: check the policy against this firmware, open the owner's session (or, with no
        GODH/session, make random TEK/TIK as the firmware does), and create a guest in LUPDATE."""
        if handle:
            raise FirmwareError("LAUNCH_START", SevStatus.INVALID_GUEST,
                                f"handle {handle} does not name an existing guest (key sharing is not simulated)")
        sev_policy = SevPolicy(policy)
        if sev_policy.es and not self.config.es:
            raise FirmwareError("LAUNCH_START", SevStatus.POLICY_FAILURE,
                                "policy requires SEV-ES but the platform's ES support is off")
        if (sev_policy.api_major, sev_policy.api_minor) > (self.config.api_major, self.config.api_minor):
            raise FirmwareError(
                "LAUNCH_START", SevStatus.POLICY_FAILURE,
                f"policy requires firmware API >= {sev_policy.api_major}.{sev_policy.api_minor}, "
                f"the platform runs {self.config.api_major}.{self.config.api_minor}",
            )
        if godh_cert is None or session is None:
            if godh_cert is not None or session is not None:
                raise FirmwareError("LAUNCH_START", SevStatus.INVALID_PARAM, "GODH and session must be given together")
            tek, tik = os.urandom(16), os.urandom(16)
            owner_session = False
        else:
            try:
                tek, tik = open_session(self.pdh_private_key, godh_cert, session, policy)
            except SessionRejected as exc:
                raise FirmwareError("LAUNCH_START", exc.fw_error, exc.message) from exc
            owner_session = True
        handle = self.allocate_handle()
        recorder = GuestRecorder(self.state, label or f"guest-{handle}", handle)
        return GuestContext(self, handle, policy, tek, tik, recorder, owner_session=owner_session,
                            started=time.time())
