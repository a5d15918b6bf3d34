"""Blob: write-once keys to bytes.

Parts are written once under fresh keys and never modified, so a reader that
holds a key can trust its bytes (the sha256 recorded in the batch metadata
checks that). `put` is atomic: a reader sees the whole value or no key at all.
A put that finds the disk full raises `OutOfSpace` naming the path, and leaves
no temporary file behind.
"""

from __future__ import annotations

import errno
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import pyarrow.fs as pafs

from .errors import InvalidInput, OutOfSpace

_FULL = (errno.ENOSPC, errno.EDQUOT)


def _is_full(e: OSError) -> bool:
    # pyarrow's filesystems raise a bare OSError whose text carries strerror.
    return e.errno in _FULL or any(os.strerror(n) in str(e) for n in _FULL)


def _full(path: str, e: OSError) -> OutOfSpace:
    code = e.errno if e.errno in _FULL else next((n for n in _FULL if os.strerror(n) in str(e)), errno.ENOSPC)
    return OutOfSpace(f"blob {path}: {os.strerror(code).lower()}")


@dataclass(frozen=True)
class BlobMeta:
    key: str
    size: int
    mtime_s: float


class Blob(Protocol):
    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, data: bytes) -> None: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> Iterator[BlobMeta]: ...
    def local_path(self, key: str) -> str | None:
        """A filesystem path DuckDB can read directly, or None for remote stores."""
        ...


def _put_checked(put: Callable[[str, bytes], None], path: str, data: bytes) -> None:
    """`put(path, data)`, with a full disk or quota as one `OutOfSpace` naming `path`."""
    try:
        put(path, data)
    except OSError as e:
        if _is_full(e):
            raise _full(path, e) from None
        raise


class LocalBlob:
    """Blob on a local directory. The embedded default.

    `put` writes a temporary file, fsyncs it (unless `fsync=False`) and renames
    it into place, so a crash leaves either the whole value or nothing.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True, create: bool = True):
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = fsync
        if create:
            os.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise InvalidInput(f"blob key {key!r} is not a relative key")
        return os.path.join(self.root, key)

    def local_path(self, key: str) -> str | None:
        return self._path(key)

    def get(self, key: str) -> bytes | None:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(self, key: str, data: bytes) -> None:
        _put_checked(self._put, self._path(key), data)

    def _put(self, path: str, data: bytes) -> None:
        d = os.path.dirname(path)
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass

    def list(self, prefix: str = "") -> Iterator[BlobMeta]:
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, self.root).replace(os.sep, "/")
                # An abandoned temporary from a crashed put (".tmp-*") is listed too, so gc can remove it.
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                yield BlobMeta(key, st.st_size, st.st_mtime)


class ArrowFsBlob:
    """Blob on any `pyarrow.fs.FileSystem` (local, S3, GCS, or fsspec via PyFileSystem).

    Example:
        >>> import pyarrow.fs, tempfile
        >>> b = ArrowFsBlob(pyarrow.fs.LocalFileSystem(), tempfile.mkdtemp())
        >>> b.put("s1/p1", b"abc"); b.get("s1/p1"), b.get("nope")
        (b'abc', None)
    """

    def __init__(self, fs: pafs.FileSystem, base: str):
        self.fs = fs
        self.base = base.rstrip("/")
        self.fs.create_dir(self.base, recursive=True)

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise InvalidInput(f"blob key {key!r} is not a relative key")
        return f"{self.base}/{key}"

    def local_path(self, key: str) -> str | None:
        if isinstance(self.fs, pafs.LocalFileSystem):
            return self._path(key)
        return None

    def get(self, key: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self._path(key)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:  # some filesystems report a missing key as a generic OSError
            if "not found" in str(e).lower() or "no such file" in str(e).lower():
                return None
            raise

    def put(self, key: str, data: bytes) -> None:
        _put_checked(self._put, self._path(key), data)

    def _put(self, path: str, data: bytes) -> None:
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
            try:
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                self.fs.move(tmp, path)
            except BaseException:
                try:
                    self.fs.delete_file(tmp)
                except OSError:
                    pass
                raise
        else:
            # Object stores make a single PUT atomic on their own.
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def delete(self, key: str) -> None:
        try:
            self.fs.delete_file(self._path(key))
        except FileNotFoundError:
            pass

    def list(self, prefix: str = "") -> Iterator[BlobMeta]:
        sel = pafs.FileSelector(self.base, recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.File:
                continue
            key = info.path[len(self.base) + 1 :]
            if key.startswith(prefix):
                mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
                yield BlobMeta(key, info.size or 0, mtime)
