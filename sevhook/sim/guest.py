"""One guest's launch context in the simulated firmware: the UNINIT -> LUPDATE -> LSECRET -> RUNNING state
machine, the launch digest over LAUNCH_UPDATE_DATA/VMSA, LAUNCH_MEASURE, LAUNCH_SECRET (MAC check against
this launch's measurement, decrypt, plaintext kept at the guest address), LAUNCH_FINISH and ATTESTATION.

What each guest received is persisted (0600, in the state directory) so that `sevhook sim secrets` can
prove a secret arrived intact after the QEMU stand-in has gone."""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import os
import re
import time
from typing import TYPE_CHECKING

from sevhook.errors import FormatError, VerificationError
from sevhook.sev.attestation import AttestationReport
from sevhook.sev.measurement import compute_measurement
from sevhook.sev.policy import SevPolicy
from sevhook.sev.secret import HEADER_SIZE, PacketHeader, SecretTable, unwrap_secret
from sevhook.sim.firmware_errors import FirmwareError, SevStatus
from sevhook.sim.state import StateDir

if TYPE_CHECKING:
    from sevhook.sim.platform import SoftwarePlatform

VMSA_SIZE = 4096
MNONCE_SIZE = 16
MAX_SECRET_SIZE = 16 * 1024 * 1024


class GuestState(enum.IntEnum):
    UNINIT = 0
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3

    @property
    def qmp_name(self) -> str:
        """The names QEMU's query-sev uses."""
        return {0: "uninit", 1: "launch-update", 2: "launch-secret", 3: "running"}[int(self)]


def _safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", label)[:100] or "guest"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


MAX_GUEST_RECORDS = 256  # records kept; a new guest's first write removes the oldest finished ones beyond it


class GuestRecorder:
    """Persists one guest's launch record as guests/<label>.json (the latest launch of that name)."""

    def __init__(self, state: StateDir, label: str, handle: int) -> None:
        self.state = state
        self.label = label
        self.record: dict = {"label": label, "handle": handle, "pid": os.getpid(), "secrets": []}

    @property
    def filename(self) -> str:
        return f"guests/{_safe_label(self.label)}.json"

    def update(self, **values: object) -> None:
        first = "updated" not in self.record
        self.record.update(values)
        self.record["updated"] = time.time()
        self.state.write_json(self.filename, self.record)
        if first:
            GuestRecorder.prune(self.state, keep=MAX_GUEST_RECORDS)

    @staticmethod
    def prune(state: StateDir, keep: int = 0, older_than: float | None = None) -> list[str]:
        """Remove the records of guests no longer running (ended, or their QEMU gone), newest `keep`
        excepted, and only those last updated more than `older_than` seconds ago; their labels."""
        records = GuestRecorder.all(state)
        if len(records) <= keep:
            return []
        finished = sorted((r for r in records if not r["alive"]), key=lambda r: r.get("updated", 0), reverse=True)
        now = time.time()
        removed = []
        for record in finished[max(0, keep - (len(records) - len(finished))):]:
            if older_than is not None and now - record.get("updated", 0) < older_than:
                continue
            (state.guests_dir / f"{_safe_label(str(record.get('label', '')))}.json").unlink(missing_ok=True)
            removed.append(str(record.get("label")))
        return removed

    @staticmethod
    def all(state: StateDir) -> list[dict]:
        """Every guest record, with `alive` = its QEMU process still exists and it was not torn down."""
        records = []
        if not state.guests_dir.is_dir():
            return records
        for path in sorted(state.guests_dir.glob("*.json")):
            try:
                record = state.read_json(f"guests/{path.name}")
            except Exception:  # noqa: BLE001  a record being replaced or damaged: skip it, it is only a report
                continue
            record["alive"] = not record.get("ended") and _pid_alive(int(record.get("pid", 0)))
            records.append(record)
        return records


