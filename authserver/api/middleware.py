"""The server's ASGI middleware: HEAD answered as GET, and the security headers.

Both are pure ASGI rather than `BaseHTTPMiddleware`: they touch only the scope
and the response start, so they cost next to nothing on the hot routes.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from authserver.dpop import SENT_METHOD


class HeadAsGet:
    """Answer HEAD as GET (RFC 9110 §9.3.2: every GET resource takes HEAD too).

    FastAPI routes declare GET alone. The app sees a copy of the scope saying GET,
    while the server's own scope still says HEAD, so it sends the headers only.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            # The method sent stays known: a DPoP proof names it (RFC 9449 §4.3, `htm`).
            scope = {**scope, "method": "GET", SENT_METHOD: "HEAD"}
        await self.app(scope, receive, send)


# Every HTML page may load what this server serves, and nothing else: no inline
# script or style, no other origin, no framing (clickjacking), no plugins. Images
# may also be `data:` URLs (Swagger UI's stylesheet draws its icons so): an image
# runs no code.
def content_security_policy(*form_targets: str) -> str:
    """The policy, with `form_targets` (origins) added to where a form may go. Browsers
    hold a form's redirects to `form-action` too: a sign-in form that ends in a redirect
    back to an application must name that application's origin."""
    form_action = " ".join(("'self'", *form_targets))
    return (
        f"default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action {form_action}; "
        "frame-ancestors 'none'; object-src 'none'"
    )


CONTENT_SECURITY_POLICY = content_security_policy()
_CSP = b"content-security-policy"
_ALWAYS = [(b"x-content-type-options", b"nosniff")]
_HTML_CSP = (_CSP, CONTENT_SECURITY_POLICY.encode("ascii"))
_NO_FRAMING = (b"x-frame-options", b"DENY")


class SecurityHeaders:
    """Adds `X-Content-Type-Options: nosniff` to every response, and to every HTML page a
    Content-Security-Policy (own origin only, `frame-ancestors 'none'`; unless the page
    set one built by `content_security_policy`) and `X-Frame-Options: DENY`, the header
    older browsers know."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += _ALWAYS
                if any(
                    name == b"content-type" and value.startswith(b"text/html")
                    for name, value in headers
                ):
                    # A page may bring its own policy (`content_security_policy`): one
                    # policy per page, never two whose intersection breaks it.
                    if not any(name == _CSP for name, _ in headers):
                        headers.append(_HTML_CSP)
                    headers.append(_NO_FRAMING)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
