"""Signing keys: the PEM files of the keys directory, parsed once, and the JWKS.

The file whose name sorts last signs; every other key still verifies until its
file is removed (`keys retire`). `KeyRing.reload_if_changed()` notices files
added or removed on disk, and parses only the new ones.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto.jwk import JWK

log = logging.getLogger("authserver.keys")

# The signature algorithms of the server and of its resource kit: asymmetric only,
# so that an HS* token "signed" with a public key can never verify (RFC 8725 §3.1).
Algorithm = Literal["RS256", "ES256"]
ALGORITHMS: tuple[Algorithm, ...] = ("RS256", "ES256")
KEY_TYPES: Mapping[str, str] = {"RS256": "RSA", "ES256": "EC"}  # each one's JWK `kty`
EC_CURVE = "P-256"  # the one curve of ES256 (RFC 7518 §3.4)
MIN_RSA_BITS = 2048  # RFC 7518 §3.3
MAX_RSA_BITS = 8192
MAX_RSA_EXPONENT_BITS = 32  # 65537 is 17 bits
_NAME_FORMAT = "%Y%m%dT%H%M%S%fZ"
_MAX_KEY_FILE = 64 * 1024


# Per key file: name, mtime, ctime, size, mode.
Fingerprint = tuple[tuple[str, int, int, int, int], ...]


class KeyFileError(Exception):
    """A key file that cannot be used; the message is one line naming the file."""


class NoSigningKeyError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    alg: Algorithm
    path: Path
    created: datetime
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = field(repr=False)
    public_jwk: Mapping[str, Any] = field(repr=False)

    @property
    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        return self.private_key.public_key()


def _check_mode(path: Path, st: os.stat_result, allow_insecure: bool) -> None:
    if os.name != "posix" or not st.st_mode & 0o077:
        return
    if allow_insecure:
        log.warning(
            "key file %s is accessible by group or others (mode %o); "
            "allowed by AUTHSERVER_ALLOW_INSECURE_KEY_FILES",
            path,
            stat.S_IMODE(st.st_mode),
        )
        return
    raise KeyFileError(
        f"key file {path} is accessible by group or others (mode "
        f"{stat.S_IMODE(st.st_mode):o}); fix it with: chmod 600 {path}"
    )


def load_key(path: Path, *, allow_insecure: bool = False) -> SigningKey:
    """Parse one PEM private key file; `KeyFileError` names the file and the problem."""
    try:
        st = path.stat()
        _check_mode(path, st, allow_insecure)
        if st.st_size > _MAX_KEY_FILE:
            raise KeyFileError(f"key file {path} is too large to be a PEM private key")
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            f"key file {path} is not an unencrypted PEM private key ({exc})".splitlines()[0]
        ) from exc
    alg: Algorithm
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < MIN_RSA_BITS:
            raise KeyFileError(
                f"key file {path}: RSA key of {private.key_size} bits; at least "
                f"{MIN_RSA_BITS} are required"
            )
        alg = "RS256"
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        if not isinstance(private.curve, ec.SECP256R1):
            raise KeyFileError(
                f"key file {path}: EC curve {private.curve.name}; "
                f"only {EC_CURVE} (ES256) is supported"
            )
        alg = "ES256"
    else:
        raise KeyFileError(f"key file {path}: unsupported key type; use RSA or EC P-256")
    public = JWK.from_pyca(private.public_key())
    kid = public.thumbprint()  # RFC 7638, SHA-256
    jwk = {**public.export_public(as_dict=True), "kid": kid, "use": "sig", "alg": alg}
    return SigningKey(
        kid=kid,
        alg=alg,
        path=path,
        created=_created(path, st),
        private_key=private,
        public_jwk=jwk,
    )


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


def public_key_of(jwk: Mapping[str, Any]) -> PublicKey:
    """The public key a JWK (RFC 7517) describes; `ValueError` unless it is an RSA key of
    `MIN_RSA_BITS` to `MAX_RSA_BITS` with an exponent of at most `MAX_RSA_EXPONENT_BITS`,
    or an EC key on `EC_CURVE`."""
    try:
        key = JWK(**{k: v for k, v in jwk.items() if isinstance(v, str)}).get_op_key("verify")
    except Exception as exc:  # jwcrypto raises its own and the standard exceptions alike
        raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA keys of {MIN_RSA_BITS} bits at least are required")
        # Anyone may send a key (a DPoP proof's `jwk`): its size must not set the cost
        # of the signature check (verifying grows with the modulus and the exponent).
        if key.key_size > MAX_RSA_BITS:
            raise ValueError(f"RSA keys of more than {MAX_RSA_BITS} bits are refused")
        if key.public_numbers().e.bit_length() > MAX_RSA_EXPONENT_BITS:
            raise ValueError(f"RSA exponents of more than {MAX_RSA_EXPONENT_BITS} bits are refused")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ValueError(f"only RSA and EC {EC_CURVE} keys are supported")


def public_jwk(key: PublicKey) -> dict[str, str]:
    """The public members of a key as a JWK (RFC 7517), nothing else."""
    members: dict[str, str] = JWK.from_pyca(key).export_public(as_dict=True)
    return members


def thumbprint(key: PublicKey) -> str:
    """The RFC 7638 (SHA-256) thumbprint of a public key: a `kid`, or a DPoP `jkt`."""
    value: str = JWK.from_pyca(key).thumbprint()
    return value


def _created(path: Path, st: os.stat_result) -> datetime:
    try:
        return datetime.strptime(path.stem.split("-", 1)[0], _NAME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return datetime.fromtimestamp(st.st_mtime, UTC)


def key_files(keys_dir: Path) -> list[Path]:
    """The PEM files of the directory, signing key last."""
    try:
        return sorted(p for p in keys_dir.iterdir() if p.suffix == ".pem" and p.is_file())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeyFileError(f"cannot read keys directory {keys_dir}: {exc.strerror}") from exc


def generate_key(keys_dir: Path, alg: Algorithm = "RS256") -> SigningKey:
    """Write a new private key (mode 0600) named so that it sorts last, and load it."""
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"unsupported algorithm {alg!r}")
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        path = _publish(keys_dir, alg, pem)
    except OSError as exc:
        raise KeyFileError(
            f"cannot write a key file into {keys_dir}: {exc.strerror or exc}"
        ) from exc
    return load_key(path)


def ensure_signing_key(keys_dir: Path) -> None:
    """Generate a key if the directory has none; a lock stops concurrent starters doubling up."""
    try:
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = open(keys_dir / ".lock", "a")  # closed by the with below
    except OSError as exc:
        raise KeyFileError(f"cannot use keys directory {keys_dir}: {exc.strerror or exc}") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not key_files(keys_dir):
            key = generate_key(keys_dir)
            log.warning(
                "keys directory was empty: generated a new signing key",
                extra={"kid": key.kid, "alg": key.alg, "file": str(key.path)},
            )


def _publish(keys_dir: Path, alg: Algorithm, pem: bytes) -> Path:
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    existing = key_files(keys_dir)
    stamp = datetime.now(UTC).strftime(_NAME_FORMAT)
    path = keys_dir / f"{stamp}-{alg.lower()}.pem"
    if existing and path.name <= existing[-1].name:
        # A clock that went backwards must not demote the new key.
        path = keys_dir / f"{existing[-1].stem}~{alg.lower()}.pem"
    tmp = keys_dir / f".{path.name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    # Atomic publish: a server polling the directory never sees half a file.
    os.replace(tmp, path)
    return path


class KeyRing:
    """The loaded keys; parsed once per file and swapped atomically on change."""

    def __init__(self, keys_dir: Path, *, allow_insecure: bool = False) -> None:
        self.keys_dir = keys_dir
        self.allow_insecure = allow_insecure
        self.generation = 0
        self._keys: tuple[SigningKey, ...] = ()
        self._by_kid: dict[str, SigningKey] = {}
        self._fingerprint: Fingerprint = ()
        self._jwks: dict[str, Any] = {"keys": []}

    @property
    def keys(self) -> Sequence[SigningKey]:
        return self._keys

    @property
    def signing_key(self) -> SigningKey:
        if not self._keys:
            raise NoSigningKeyError(f"no signing key in {self.keys_dir}")
        return self._keys[-1]

    def get(self, kid: str) -> SigningKey | None:
        return self._by_kid.get(kid)

    def jwks(self) -> dict[str, Any]:
        return self._jwks

    def derived_secrets(self, purpose: str) -> list[bytes]:
        """A secret per key for `purpose` (HMAC keys every process sharing the keys
        directory derives alike), the signing key's first; none leaks the key."""
        secrets = []
        for key in reversed(self._keys):
            der = key.private_key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            secrets.append(hmac.new(der, purpose.encode(), hashlib.sha256).digest())
        return secrets

    def _scan(self) -> Fingerprint:
        result = []
        for path in key_files(self.keys_dir):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            # ctime and mode too: a `chmod 600` that makes a skipped file loadable
            # changes neither its mtime nor its size.
            result.append((path.name, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_mode))
        return tuple(result)

    def load(self) -> None:
        """Load every key, raising `KeyFileError` for the first bad file."""
        self._apply(self._scan(), strict=True)

    def reload_if_changed(self) -> bool:
        """Pick up keys added or removed on disk; a bad new file is logged and skipped."""
        fingerprint = self._scan()
        if fingerprint == self._fingerprint:
            return False
        self._apply(fingerprint, strict=False)
        return True

    def _apply(self, fingerprint: Fingerprint, *, strict: bool) -> None:
        known = {(k.path.name): k for k in self._keys}
        previous = dict(zip((f[0] for f in self._fingerprint), self._fingerprint, strict=True))
        loaded: list[SigningKey] = []
        for entry in fingerprint:
            name = entry[0]
            if name in known and previous.get(name) == entry:
                loaded.append(known[name])
                continue
            try:
                key = load_key(self.keys_dir / name, allow_insecure=self.allow_insecure)
            except KeyFileError as exc:
                if strict:
                    raise
                log.error("key file skipped: %s", exc)  # noqa: TRY400 - the message is the point
                continue
            if name not in known:
                log.info("key loaded", extra={"kid": key.kid, "alg": key.alg, "file": name})
            loaded.append(key)
        for name, key in known.items():
            if name not in {k.path.name for k in loaded}:
                log.info("key removed", extra={"kid": key.kid, "file": name})
        self._keys = tuple(loaded)
        self._by_kid = {k.kid: k for k in loaded}
        # Newest first, and each key once: a key copied into two files has one kid.
        unique = {k.kid: k for k in reversed(loaded)}
        self._jwks = {"keys": [dict(k.public_jwk) for k in unique.values()]}
        self._fingerprint = fingerprint
        self.generation += 1
