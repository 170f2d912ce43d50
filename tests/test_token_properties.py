"""Property tests: the token parser and the request parsers never fail in an unplanned way.

`AccessTokenVerifier.verify` may only return claims or raise `InvalidTokenError`,
whatever string it is given; a real token changed in any way must not verify.
The body parsers of `api/parsing.py` may only return or raise `InvalidRequestError`,
and their messages never repeat a submitted value.
"""

from __future__ import annotations

import base64
import json
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from authserver.api.parsing import parse_form, parse_json, validate
from authserver.api.schemas import LoginRequest, LogoutRequest, RefreshRequest
from authserver.errors import InvalidRequestError, InvalidScopeError, InvalidTokenError
from authserver.keys import KeyRing, generate_key
from authserver.scopes import parse_scope
from authserver.tokens import AccessTokenVerifier, KeyRingSource, mint_access_token

settings.register_profile(
    "authserver",
    deadline=None,
    max_examples=150,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PROFILE = settings.get_profile("authserver")
ISSUER, AUDIENCE = "http://testserver", "authserver"


class Keys:
    def __init__(self, keys_dir: Path) -> None:
        generate_key(keys_dir, "RS256")
        generate_key(keys_dir, "ES256")
        ring = KeyRing(keys_dir)
        ring.load()
        self.source = KeyRingSource(ring)

    def verifier(self) -> AccessTokenVerifier:
        # No cache: every call takes the full path.
        return AccessTokenVerifier(self.source, issuer=ISSUER, audience=AUDIENCE, cache_size=0)

    def mint(self, subject: str = "alice") -> str:
        kid, alg, key = self.source.signing_key()
        token, _ = mint_access_token(
            key=key,
            kid=kid,
            alg=alg,
            issuer=ISSUER,
            audience=AUDIENCE,
            subject=subject,
            scope="read",
            client_id="authserver",
            ttl=3600,
        )
        return token


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    yield Keys(tmp_path_factory.mktemp("prop-keys"))


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def must_reject(verifier: AccessTokenVerifier, token: str) -> None:
    try:
        verifier.verify(token)
    except InvalidTokenError:
        return
    raise AssertionError(f"accepted: {token!r}")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
B64URL = string.ascii_letters + string.digits + "-_"


# -- the token parser --------------------------------------------------------------


@PROFILE
@given(text=st.text(max_size=300))
def test_verify_arbitrary_text(keys: Keys, text: str) -> None:
    must_reject(keys.verifier(), text)


@PROFILE
@given(data=st.binary(max_size=300))
def test_verify_arbitrary_bytes(keys: Keys, data: bytes) -> None:
    verifier = keys.verifier()
    must_reject(verifier, data.decode("latin-1"))
    must_reject(verifier, b64u(data))
    must_reject(verifier, ".".join(b64u(part) for part in data.split(b".", 2)))


@PROFILE
@given(segments=st.lists(st.text(alphabet=B64URL + ".=+/ ", max_size=60), min_size=1, max_size=5))
def test_verify_token_shaped_strings(keys: Keys, segments: list[str]) -> None:
    must_reject(keys.verifier(), ".".join(segments))


@PROFILE
@given(header=json_values, payload=json_values)
def test_verify_arbitrary_json_under_a_real_signature(
    keys: Keys, header: Any, payload: Any
) -> None:
    signature = keys.mint().rsplit(".", 1)[1]
    forged = f"{b64u(json.dumps(header).encode())}.{b64u(json.dumps(payload).encode())}"
    must_reject(keys.verifier(), f"{forged}.{signature}")


@PROFILE
@given(extra=st.dictionaries(st.text(max_size=10), json_values, max_size=5), data=st.data())
def test_verify_real_header_with_extra_members(
    keys: Keys, extra: dict[str, Any], data: Any
) -> None:
    token = keys.mint()
    header_segment, payload, signature = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_segment + "=="))
    changed = {**header, **extra}
    assume(changed != header)
    forged = f"{b64u(json.dumps(changed).encode())}.{payload}.{signature}"
    must_reject(keys.verifier(), forged)


mutations = st.one_of(
    st.tuples(st.just("replace"), st.integers(0, 10_000), st.characters()),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.characters()),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.just("")),
)


