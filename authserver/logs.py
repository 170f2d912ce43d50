"""Logging to standard error: one JSON object per line, or plain text for people."""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

_CONFIGURED = "_authserver_handler"
# What every LogRecord has; anything else on a record was passed in `extra`.
_STANDARD = frozenset({*RESERVED_ATTRS, "taskName", "color_message"})


class _TextFormatter(logging.Formatter):
    """For people: the JSON format's fields, as `key=value` after the message."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD and value is not None
        )
        line = super().formatMessage(record)
        return f"{line} {fields}" if fields else line


def configure_logging(log_format: str = "json", level: str = "INFO") -> None:
    """Send every log record to stderr, unbuffered, in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _CONFIGURED, True)
    if log_format == "json":
        handler.setFormatter(
            # orjson: a refresh logs one audit line, and the stdlib encoder costs more.
            OrjsonFormatter(
                "%(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "name": "logger"},
                timestamp="time",
                reserved_attrs=[*RESERVED_ATTRS, "color_message"],
            )
        )
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in [h for h in root.handlers if getattr(h, _CONFIGURED, False)]:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's own loggers propagate to ours, so its lines share the format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Access lines carry query strings, where a careless client may put a token.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # Migration chatter on every start and every CLI command says nothing new.
    logging.getLogger("alembic").setLevel(logging.WARNING)
