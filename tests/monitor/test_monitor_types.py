"""The typed QMP answers: both query-sev shapes (before and after QEMU 9.1), capabilities, the
launch measurement (a known answer from tests/data/vectors), and fuzzing: any JSON-like answer
parses or raises MonitorProtocolError, nothing else."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevhook.monitor.errors import MonitorProtocolError
from sevhook.monitor.types import SevCapabilities, SevInfo, VmStatus, parse_measurement, parse_report

QEMU_7_QUERY_SEV = {"enabled": False, "api-minor": 0, "handle": 0, "state": "uninit", "api-major": 0,
                    "build-id": 0, "policy": 0}


def test_query_sev_flat_shape_before_9_1():
    answer = {"enabled": True, "api-major": 1, "api-minor": 40, "build-id": 40, "policy": 3,
              "state": "launch-secret", "handle": 1}
    info = SevInfo.from_qmp(answer)
    assert info == SevInfo(enabled=True, api_major=1, api_minor=40, build_id=40, state="launch-secret",
                           sev_type="sev", policy=3, snp_policy=None, handle=1)


def test_query_sev_tagged_shapes_from_9_1():
    sev = SevInfo.from_qmp({**QEMU_7_QUERY_SEV, "sev-type": "sev", "policy": 5, "state": "running"})
    assert (sev.sev_type, sev.policy, sev.snp_policy, sev.state) == ("sev", 5, None, "running")
    snp = {key: value for key, value in QEMU_7_QUERY_SEV.items() if key not in ("policy", "handle")}
    info = SevInfo.from_qmp({**snp, "sev-type": "sev-snp", "snp-policy": 0x30000})
    assert (info.sev_type, info.policy, info.snp_policy, info.handle) == ("sev-snp", None, 0x30000, None)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"state": "dancing"}, "state"),
        ({"sev-type": "tdx"}, "sev-type"),
        ({"policy": True}, "policy"),
        ({"api-major": "1"}, "api-major"),
        ({"enabled": 1}, "enabled"),
    ],
)
def test_query_sev_refuses_wrong_fields(change, field):
    with pytest.raises(MonitorProtocolError, match=field):
        SevInfo.from_qmp({**QEMU_7_QUERY_SEV, **change})


def test_snp_answer_without_snp_policy_is_refused():
    with pytest.raises(MonitorProtocolError, match="snp-policy"):
        SevInfo.from_qmp({**QEMU_7_QUERY_SEV, "sev-type": "sev-snp"})


def test_status_and_capabilities():
    assert VmStatus.from_qmp({"status": "prelaunch", "singlestep": False, "running": False}) == \
        VmStatus("prelaunch", False)
    pdh, chain = base64.b64encode(b"p" * 2084).decode(), base64.b64encode(b"c" * 6252).decode()
    capabilities = SevCapabilities.from_qmp({"pdh": pdh, "cert-chain": chain, "cbitpos": 47,
                                             "reduced-phys-bits": 1})
    assert (capabilities.pdh_b64, capabilities.cert_chain_b64, capabilities.cpu0_id_b64) == (pdh, chain, None)
    with pytest.raises(MonitorProtocolError, match="pdh is not valid base64"):
        SevCapabilities.from_qmp({"pdh": "!!", "cert-chain": chain, "cbitpos": 47, "reduced-phys-bits": 1})


def test_launch_measurement_known_answer(shared):
    readme = (shared / "vectors" / "README.md").read_text()
    blob = "lswbxWxI9gckya16JQvdFtpYmNO4b+3inAPpqsgoBI7DE/q1EcIWsVBbGy6pkDxA"
    assert blob in readme  # vector 1 of sevctl's measurement tests
    measurement = parse_measurement({"data": blob})
    assert base64.b64encode(measurement.mnonce).decode() == "wxP6tRHCFrFQWxsuqZA8QA=="
    assert measurement.b64 == blob and len(measurement.measurement) == 32


def test_measurement_of_wrong_size_is_a_protocol_error():
    with pytest.raises(MonitorProtocolError, match="48"):
        parse_measurement({"data": base64.b64encode(bytes(32)).decode()})
    with pytest.raises(MonitorProtocolError, match="data"):
        parse_measurement({"data": 7})


def test_report_is_decoded():
    assert parse_report({"data": base64.b64encode(b"report").decode()}) == b"report"


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=12,
)
_sev_like = st.fixed_dictionaries(
    {},
    optional={key: _json | st.integers(0, 255) | st.sampled_from(["sev", "sev-snp", "launch-secret", "uninit"])
              for key in ("enabled", "api-major", "api-minor", "build-id", "policy", "snp-policy", "state",
                          "handle", "sev-type")},
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(_json, _sev_like))
def test_fuzzed_answers_raise_only_protocol_errors(answer):
    for parse in (SevInfo.from_qmp, VmStatus.from_qmp, SevCapabilities.from_qmp, parse_measurement, parse_report):
        try:
            parse(answer)
        except MonitorProtocolError:
            pass
