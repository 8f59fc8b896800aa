"""`sevhook completion`: the generated script is loaded into a real bash and asked to complete, as
bash's `complete` would; and every command's --help carries examples."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sevhook.cli import build_parser
from sevhook.commands.completion import command_table

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    result = subprocess.run([sys.executable, "-m", "sevhook", "completion", "bash"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("completion") / "sevhook.bash"
    path.write_text(result.stdout)
    return path


def complete(script: Path, *words: str, cwd: Path = ROOT) -> list[str]:
    """What bash offers for the last word of `sevhook WORDS...`."""
    program = (f"source {script}\n"
               "complete -p sevhook >/dev/null || exit 3\n"
               "COMP_WORDS=(sevhook \"$@\"); COMP_CWORD=$#; _sevhook; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    result = subprocess.run(["bash", "-c", program, "bash", *words], capture_output=True, text=True, cwd=cwd,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def test_commands_subcommands_and_options_complete(script: Path) -> None:
    assert complete(script, "bro") == ["broker"]
    assert set(complete(script, "")) >= {"broker", "status", "config", "completion", "doctor", "--help"}
    assert complete(script, "broker", "update-") == ["update-guest"]
    assert "--add-firmware" in complete(script, "broker", "update-guest", "web1", "--")
    assert complete(script, "config", "show", "--j") == ["--json"]
    assert complete(script, "broker", "--data-dir", "/tmp", "rot") == ["rotate-host-token"]


def test_an_option_value_completes_files(script: Path, tmp_path: Path) -> None:
    (tmp_path / "OVMF.new.fd").write_bytes(b"")
    assert complete(script, "broker", "update-guest", "web1", "--add-firmware", "OVMF", cwd=tmp_path) == ["OVMF.new.fd"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_loads_the_script() -> None:
    text = subprocess.run([sys.executable, "-m", "sevhook", "completion", "zsh"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60).stdout
    result = subprocess.run(["zsh", "-c", text + "\ncomplete -p sevhook"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_the_table_matches_the_parsers() -> None:
    table = command_table(build_parser())
    assert "broker update-guest" in table and "status" in table and "config show" in table
    words, options, with_value = table["broker update-guest"]
    assert words == [] and "--remove-digest" in options and "--remove-digest" in with_value
    assert "--help" in options and "--help" not in with_value


def test_every_command_has_examples_in_its_help() -> None:
    """Every leaf command's --help shows at least one example command line."""
    parser = build_parser()
    missing = []
    for path in command_table(parser):
        node = parser
        for word in path.split():
            node = next(a for a in node._actions if hasattr(a, "choices") and isinstance(a.choices, dict)
                        and word in a.choices).choices[word]
        has_children = any(a.__class__.__name__ == "_SubParsersAction" for a in node._actions)
        text = node.format_help()
        if not has_children and "example" not in text:
            missing.append(path or "sevhook")
    assert not missing, f"commands whose --help has no example: {missing}"


def test_the_stand_in_help_names_its_own_options() -> None:
    stand_in = Path(sys.executable).with_name("sevhook-sim-qemu")
    result = subprocess.run([str(stand_in), "--help"], capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("sevhook-sim-qemu: ")
    for option in ("--sim-state-dir", "--sim-qemu-binary", "--sim-standalone", "--sim-qemu-version"):
        assert option in result.stdout
