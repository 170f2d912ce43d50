"""The /docs pages over HTTP: nothing loaded from outside, and a policy that forbids inline
script, other origins and framing. (tests/test_docs_browser.py drives them in Chromium;
these need no browser, and a module-scoped one would hold the event loop they run on.)
"""

from __future__ import annotations

import re

from tests.helpers.app import Running


async def test_docs_page_loads_nothing_from_outside(server: Running) -> None:
    """The /docs HTML names only the server's own paths, and those assets are served."""
    page = await server.client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower()
    assert not re.search(r"https?://", page.text)
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert urls, page.text
    for url in urls:
        assert url.startswith(("/docs/assets/", "/docs/static/")), url
        asset = await server.client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 0
    spec = (await server.client.get("/openapi.json")).json()
    flows = spec["components"]["securitySchemes"]["OAuth2"]["flows"]
    # A user's password flow, a confidential client's client_credentials (RFC 6749 §4.4),
    # and the browser's authorization code (with PKCE).
    assert set(flows) == {"password", "clientCredentials", "authorizationCode"}
    assert flows["authorizationCode"]["authorizationUrl"] == "/authorize"
    for flow in flows.values():
        assert flow["tokenUrl"] == "/token"
        assert set(flow["scopes"]) == {"read", "write"}
    # The page Swagger UI's other OAuth2 flows return to; the password flow needs none.
    redirect = await server.client.get("/docs/oauth2-redirect")
    assert redirect.status_code == 200
    assert "text/html" in redirect.headers["content-type"]


async def test_every_html_page_forbids_inline_script_other_origins_and_framing(
    server: Running,
) -> None:
    for path in ("/docs", "/docs/oauth2-redirect"):
        page = await server.client.get(path)
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
        assert directives["default-src"] == "'self'"
        assert directives["frame-ancestors"] == "'none'"
        assert "script-src" not in directives  # so no 'unsafe-inline' either
        assert page.headers["x-frame-options"] == "DENY"
        # Nothing inline that the policy would block: every script has a src, or is data.
        for tag in re.findall(r"<script[^>]*>", page.text):
            assert "src=" in tag or 'type="application/json"' in tag, tag
        assert "style=" not in page.text and "<style" not in page.text
        script_urls = re.findall(r'<script src="([^"]+)"', page.text)
        for url in script_urls:
            script = await server.client.get(url)
            assert script.status_code == 200, url
            assert "javascript" in script.headers["content-type"], url
    # JSON answers are no pages: they do without.
    assert "content-security-policy" not in (await server.client.get("/health")).headers
