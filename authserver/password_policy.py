"""What a new password must be (NIST SP 800-63B §5.1.1.2), wherever one is set.

- at least `min_length` characters (8 by default, `AUTHSERVER_PASSWORD_MIN_LENGTH`
  raises it), and at most 72 bytes of UTF-8, which is all bcrypt reads;
- not the username, in any case;
- not one of the 30,000 most common passwords. The list is zxcvbn's
  (`zxcvbn.frequency_lists`, the Dropbox estimator's Python port on PyPI), drawn
  from leaked-password corpora; it is compared case-insensitively, as zxcvbn does.
- no composition rules (no "one digit, one symbol"): NIST advises against them.

The message of the `PasswordPolicyError` says why, in words, and never repeats the
password.
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass

from authserver.passwords import PasswordPolicyError, normalize_password, validate_new_password

DEFAULT_MIN_LENGTH = 8
COMMON_PASSWORDS_SOURCE = "zxcvbn's list of the 30,000 most common passwords"


@functools.cache
def common_passwords() -> frozenset[str]:
    """zxcvbn's common-password list, loaded once (about 40 ms) on the first password set."""
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return frozenset(FREQUENCY_LISTS["passwords"])


def _length(password: str) -> int:
    """Characters as a person counts them: a combining accent is part of its letter."""
    return sum(1 for ch in password if not unicodedata.combining(ch))


@dataclass(frozen=True, slots=True)
class PasswordPolicy:
    min_length: int = DEFAULT_MIN_LENGTH

    def check(self, password: str, *, username: str | None = None) -> bytes:
        """The UTF-8 bytes of an acceptable new password (NFC), or `PasswordPolicyError`."""
        encoded = validate_new_password(password)  # empty, over 72 bytes, NUL
        normal = normalize_password(password)
        length = _length(normal)
        if length < self.min_length:
            raise PasswordPolicyError(
                f"the password is {length} characters long; use at least {self.min_length} "
                "(a few words make a good one)"
            )
        folded = normal.casefold()
        if username is not None and folded == normalize_password(username).casefold():
            raise PasswordPolicyError("the password is the username")
        if folded in common_passwords():
            raise PasswordPolicyError(
                f"the password is one of the most common passwords ({COMMON_PASSWORDS_SOURCE}), "
                "the first ones an attacker tries"
            )
        return encoded
