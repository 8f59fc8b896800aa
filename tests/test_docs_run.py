"""The shell commands in README.md and docs/*.md run as written.

Every ```sh (or bash, shell, console) block in the docs carries a mark on the line before it:

    <!-- docs-test: run -->           the block runs, line by line in one bash session (`set -e`,
                                      `pipefail`), in the document's scratch world; a failing line
                                      fails the test with the document's file and line
    <!-- docs-test: skip REASON -->   the block cannot run here (SEV hardware, installing into /etc or
                                      /usr/local, the hook in the shared libvirtd, a transcript with
                                      its output: ```console); REASON shows in pytest's summary

An unmarked block fails `test_every_shell_block_is_marked`, and so does a plain ``` block holding a
command (it must say ```sh, ```console or ```text), so a new example cannot slip by.

A document's runnable blocks run in order in its world (`DocsWorld`, one document at a time): a copy
of the software SEV platform (`sevhook sim platform init`) that the stand-in QEMU (`sevhook-sim-qemu`)
runs on, the test libvirtd (qemu:///system, shared: the domains the docs name get a unique prefix and
are destroyed and undefined afterwards) with the host's existing domain `web1` defined, the files the
docs name, and a scratch configuration file (`SEVHOOK_CONFIG`): its [host] section names the guest
owner's broker as the host sees it (`HostSide`, made once: TLS on loopback, this host's token, the
guests the host-side examples start, the simulated AMD KDS), its [broker] section the owner's own data
directory, which the docs' `sevhook broker init` creates. GIVEN holds what a document takes as done
before its first block. Background jobs a block starts (`sevhook broker serve ... &`) end with its bash
session, and before each block the world's domains are shut off (each block is an example of its own).
The docs' placeholders are rewritten by the one table in `substitutions`, no more."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sevhook.flow.firmware import demo_firmware, tampered
from sevhook.sim.kds import SimulatedKds

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DATA = ROOT / "tests" / "data"
STOCK_OVMF = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")  # Debian's ovmf package
VENV_BIN = Path(sys.executable).parent
SEVHOOK = [sys.executable, "-m", "sevhook"]
SHELL_LANGUAGES = {"sh", "bash", "shell", "console"}
MARK = re.compile(r"^<!-- docs-test: (?P<kind>run|skip)(?: (?P<reason>.+?))? -->$")
# a line of a plain (no language) block that is a command: such a block needs a language and a mark
COMMAND_LINE = re.compile(r"^\s*(\$ )?(sevhook|sevhook-sim-qemu|sevhook-qemu|virsh|sevctl)(\s|$)")
FENCE = re.compile(r"^(?P<indent> *)```(?P<language>[\w-]*)\s*$")
BLOCK_TIMEOUT = 240.0
RUN = secrets.token_hex(3)
PREFIX = f"docs-{RUN}-"  # of the libvirt domains and guest ids the docs name: libvirtd is shared
EXAMPLE_DOMAIN_MARK = "<!-- sevhook-example: software-platform-domain -->"
# the libvirt domains (and guest ids) the docs name; each becomes PREFIX + name
DOMAIN_NAMES = ("web1", "guest1")
DEFINED_DOMAINS = ("web1",)  # the host's existing domain (`virsh dumpxml web1`); guest1.xml is a new one
# what a document's examples take as done before them (its story starts in the middle), run in its
# world before its first block, rewritten like the blocks
GIVEN = {
    "docs/troubleshooting.md": "sevhook broker init\nsevhook broker add-guest web1 --firmware OVMF.amdsev.fd "
                               "--kernel vmlinuz --initrd initrd.img --cmdline 'console=ttyS0' --policy 0x3\n",
}


def substitutions(world: DocsWorld) -> list[tuple[re.Pattern[str], str]]:
    """The one table of rewrites from the docs' placeholders to the scratch world, applied in order
    to every runnable block and to the example files made from the docs. Each exists because the
    real thing cannot be used by a test on a shared machine:
    - the broker's public name and port: no name resolves here; the host's broker listens on loopback;
    - a broker listening on every interface: the test listens on loopback only, on a free port;
    - /etc/sevhook and /var/lib/sevhook: host-global; the world keeps them under its scratch root
      (the code itself is pointed there by SEVHOOK_CONFIG, SEVHOOK_SIM_DIR and SEVHOOK_STATUS_DIR);
    - /usr/local/bin/sevhook-sim-qemu: the installed stand-in; libvirtd runs emulators with an empty
      environment, so the world's stand-in is a script naming the scratch platform's state directory;
    - the domain names: libvirtd is shared, so each name gets a unique prefix."""
    table = [
        (re.escape("https://kbs.example.org:8700"), world.host_broker_url),
        (re.escape("0.0.0.0:8700"), f"127.0.0.1:{world.owner_port}"),
        (r"(?<![\w./-])/etc/sevhook/", f"{world.root}/etc/sevhook/"),
        (r"(?<![\w./-])/var/lib/sevhook/", f"{world.root}/var/lib/sevhook/"),
        (re.escape("/usr/local/bin/sevhook-sim-qemu"), str(world.standin)),
    ]
    table += [(rf"(?<![\w-]){name}(?![\w-])", PREFIX + name) for name in DOMAIN_NAMES]
    table += [(rf"(?<![\w-]){name}(?=[._])", PREFIX + name) for name in DOMAIN_NAMES]  # web1.xml, web1_VARS
    return [(re.compile(pattern), replacement) for pattern, replacement in table]


def rewrite(text: str, table: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, replacement in table:
        text = pattern.sub(lambda _match, value=replacement: value, text)
    return text


@dataclass(frozen=True)
class Block:
    """One fenced block: its document, the line of its opening fence, language, mark and text."""

    path: Path
    line: int
    language: str
    kind: str | None
    reason: str | None
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file (any indentation), with the mark on the line before it."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent = opening["indent"]
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        previous = lines[index - 1].strip() if index else ""
        mark = MARK.match(previous)
        body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[index + 1:end])
        blocks.append(Block(path, index + 1, opening["language"], mark["kind"] if mark else None,
                            mark["reason"] if mark else None, body + "\n"))
        index = end + 1
    return blocks


ALL_BLOCKS = [block for path in DOCS for block in read_blocks(path)]
SHELL_BLOCKS = [block for block in ALL_BLOCKS if block.language in SHELL_LANGUAGES]


def test_every_shell_block_is_marked() -> None:
    problems = []
    for block in ALL_BLOCKS:
        if block.language in SHELL_LANGUAGES and block.kind is None:
            problems.append(f"{block.where}: a ```{block.language} block without a mark: put "
                            "`<!-- docs-test: run -->` or `<!-- docs-test: skip REASON -->` on the line before it")
        elif block.kind is not None and block.language not in SHELL_LANGUAGES:
            problems.append(f"{block.where}: a docs-test mark before a ```{block.language or '(plain)'} block: "
                            f"only {', '.join(sorted(SHELL_LANGUAGES))} blocks run")
        elif block.kind == "skip" and not block.reason:
            problems.append(f"{block.where}: `docs-test: skip` needs a reason")
        elif not block.language and any(COMMAND_LINE.match(line) for line in block.text.splitlines()):
            problems.append(f"{block.where}: a plain ``` block with a command: make it ```sh with a docs-test mark, "
                            "```console for a transcript (command and output) or ```text for a synopsis")
        elif block.kind == "run" and block.language == "console":
            problems.append(f"{block.where}: a console block is a transcript with output: it cannot run")
    assert not problems, "\n".join(problems)


def test_the_marks_parse(tmp_path: Path) -> None:
    """The reader finds indented fences and marks, and leaves unmarked blocks unmarked."""
    doc = tmp_path / "doc.md"
    doc.write_text("text\n<!-- docs-test: skip needs SEV -->\n```sh\nsevhook doctor\n```\n\n"
                   "- item\n\n  ```sh\n  echo hi\n  ```\n<!-- docs-test: run -->\n```bash\ntrue\n```\n")
    found = read_blocks(doc)
    assert [(b.line, b.language, b.kind, b.reason, b.text) for b in found] == [
        (3, "sh", "skip", "needs SEV", "sevhook doctor\n"),
        (9, "sh", None, None, "echo hi\n"),
        (13, "bash", "run", None, "true\n"),
    ]


def bare_world(tmp_path: Path) -> DocsWorld:
    """A world with its directories and no services, for the runner's own tests."""
    world = DocsWorld(tmp_path / "world", "qemu:///system", HostSide(tmp_path / "host", broker_url="https://127.0.0.1:1"))
    world.work.mkdir(parents=True)
    return world


