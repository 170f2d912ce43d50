"""An example resource server: a separate API that accepts authserver's access tokens.

Run it next to authserver (which listens on 127.0.0.1:8000 by default)::

    RESOURCE_ISSUER=http://127.0.0.1:8000 uvicorn --app-dir examples resource_server:app --port 9000

Configuration (environment):

- `RESOURCE_ISSUER`: the auth server's issuer URL (`AUTHSERVER_ISSUER` there).
- `RESOURCE_AUDIENCE`: the `aud` tokens must carry (`AUTHSERVER_AUDIENCE` there);
  default `authserver`.
- `RESOURCE_JWKS_REFETCH_INTERVAL`: least seconds between two JWKS fetches, default 5.

GET /hello needs any valid token with the `read` scope; GET /admin needs the
`admin` scope, which authserver's default scopes do not include: a 403 to try.
"""

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI

from authserver.resource import AccessClaims, TokenValidator, install_error_handler, require_token

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

validator = TokenValidator.from_issuer(
    os.environ.get("RESOURCE_ISSUER", "http://127.0.0.1:8000"),
    audience=os.environ.get("RESOURCE_AUDIENCE", "authserver"),
    min_refetch_interval=float(os.environ.get("RESOURCE_JWKS_REFETCH_INTERVAL", "5")),
)
# Module-level aliases: FastAPI resolves annotations in the module's namespace.
Reader = Annotated[AccessClaims, Depends(require_token(validator, scopes=["read"]))]
Admin = Annotated[AccessClaims, Depends(require_token(validator, scopes=["admin"]))]


@contextlib.asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    yield
    await validator.aclose()


app = FastAPI(title="example resource server", lifespan=lifespan)
install_error_handler(app)


@app.get("/hello")
async def hello(claims: Reader) -> dict[str, object]:
    return {"message": f"Hello, {claims.sub}.", "scope": list(claims.scope)}


@app.get("/admin")
async def admin(claims: Admin) -> dict[str, object]:
    return {"message": f"Welcome, administrator {claims.sub}."}


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("RESOURCE_PORT", "9000")))
