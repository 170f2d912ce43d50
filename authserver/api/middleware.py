"""The server's ASGI middleware: HEAD answered as GET, and the security headers.

Both are pure ASGI rather than `BaseHTTPMiddleware`: they touch only the scope
and the response start, so they cost next to nothing on the hot routes.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadAsGet:
    """Answer HEAD as GET (RFC 9110 §9.3.2: every GET resource takes HEAD too).

    FastAPI routes declare GET alone. The app sees a copy of the scope saying GET,
    while the server's own scope still says HEAD, so it sends the headers only.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


class SecurityHeaders:
    """Adds `X-Content-Type-Options: nosniff` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-content-type-options", b"nosniff"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)
