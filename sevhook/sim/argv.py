"""Reading a real qemu-system-x86_64 command line: what a SEV launch needs from it (the sev-guest object,
read by sevhook.qemu_cmdline in JSON or key=value syntax; firmware, direct-boot inputs, vCPUs, -S, every
QMP monitor) and rewriting it for the real QEMU when the stand-in wraps one. Every other option is kept
and ignored; an -object QEMU would refuse is refused. Which options take an argument, and how key=value
lists split, come from sevhook.qemu_cmdline.options, shared with `sevhook cmdline --check`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from sevhook.errors import UsageError
from sevhook.qemu_cmdline.argv import OptionArg, object_id_of, parse_object_arg
from sevhook.qemu_cmdline.objects import SEV_GUEST, SEV_SNP_GUEST, ParsedObject, QemuObject
from sevhook.qemu_cmdline.options import MissingArgument, Option, iter_options, split_keyval_parts, unescape

PROG = "qemu-system-x86_64"

SIM_FLAGS = frozenset({"sim-standalone"})
SIM_OPTIONS = frozenset({"sim-qemu-version", "sim-state-dir", "sim-qemu-binary"})
# Options whose argument is kept exactly as given, and the QemuInvocation field that keeps it.
VERBATIM_OPTIONS = {
    "sim-qemu-version": "qemu_version", "sim-state-dir": "state_dir", "sim-qemu-binary": "qemu_binary",
    "uuid": "uuid", "bios": "firmware", "kernel": "kernel", "initrd": "initrd", "append": "append",
    "pidfile": "pidfile",
}
DEFAULT_BIOS = Path("/usr/share/qemu/bios-256k.bin")
MIB = 1 << 20
_SIZE_SUFFIX = {"": MIB, "b": 1, "k": 1 << 10, "m": MIB, "g": 1 << 30, "t": 1 << 40}


def parse_keyval(text: str, implied_key: str | None = None, what: str = "option") -> dict[str, str]:
    """QEMU's `key=value,...` syntax: `,,` is a literal comma, a bare first word is the implied key,
    other bare words are booleans (`server` = on, `nowait` = wait off)."""
    result: dict[str, str] = {}
    for position, escaped in enumerate(split_keyval_parts(text)):
        if not escaped:
            continue
        part = unescape(escaped)
        key, sep, value = part.partition("=")
        if not sep:
            if position == 0 and implied_key:
                result[implied_key] = part
            elif part.startswith("no") and len(part) > 2:
                result[part[2:]] = "off"
            else:
                result[part] = "on"
        else:
            result[key] = value
    return result


def parse_bool(value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in ("on", "yes", "true", "y"):
        return True
    if text in ("off", "no", "false", "n"):
        return False
    raise UsageError(f"{what}: {value!r} is not a boolean (use on or off)")


def parse_int(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise UsageError(f"{what}: expected a number, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value), 0)
    except ValueError as exc:
        raise UsageError(f"{what}: {value!r} is not a number") from exc


def _blockdev_properties(text: str) -> dict[str, object]:
    """A -blockdev argument in JSON (libvirt with QEMU >= 6.0) or key=value syntax."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"-blockdev {text[:60]!r}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(value, dict):
            raise UsageError("-blockdev: the JSON argument must be an object")
        return value
    return dict(parse_keyval(text, None, "-blockdev"))


@dataclass(frozen=True)
class SevGuestObject:
    """The `-object sev-guest,...` properties that drive a launch (QEMU defaults where absent)."""

    object_id: str
    policy: int = 0x1
    cbitpos: int | None = None
    reduced_phys_bits: int | None = None
    dh_cert_file: str | None = None
    session_file: str | None = None
    kernel_hashes: bool = False
    handle: int = 0

    @classmethod
    def from_object(cls, obj: QemuObject) -> SevGuestObject:
        """From sevhook.qemu_cmdline's reading, whose values are already typed and range-checked as
        QEMU checks them (either -object syntax)."""
        values = dict(obj.props)

        def number(key: str) -> int | None:
            return int(values[key]) if key in values else None

        def text(key: str) -> str | None:
            return str(values[key]) if key in values else None

        return cls(
            object_id=obj.id,
            policy=int(values.get("policy", 0x1)),
            cbitpos=number("cbitpos"),
            reduced_phys_bits=number("reduced-phys-bits"),
            dh_cert_file=text("dh-cert-file"),
            session_file=text("session-file"),
            kernel_hashes=bool(values.get("kernel-hashes", False)),
            handle=int(values.get("handle", 0)),
        )


