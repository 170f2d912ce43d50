"""`DirectRoute`: a route whose endpoint reads the request itself, called with it directly.

FastAPI resolves an endpoint's parameters on every request (`solve_dependencies`),
even when the only one is the `Request`: on the token endpoints that was about 5 %
of the time the process holds the GIL (py-spy --gil, client_credentials). These
endpoints parse their bodies themselves (`parsing.py`) and return responses, so
there is nothing to resolve or serialise: `get_route_handler`, FastAPI's hook for
a custom route class, hands the request straight to them. The OpenAPI document
still comes from the endpoint's declaration, unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, cast

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
Endpoint = Callable[..., Coroutine[Any, Any, Response]]


def _request_only(route: APIRoute) -> bool:
    d = route.dependant
    return (
        d.request_param_name is not None
        and not (d.path_params or d.query_params or d.header_params or d.cookie_params)
        and not (d.body_params or d.dependencies)
        and not (d.websocket_param_name or d.background_tasks_param_name)
        and not (d.response_param_name or d.security_scopes_param_name)
    )


class DirectRoute(APIRoute):
    """Calls an `async def endpoint(request)` without resolving its parameters; any
    other endpoint gets FastAPI's usual handler."""

    def get_route_handler(self) -> Handler:
        if not _request_only(self):
            return super().get_route_handler()
        endpoint = cast(Endpoint, self.endpoint)
        name = self.dependant.request_param_name
        assert name is not None

        async def handler(request: Request) -> Response:
            return await endpoint(**{name: request})

        return handler
