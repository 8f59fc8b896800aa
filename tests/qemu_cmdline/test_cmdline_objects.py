"""Model -> object -> text, per launch-security type, QEMU generation and syntax."""

from __future__ import annotations

from pathlib import Path

import pytest

from sevhook.errors import FormatError, SevhookError
from sevhook.qemu_cmdline import json_syntax, keyval
from sevhook.qemu_cmdline.objects import QemuObject, keyval_bool, keyval_number
from sevhook.qemu_cmdline.qemu_version import QemuVersion
from sevhook.qemu_cmdline.translate import CmdlineOptions, translate, translate_launch_security
from sevhook.sev.policy import SevPolicy, SnpPolicy
from sevhook.xml.models import (
    Domain,
    S390PvLaunchSecurity,
    SevLaunchSecurity,
    SevSnpLaunchSecurity,
    TdxLaunchSecurity,
)

LIB = Path("/var/lib/libvirt/qemu/domain--1-guest")
SEV = SevLaunchSecurity(policy=SevPolicy(0x33), cbitpos=51, reduced_phys_bits=1, dh_cert="DH", session="SE")


def options(version: str | None = None, **kwargs: object) -> CmdlineOptions:
    return CmdlineOptions(qemu_version=QemuVersion.parse(version) if version else None, **kwargs)  # type: ignore[arg-type]


def test_sev_json_has_libvirts_key_order_and_number_types() -> None:
    text = translate_launch_security(SEV, LIB).object_text
    assert text == (
        '{"qom-type":"sev-guest","id":"lsec0","cbitpos":51,"reduced-phys-bits":1,"policy":51,'
        f'"dh-cert-file":"{LIB}/dh_cert.base64","session-file":"{LIB}/session.base64"}}'
    )


def test_sev_without_blobs_omits_the_file_properties() -> None:
    model = SevLaunchSecurity(policy=SevPolicy(1), cbitpos=47, reduced_phys_bits=1)
    assert translate_launch_security(model, LIB).object_text == (
        '{"qom-type":"sev-guest","id":"lsec0","cbitpos":47,"reduced-phys-bits":1,"policy":1}'
    )


@pytest.mark.parametrize("value, text", [(True, "true"), (False, "false")])
def test_kernel_hashes_is_a_json_boolean_after_the_files(value: bool, text: str) -> None:
    model = SevLaunchSecurity(policy=SevPolicy(7), cbitpos=47, reduced_phys_bits=1, dh_cert="D", kernel_hashes=value)
    out = translate_launch_security(model, LIB).object_text
    assert out.endswith(f'"dh-cert-file":"{LIB}/dh_cert.base64","kernel-hashes":{text}}}')
    assert "session-file" not in out


def test_empty_blob_text_is_absent_as_libvirt_reads_it() -> None:
    model = SevLaunchSecurity(policy=SevPolicy(1), cbitpos=47, reduced_phys_bits=1, dh_cert="", session="")
    assert "file" not in translate_launch_security(model, LIB).object_text


def test_snp_order_inversion_and_verbatim_blobs() -> None:
    model = SevSnpLaunchSecurity(
        policy=SnpPolicy(0x30000),
        cbitpos=51,
        reduced_phys_bits=1,
        kernel_hashes=True,
        author_key=True,
        vcek=False,
        guest_visible_workarounds="AAAAAAAAAAAAAAAAAAAAAA==",
        id_block="aWQ=",
        id_auth="YXV0aA==",
        host_data="aG9zdA==",
    )
    assert translate_launch_security(model, LIB).object_text == (
        '{"qom-type":"sev-snp-guest","id":"lsec0","cbitpos":51,"reduced-phys-bits":1,"kernel-hashes":true,'
        '"policy":196608,"guest-visible-workarounds":"AAAAAAAAAAAAAAAAAAAAAA==","id-block":"aWQ=",'
        '"id-auth":"YXV0aA==","host-data":"aG9zdA==","author-key-enabled":true,"vcek-disabled":true}'
    )


