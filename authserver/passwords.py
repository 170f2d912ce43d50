"""bcrypt hashing off the event loop, the 72-byte policy, and the timing guard.

Passwords are normalised to NFC before they are hashed or checked (NIST SP
800-63B §5.1.1.2), so the same password typed on two keyboards that compose
accents differently is the same password.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import bcrypt

from authserver import metrics

MAX_PASSWORD_BYTES = 72  # bcrypt ignores (bcrypt >= 5: refuses) anything longer
# Hashing threads run at the lowest nice level so the event loop (nice 0) wins the
# CPU whenever it wakes: logins lose almost nothing (the loop is idle most of the
# time), while /protected keeps its latency. Measured with `python -m bench --only
# login`: the GET p99 under login load fell from about 1.6 ms at nice 10 to about
# 1.0 ms at nice 19, with logins still at 0.96x the bcrypt bound. Not SCHED_IDLE:
# a hashing thread holds the GIL between its hashes, and one that the scheduler
# starves then (SCHED_IDLE yields to any runnable thread) keeps the event loop
# waiting for the GIL: the p99 was 5.4 to 5.9 ms under logins with it, 2.3 to
# 3.4 ms at nice 19 alone (three rounds each, the same machine).
_HASH_THREAD_NICENESS = 19


def normalize_password(password: str) -> str:
    """The one spelling of a password: Unicode NFC (NIST SP 800-63B §5.1.1.2)."""
    return unicodedata.normalize("NFC", password)


@dataclass(frozen=True, slots=True)
class PasswordCheck:
    ok: bool
    rehash: bool  # right, but stored at a lower cost or before NFC: store a new hash


class PasswordPolicyError(ValueError):
    """A password that cannot be set; the message says why, never the password."""


def validate_new_password(password: str) -> bytes:
    """Return the UTF-8 bytes of an acceptable new password (in NFC), or raise
    `PasswordPolicyError`."""
    encoded = normalize_password(password).encode("utf-8", errors="surrogatepass")
    if not encoded:
        raise PasswordPolicyError("the password is empty")
    if len(encoded) > MAX_PASSWORD_BYTES:
        raise PasswordPolicyError(
            f"the password is {len(encoded)} bytes long; bcrypt allows at most "
            f"{MAX_PASSWORD_BYTES} bytes (UTF-8)"
        )
    if b"\x00" in encoded:
        raise PasswordPolicyError("the password contains a NUL character")
    return encoded


def hash_rounds(password_hash: str) -> int | None:
    """The cost of a `$2b$12$...` hash, or None if it is not one."""
    parts = password_hash.split("$")
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return int(parts[2])


def _lower_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _HASH_THREAD_NICENESS)


def _check(password: bytes, password_hash: bytes, pad_to_rounds: int = 0) -> bool:
    """`checkpw`, then as much more work as a hash of cost `pad_to_rounds` would take.

    A hash made at a lower cost (before the cost was raised; it is upgraded at the
    user's next login) checks faster than the dummy an unknown user gets, which
    would tell an attacker the user exists. bcrypt's work doubles per round, so
    2^(k - r) - 1 more hashes at cost r add up to one at cost k (as Django's
    `harden_runtime` does).
    """
    try:
        ok = bcrypt.checkpw(password, password_hash)
        rounds = hash_rounds(password_hash.decode("ascii", errors="replace"))
        if rounds is not None and rounds < pad_to_rounds:
            salt = password_hash[:29]  # "$2b$" + cost + "$" + 22 characters of salt
            for _ in range(2 ** (pad_to_rounds - rounds) - 1):
                bcrypt.hashpw(password, salt)
    except ValueError:
        return False
    return ok


def _timed(fn: Callable[..., object], *args: object) -> object:
    """Run one hash or check in its thread, timed there: the queue before it is not bcrypt's."""
    start = time.perf_counter()
    try:
        return fn(*args)
    finally:
        metrics.PASSWORD_HASH_SECONDS.observe(time.perf_counter() - start)


class PasswordHasher:
    """Hashes and checks passwords in a bounded pool of low-priority threads.

    At most `threads` hashes run at once (default: one per core); the rest wait
    their turn without blocking the event loop.
    """

    def __init__(self, *, rounds: int, threads: int = 0) -> None:
        self.rounds = rounds
        workers = threads or os.cpu_count() or 1
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="bcrypt", initializer=_lower_priority
        )
        self._dummy: bytes | None = None
        self._dummy_lock = asyncio.Lock()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., object], *args: object) -> object:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _timed, fn, *args)

    async def hash(self, password: str) -> str:
        encoded = validate_new_password(password)
        salt = bcrypt.gensalt(self.rounds)
        hashed = await self._run(bcrypt.hashpw, encoded, salt)
        assert isinstance(hashed, bytes)
        return hashed.decode("ascii")

    async def verify(self, password: str, password_hash: str | None) -> bool:
        """Whether `password` is right; see `check`."""
        return (await self.check(password, password_hash)).ok

    async def check(self, password: str, password_hash: str | None) -> PasswordCheck:
        """Check a password; with no hash (unknown user) spend the same time on a dummy.

        Answering faster for unknown users would tell an attacker which usernames
        exist (the timing side of the anti-enumeration rule). A password that NFC
        changes is checked a second time as typed, for a hash made before passwords
        were normalised; the dummy then runs twice as well.
        """
        typed = password.encode("utf-8", errors="surrogatepass")
        normal = normalize_password(password).encode("utf-8", errors="surrogatepass")
        candidates = [normal] if normal == typed else [normal, typed]
        if password_hash is None or len(normal) > MAX_PASSWORD_BYTES:
            dummy = await self._dummy_hash()
            for candidate in candidates:
                await self._run(_check, candidate[:MAX_PASSWORD_BYTES], dummy)
            return PasswordCheck(ok=False, rehash=False)
        stored = password_hash.encode("ascii", errors="replace")
        for candidate in candidates:
            if await self._run(_check, candidate, stored, self.rounds) is True:
                legacy = candidate is not normal
                return PasswordCheck(ok=True, rehash=legacy or self.needs_rehash(password_hash))
        return PasswordCheck(ok=False, rehash=False)

    def needs_rehash(self, password_hash: str) -> bool:
        rounds = hash_rounds(password_hash)
        return rounds is None or rounds < self.rounds

    async def _dummy_hash(self) -> bytes:
        if self._dummy is None:
            async with self._dummy_lock:
                if self._dummy is None:
                    hashed = await self._run(
                        bcrypt.hashpw, b"timing-guard-dummy", bcrypt.gensalt(self.rounds)
                    )
                    assert isinstance(hashed, bytes)
                    self._dummy = hashed
        return self._dummy

    async def warm_up(self) -> None:
        """Compute the dummy hash now, so the first unknown-user login is not slower."""
        await self._dummy_hash()