class GuestContext:
    """A guest's firmware context. TEK and TIK never leave this object (nor appear in its repr)."""

    def __init__(
        self, platform: SoftwarePlatform, handle: int, policy: int, tek: bytes, tik: bytes,
        recorder: GuestRecorder, owner_session: bool, started: float,
    ) -> None:
        self.platform = platform
        self.handle = handle
        self.policy = policy
        self._tek = tek
        self._tik = tik
        self.recorder = recorder
        self.owner_session = owner_session
        self.state = GuestState.LUPDATE
        self._digest = hashlib.sha256()
        self.launch_digest: bytes | None = None
        self.measurement: bytes | None = None  # the 32-byte HMAC
        self.mnonce: bytes | None = None
        self.memory: dict[int, bytes] = {}  # guest physical address -> plaintext written by LAUNCH_SECRET
        self.updates: list[tuple[str, int]] = []
        config = platform.config
        self.api = (config.api_major, config.api_minor)
        self.build_id = config.build_id
        recorder.update(policy=policy, state=self.state.qmp_name, owner_session=owner_session, started=started,
                        api=f"{config.api_major}.{config.api_minor}", build_id=config.build_id)

    def __repr__(self) -> str:
        return f"GuestContext(handle={self.handle}, policy={self.policy:#x}, state={self.state.name})"

    @property
    def es(self) -> bool:
        return SevPolicy(self.policy).es

    def _require(self, command: str, *states: GuestState) -> None:
        if self.state not in states:
            wanted = " or ".join(state.name for state in states)
            raise FirmwareError(command, SevStatus.INVALID_GUEST_STATE,
                                f"guest {self.handle} is in {self.state.name}, {command} needs {wanted}")

    def _set_state(self, state: GuestState, **values: object) -> None:
        self.state = state
        self.recorder.update(state=state.qmp_name, **values)

    def launch_update_data(self, data: bytes, what: str = "data") -> None:
        """Measure (and, on hardware, encrypt in place) one buffer of initial guest memory."""
        self._require("LAUNCH_UPDATE_DATA", GuestState.LUPDATE)
        if not data:
            raise FirmwareError("LAUNCH_UPDATE_DATA", SevStatus.INVALID_LEN, "empty buffer")
        self._digest.update(data)
        self.updates.append((what, len(data)))

    def launch_update_vmsa(self, page: bytes) -> None:
        self._require("LAUNCH_UPDATE_VMSA", GuestState.LUPDATE)
        if not self.es:
            raise FirmwareError("LAUNCH_UPDATE_VMSA", SevStatus.POLICY_FAILURE, "the guest policy has no ES bit")
        if len(page) != VMSA_SIZE:
            raise FirmwareError("LAUNCH_UPDATE_VMSA", SevStatus.INVALID_LEN, f"a VMSA is {VMSA_SIZE} bytes")
        self._digest.update(page)
        self.updates.append(("vmsa", len(page)))

    def launch_measure(self) -> bytes:
        """measurement(32) || mnonce(16), with a fresh random mnonce; the guest moves to LSECRET."""
        self._require("LAUNCH_MEASURE", GuestState.LUPDATE)
        self.launch_digest = self._digest.digest()
        self.mnonce = os.urandom(MNONCE_SIZE)
        self.measurement = compute_measurement(self._tik, *self.api, self.build_id, self.policy,
                                               self.launch_digest, self.mnonce)
        blob = self.measurement + self.mnonce
        self._set_state(GuestState.LSECRET, launch_digest=self.launch_digest.hex(),
                        measurement=base64.b64encode(blob).decode(),
                        updates=[{"what": what, "length": length} for what, length in self.updates])
        return blob

    def launch_secret(self, header: bytes, ciphertext: bytes, guest_paddr: int, guest_len: int | None = None) -> bytes:
        """Check the header MAC against this launch's measurement, decrypt, keep the plaintext at
        guest_paddr. Returns the plaintext (for the caller's guest memory, never for logs)."""
        command = "LAUNCH_SECRET"
        self._require(command, GuestState.LSECRET)
        guest_len = len(ciphertext) if guest_len is None else guest_len
        if len(header) != HEADER_SIZE:
            raise FirmwareError(command, SevStatus.INVALID_LEN, f"the packet header is {HEADER_SIZE} bytes, "
                                f"got {len(header)}")
        if not ciphertext or len(ciphertext) > MAX_SECRET_SIZE:
            raise FirmwareError(command, SevStatus.INVALID_LEN, f"secret of {len(ciphertext)} bytes")
        if guest_len != len(ciphertext):
            raise FirmwareError(command, SevStatus.INVALID_LEN, "guest length differs from the transport length "
                                "(compressed secrets are not supported)")
        if not 0 <= guest_paddr < 1 << 52:
            raise FirmwareError(command, SevStatus.INVALID_ADDRESS, f"guest address {guest_paddr:#x}")
        if PacketHeader.parse(header).flags & ~0x1:
            raise FirmwareError(command, SevStatus.INVALID_PARAM, "reserved header flag bits are set")
        assert self.measurement is not None
        try:
            plaintext = unwrap_secret(self._tek, self._tik, self.measurement, header, ciphertext, *self.api,
                                      guest_length=guest_len)
        except VerificationError as exc:
            status = SevStatus.INVALID_PARAM if "COMPRESSED" in exc.message else SevStatus.BAD_MEASUREMENT
            raise FirmwareError(command, status, exc.message) from exc
        self.memory[guest_paddr] = plaintext
        self.recorder.record["secrets"].append(_describe_secret(plaintext, guest_paddr))
        self.recorder.update()
        return plaintext

    def launch_finish(self) -> None:
        self._require("LAUNCH_FINISH", GuestState.LSECRET)
        self._set_state(GuestState.RUNNING)

    def attestation(self, mnonce: bytes) -> bytes:
        """ATTESTATION: a report over the caller's mnonce and this launch, signed by the PEK."""
        self._require("ATTESTATION", GuestState.LSECRET, GuestState.RUNNING)
        if len(mnonce) != MNONCE_SIZE:
            raise FirmwareError("ATTESTATION", SevStatus.INVALID_LEN, f"mnonce is {MNONCE_SIZE} bytes")
        assert self.launch_digest is not None
        report = AttestationReport.build(mnonce, self.launch_digest, self.policy)
        return report.sign(self.platform.pek_private_key).to_bytes()

    def end(self) -> None:
        """The QEMU process is going away: mark the record so it no longer counts as a live guest."""
        with contextlib.suppress(OSError):
            self.recorder.update(ended=time.time())


def _describe_secret(plaintext: bytes, gpa: int) -> dict:
    """What `sevhook sim secrets` shows: the EFI secret table's GUIDs and lengths when it is one."""
    entry: dict = {"gpa": gpa, "length": len(plaintext), "received": time.time(),
                   "value_b64": base64.b64encode(plaintext).decode()}
    try:
        table = SecretTable.parse(plaintext)
    except FormatError as exc:
        entry["table"] = None
        entry["table_error"] = exc.message
    else:
        entry["table"] = [{"guid": str(guid), "length": len(data), "value_b64": base64.b64encode(data).decode()}
                          for guid, data in table.entries]
    return entry