def test_a_failing_line_fails_its_block_and_is_named(tmp_path: Path) -> None:
    world = bare_world(tmp_path)
    result = run_block(Block(ROOT / "README.md", 1, "sh", "run", None, "true\nfalse | cat\necho never\n"), world)
    assert result.returncode == 1
    assert "line 2 of the block failed" in result.stderr and "never" not in result.stdout


def test_background_jobs_end_with_their_block(tmp_path: Path) -> None:
    world = bare_world(tmp_path)
    started = time.monotonic()
    result = run_block(Block(ROOT / "README.md", 1, "sh", "run", None, "sleep 300 &\necho $! > pid\n"), world)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    assert not Path(f"/proc/{(world.work / 'pid').read_text().strip()}").exists()


def test_the_substitutions(tmp_path: Path) -> None:
    world = bare_world(tmp_path)
    world.owner_port = 8123
    text = ("sevhook prepare-domain web1.xml --broker https://kbs.example.org:8700 --guest web1 "
            "--token-file /etc/sevhook/host1.token -o web1.prepared.xml\n"
            "sevhook broker serve --listen 0.0.0.0:8700 &  # not /x/var/lib/sevhook/ nor web10 or my-web1\n"
            "<loader>/var/lib/sevhook/OVMF.sim.fd</loader><emulator>/usr/local/bin/sevhook-sim-qemu</emulator>"
            "<nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>\n")
    assert rewrite(text, substitutions(world)) == (
        f"sevhook prepare-domain {PREFIX}web1.xml --broker https://127.0.0.1:1 --guest {PREFIX}web1 "
        f"--token-file {world.root}/etc/sevhook/host1.token -o {PREFIX}web1.prepared.xml\n"
        "sevhook broker serve --listen 127.0.0.1:8123 &  # not /x/var/lib/sevhook/ nor web10 or my-web1\n"
        f"<loader>{world.root}/var/lib/sevhook/OVMF.sim.fd</loader><emulator>{world.standin}</emulator>"
        f"<nvram>/var/lib/libvirt/qemu/nvram/{PREFIX}web1_VARS.fd</nvram>\n")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def must(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run([*SEVHOOK, *args], capture_output=True, text=True, timeout=180, env=env, cwd=cwd)
    assert result.returncode == 0, f"world set-up: sevhook {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


def example_domain() -> str:
    """docs/quickstart.md's complete domain for the software platform, as written."""
    text = (ROOT / "docs" / "quickstart.md").read_text()
    match = re.search(rf"{re.escape(EXAMPLE_DOMAIN_MARK)}\n```xml\n(.*?)```", text, re.DOTALL)
    assert match, f"docs/quickstart.md: no ```xml block after {EXAMPLE_DOMAIN_MARK}"
    return match.group(1)


@dataclass
class HostSide:
    """What every document's world shares, made once: the software platform's state (copied into each
    world), what the host exported from the stand-in (its CEK unsigned, as real firmware's), the
    simulated AMD KDS, and the guest owner's broker as the host sees it: TLS on loopback, this host's
    token, the simulated platform's root, and the guests the host-side examples start, registered with
    the example domain's firmware."""

    root: Path
    broker_url: str = ""
    kds: SimulatedKds | None = None
    broker: subprocess.Popen[bytes] | None = None

    @property
    def sim(self) -> Path:
        return self.root / "sim"

    @property
    def platform(self) -> Path:
        return self.root / "platform"

    @property
    def token(self) -> Path:
        return self.root / "host1.token"

    @property
    def ca(self) -> Path:
        return self.root / "broker" / "tls" / "ca.crt"

    @property
    def sim_ca(self) -> Path:
        return self.root / "sim-export" / "ask_ark.cert"

    def create(self) -> None:
        env = {**os.environ, "SEVHOOK_CONFIG": str(self.root / "none.toml")}
        (self.root / "none.toml").write_text("")
        must("sim", "platform", "init", "--state-dir", str(self.sim), "--rsa-bits", "2048", env=env)
        standin = self.root / "sevhook-sim-qemu"
        standin.write_text(f"#!/bin/sh\nexec {VENV_BIN / 'sevhook-sim-qemu'} --sim-state-dir {self.sim} \"$@\"\n")
        standin.chmod(0o755)
        must("platform", "export", "--emulator", str(standin), "--out-dir", str(self.platform), env=env)
        must("sim", "platform", "export", "--state-dir", str(self.sim), "--out-dir", str(self.sim_ca.parent), env=env)
        self.kds = SimulatedKds([self.sim]).start()
        data = ["--data-dir", str(self.root / "broker")]
        must("broker", "init", "--tls", *data, env=env)
        must("broker", "add-root", "docs-sim", "--ca", str(self.sim_ca), "--test", *data, env=env)
        must("broker", "add-host", "docs-host", "--token-file", str(self.token), *data, env=env)
        firmware = self.root / "OVMF.sim.fd"
        must("sim", "firmware", "--out", str(firmware), env=env)  # the example domain's <loader>
        for name in DOMAIN_NAMES:
            must("broker", "add-guest", PREFIX + name, "--firmware", str(firmware), "--policy", "0x3", *data, env=env)
        port = free_port()
        with open(self.root / "broker.log", "wb") as log:
            self.broker = subprocess.Popen(
                [*SEVHOOK, "broker", "serve", "--listen", f"127.0.0.1:{port}", "--rate-limit", "0", "--kds-url",
                 self.kds.url, *data], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert self.broker.poll() is None and time.monotonic() < deadline, \
                    (self.root / "broker.log").read_text()
                time.sleep(0.05)
        self.broker_url = f"https://127.0.0.1:{port}"

    def close(self) -> None:
        try:
            if self.kds is not None:
                self.kds.stop()
            if self.broker is not None:
                self.broker.terminate()
                try:
                    self.broker.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.broker.kill()
                    self.broker.wait(timeout=10)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class DocsWorld:
    """One document's scratch world (see the module's docstring); one at a time, since the domain names
    are the same in every document."""

    root: Path
    libvirt_uri: str
    host: HostSide
    owner_port: int = 0
    domains: list[str] = field(default_factory=list)
    disks: list[Path] = field(default_factory=list)

    @property
    def host_broker_url(self) -> str:
        return self.host.broker_url

    @property
    def work(self) -> Path:
        """The blocks' working directory, holding the files the docs name."""
        return self.root / "work"

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "sevhook"

    @property
    def var(self) -> Path:
        return self.root / "var" / "lib" / "sevhook"

    @property
    def standin(self) -> Path:
        return self.root / "bin" / "sevhook-sim-qemu"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PATH": f"{self.root / 'bin'}:{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                "SEVHOOK_CONFIG": str(self.etc / "sevhook.toml"), "SEVHOOK_SIM_DIR": str(self.var / "sim"),
                "SEVHOOK_STATUS_DIR": str(self.var / "status"), "LIBVIRT_DEFAULT_URI": self.libvirt_uri}

    def create(self) -> None:
        for directory in (self.work, self.etc, self.var, self.root / "bin"):
            directory.mkdir(parents=True, mode=0o700)
        self.owner_port = free_port()
        sim = self.var / "sim"
        shutil.copytree(self.host.sim, sim)  # the same platform (keys, chip id) as the host's export
        shutil.copytree(self.host.platform, self.var / "platform")
        shutil.copy(self.host.token, self.etc / "host1.token")
        shutil.copy(self.host.ca, self.etc / "kbs-ca.pem")
        (self.etc / "sevhook.toml").write_text(f"""[broker]
data-dir = "{self.var / 'broker'}"
listen = "127.0.0.1:{self.owner_port}"
kds-url = "{self.host.kds.url if self.host.kds else 'none'}"

[host]
broker-url = "{self.host_broker_url}"
token-file = "{self.etc / 'host1.token'}"
ca-file = "{self.etc / 'kbs-ca.pem'}"
platform-export = "{self.var / 'platform'}"
""")
        self.standin.write_text(f"#!/bin/sh\nexec {VENV_BIN / 'sevhook-sim-qemu'} --sim-state-dir {sim} \"$@\"\n")
        self.standin.chmod(0o755)
        self._write_files()
        self._define_example_domains()

    def _write_files(self) -> None:
        """The files the docs' examples name, in the working directory."""
        firmware = demo_firmware()
        (self.work / "OVMF.amdsev.fd").write_bytes(firmware)
        (self.work / "OVMF.amdsev.new.fd").write_bytes(tampered(firmware))
        shutil.copy(STOCK_OVMF, self.work / "OVMF.fd")  # a stock OVMF build: no secret or kernel-hashes area
        (self.work / "vmlinuz").write_bytes(b"docs kernel " * 4096)
        (self.work / "initrd.img").write_bytes(b"docs initrd " * 8192)
        for name, text in (("luks.pass", "docs passphrase\n"), ("luks.new.pass", "new docs passphrase\n"),
                           ("api-token.txt", "docs api token"), ("extra.bin", "extra secret")):
            (self.work / name).write_text(text)
            (self.work / name).chmod(0o600)
        roots = DATA / "vectors" / "amd-roots"
        (self.work / "ask_ark_milan.cert").write_bytes((roots / "milan_ask.cert").read_bytes()
                                                      + (roots / "milan_ark.cert").read_bytes())
        shutil.copy(self.host.sim_ca, self.work / "sim-ask-ark.cert")  # docs/broker.md's test root
        golden = DATA / "libvirt-golden"  # docs/cmdline.md's guest: libvirt's own SEV test domain
        shutil.copy(golden / "launch-security-sev.xml", self.work / "guest.xml")
        shutil.copy(golden / "launch-security-sev.x86_64-6.0.0.args", self.work / "guest.args")
        (self.work / "caps.xml").write_text(self.virsh("domcapabilities", "--emulatorbin", str(self.standin)).stdout)

    def _define_example_domains(self) -> None:
        """The quickstart's complete software-platform domain under each name the docs use, as a file
        NAME.xml with its firmware and disk; the host's existing ones defined."""
        table = substitutions(self)
        for name in DOMAIN_NAMES:
            text = rewrite(example_domain().replace("<name>web1</name>", f"<name>{name}</name>")
                           .replace("web1.img", f"{name}.img").replace("web1_VARS", f"{name}_VARS"), table)
            (self.work / f"{PREFIX}{name}.xml").write_text(text)
            loader = re.search(r"<loader[^>]*>([^<]+)</loader>", text)
            assert loader, "the example domain has no <loader>"
            shutil.copy(self.host.root / "OVMF.sim.fd", loader.group(1))  # what `sevhook sim firmware` wrote
            disk = re.search(r"<source file='([^']+)'", text)
            if disk:
                self.disks.append(Path(disk.group(1)))
                Path(disk.group(1)).parent.mkdir(parents=True, exist_ok=True)
                with open(disk.group(1), "wb") as image:  # a sparse raw disk
                    image.truncate(64 << 20)
            self.domains.append(PREFIX + name)
            if name in DEFINED_DOMAINS:
                self.virsh("define", str(self.work / f"{PREFIX}{name}.xml"))

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["virsh", "-c", self.libvirt_uri, *args], capture_output=True, text=True,
                                timeout=120)
        assert not check or result.returncode == 0, f"virsh {' '.join(args)}: {result.stderr.strip()}"
        return result

    def shut_off_domains(self) -> None:
        for name in self.domains:
            if self.virsh("domstate", name, check=False).stdout.strip() not in ("shut off", ""):
                self.virsh("destroy", name, check=False)

    def close(self) -> None:
        """Domains destroyed and undefined (with their NVRAM), disks removed, files removed; background
        jobs of the blocks ended with their bash sessions."""
        try:
            self.shut_off_domains()
            for name in self.domains:
                self.virsh("undefine", name, "--nvram", check=False)
            for disk in self.disks:
                disk.unlink(missing_ok=True)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


SCRIPT_HEADER = """set -eo pipefail
trap 'echo "docs-test: line $((LINENO - {offset})) of the block failed with status $?: $BASH_COMMAND" >&2' ERR
trap 'jobs -p | xargs -r kill 2>/dev/null; wait' EXIT
"""


def run_block(block: Block, world: DocsWorld) -> subprocess.CompletedProcess[str]:
    """The block, rewritten, as one bash session in the world's working directory."""
    header = SCRIPT_HEADER.format(offset=SCRIPT_HEADER.count("\n"))
    script = world.root / f"block-{block.line}.sh"
    script.write_text(header + rewrite(block.text, substitutions(world)))
    return subprocess.run(["bash", str(script)], cwd=world.work, env=world.env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT)


@pytest.fixture(scope="module")
def host_side(libvirt_uri: str) -> Iterator[HostSide]:
    host = HostSide(Path(tempfile.mkdtemp(prefix="sevhook-docs-host-", dir="/tmp")))
    try:
        host.create()
        yield host
    finally:
        host.close()


@pytest.fixture(scope="module")
def worlds(host_side: HostSide) -> Iterator[dict[Path, DocsWorld]]:
    """The current document's world (the previous one is closed when the next document starts)."""
    made: dict[Path, DocsWorld] = {}
    try:
        yield made
    finally:
        for world in made.values():
            world.close()


def world_for(block: Block, worlds: dict[Path, DocsWorld], host: HostSide, libvirt_uri: str) -> DocsWorld:
    if block.path not in worlds:
        for previous in list(worlds):
            worlds.pop(previous).close()
        root = Path(tempfile.mkdtemp(prefix=f"sevhook-docs-{block.path.stem}-", dir="/tmp"))
        world = DocsWorld(root, libvirt_uri, host)
        try:
            world.create()
        except BaseException:
            world.close()  # a half-made world is not reused by the document's next block
            raise
        worlds[block.path] = world
        name = str(block.path.relative_to(ROOT))
        if name in GIVEN:
            given = run_block(Block(block.path, 0, "sh", "run", None, GIVEN[name]), world)
            assert given.returncode == 0, f"{name}: what its examples take as done failed: {given.stderr}"
    return worlds[block.path]


@pytest.mark.libvirt
@pytest.mark.timeout(900)
@pytest.mark.parametrize("block", [b for b in SHELL_BLOCKS if b.kind in ("run", "skip")], ids=lambda b: b.where)
def test_the_docs_commands_run(block: Block, worlds: dict[Path, DocsWorld], host_side: HostSide,
                               libvirt_uri: str) -> None:
    if block.kind == "skip":
        pytest.skip(f"{block.where}: {block.reason}")
    world = world_for(block, worlds, host_side, libvirt_uri)
    world.shut_off_domains()
    result = run_block(block, world)
    assert result.returncode == 0, (f"{block.where}: the block fails as written (status {result.returncode})\n"
                                    f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}")
