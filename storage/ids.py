"""Identifiers: shard ids are `s` + a UUID, printable and parseable."""

from __future__ import annotations

import re
import uuid

from .errors import InvalidInput

_SHARD_RE = re.compile(r"^s[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class ShardId(str):
    """A shard id, e.g. `s0f3a...`: a str that only holds valid ids.

    Example:
        >>> s = ShardId.new(); ShardId(str(s)) == s
        True
        >>> ShardId("nope")
        Traceback (most recent call last):
        ...
        storage.errors.InvalidInput: shard id 'nope' is not of the form s<uuid>
    """

    __slots__ = ()

    def __new__(cls, value: str) -> ShardId:
        if isinstance(value, ShardId):
            return value
        if not isinstance(value, str) or not _SHARD_RE.fullmatch(value):
            raise InvalidInput(f"shard id {value!r} is not of the form s<uuid>")
        return super().__new__(cls, value)

    @classmethod
    def new(cls) -> ShardId:
        return cls("s" + str(uuid.uuid4()))

    def __repr__(self) -> str:
        return f"ShardId({str(self)!r})"


def new_id(prefix: str) -> str:
    """A fresh random id for writers and readers, e.g. `w3f2a...`."""
    return prefix + uuid.uuid4().hex[:16]
