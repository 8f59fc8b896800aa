"""The Authorization header parser, fuzzed: any header gives None, "" or exactly the token after one space."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from sevhook.broker.app import bearer_token

TOKEN68 = st.from_regex(r"\A[A-Za-z0-9._~+/-]{1,64}={0,2}\Z")


@given(st.text(max_size=200))
@settings(max_examples=500, deadline=None)
def test_any_header_gives_none_empty_or_a_token68(header: str) -> None:
    token = bearer_token(header)
    assert token is not None
    if token:
        assert header.lower().startswith("bearer ") and header[7:] == token
        assert re.fullmatch(r"[A-Za-z0-9._~+/-]+=*", token)


@given(st.sampled_from(["Bearer", "bearer", "BEARER", "bEaReR"]), TOKEN68)
def test_the_scheme_is_case_insensitive(scheme: str, token: str) -> None:
    assert bearer_token(f"{scheme} {token}") == token


@given(TOKEN68, st.sampled_from(["  ", "\t", " \t", ", "]))
def test_anything_but_one_space_is_malformed(token: str, separator: str) -> None:
    assert bearer_token(f"Bearer{separator}{token}") == ""
    assert bearer_token(f"Bearer {token} extra") == ""


def test_no_header_is_no_token() -> None:
    assert bearer_token(None) is None
    assert bearer_token("Basic dXNlcjpwYXNz") == ""
