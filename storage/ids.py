"""Identifiers: shard ids are `s` + a UUID, printable and parseable; collection names."""

from __future__ import annotations

import re
import uuid

from .errors import InvalidInput

_SHARD_RE = re.compile(r"^s[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

#: The longest collection name (each part of `schema.name`), as PostgreSQL's identifiers.
NAME_MAX = 63
#: SUBTLE: matched with `fullmatch`: `match` with `$` lets a trailing newline through.
_NAME_RE = re.compile(r"[a-z_][a-z0-9_]*")
#: Names starting with `__` belong to the query connection's internals (`__since`,
#: `__changes_<name>`, `__parts_...`): a collection there would collide with them.
RESERVED_PREFIX = "__"
NAME_RULE = f"[a-z_][a-z0-9_]*, at most {NAME_MAX} characters, not starting with {RESERVED_PREFIX!r}"


def shown_name(name: object) -> str:
    """`name` for an error message: its repr, cut to 40 characters of a long name."""
    if isinstance(name, str) and len(name) > 40:
        return f"{name[:40]!r}... ({len(name)} characters)"
    return repr(name)


def name_problem(part: object) -> str | None:
    """Why `part` (one part of a collection name) is not valid, or None if it is.

    Example:
        >>> [name_problem(n) for n in ("orders", "orders\\n", "__since", "x" * 64)]
        [None, 'not [a-z_][a-z0-9_]*', "'__' is reserved for query internals", 'longer than 63 characters']
    """
    if not isinstance(part, str):
        return f"must be a str, got {type(part).__name__}"
    if not _NAME_RE.fullmatch(part):
        return "not [a-z_][a-z0-9_]*"
    if part.startswith(RESERVED_PREFIX):
        return f"{RESERVED_PREFIX!r} is reserved for query internals"
    if len(part) > NAME_MAX:
        return f"longer than {NAME_MAX} characters"
    return None


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
