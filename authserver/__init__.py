"""authserver: password login, rotating refresh tokens with reuse detection, JWT access tokens."""

__version__ = "0.1.0"
