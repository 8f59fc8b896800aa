"""sevhook.toml: loading and validation (sevhook.config), the argparse defaults every command takes
from it (flags win), `sevhook config show`, and the broker's data directory and database password
coming from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevhook import config
from sevhook.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent


def sevhook(*args: str | Path, config_file: Path | None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("SEVHOOK_CONFIG", "SEVHOOK_DB_PASSWORD")}
    if config_file is not None:
        environ["SEVHOOK_CONFIG"] = str(config_file)
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "sevhook.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=environ)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_without_a_file_every_value_is_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")  # the default file may be missing
    loaded = config.load(environ={})
    assert loaded.path is None
    assert {v.source for v in loaded.values.values()} == {"default"}
    assert loaded.get("broker.listen") == "127.0.0.1:8700"
    assert loaded.get("broker.data-dir") == (Path("/var/lib/sevhook/broker") if os.geteuid() == 0 else
                                             loaded.get("broker.data-dir"))


def test_file_values_override_defaults_and_name_their_source(tmp_path: Path) -> None:
    path = write(tmp_path / "s.toml", '[broker]\ndata-dir = "/srv/kbs"\n[host]\nbroker-url = "https://kbs:8700/"\n')
    loaded = config.load(environ={"SEVHOOK_CONFIG": str(path)})
    assert loaded.path == path
    assert loaded.get("broker.data-dir") == Path("/srv/kbs")
    assert loaded.source("broker.data-dir") == f"{path}: broker.data-dir"
    assert loaded.get("host.broker-url") == "https://kbs:8700"
    assert loaded.source("host.token-file") == "default"


@pytest.mark.parametrize(("text", "expected"), [
    ("[brokr]\n", "[brokr]: unknown section"),
    ('[broker]\ndatadir = "/x"\n', "broker.datadir: unknown key; [broker] takes data-dir"),
    ('[broker]\ndata-dir = "relative/dir"\n', "broker.data-dir: 'relative/dir' is relative"),
    ("[broker]\nlisten = 8700\n", "broker.listen: give a string"),
    ('[broker]\nlisten = "nowhere"\n', "broker.listen: 'nowhere': use ADDR:PORT"),
    ('[host]\nbroker-url = "kbs:8700"\n', "host.broker-url: 'kbs:8700' is not an http:// or https:// URL"),
    ('[broker]\ndatabase-url = "postgresql+psycopg://u:secret@db/x"\n', "the URL holds a password"),
    ("[broker\n", "not valid TOML"),
    ('data-dir = "/x"\n', "[data-dir]: unknown section"),
])
def test_bad_files_are_one_message_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "bad.toml", text)
    with pytest.raises(UsageError) as error:
        config.load(path)
    assert error.value.message.startswith(f"{path}: ") and expected in error.value.message
    assert "secret" not in error.value.message  # a password in a refused URL is never repeated


def test_a_chosen_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="configuration file not found"):
        config.load(environ={"SEVHOOK_CONFIG": str(tmp_path / "missing.toml")})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_any_file_loads_or_is_one_usage_error(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "f.toml"
    path.write_bytes(raw)
    try:
        loaded = config.load(path)
    except UsageError as error:
        assert error.message.startswith(str(path))
    else:
        assert set(loaded.values) == set(config.SETTINGS)


def test_config_show_prints_values_and_sources_never_the_password(tmp_path: Path) -> None:
    write(tmp_path / "pw", "hunter2-password\n")
    path = write(tmp_path / "s.toml", f'[broker]\nlisten = "0.0.0.0:8700"\npassword-file = "{tmp_path / "pw"}"\n')
    shown = sevhook("config", "show", config_file=path)
    assert shown.returncode == 0, shown.stderr
    assert f"file: {path} ($SEVHOOK_CONFIG)" in shown.stdout
    line = next(li for li in shown.stdout.splitlines() if li.startswith("broker.listen"))
    assert "0.0.0.0:8700" in line and f"{path}: broker.listen" in line
    assert "hunter2" not in shown.stdout
    as_json = json.loads(sevhook("config", "show", "--json", config_file=path).stdout)
    assert as_json["settings"]["broker.listen"] == {"value": "0.0.0.0:8700", "source": f"{path}: broker.listen",
                                                    "meaning": config.SETTINGS["broker.listen"].meaning}
    assert as_json["database_password"] == f"file {tmp_path / 'pw'}"
    bad = sevhook("config", "show", config_file=write(tmp_path / "bad.toml", "[host]\nmode = 1\n"))
    assert bad.returncode == 2 and bad.stderr.startswith(f"sevhook: error: {tmp_path / 'bad.toml'}: host.mode")


def test_broker_commands_take_the_data_dir_from_the_file_and_flags_win(tmp_path: Path) -> None:
    data = tmp_path / "kbs"
    path = write(tmp_path / "s.toml", f'[broker]\ndata-dir = "{data}"\n')
    before = sevhook("broker", "list-hosts", config_file=path)
    assert before.returncode == 2
    assert f"{data}: not an initialised broker data directory" in before.stderr
    assert f"the path came from {path}: broker.data-dir" in before.stderr
    assert sevhook("broker", "init", config_file=path).returncode == 0
    assert (data / "storage.key").exists()
    assert sevhook("broker", "add-host", "h1", "--token-file", tmp_path / "h1.token", config_file=path).returncode == 0
    assert sevhook("broker", "list-hosts", config_file=path).stdout.startswith("h1\tactive")
    other = sevhook("broker", "list-hosts", "--data-dir", tmp_path / "other", config_file=path)
    assert other.returncode == 2 and "the path came from flag --data-dir" in other.stderr
    assert not (tmp_path / "other").exists()  # a wrong directory is refused, never created


def test_a_required_option_comes_from_the_flag_or_the_file(tmp_path: Path) -> None:
    domain = write(tmp_path / "d.xml", "<domain type='kvm'><name>d</name></domain>")
    empty = write(tmp_path / "empty.toml", "")
    missing = sevhook("prepare-domain", domain, "--guest", "g", config_file=empty)
    assert missing.returncode == 2
    assert f"--broker is required: give it, or set broker-url in the [host] section of {empty}" in missing.stderr
    configured = write(tmp_path / "host.toml", '[host]\nbroker-url = "http://127.0.0.1:9"\n')
    later = sevhook("prepare-domain", domain, "--guest", "g", "--platform-export", tmp_path / "none",
                    config_file=configured)
    assert "--broker is required" not in later.stderr and "Traceback" not in later.stderr
    assert later.returncode != 0


def test_one_option_name_for_the_platform_export() -> None:
    from sevhook.cli import build_parser

    for command in (["start", "web1"], ["prepare-domain", "web1.xml", "--guest", "g"]):
        parsed = build_parser(command[0]).parse_args([*command, "--platform-export", "/x/export"])
        assert (getattr(parsed, "platform", None) or parsed.platform_export) == Path("/x/export")
    assert build_parser("start").parse_args(["start", "web1", "--platform", "/x/f"]).platform == Path("/x/f")


def test_the_platform_export_comes_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sevhook.cli import build_parser
    from sevhook.commands.arguments import apply_config

    monkeypatch.setenv("SEVHOOK_CONFIG", str(write(tmp_path / "s.toml",
                                                   '[host]\nplatform-export = "/var/lib/sevhook/platform"\n')))
    args = build_parser("start").parse_args(["start", "web1"])
    apply_config(args)
    assert args.platform == Path("/var/lib/sevhook/platform")
    assert args._config_sources["platform"] == f"{tmp_path / 's.toml'}: host.platform-export"
    prepared = build_parser("prepare-domain").parse_args(["prepare-domain", "d.xml", "--guest", "g", "-c", "qemu:///x",
                                                          "--broker", "http://127.0.0.1:1"])
    apply_config(prepared)
    assert prepared.platform_export is None  # -c chose libvirt: the file's export does not override it
    assert prepared._config_sources["broker"] == "flag --broker"


def test_the_host_mode_is_prepare_domains_default_and_the_flag_wins(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from sevhook.cli import build_parser
    from sevhook.commands.arguments import apply_config

    words = ["prepare-domain", "d.xml", "--guest", "g", "--broker", "http://127.0.0.1:1"]
    monkeypatch.setenv("SEVHOOK_CONFIG", str(write(tmp_path / "none.toml", "")))
    default = build_parser("prepare-domain").parse_args(words)
    apply_config(default)
    assert default.mode == "emulator"
    monkeypatch.setenv("SEVHOOK_CONFIG", str(write(tmp_path / "s.toml", '[host]\nmode = "hook"\n')))
    configured = build_parser("prepare-domain").parse_args(words)
    apply_config(configured)
    assert configured.mode == "hook" and configured._config_sources["mode"] == f"{tmp_path / 's.toml'}: host.mode"
    flagged = build_parser("prepare-domain").parse_args([*words, "--mode", "start"])
    apply_config(flagged)
    assert flagged.mode == "start"
    bad = sevhook("config", "show", config_file=write(tmp_path / "bad.toml", '[host]\nmode = "wrapper"\n'))
    assert bad.returncode == 2 and "host.mode" in bad.stderr and "emulator, hook, start" in bad.stderr
