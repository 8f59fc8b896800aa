"""SEV and SNP policies both ways, with the exact integer kept, and CLI number parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sevhook.errors import FormatError
from sevhook.sev.policy import SevPolicy, SevPolicyFlag, SnpPolicy, SnpPolicyFlag, parse_number


def test_sev_policy_decode() -> None:
    policy = SevPolicy(0x1218_0037)
    assert policy.flag_names() == ["NODBG", "NOKS", "ES", "DOMAIN", "SEV"]
    assert (policy.api_major, policy.api_minor) == (0x18, 0x12)
    assert not policy.debug_allowed and not policy.key_sharing_allowed and policy.es
    assert policy.to_bytes() == bytes([0x37, 0x00, 0x18, 0x12])
    assert "minimum API 24.18" in policy.describe()


def test_sev_policy_build_and_reserved_bits() -> None:
    assert SevPolicy.build(SevPolicyFlag.NODBG | SevPolicyFlag.NOKS, 1, 40).value == 0x2801_0003
    odd = SevPolicy(0x41)
    assert odd.reserved_bits == 0x40 and "reserved bits 0x40" in odd.describe()
    with pytest.raises(FormatError):
        SevPolicy(1 << 32)
    with pytest.raises(FormatError):
        SevPolicy.build(api_major=256)


@given(st.integers(min_value=0, max_value=0xFFFF_FFFF))
def test_sev_policy_keeps_every_bit(value: int) -> None:
    policy = SevPolicy(value)
    assert int.from_bytes(policy.to_bytes(), "little") == value
    rebuilt = SevPolicy.build(policy.flags, policy.api_major, policy.api_minor).value | policy.reserved_bits
    assert rebuilt == value


def test_snp_policy() -> None:
    policy = SnpPolicy.build(SnpPolicyFlag.SMT | SnpPolicyFlag.DEBUG, 1, 55)
    assert policy.value == 0x0009_0137 | (1 << 17) and policy.reserved_bit17_set
    assert policy.flag_names() == ["SMT", "DEBUG"] and (policy.abi_major, policy.abi_minor) == (1, 55)
    assert policy.to_bytes() == policy.value.to_bytes(8, "little")
    assert SnpPolicy(1 << 30).reserved_bits == 1 << 30
    with pytest.raises(FormatError):
        SnpPolicy(1 << 64)


@pytest.mark.parametrize("text,value", [("3", 3), ("0x30005", 0x30005), (" 0X10 ", 16), ("0", 0)])
def test_parse_number(text: str, value: int) -> None:
    assert parse_number(text) == value


def test_parse_number_error_names_the_field() -> None:
    with pytest.raises(FormatError, match="--policy: 'abc' is not a number"):
        parse_number("abc", "--policy")