def test_snp_vcek_yes_is_vcek_disabled_false() -> None:
    model = SevSnpLaunchSecurity(policy=SnpPolicy(0x30000), cbitpos=51, reduced_phys_bits=1, vcek=True,
                                 author_key=False)
    text = translate_launch_security(model, LIB).object_text
    assert text.endswith('"policy":196608,"author-key-enabled":false,"vcek-disabled":false}')


def test_s390_pv_is_type_and_id_only() -> None:
    result = translate_launch_security(S390PvLaunchSecurity(), LIB)
    assert result.argv == ["-machine", "confidential-guest-support=lsec0", "-object",
                           '{"qom-type":"s390-pv-guest","id":"lsec0"}']


def test_tdx_is_refused_clearly() -> None:
    with pytest.raises(SevhookError, match="'tdx' is not supported"):
        translate_launch_security(TdxLaunchSecurity(), LIB)


def test_before_qemu_6_keyval_and_memory_encryption() -> None:
    result = translate_launch_security(SEV, LIB, options("5.2"))
    assert result.argv[:2] == ["-machine", "memory-encryption=lsec0"]
    assert result.object_text == (
        f"sev-guest,id=lsec0,cbitpos=51,reduced-phys-bits=1,policy=51,"
        f"dh-cert-file={LIB}/dh_cert.base64,session-file={LIB}/session.base64"
    )


def test_keyval_on_new_qemu_keeps_confidential_guest_support() -> None:
    result = translate_launch_security(SEV, LIB, options("7.2", syntax="keyval"))
    assert result.machine_text == "confidential-guest-support=lsec0"
    assert result.syntax == "keyval"


def test_keyval_escapes_commas_in_paths() -> None:
    result = translate_launch_security(SEV, Path("/srv/a,b"), options(syntax="keyval"))
    assert "dh-cert-file=/srv/a,,b/dh_cert.base64," in result.object_text
    assert keyval.parse_object(result.object_text).obj.get("dh-cert-file") == "/srv/a,b/dh_cert.base64"  # type: ignore[union-attr]


def test_keyval_booleans_are_on_off() -> None:
    model = SevLaunchSecurity(policy=SevPolicy(1), cbitpos=47, reduced_phys_bits=1, kernel_hashes=False)
    assert translate_launch_security(model, LIB, options(syntax="keyval")).object_text.endswith(",kernel-hashes=off")


def test_libvirt4_compat_uses_sev0_and_hex_policy() -> None:
    result = translate_launch_security(SevLaunchSecurity(policy=SevPolicy(0x33), cbitpos=47, reduced_phys_bits=1), LIB,
                                       options(libvirt4_compat=True))
    assert result.argv == ["-machine", "memory-encryption=sev0", "-object",
                           "sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1,policy=0x33"]


@pytest.mark.parametrize(
    "model, version, kwargs, message",
    [
        (SevSnpLaunchSecurity(policy=SnpPolicy(0x30000), cbitpos=51, reduced_phys_bits=1), "7.2", {},
         "'sev-snp' launch security is not supported"),
        (SevLaunchSecurity(policy=SevPolicy(1), cbitpos=47, reduced_phys_bits=1, kernel_hashes=False), "6.1", {},
         "measured direct kernel boot"),
        (SEV, "2.11", {}, "sev-guest needs QEMU 2.12"),
        (S390PvLaunchSecurity(), "5.2", {}, "'s390-pv' launch security is not supported"),
        (SEV, "5.2", {"syntax": "json"}, "no JSON -object syntax"),
        (SEV, None, {"libvirt4_compat": True, "syntax": "json"}, "drop --syntax json"),
        (S390PvLaunchSecurity(), None, {"libvirt4_compat": True}, "libvirt 4.x knew only"),
        (SevLaunchSecurity(policy=SevPolicy(1), cbitpos=47, reduced_phys_bits=1, kernel_hashes=True), None,
         {"libvirt4_compat": True}, "libvirt 4.x had no kernelHashes"),
    ],
)
def test_what_the_qemu_or_mode_lacks_is_refused(model, version, kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SevhookError, match=message):
        translate_launch_security(model, LIB, options(version, **kwargs))


def test_missing_platform_values_are_an_error_naming_the_sources() -> None:
    with pytest.raises(SevhookError, match="--domcaps FILE"):
        translate_launch_security(SevLaunchSecurity(policy=SevPolicy(1)), LIB)


