"""Sign RFC 9068 access tokens as authserver does, from a PEM in its keys directory.

The same steps as `authserver.tokens.mint_access_token`, written out here so the
sign-only peer does not import authserver: the claims serialised by orjson, then
`jose.jws.sign` with a key prepared once by `jose.jwk.construct`, the header
carrying `kid` (the RFC 7638 thumbprint of the public key, as authserver names
its keys) and `typ: at+jwt`. authserver's /protected accepting these tokens is
the check that they really are authserver's.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jws
from jose.jwk import construct
from jwcrypto.jwk import JWK


@dataclass(frozen=True)
class Signer:
    kid: str
    alg: str
    key: Any  # a prepared jose key: parsing the PEM per token would cost more than signing

    @classmethod
    def from_keys_dir(cls, keys_dir: Path) -> Signer:
        """The newest key: authserver names key files by their UTC creation time."""
        pems = sorted(p for p in keys_dir.iterdir() if p.suffix == ".pem" and p.is_file())
        if not pems:
            raise FileNotFoundError(f"no .pem key in {keys_dir}")
        private = serialization.load_pem_private_key(pems[-1].read_bytes(), password=None)
        if isinstance(private, rsa.RSAPrivateKey):
            alg = "RS256"
        elif isinstance(private, ec.EllipticCurvePrivateKey):
            alg = "ES256"
        else:
            raise TypeError(f"{pems[-1]}: not an RSA or EC private key")
        kid = JWK.from_pyca(private.public_key()).thumbprint()
        return cls(kid=kid, alg=alg, key=construct(private, alg))

    def mint(
        self,
        *,
        issuer: str,
        audience: str,
        subject: str,
        scope: str,
        client_id: str,
        ttl: int,
    ) -> str:
        issued = int(time.time())
        claims = {
            "iss": issuer,
            "sub": subject,
            "aud": audience,
            "exp": issued + ttl,
            "iat": issued,
            "jti": secrets.token_urlsafe(16),
            "scope": scope,
            "client_id": client_id,
        }
        token: str = jws.sign(
            orjson.dumps(claims),
            self.key,
            headers={"kid": self.kid, "typ": "at+jwt"},
            algorithm=self.alg,
        )
        return token
