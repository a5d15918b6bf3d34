"""Errors raised by connectors; all derive from `storage.errors.ShardflowError`."""

from __future__ import annotations

from storage.errors import ShardflowError

__all__ = ["ConnectorError", "FileSourceError", "PostgresCdcError", "WebhookError"]


class ConnectorError(ShardflowError):
    """Bad input or a misconfigured external system; the message names the input and the offset."""


class FileSourceError(ConnectorError, ValueError):
    """A malformed record (or file). Attributes: `path`, `line` (1-based or None), `offset` (byte)."""

    def __init__(self, msg: str, *, path: str, line: int | None = None, offset: int | None = None):
        super().__init__(msg)
        self.path = path
        self.line = line
        self.offset = offset


class PostgresCdcError(ConnectorError):
    """PostgreSQL is not set up for CDC (wal_level, publication, slot, replica identity) or sent something unsupported."""


class WebhookError(ConnectorError):
    """The webhook server could not start or deliver a request."""