def test_domain_without_launch_security() -> None:
    with pytest.raises(SevhookError, match="no <launchSecurity>"):
        translate(Domain(name="g", type="kvm"))


def test_default_lib_dir_is_libvirts_short_name() -> None:
    domain = Domain(name="a-very-long-domain-name-indeed", type="kvm", id=7, launch_security=SEV)
    assert translate(domain).lib_dir == "/var/lib/libvirt/qemu/domain-7-a-very-long-domain-n"
    inactive = Domain(name="QEMUGuest1", type="kvm", launch_security=SEV)
    assert translate(inactive).lib_dir == "/var/lib/libvirt/qemu/domain--1-QEMUGuest1"


def test_unicode_names_are_cut_by_characters() -> None:
    domain = Domain(name="ü" * 25, type="kvm", launch_security=SEV)
    assert translate(domain).lib_dir == "/var/lib/libvirt/qemu/domain--1-" + "ü" * 20


def test_json_does_not_escape_slashes_or_unicode() -> None:
    text = json_syntax.format_object(QemuObject("sev-guest", "lsec0", (("dh-cert-file", "/a/ü/\"q\""),)))
    assert text == '{"qom-type":"sev-guest","id":"lsec0","dh-cert-file":"/a/ü/\\"q\\""}'


@pytest.mark.parametrize(
    "text, value",
    [("0", 0), ("47", 47), ("0x2f", 47), ("0X2F", 47), ("057", 47), ("", None), ("-1", None), (" 1", None),
     ("0x", None), ("1k", None)]
)
def test_keyval_numbers_read_like_qemu(text: str, value: int | None) -> None:
    assert keyval_number(text) == value


@pytest.mark.parametrize("text, value",
                         [("on", True), ("yes", True), ("true", True), ("off", False), ("n", False), ("1", None)])
def test_keyval_booleans_read_like_qemu(text: str, value: bool | None) -> None:
    assert keyval_bool(text) is value


def test_keyval_split_rules() -> None:
    assert keyval.split("sev-guest,id=a,,b,policy=1", "qom-type", "x") == [("qom-type", "sev-guest"), ("id", "a,b"),
                                                                           ("policy", "1")]
    assert keyval.split("qom-type=sev-guest,id=x", "qom-type", "x") == [("qom-type", "sev-guest"), ("id", "x")]
    with pytest.raises(FormatError, match="expected '=' after parameter 'bogus'"):
        keyval.split("sev-guest,bogus", "qom-type", "x")
    with pytest.raises(FormatError, match="empty parameter name"):
        keyval.split("sev-guest,=1", "qom-type", "x")


def test_parsers_report_what_qemu_would_refuse() -> None:
    parsed = json_syntax.parse_object('{"qom-type":"sev-guest","id":"l","policy":"1","cbitpos":-1,"bogus":1,'
                                      '"kernel-hashes":1,"x":{}}')
    assert parsed is not None
    assert parsed.obj.props == ()
    assert len(parsed.problems) == 5
    parsed = keyval.parse_object("sev-guest,id=l,policy=x,kernel-hashes=maybe,policy=1")
    assert parsed is not None and parsed.obj.props == ()
    assert any("'policy=x'" in p for p in parsed.problems) and any("twice" in p for p in parsed.problems)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"qom-type":"sev-guest","id":"a","id":"b"}', "duplicate key"),
        ("[1]", "expected a JSON object"),
        ('{"qom-type":"sev-guest","id":"a",', "not valid JSON"),
        ('{"qom-type":"sev-guest","id":"a","policy":NaN}', "NaN is not valid JSON"),
        ('{"qom-type":1}', "'qom-type' must be a string"),
        ('{"qom-type":"sev-guest"}', "needs a string 'id'"),
        ("[" * 100000, "nested too deeply"),
    ],
)
def test_bad_json_objects_are_format_errors(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        json_syntax.parse_object(text)


def test_other_objects_are_not_launch_security() -> None:
    assert json_syntax.parse_object('{"qom-type":"memory-backend-ram","id":"pc.ram","size":1}') is None
    assert keyval.parse_object("secret,id=masterKey0,format=raw,file=/x") is None