@dataclass(frozen=True)
class MonitorSpec:
    """One QMP monitor: a listening unix socket by path, an inherited listening fd, or TCP."""

    option_index: int  # argv index of the value to rewrite (-qmp's spec or -chardev's options)
    option: str  # "qmp" or "chardev"
    chardev_id: str | None = None
    path: str | None = None
    fd: int | None = None
    host: str | None = None
    port: int | None = None
    pretty: bool = False

    def describe(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        if self.fd is not None:
            return f"fd={self.fd}"
        return f"tcp:{self.host}:{self.port}"


@dataclass
class QemuInvocation:
    """What the stand-in needs from one command line; `argv` keeps it whole for the real QEMU."""

    argv: list[str]
    name: str | None = None
    uuid: str | None = None
    sev: SevGuestObject | None = None
    sev_object_index: int | None = None
    confidential_guest_support: str | None = None
    machine_type: str | None = None
    firmware: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    vcpus: int = 1
    ram_bytes: int = 128 * MIB
    cpu_model: str | None = None
    start_paused: bool = False
    daemonize: bool = False
    pidfile: str | None = None
    monitors: list[MonitorSpec] = field(default_factory=list)
    standalone: bool = False
    qemu_version: str | None = None
    state_dir: str | None = None
    qemu_binary: str | None = None
    wants_help: bool = False

    @property
    def is_probe(self) -> bool:
        """libvirt's capability probe runs `-machine none`: no guest at all."""
        return self.machine_type == "none"


def split_options(argv: list[str]) -> list[Option]:
    """Every option of a stand-in command line (without the program name), its --sim-* ones included."""
    try:
        return list(iter_options(argv, extra_flags=SIM_FLAGS, extra_options=SIM_OPTIONS))
    except MissingArgument as exc:
        raise UsageError(f"{exc.token}: requires an argument ({PROG}: {exc.token}: requires an argument)") from exc


def _monitor_from_chardev_spec(text: str, index: int) -> MonitorSpec | None:
    """A -qmp argument: `unix:PATH[,server=on][,wait=off]`, `tcp:HOST:PORT,...`; others are not served."""
    backend, sep, rest = text.partition(":")
    if not sep:
        return None
    opts = parse_keyval(rest, "target", "-qmp")
    target = opts.get("target", "")
    if backend == "unix":
        _check_server(opts, f"-qmp {text}")
        return MonitorSpec(index, "qmp", path=target)
    if backend == "tcp":
        _check_server(opts, f"-qmp {text}")
        host, _, port = target.rpartition(":")
        return MonitorSpec(index, "qmp", host=host or "127.0.0.1", port=parse_int(port, f"-qmp {text}: port"))
    return None


def _check_server(opts: dict[str, str], what: str) -> None:
    if not parse_bool(opts.get("server", "off"), f"{what}: server"):
        raise UsageError(f"{what}: only listening monitors (server=on) are supported by the stand-in")


def parse_qemu_argv(argv: list[str]) -> QemuInvocation:  # noqa: PLR0912, PLR0915  (a branch per QEMU option)
    """Read a QEMU command line (without the program name)."""
    inv = QemuInvocation(argv=list(argv))
    objects: list[tuple[int, str]] = []
    blockdevs: dict[str, dict[str, object]] = {}
    chardevs: dict[str, tuple[int, dict[str, str]]] = {}
    control_chardevs: dict[str, bool] = {}
    pflash_drives: list[tuple[int, str]] = []
    machine: dict[str, str] = {}
    smp: dict[str, str] = {}
    for option in split_options(argv):
        index, name, value = option.index, option.name, option.value
        if name in ("version", "help", "h"):
            inv.wants_help = True
        elif name == "sim-standalone":
            inv.standalone = True
        elif value is None:
            if name == "S":
                inv.start_paused = True
            elif name == "daemonize":
                inv.daemonize = True
        elif name in VERBATIM_OPTIONS:
            setattr(inv, VERBATIM_OPTIONS[name], value)
        elif name == "name":
            inv.name = parse_keyval(value, "guest").get("guest")
        elif name == "object":
            objects.append((index, value))
        elif name == "blockdev":
            props = _blockdev_properties(value)
            if "node-name" in props:
                blockdevs[str(props["node-name"])] = props
        elif name in ("machine", "M"):
            machine.update(parse_keyval(value, "type", "-machine"))
        elif name == "drive":
            opts = parse_keyval(value, None, "-drive")
            if opts.get("if") == "pflash" and "file" in opts:
                pflash_drives.append((parse_int(opts.get("unit", len(pflash_drives)), "-drive unit"), opts["file"]))
        elif name == "smp":
            smp.update(parse_keyval(value, "cpus", "-smp"))
        elif name == "m":
            inv.ram_bytes = _memory_size(parse_keyval(value, "size", "-m").get("size", "128"))
        elif name == "cpu":
            inv.cpu_model = parse_keyval(value, "model", "-cpu").get("model")
        elif name in ("qmp", "qmp-pretty"):
            spec = _monitor_from_chardev_spec(value, index)
            if spec is not None:
                inv.monitors.append(replace(spec, pretty=name == "qmp-pretty"))
        elif name == "chardev":
            opts = parse_keyval(value, "backend", "-chardev")
            if "id" in opts:
                chardevs[opts["id"]] = (index, opts)
        elif name == "mon":
            opts = parse_keyval(value, "chardev", "-mon")
            if opts.get("mode") == "control" and "chardev" in opts:
                control_chardevs[opts["chardev"]] = parse_bool(opts.get("pretty", "off"), "-mon pretty")
    inv.machine_type = machine.get("type")
    inv.confidential_guest_support = machine.get("confidential-guest-support") or machine.get("memory-encryption")
    _resolve_sev(inv, objects)
    _resolve_firmware(inv, machine, blockdevs, pflash_drives)
    _resolve_monitors(inv, chardevs, control_chardevs)
    inv.vcpus = _vcpus(smp)
    return inv


def _resolve_sev(inv: QemuInvocation, objects: list[tuple[int, str]]) -> None:
    """Find the sev-guest object the machine points at; sevhook.qemu_cmdline reads -object in both
    syntaxes."""
    cgs = inv.confidential_guest_support
    if not objects:
        if cgs is not None:
            raise UsageError(f"-machine confidential-guest-support={cgs}: no -object with id {cgs!r}")
        return
    ids: set[str | None] = set()
    sev_guests: list[tuple[int, ParsedObject]] = []
    for index, text in objects:
        arg = OptionArg(index + 1, "-object", text)  # +1: messages count the program as argv[0]
        found = parse_object_arg(arg)
        ids.add(object_id_of(arg))
        if found is None:
            continue
        parsed = found[1]
        if parsed.obj.qom_type == SEV_SNP_GUEST:
            raise UsageError(
                "-object sev-snp-guest: the simulated platform implements SEV and SEV-ES only (no SNP); "
                "use <launchSecurity type='sev'>"
            )
        if parsed.obj.qom_type == SEV_GUEST:
            sev_guests.append((index, parsed))
    if cgs is None:
        return
    match = [(index, parsed) for index, parsed in sev_guests if parsed.obj.id == cgs]
    if not match:
        # a confidential-guest-support object of another kind (or none): QEMU would fail to find it
        if cgs not in ids:
            raise UsageError(f"-machine confidential-guest-support={cgs}: no -object with id {cgs!r}")
        return
    inv.sev_object_index, parsed = match[-1]
    if parsed.problems:
        raise UsageError(f"-object sev-guest,id={cgs}: {'; '.join(parsed.problems)} (QEMU refuses it)")
    inv.sev = SevGuestObject.from_object(parsed.obj)


def _blockdev_filename(node: object, blockdevs: dict[str, dict[str, object]], depth: int = 0) -> str | None:
    """Follow a -blockdev node (format over protocol) down to the file driver's filename."""
    if depth > 8:
        return None
    if isinstance(node, str):
        node = blockdevs.get(node)
    if not isinstance(node, dict):
        return None
    if "filename" in node:
        return str(node["filename"])
    return _blockdev_filename(node.get("file"), blockdevs, depth + 1)


def _resolve_firmware(
    inv: QemuInvocation,
    machine: dict[str, str],
    blockdevs: dict[str, dict[str, object]],
    pflash_drives: list[tuple[int, str]],
) -> None:
    if "pflash0" in machine:
        filename = _blockdev_filename(machine["pflash0"], blockdevs)
        if filename is None:
            raise UsageError(f"-machine pflash0={machine['pflash0']}: no -blockdev with that node-name and a filename")
        inv.firmware = filename
    elif pflash_drives:
        inv.firmware = sorted(pflash_drives)[0][1]


def _resolve_monitors(
    inv: QemuInvocation, chardevs: dict[str, tuple[int, dict[str, str]]], control: dict[str, bool]
) -> None:
    for chardev_id, pretty in control.items():
        if chardev_id not in chardevs:
            raise UsageError(f"-mon chardev={chardev_id}: no -chardev with id {chardev_id!r}")
        index, opts = chardevs[chardev_id]
        what = f"-chardev id={chardev_id}"
        if opts.get("backend") != "socket":
            continue  # a control monitor on stdio/pty/file: not served by the stand-in
        _check_server(opts, what)
        if "fd" in opts:
            spec = MonitorSpec(index, "chardev", chardev_id, fd=parse_int(opts["fd"], f"{what}: fd"), pretty=pretty)
        elif "path" in opts:
            spec = MonitorSpec(index, "chardev", chardev_id, path=opts["path"], pretty=pretty)
        elif "port" in opts:
            spec = MonitorSpec(index, "chardev", chardev_id, host=opts.get("host") or "127.0.0.1",
                               port=parse_int(opts["port"], f"{what}: port"), pretty=pretty)
        else:
            raise UsageError(f"{what}: a socket chardev needs path=, fd= or port=")
        inv.monitors.append(spec)
    inv.monitors.sort(key=lambda spec: spec.option_index)


def _memory_size(text: str) -> int:
    """-m sizes: a bare number is MiB; k/M/G/T suffixes as QEMU accepts them."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([bkKmMgGtT]?)", text.strip())
    if not match:
        raise UsageError(f"-m {text!r}: invalid RAM size (e.g. 512, 512M, 2G)")
    return int(float(match.group(1)) * _SIZE_SUFFIX[match.group(2).lower()])


def _vcpus(smp: dict[str, str]) -> int:
    if "cpus" in smp:
        return max(1, parse_int(smp["cpus"], "-smp cpus"))
    product = 1
    for key in ("sockets", "dies", "clusters", "cores", "threads"):
        if key in smp:
            product *= parse_int(smp[key], f"-smp {key}")
    return max(1, product)


def inherited_fds(argv: list[str]) -> set[int]:
    """Every file descriptor number the command line refers to (fd=N, fds=N:M, -add-fd fd=N)."""
    found: set[int] = set()
    for arg in argv:
        for match in re.finditer(r"(?:^|[,{\"])(?:fd|vhostfd)\"?[=:]\s*\"?(\d+)", arg):
            found.add(int(match.group(1)))
        for match in re.finditer(r"(?:^|,)(?:fds|vhostfds)=([\d:]+)", arg):
            found.update(int(part) for part in match.group(1).split(":") if part)
    return found
