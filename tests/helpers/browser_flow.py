"""The authorization code flow as a browser and a client walk it, over plain HTTP.

For the in-process tests of /authorize: an httpx client keeps the cookies (as a
browser would) and follows nothing by itself, so every redirect is looked at.
"""

from __future__ import annotations

import base64
import html
import re
import secrets
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson

from authserver.authorize import s256
from tests.helpers.factories import DEFAULT_PASSWORD

_HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')


def pkce() -> tuple[str, str]:
    """A fresh (code_verifier, code_challenge) pair (RFC 7636, S256)."""
    verifier = secrets.token_urlsafe(48)
    return verifier, s256(verifier)


def hidden_fields(page: str) -> dict[str, str]:
    return {name: html.unescape(value) for name, value in _HIDDEN.findall(page)}


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def claims_of(jwt: str) -> dict[str, Any]:
    payload = jwt.split(".")[1]
    claims: dict[str, Any] = orjson.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


class Flow:
    """One client's authorization requests, from one browser (the httpx client's cookies)."""

    def __init__(
        self,
        browser: httpx.AsyncClient,
        client_id: str,
        redirect_uri: str,
        *,
        secret: str | None = None,
    ) -> None:
        self.browser = browser
        self.client_id = client_id
        self.redirect_uri = redirect_uri
        self.secret = secret
        self.verifier, self.challenge = pkce()

    def params(self, **overrides: str | None) -> dict[str, str]:
        params: dict[str, str | None] = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "code_challenge": self.challenge,
            "code_challenge_method": "S256",
            "state": "the-state",
            "nonce": "the-nonce",
            "scope": "openid read",
        }
        params.update(overrides)
        return {k: v for k, v in params.items() if v is not None}

    async def authorize(self, **overrides: str | None) -> httpx.Response:
        return await self.browser.get("/authorize", params=self.params(**overrides))

    async def sign_in(
        self,
        page: httpx.Response,
        username: str = "alice",
        password: str = DEFAULT_PASSWORD,
        **extra: str,
    ) -> httpx.Response:
        """Fill in and send the sign-in form `page` shows."""
        assert "/authorize/sign-in" in page.text, page.text
        form = {**hidden_fields(page.text), "username": username, "password": password, **extra}
        return await self.browser.post("/authorize/sign-in", data=form)

    async def answer_consent(self, page: httpx.Response, decision: str) -> httpx.Response:
        assert page.status_code == 200 and "/authorize/consent" in page.text, page.text
        form = {**hidden_fields(page.text), "decision": decision}
        return await self.browser.post("/authorize/consent", data=form)

    async def code(self, **overrides: str | None) -> str:
        """Sign in (if the browser must) and return the code the redirect carries."""
        response = await self.authorize(**overrides)
        if response.status_code == 200:
            response = await self.sign_in(response)
        assert response.status_code == 303, response.text
        location = response.headers["location"]
        assert location.startswith(self.redirect_uri), location
        return query_of(location)["code"]

    async def exchange(self, code: str, **overrides: str | None) -> httpx.Response:
        form: dict[str, str | None] = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": self.verifier,
            "client_id": self.client_id,
        }
        form.update(overrides)
        data = {k: v for k, v in form.items() if v is not None}
        if self.secret is None:
            return await self.browser.post("/token", data=data)
        return await self.browser.post("/token", data=data, auth=(self.client_id, self.secret))