def mutate(token: str, steps: list[tuple[str, int, str]]) -> str:
    for kind, index, char in steps:
        at = index % (len(token) + (kind == "insert"))
        if kind == "replace" and token:
            token = token[:at] + char + token[at + 1 :]
        elif kind == "insert":
            token = token[:at] + char + token[at:]
        elif token:
            token = token[:at] + token[at + 1 :]
    return token


@PROFILE
@given(steps=st.lists(mutations, min_size=1, max_size=4))
def test_a_mutated_real_token_never_verifies(keys: Keys, steps: list[tuple[str, int, str]]) -> None:
    token = keys.mint()
    verifier = keys.verifier()
    assert verifier.verify(token).sub == "alice"
    mutated = mutate(token, steps)
    assume(mutated != token)
    must_reject(verifier, mutated)


@PROFILE
@given(index=st.integers(0, 2), char=st.sampled_from(B64URL))
def test_last_character_of_a_segment_must_be_canonical(keys: Keys, index: int, char: str) -> None:
    # base64url's last character may carry unused bits: another spelling of the same bytes.
    token = keys.mint()
    segments = token.split(".")
    segments[index] = segments[index][:-1] + char
    mutated = ".".join(segments)
    assume(mutated != token)
    must_reject(keys.verifier(), mutated)


def test_the_verified_token_cache_is_bounded_and_honest_about_expiry(keys: Keys) -> None:
    now = [time.time()]
    verifier = AccessTokenVerifier(
        keys.source, issuer=ISSUER, audience=AUDIENCE, cache_size=3, clock=lambda: now[0]
    )
    hot, *others = [keys.mint(subject=f"user{i}") for i in range(6)]
    verifier.verify(hot)
    for token in others:
        verifier.verify(token)
        assert hot in verifier._cache  # in use: never the one evicted
        assert verifier.verify(hot).sub == "user0"
        assert len(verifier._cache) <= 3
    assert set(verifier._cache) == {hot, *others[-2:]}
    # A remembered token is refused once its exp has passed, and forgotten.
    now[0] += 3601
    with pytest.raises(InvalidTokenError, match="expired"):
        verifier.verify(hot)
    assert hot not in verifier._cache


# -- the request parsers ----------------------------------------------------------------


@PROFILE
@given(body=st.binary(max_size=400))
def test_parse_form_and_json_on_arbitrary_bytes(body: bytes) -> None:
    try:
        form = parse_form(body)
    except InvalidRequestError:
        pass
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in form.items())
    try:
        value = parse_json(body)
    except InvalidRequestError:
        pass
    else:
        assert isinstance(value, dict)


form_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=30)


@PROFILE
@given(fields=st.dictionaries(form_text, form_text, max_size=8))
def test_parse_form_round_trips(fields: dict[str, str]) -> None:
    assume("" not in fields)
    assert parse_form(urlencode(fields).encode()) == fields


@PROFILE
@given(
    data=st.dictionaries(
        st.sampled_from(["username", "password", "scope", "client_id", "refresh_token", "x"]),
        json_values,
    ),
    # The marker character never occurs in an error text, so only an echo can put it there.
    secret=st.text(min_size=11, max_size=40)
    .filter(lambda s: s.strip() == s and s.isprintable())
    .map(lambda s: "\u2603" + s),
)
def test_validate_request_models_never_echo_values(data: dict[str, Any], secret: str) -> None:
    for model in (LoginRequest, RefreshRequest, LogoutRequest):
        # The secret goes where a password or token would: it must never come back.
        for field in ("password", "refresh_token"):
            attempt = {**data, field: data.get(field, secret)}
            if isinstance(attempt[field], str):
                attempt[field] = secret
            else:
                attempt["username"] = secret
            try:
                validate(model, attempt)
            except InvalidRequestError as exc:
                assert secret not in exc.description
                assert len(exc.description) <= 400


@PROFILE
@given(scope=st.text(max_size=60))
def test_parse_scope(scope: str) -> None:
    try:
        parsed = parse_scope(scope)
    except InvalidScopeError:
        return
    if parsed is not None:
        assert parsed and all(token and " " not in token for token in parsed)
        assert len(set(parsed)) == len(parsed)
