"""model -> argv -> model is the identity, over generated models and every fixture; the parsers
raise nothing but SevhookError on arbitrary input."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevhook.errors import SevhookError
from sevhook.qemu_cmdline import json_syntax, keyval
from sevhook.qemu_cmdline.argv import argv_from_text, read_launch_security
from sevhook.qemu_cmdline.domain_input import load_for_cmdline
from sevhook.qemu_cmdline.platform import ExplicitValues, fill_platform
from sevhook.qemu_cmdline.translate import CmdlineOptions, translate
from sevhook.sev.policy import SevPolicy, SnpPolicy
from sevhook.xml.models import Domain, S390PvLaunchSecurity, SevLaunchSecurity, SevSnpLaunchSecurity, TdxLaunchSecurity

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "valid"
uint32 = st.integers(0, 0xFFFF_FFFF)
tristate = st.sampled_from([None, True, False])
blob = st.none() | st.text(min_size=1, max_size=40)  # any text, commas and quotes included

sev_models = st.builds(
    SevLaunchSecurity,
    policy=st.builds(SevPolicy, uint32),
    cbitpos=uint32,
    reduced_phys_bits=uint32,
    dh_cert=blob,
    session=blob,
    kernel_hashes=tristate,
)
snp_models = st.builds(
    SevSnpLaunchSecurity,
    policy=st.builds(SnpPolicy, st.integers(0, 2**64 - 1)),
    cbitpos=uint32,
    reduced_phys_bits=uint32,
    kernel_hashes=tristate,
    author_key=tristate,
    vcek=tristate,
    guest_visible_workarounds=blob,
    id_block=blob,
    id_auth=blob,
    host_data=blob,
)
models = sev_models | snp_models | st.just(S390PvLaunchSecurity())
names = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=40)


def argv_and_back(domain: Domain, options: CmdlineOptions, model: object = None) -> tuple[list[str], object]:
    translation = translate(domain, options, model)  # type: ignore[arg-type]
    files = {str(path): text for path, text in translation.files.items()}
    argv = ["/usr/bin/qemu-system-x86_64", "-S", "-machine", "q35,usb=off", *translation.argv, "-msg", "timestamp=on"]
    return argv, read_launch_security(argv, files)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=models, name=names, domain_id=st.none() | st.integers(-1, 10**6),
       syntax=st.sampled_from(["json", "keyval"]))
def test_model_argv_model_identity(model, name: str, domain_id: int | None, syntax: str) -> None:  # type: ignore[no-untyped-def]
    domain = Domain(name=name, type="kvm", id=domain_id, launch_security=model)
    _argv, found = argv_and_back(domain, CmdlineOptions(syntax=syntax))  # type: ignore[arg-type]
    assert found.model == model, found.problems  # type: ignore[attr-defined]
    assert found.problems == ()  # type: ignore[attr-defined]


@settings(max_examples=100, deadline=None)
@given(model=sev_models.filter(lambda m: m.kernel_hashes is None), name=names)
def test_libvirt4_compat_round_trip(model: SevLaunchSecurity, name: str) -> None:
    domain = Domain(name=name, type="kvm", launch_security=model)
    _, found = argv_and_back(domain, CmdlineOptions(libvirt4_compat=True))
    assert found.model == model  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(model=models, name=names)
def test_object_text_reformats_to_itself(model, name: str) -> None:  # type: ignore[no-untyped-def]
    domain = Domain(name=name, type="kvm", launch_security=model)
    text = translate(domain).object_text
    parsed = json_syntax.parse_object(text)
    assert parsed is not None and json_syntax.format_object(parsed.obj) == text
    ktext = translate(domain, CmdlineOptions(syntax="keyval")).object_text
    kparsed = keyval.parse_object(ktext)
    assert kparsed is not None and keyval.format_object(kparsed.obj) == ktext


def fixture_files() -> list[Path]:
    return sorted(FIXTURES.glob("*.xml")) if FIXTURES.is_dir() else []


def test_fixtures_are_there() -> None:
    assert fixture_files(), f"{FIXTURES} has no fixtures"


@pytest.mark.parametrize("path", fixture_files(), ids=lambda p: p.name)
def test_every_valid_fixture_round_trips(path: Path) -> None:
    try:
        loaded = load_for_cmdline(path)
    except SevhookError as exc:
        # the only reason a valid fixture has nothing to translate
        assert "no <launchSecurity>" in exc.message, exc.message
        return
    if isinstance(loaded.launch_security, TdxLaunchSecurity):
        with pytest.raises(SevhookError, match="'tdx' is not supported"):
            translate(loaded.domain)
        return
    model, _ = fill_platform(loaded.launch_security, ExplicitValues(51, 1))
    for options in (CmdlineOptions(), CmdlineOptions(syntax="keyval")):
        _, found = argv_and_back(loaded.domain, options, model)
        expected = model if not isinstance(model, SevLaunchSecurity) else _without_handle(model)
        assert found.model == expected  # type: ignore[attr-defined]


def _without_handle(model: SevLaunchSecurity) -> SevLaunchSecurity:
    """libvirt never passes <handle> to QEMU, so it cannot come back from the argv."""
    import dataclasses

    return dataclasses.replace(model, handle=None)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_object_parsers_raise_only_sevhook_errors(text: str) -> None:
    for parse in (json_syntax.parse_object, keyval.parse_object):
        try:
            parse(text)
        except SevhookError:
            pass


@settings(max_examples=300, deadline=None)
@given(argv=st.lists(st.sampled_from(["-object", "-machine", "-M", "-S", "--object", "q", "x,y=1"])
                     | st.text(max_size=30), max_size=12))
def test_argv_reader_raises_only_sevhook_errors(argv: list[str]) -> None:
    try:
        read_launch_security(argv, {})
    except SevhookError:
        pass


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_argv_text_reader_raises_only_sevhook_errors(text: str) -> None:
    try:
        argv_from_text(text)
    except SevhookError:
        pass
