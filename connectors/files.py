"""`FileSource`: CSV, JSON Lines and Parquet files under a glob, read once or tailed.

Delivery: **exactly-once**, given that the sink commits each batch's offsets in
the same compare-and-set as its data.

Offsets: per partition, `{path: entry}` with `entry = {"off", "dev", "ino",
"hlen", "hcrc"}`: every byte of the file before `off` has been emitted (for CSV
this includes the header line; for Parquet `off` is the file size once the file
was read), and `dev`/`ino`/`hcrc` fingerprint that file (device, inode, crc32
of its first `hlen = min(off, 4096)` bytes). Off-by-one rule: a resumed
partition reads each file from its committed offset on, i.e. *after* the last
emitted byte; a file not in the offsets is read from the start. A plain byte
offset (the format before fingerprints) is still accepted: the file is resumed
at it if it is at least that long (a rotation cannot be told apart then), else
the run stops with a `FileSourceError` naming it; the next commit upgrades it.

Rotation: when the file under a known path has another fingerprint, it is new
content and is read from byte 0, after the old content is finished:

- renamed away and recreated (`x.csv` -> `x.csv.1`, new `x.csv`): the old
  file is found in the same directory by device and inode (and first bytes)
  and read from the offset to its end (a last line without newline counts);
- copied and truncated (logrotate `copytruncate`: same inode, new first bytes
  or shorter than the offset): the copy is the newest `x.csv*` in the same
  directory with the same first bytes, at least as long as the offset; it is
  read from the offset to its end.

If the old content cannot be found, the new file is still read from 0 (rows
written to the old file after the last read are then not ingested). A file
that is shorter than its offset with no copy found (same inode) raises
`FileSourceError`: files must otherwise be append-only. Parquet files are read
whole, so new content under a known path is simply read again from 0.

Times: with `partitions=1`, the partition's *byte clock*. All records of one
read (a chunk of whole lines, or a whole Parquet file) get `_time = S`, where
`S` is the sum of the partition's file offsets before the chunk (raised to the
shard's upper when the job started, if that is larger). After the chunk the
partition emits `Progress(S + chunk bytes)`. Times are thus derived from the
offsets alone: a batch run over the same files yields the same times on every
replay, and a resumed run continues where the committed offsets say. In
continuous mode a chunk ends where the file ended when it was polled, so
chunking (and hence the exact times) follows the writer's timing; only
uncommitted data is ever re-read.

With `partitions > 1` all partitions share one time domain that starts at
`t0` (the shard's upper at start, or the largest partition's offset sum), so
the stream frontier (the minimum over partitions) is meaningful:

- batch: each partition's clock is `t0` + the bytes it has read in this run,
  and every partition ends the run with `Progress(t0 + BATCH_SPAN)` (2**40), so
  the final frontier is beyond every partition's data whichever finishes
  first. A partition may read at most `BATCH_SPAN` bytes per run.
- continuous: the shared tick, `t0` + milliseconds since the source was built
  (at least one more than the previous chunk); an idle partition emits
  `Progress(tick)` every second, so it never holds back the others' commits.

Records: one per line (CSV without newlines inside quoted values; JSON Lines one
object per line, unknown fields ignored, missing fields null). Blank lines are
skipped. Parsing runs in `pyarrow.csv` / `pyarrow.json` over whole chunks; only
when a chunk fails does the source bisect it to find the bad lines.

Malformed records (including a string that is not valid UTF-8, which
pyarrow's JSON and Parquet readers let through): with `on_error="raise"` (default) the first bad record raises
`FileSourceError` naming the file, the 1-based line, the byte offset and what was
wrong; nothing of that chunk is emitted. With `on_error="collect"` the good
records are emitted as usual and the bad ones as an `ErrorBatch` (an
`UpdateBatch` subclass with `ERRORS_SCHEMA`: file, line, offset, error, record)
at the same time and with the same offsets. Route them with
`split_errors(step_id, stream)`, which returns `.data` and `.errors` streams
(Progress goes to both); sink both with `ctx.persist_split(step_id, data, errors,
name)`, which puts `.errors` into the `<name>_errors` collection
(`FileSource.errors_collection`) and commits it before the data (two separate
sinks can lose error rows to a kill between their commits).

A line holding two JSON objects (`{"a": 1}{"a": 2}`) is a bad record: JSON Lines is
one object per line.

A partial line at the end of a file (no trailing newline yet) is not an error in
continuous mode: it waits for the rest. In batch mode the file is complete, so a
last line without newline is a record. A Parquet file is read once its footer is
complete; in continuous mode a `.parquet` file that does not start with `PAR1`, or
still has no footer `PARQUET_SETTLE_S` (60 s) after its last change, is a bad file
(raised, or one row in `<name>_errors`). A glob that matches no file fails a batch
run unless `allow_empty` (see the argument). Besides rotation (above), files must be append-only.

Example:
    >>> import os, tempfile
    >>> import pyarrow as pa
    >>> from bytewax.dataflow import Dataflow
    >>> import bytewax.operators as op
    >>> from bytewax.testing import TestingSink, run_main
    >>> d = tempfile.mkdtemp()
    >>> with open(os.path.join(d, "a.csv"), "w") as f:
    ...     _ = f.write("id,name\\n1,x\\n2,y\\n")
    >>> src = FileSource(os.path.join(d, "*.csv"), format="csv", schema=pa.schema([("id", pa.int64()), ("name", pa.string())]))
    >>> flow, out = Dataflow("files"), []
    >>> op.output("out", op.input("in", flow, src), TestingSink(out))
    >>> run_main(flow)
    >>> out[0].frontier  # the initial progress
    Frontier(0)
    >>> out[1].table.to_pylist()
    [{'id': 1, 'name': 'x', '_time': 0, '_diff': 1}, {'id': 2, 'name': 'y', '_time': 0, '_diff': 1}]
    >>> [e["off"] for e in out[1].offsets["files/0"].values()], out[2].frontier
    ([16], Frontier(16))
"""

from __future__ import annotations

import glob as globmod
import io
import logging
import os
import re
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import bytewax.operators as op
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from bytewax.dataflow import Stream, operator

from storage import DIFF, TIME, Frontier, Progress, UpdateBatch, check_row_schema, update_schema
from storage.errors import InvalidInput

from .base import Item, UpdatePartition, UpdateSource, awake_in, partition_key, stop_requested
from .errors import FileSourceError

__all__ = ["ERRORS_SCHEMA", "ErrorBatch", "FileSource", "FileSourceError", "SplitErrors", "split_errors"]

Format = Literal["csv", "jsonl", "parquet"]

#: Row schema of the `<name>_errors` collection.
ERRORS_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int64()),
        ("offset", pa.int64()),
        ("error", pa.string()),
        ("record", pa.string()),
    ]
)

_ONE = pa.scalar(1, pa.int64())
_IDLE_PROGRESS_S = 1.0
#: Environment variable that `shardflow run --allow-empty` sets (see `FileSource(allow_empty=)`).
ALLOW_EMPTY_ENV = "SHARDFLOW_ALLOW_EMPTY"
#: Continuous mode: a `.parquet` file still without its footer this long after its
#: last change is not being written any more: it is a bad file, not a file in progress.
PARQUET_SETTLE_S = 60.0
_PAR1 = b"PAR1"
#: Lines holding something other than white space (a line with two JSON objects parses to two rows).
_NONBLANK_LINE = re.compile(rb"(?m)^[ \t\r\f\v]*[^ \t\r\f\v\n]")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorBatch(UpdateBatch):
    """Bad records (rows under `ERRORS_SCHEMA`) for the `<name>_errors` collection."""


class FileSource(UpdateSource):
    """Files matching `glob`, as a source of updates (see the module docstring).

    Args:
        glob: A `glob.glob` pattern (`**` allowed). Paths are used as found, so
            they are the keys of the offsets: keep the pattern stable across runs.
        format: `"csv"` (a header line by default), `"jsonl"` or `"parquet"`.
        schema: The row schema. CSV columns are matched by position and the
            header must name them; JSON fields and Parquet columns by name.
        mode: `"batch"` reads every matching file to its end once, then EOF;
            `"continuous"` keeps polling for new files and appended bytes until
            `request_stop()`.
        on_error: `"raise"` or `"collect"` (see the module docstring).
        time: `"offset"`, the byte clock (the only choice so far).
        name: Source name: partition keys are `"<name>/<i>"`, errors go to
            `"<name>_errors"`.
        partitions: Number of partitions; a file belongs to partition
            `crc32(path) % partitions`. With more than one, partitions share
            one time domain (see "Times"), in batch and continuous mode.
        header: CSV only: whether each file starts with a header line.
        block_size: Bytes read per chunk (whole lines; a longer line is read whole).
        poll_interval: Seconds between polls in continuous mode.
        resume: `{partition key: {path: entry}}` from the shard's metadata
            (an entry is a fingerprinted offset, or a plain byte offset).
        resume_upper: The shard's upper at start; times never go below it.
        allow_empty: Batch mode: a glob that matches no file is an empty input
            rather than an error. None (the default) takes `$SHARDFLOW_ALLOW_EMPTY`
            (`shardflow run --allow-empty` sets it). Continuous mode only logs a
            warning, since files may come later.

    Raises:
        InvalidInput: a bad option.
        FileSourceError: batch mode, the glob matches no file, and empty input is not allowed.
    """

    def __init__(
        self,
        glob: str,
        *,
        format: Format,
        schema: pa.Schema,
        mode: Literal["batch", "continuous"] = "batch",
        on_error: Literal["raise", "collect"] = "raise",
        time: Literal["offset"] = "offset",
        name: str = "files",
        partitions: int = 1,
        header: bool = True,
        block_size: int = 16 << 20,
        poll_interval: float = 0.25,
        resume: Mapping[str, Any] | None = None,
        resume_upper: Frontier | None = None,
        allow_empty: bool | None = None,
    ) -> None:
        super().__init__(resume=resume, resume_upper=resume_upper)
        where = f"FileSource {name!r}"
        if format not in ("csv", "jsonl", "parquet"):
            raise InvalidInput(f"{where}: format must be 'csv', 'jsonl' or 'parquet', got {format!r}")
        if mode not in ("batch", "continuous"):
            raise InvalidInput(f"{where}: mode must be 'batch' or 'continuous', got {mode!r}")
        if on_error not in ("raise", "collect"):
            raise InvalidInput(f"{where}: on_error must be 'raise' or 'collect', got {on_error!r}")
        if time != "offset":
            raise InvalidInput(f"{where}: time must be 'offset' (the byte clock), got {time!r}")
        if not isinstance(partitions, int) or partitions < 1:
            raise InvalidInput(f"{where}: partitions must be an int >= 1, got {partitions!r}")
        if block_size < 1:
            raise InvalidInput(f"{where}: block_size must be >= 1, got {block_size!r}")
        check_row_schema(schema, where)
        self.glob = glob
        self.format: Format = format
        self.schema = schema
        self.mode = mode
        self.on_error = on_error
        self.name = name
        self.partitions = partitions
        self.header = header
        self.block_size = block_size
        self.poll_interval = poll_interval
        self.update_schema = update_schema(schema)
        self.errors_collection = f"{name}_errors"
        # The time every partition starts at (see "Times" in the module docstring).
        if partitions > 1 and self.resume and resume_upper is None:
            # SUBTLE: a resumed run's shared time starts at t0; the last run's upper is
            # t0 + BATCH_SPAN or a wall-clock tick, which the offsets cannot tell. Started
            # below it, a persist sink would drop the new records as history (silent loss).
            raise InvalidInput(
                f"{where}: partitions > 1 resumes need resume_upper= (the collection's upper, "
                f"e.g. resume_upper=ctx.upper({name!r}) in a flow file), so that new times start past it"
            )
        starts = [_offsets_sum(v) for v in self.resume.values() if isinstance(v, Mapping)]
        self.t0 = max([*starts, 0] if partitions > 1 else [0])
        if resume_upper is not None and resume_upper.time is not None:
            self.t0 = max(self.t0, resume_upper.time)
        self._anchor_ms = _now_ms()  # continuous, partitions > 1: the shared tick counts ms from here
        if allow_empty is None:
            allow_empty = os.environ.get(ALLOW_EMPTY_ENV, "") not in ("", "0")
        self.allow_empty = allow_empty
        if not any(os.path.isfile(p) for p in globmod.glob(glob, recursive=True)):
            msg = f"{where}: the glob {glob!r} matches no file"
            if mode == "batch" and not allow_empty:
                raise FileSourceError(
                    f"{msg}; a batch run would read nothing (pass --allow-empty, or allow_empty=True, if that is expected)",
                    path=glob,
                )
            log.warning("%s%s", msg, " (yet: waiting for files)" if mode == "continuous" else "; reading nothing")

    def list_parts(self) -> list[str]:
        return [partition_key(self.name, p) for p in range(self.partitions)]

    def tick(self) -> int:
        """Continuous mode with `partitions > 1`: the shared time, `t0` + ms since this source was built."""
        return self.t0 + max(0, _now_ms() - self._anchor_ms)

    def build_partition(self, key: str, resume_offset: Any) -> _FilePartition:
        if resume_offset is not None and not isinstance(resume_offset, Mapping):
            msg = f"FileSource {self.name!r}: resume offset of {key} must be {{path: offset}}, got {resume_offset!r}"
            raise InvalidInput(msg)
        for path, e in (resume_offset or {}).items():
            if not _valid_entry(e):
                msg = (
                    f"FileSource {self.name!r}: resume offset of {key} for {path}: expected a byte offset or "
                    f"{{'off', 'dev', 'ino', 'hlen', 'hcrc'}}, found {e!r}"
                )
                raise InvalidInput(msg)
        index = self.list_parts().index(key)
        return _FilePartition(self, key, index, dict(resume_offset or {}))

    def files(self, index: int) -> list[str]:
        """The files of partition `index`, sorted by path."""
        paths = sorted(p for p in globmod.glob(self.glob, recursive=True) if os.path.isfile(p))
        if self.partitions == 1:
            return paths
        return [p for p in paths if zlib.crc32(p.encode()) % self.partitions == index]

    # ---- parsing (pure: bytes -> table) ----
    def parse(self, data: bytes) -> pa.Table:
        """Parse whole lines of CSV/JSONL (no header) into a table under `schema`.

        Raises pyarrow's ArrowInvalid or ValueError on a malformed record.
        """
        if not data or data.isspace():  # (not `strip()`: that copies a 16 MiB chunk)
            return self.schema.empty_table()
        if self.format == "csv":
            # Threads parse blocks of whole lines in parallel; the table keeps the input's row
            # order, so offsets and error lines mean the same as on one thread.
            t = pacsv.read_csv(
                io.BytesIO(data),
                read_options=pacsv.ReadOptions(
                    column_names=self.schema.names, use_threads=True, block_size=_csv_block(len(data))
                ),
                parse_options=pacsv.ParseOptions(newlines_in_values=False),
                convert_options=pacsv.ConvertOptions(column_types=self.schema),
            )
        else:
            t = pajson.read_json(
                io.BytesIO(data),
                read_options=pajson.ReadOptions(use_threads=False, block_size=max(len(data) + 1, 1 << 16)),
                parse_options=pajson.ParseOptions(
                    explicit_schema=self.schema, unexpected_field_behavior="ignore"
                ),
            )
            t = t.select(self.schema.names)
            lines = len(_NONBLANK_LINE.findall(data))
            if t.num_rows != lines:
                # SUBTLE: pyarrow's JSON reader takes `{"a": 1}{"a": 2}` on one line as two
                # rows; JSON Lines is one object per line, so that line is a bad record.
                raise ValueError(
                    f"{t.num_rows} JSON values on {lines} line(s): a JSON Lines record is one object on its own line"
                )
        return _conform(t, self.schema)


#: Bytes per block of the threaded CSV parse: small enough that a chunk splits over every core,
#: big enough that a block costs more than its scheduling.
CSV_BLOCK_MIN = 256 << 10
CSV_BLOCK_MAX = 4 << 20


def _csv_block(n: int) -> int:
    """pyarrow's CSV block size for `n` bytes: about four blocks per core, within [MIN, MAX]."""
    return max(CSV_BLOCK_MIN, min(CSV_BLOCK_MAX, n // (4 * (os.cpu_count() or 1)) + 1))


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    for field in schema:
        if not field.nullable and t.column(field.name).null_count:
            raise ValueError(f"column {field.name!r} is null but the schema says not null")
    t = t.cast(schema)
    for field in schema:
        if _has_strings(field.type):
            # SUBTLE: pyarrow's JSON reader (and Parquet) do not check UTF-8; a bad string
            # stored in a shard makes every later query fail, so it is a bad record here.
            try:
                t.column(field.name).validate(full=True)
            except pa.ArrowInvalid:
                raise ValueError(f"column {field.name!r}: invalid UTF-8 in a string") from None
    return t


def _has_strings(t: pa.DataType) -> bool:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return True
    return any(_has_strings(t.field(i).type) for i in range(t.num_fields))


def _with_time_diff(t: pa.Table, ts: int) -> pa.Table:
    n = t.num_rows
    t = t.append_column(pa.field(TIME, pa.int64(), nullable=False), pa.repeat(pa.scalar(ts, pa.int64()), n))
    return t.append_column(pa.field(DIFF, pa.int64(), nullable=False), pa.repeat(_ONE, n))


def _short(e: BaseException, names: list[str] | None = None) -> str:
    """pyarrow's message, first line only, with "In CSV column #i: Row #j:" turned into the column's name."""
    lines = str(e).strip().splitlines()
    msg = lines[0] if lines else type(e).__name__
    m = _CSV_PREFIX.match(msg)
    if m and names is not None and int(m.group(1)) < len(names):
        msg = f"column {names[int(m.group(1))]!r}: " + msg[m.end() :]
    return msg


_CSV_PREFIX = re.compile(r"In CSV column #(\d+): (?:Row #\d+: )?")


class _FilePartition(UpdatePartition):
    def __init__(self, src: FileSource, key: str, index: int, offsets: dict[str, Any]) -> None:
        self.src = src
        self.key = key
        self.keys = tuple(src.list_parts())
        self.index = index
        self.offset = offsets  # {path: entry (see _entry)}; what the next batch will claim
        self._lines: dict[str, int] = {}  # real path -> newlines before the offset, when known
        # SUBTLE: with partitions > 1 every partition starts at the same time t0 (the shard's
        # upper, or the largest partition byte clock), so their frontiers are comparable.
        self._clock = src.t0 if src.partitions > 1 else max(_offsets_sum(offsets), src.t0)
        self._shared = src.partitions > 1
        self._batch_files: list[str] | None = src.files(index) if src.mode == "batch" else None
        self._awake: datetime | None = None
        self._last_progress = 0.0
        self._done = False
        self._progressed: int | None = None  # the last Progress emitted

    def _final(self) -> list[Item]:
        self._done = True
        if self._shared and self.src.mode == "batch":
            # Every partition of a batch run ends at the same frontier, t0 + BATCH_SPAN, so
            # the stream's final frontier (the minimum) is beyond every partition's data.
            if self._clock > self.src.t0 + BATCH_SPAN:
                msg = (
                    f"FileSource {self.src.name!r}: partition {self.key} read {self._clock - self.src.t0} bytes in "
                    f"one batch run; at most {BATCH_SPAN} are allowed per partition and run (use more partitions)"
                )
                raise FileSourceError(msg, path=self.src.glob)
            self._clock = self.src.t0 + BATCH_SPAN
        elif self._shared:
            self._clock = max(self._clock, self.src.tick())
        return [] if self._progressed == self._clock else [self._progress()]

    def _progress(self) -> Progress:
        self._last_progress = time.monotonic()
        self._progressed = self._clock
        return Progress(Frontier(self._clock), partition=self.key, partitions=self.keys)

    def _time(self) -> int:
        """The time of the next chunk (its records' `_time`)."""
        if self._shared and self.src.mode == "continuous":
            self._clock = max(self._clock, self.src.tick())
        return self._clock

    def _advance(self, nbytes: int) -> None:
        """After a chunk of `nbytes` at time `self._clock`: the next chunk's time."""
        if self._shared and self.src.mode == "continuous":
            self._clock += 1
        else:
            self._clock += nbytes

    def next_batch(self) -> list[Item]:
        if self._done:
            raise StopIteration()
        if self._progressed is None:
            return [self._progress()]  # initial: downstream learns this partition exists
        if self.src.mode == "continuous" and stop_requested():
            return self._final()
        files = self._batch_files if self._batch_files is not None else self.src.files(self.index)
        for path in files:
            items = self._read(path)
            if items is not None:
                self._awake = None
                return items
        if self.src.mode == "batch":
            return self._final()
        self._awake = awake_in(self.src.poll_interval)
        if time.monotonic() - self._last_progress >= _IDLE_PROGRESS_S:
            self._time()  # an idle partition moves with the shared tick
            return [self._progress()]
        return []

    def next_awake(self) -> datetime | None:
        return self._awake

    def close(self) -> None:
        pass

    # ---- which bytes to read next: fingerprints, rotation, copytruncate ----
    def _read(self, path: str) -> list[Item] | None:
        """Emit the next chunk stored under `path`, or None when it has nothing new (yet)."""
        e = self.offset.get(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None  # deleted after the glob; whatever was read stays read
        final = self.src.mode == "batch"
        if e is None:
            return self._chunk(path, path, 0, st, final)
        off = _entry_off(e)
        if not isinstance(e, Mapping):
            # An offset written before fingerprints: resume at it if the file can still hold it.
            if st.st_size < off:
                msg = (
                    f"{path}: file has {st.st_size} bytes, below the committed offset {off} (an offset without a "
                    f"fingerprint, from an older shardflow, so a rotation cannot be told apart); move the file "
                    f"away or drop the offset"
                )
                raise FileSourceError(msg, path=path, offset=off)
            return self._chunk(path, path, off, st, final) if st.st_size > off else None
        same_inode = (st.st_dev, st.st_ino) == (e["dev"], e["ino"])
        if same_inode and st.st_size == off:
            return None  # nothing new to read (a rewrite is caught once it grows past the offset)
        if same_inode and _head_matches(path, e):
            if st.st_size < off:
                msg = (
                    f"{path}: file shrank to {st.st_size} bytes below the committed offset {off} while its first "
                    f"{e['hlen']} bytes stayed the same (not a rotation or copytruncate); files must be append-only"
                )
                raise FileSourceError(msg, path=path, offset=off)
            if st.st_size == off or self.src.format == "parquet":
                return None
            return self._chunk(path, path, off, st, final)
        # `path` holds new content: renamed away and recreated, or copied and truncated.
        old = None if self.src.format == "parquet" else _find_old(path, e, same_inode)  # Parquet: read whole
        if same_inode and st.st_size < off and old is None:
            msg = (
                f"{path}: file shrank to {st.st_size} bytes below the committed offset {off} and no copy of its "
                f"old content ({path}*, same first {e['hlen']} bytes) is in its directory, so it is not a "
                f"copytruncate; files must be append-only"
            )
            raise FileSourceError(msg, path=path, offset=off)
        if old is not None:
            ost = os.stat(old)
            if ost.st_size > off:
                # Finish the old content first, keeping its identity in the offsets.
                return self._chunk(path, old, off, ost, True, ident=(e["dev"], e["ino"]), then=st)
        if st.st_size == 0:
            return None
        return self._chunk(path, path, 0, st, final)

    def _chunk(
        self,
        path: str,
        real: str,
        off: int,
        st: os.stat_result,
        final: bool,
        ident: tuple[int, int] | None = None,
        then: os.stat_result | None = None,
    ) -> list[Item] | None:
        """Read from `real` at `off`; the offsets record it under `path` with `real`'s (or `ident`'s) fingerprint.

        Draining old content (`ident` given): once it is read to its end, the
        entry becomes `then` (the file now under `path`) at offset 0.
        """
        if self.src.format == "parquet":
            return self._read_parquet(path, st)
        data = _read_lines(real, off, self.src.block_size, final)
        if not data:
            return None  # only a partial line so far: wait for the rest
        body_start = 0
        if off == 0 and self.src.format == "csv" and self.src.header:
            nl = data.find(b"\n")
            body_start = len(data) if nl < 0 else nl + 1
            self._check_header(real, data[:body_start])
        if off == 0:
            self._lines[real] = 0
        body = data[body_start:]
        try:
            good = self.src.parse(body)
            bad: list[tuple[int, int, str, bytes]] = []
        except (pa.ArrowInvalid, ValueError):
            good, bad = self._diagnose(real, off + body_start, body)
        if bad and self.src.on_error == "raise":
            line_base = self._line_base(real, off) + (1 if body_start else 0)
            idx, rec_off, what, _ = bad[0]
            line = line_base + idx + 1
            raise FileSourceError(f"{real}: line {line} (byte {rec_off}): {what}", path=real, line=line, offset=rec_off)
        ts = self._time()
        items: list[Item] = []
        dev, ino = ident if ident is not None else (st.st_dev, st.st_ino)
        if then is not None and off + len(data) >= st.st_size:
            entry = {"off": 0, "dev": then.st_dev, "ino": then.st_ino, "hlen": 0, "hcrc": zlib.crc32(b"")}
        else:
            entry = _entry(real, off + len(data), dev, ino, data if off == 0 else None, self.offset.get(path))
        new_offsets = {**self.offset, path: entry}
        if bad:
            line_base = self._line_base(real, off) + (1 if body_start else 0)
            errs = pa.table(
                {
                    "file": pa.array([real] * len(bad), pa.string()),
                    "line": pa.array([line_base + b[0] + 1 for b in bad], pa.int64()),
                    "offset": pa.array([b[1] for b in bad], pa.int64()),
                    "error": pa.array([b[2] for b in bad], pa.string()),
                    "record": pa.array([b[3].decode("utf-8", "replace") for b in bad], pa.string()),
                },
                schema=ERRORS_SCHEMA,
            )
            items.append(ErrorBatch(_with_time_diff(errs, ts), Frontier(ts), Frontier(ts + 1), offsets={self.key: new_offsets}))
        if real in self._lines:
            self._lines[real] += data.count(b"\n")
        items.insert(0, UpdateBatch(_with_time_diff(good, ts), Frontier(ts), Frontier(ts + 1), offsets={self.key: new_offsets}))
        self.offset = new_offsets
        self._advance(len(data))
        items.append(self._progress())
        return items

    def _check_header(self, path: str, line: bytes) -> None:
        try:
            names = pacsv.read_csv(io.BytesIO(line)).column_names if line.strip() else []
        except pa.ArrowInvalid as e:
            raise FileSourceError(f"{path}: line 1 (byte 0): bad CSV header: {_short(e)}", path=path, line=1, offset=0) from None
        if names != self.src.schema.names:
            msg = f"{path}: line 1 (byte 0): CSV header names columns {names}, the schema says {self.src.schema.names}"
            raise FileSourceError(msg, path=path, line=1, offset=0)

    def _line_base(self, path: str, off: int) -> int:
        """Number of newlines in `path` before byte `off` (error path only after a resume)."""
        n = self._lines.get(path)
        if n is None:
            with open(path, "rb") as f:
                n = 0
                left = off
                while left > 0:
                    buf = f.read(min(left, 1 << 20))
                    if not buf:
                        break
                    n += buf.count(b"\n")
                    left -= len(buf)
            self._lines[path] = n
        return n

    def _diagnose(self, path: str, start: int, body: bytes) -> tuple[pa.Table, list[tuple[int, int, str, bytes]]]:
        """Find the bad lines of a chunk that failed to parse, by bisection.

        Returns the good records as a table and the bad ones as
        `(line index in chunk, byte offset, what was wrong, raw line)`.
        """
        entries: list[tuple[int, int, bytes]] = []  # (line index, byte offset, line)
        pos = 0
        for i, line in enumerate(body.split(b"\n")):
            if line.strip():
                entries.append((i, start + pos, line))
            pos += len(line) + 1
        bad: list[tuple[int, int, str, bytes]] = []
        first_only = self.src.on_error == "raise"
        parse: Callable[[bytes], pa.Table] = self.src.parse

        def blob(lo: int, hi: int) -> bytes:
            return b"\n".join(e[2] for e in entries[lo:hi]) + b"\n"

        def bisect(lo: int, hi: int) -> None:
            if lo >= hi or (first_only and bad):
                return
            try:
                parse(blob(lo, hi))
                return
            except (pa.ArrowInvalid, ValueError) as e:
                if hi - lo == 1:
                    i, rec_off, line = entries[lo]
                    bad.append((i, rec_off, _short(e, self.src.schema.names), line))
                    return
            mid = (lo + hi) // 2
            bisect(lo, mid)
            bisect(mid, hi)

        bisect(0, len(entries))
        if first_only:
            return self.src.schema.empty_table(), bad
        bad_idx = {b[0] for b in bad}
        good = parse(b"\n".join(e[2] for e in entries if e[0] not in bad_idx) + b"\n")
        return good, bad

    def _read_parquet(self, path: str, st: os.stat_result) -> list[Item] | None:
        size = st.st_size
        try:
            t = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            if self.src.mode == "continuous" and not _parquet_complete(path):
                head = _head(path, 4)
                if not _PAR1.startswith(head[:4]):
                    # SUBTLE: a Parquet writer writes the magic first; a file that does not
                    # start with it will never become Parquet: waiting would ignore it forever.
                    return self._bad_file(path, st, f"not a Parquet file (it starts with {head!r}, not {_PAR1!r})")
                if time.time() - st.st_mtime < PARQUET_SETTLE_S:
                    return None  # still being written: wait for the footer
                return self._bad_file(
                    path, st, f"not a readable Parquet file: no footer {PARQUET_SETTLE_S:g} s after its last change"
                )
            return self._bad_file(path, st, f"not a readable Parquet file: {_short(e)}")
        try:
            missing = [n for n in self.src.schema.names if n not in t.column_names]
            if missing:
                raise ValueError(f"missing column {missing[0]!r} (the schema says {self.src.schema.names})")
            t = _conform(t.select(self.src.schema.names), self.src.schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
            return self._bad_file(path, st, _short(e))
        ts = self._time()
        self.offset = {**self.offset, path: _entry(path, size, st.st_dev, st.st_ino, None, None)}
        self._advance(size)
        return [UpdateBatch(_with_time_diff(t, ts), Frontier(ts), Frontier(ts + 1), offsets={self.key: self.offset}), self._progress()]

    def _bad_file(self, path: str, st: os.stat_result, what: str) -> list[Item]:
        if self.src.on_error == "raise":
            raise FileSourceError(f"{path}: {what}", path=path, offset=0)
        ts = self._time()
        errs = pa.table(
            {"file": [path], "line": pa.nulls(1, pa.int64()), "offset": [0], "error": [what], "record": pa.nulls(1, pa.string())},
            schema=ERRORS_SCHEMA,
        )
        self.offset = {**self.offset, path: _entry(path, st.st_size, st.st_dev, st.st_ino, None, None)}
        self._advance(st.st_size)
        off = {self.key: self.offset}
        return [
            UpdateBatch(_with_time_diff(self.src.schema.empty_table(), ts), Frontier(ts), Frontier(ts + 1), offsets=off),
            ErrorBatch(_with_time_diff(errs, ts), Frontier(ts), Frontier(ts + 1), offsets=off),
            self._progress(),
        ]


#: Bytes of a file's start that its fingerprint hashes (fewer while the offset is smaller).
HEAD_BYTES = 4096
#: Batch mode with partitions > 1: every partition ends a run at `t0 + BATCH_SPAN`
#: (its byte clock stays below that: at most 1 TiB per partition and run).
BATCH_SPAN = 1 << 40


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _entry_off(e: Any) -> int:
    return int(e["off"]) if isinstance(e, Mapping) else int(e)


def _offsets_sum(offsets: Mapping[str, Any]) -> int:
    return sum(_entry_off(e) for e in offsets.values())


def _valid_entry(e: Any) -> bool:
    if isinstance(e, int) and not isinstance(e, bool):
        return e >= 0
    if not isinstance(e, Mapping):
        return False
    return all(isinstance(e.get(k), int) for k in ("off", "dev", "ino", "hlen", "hcrc"))


def _head(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _entry(real: str, off: int, dev: int, ino: int, first: bytes | None, prev: Any) -> dict[str, int]:
    """The offset entry: byte offset plus the fingerprint (device, inode, crc32 of the first bytes).

    `first` is the chunk read at offset 0, if that is what was read; `prev` the
    previous entry, whose head hash is reused once it covers `HEAD_BYTES`.
    """
    hlen = min(off, HEAD_BYTES)
    if isinstance(prev, Mapping) and prev.get("hlen") == hlen and (prev.get("dev"), prev.get("ino")) == (dev, ino):
        hcrc = int(prev["hcrc"])
    else:
        head = first[:hlen] if first is not None and len(first) >= hlen else _head(real, hlen)
        hcrc = zlib.crc32(head[:hlen])
    return {"off": off, "dev": dev, "ino": ino, "hlen": hlen, "hcrc": hcrc}


def _head_matches(path: str, e: Mapping[str, Any]) -> bool:
    try:
        head = _head(path, int(e["hlen"]))
    except OSError:
        return False
    return len(head) == e["hlen"] and zlib.crc32(head) == e["hcrc"]


def _find_old(path: str, e: Mapping[str, Any], same_inode: bool) -> str | None:
    """Where the content an offset entry describes went, in `path`'s directory, or None.

    Renamed away (`same_inode` False): the file with the entry's device and
    inode (and the same first bytes). Copied and truncated (`same_inode`): the
    newest file named `<name>*` whose first bytes match and that is at least
    as long as the offset.
    """
    d = os.path.dirname(path) or "."
    base = os.path.basename(path)
    best: tuple[float, str] | None = None
    try:
        names = os.listdir(d)
    except OSError:
        return None
    for name in names:
        p = os.path.join(d, name)
        if name == base:
            continue
        try:
            st = os.stat(p)
        except OSError:
            continue
        if not same_inode:
            if (st.st_dev, st.st_ino) == (e["dev"], e["ino"]) and _head_matches(p, e):
                return p
            continue
        newer = best is None or st.st_mtime > best[0]
        if name.startswith(base) and st.st_size >= int(e["off"]) and newer and _head_matches(p, e):
            best = (st.st_mtime, p)
    return None if best is None else best[1]


def _parquet_complete(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def _read_lines(path: str, off: int, block: int, final: bool) -> bytes:
    """Bytes of `path` from `off`: at most about `block` bytes, ending after a newline.

    A line longer than `block` is read whole. At end of file, a last line without
    newline is included only if `final` (the file is complete).
    """
    with open(path, "rb") as f:
        f.seek(off)
        buf = f.read(block)
        while True:
            at_eof = len(buf) < block or not buf
            nl = buf.rfind(b"\n")
            if at_eof:
                return buf if final else buf[: nl + 1]
            if nl >= 0:
                return buf[: nl + 1]
            more = f.read(block)
            if not more:
                return buf if final else b""
            buf += more
            block *= 2


@dataclass(frozen=True)
class SplitErrors:
    """The two outputs of `split_errors`."""

    data: Stream[Item]
    errors: Stream[Item]


@operator
def split_errors(step_id: str, up: Stream[Item]) -> SplitErrors:
    """Split a source stream into its data and its bad records (`ErrorBatch`).

    Progress items go to both outputs, so both collections' uppers advance. The
    errors come out as plain `UpdateBatch`es under `ERRORS_SCHEMA`, with the
    source's offsets, ready for the `<name>_errors` collection: sink both with
    `ctx.persist_split` (errors committed first; see `flows.job`).
    """

    def data(x: Item) -> list[Item]:
        return [] if isinstance(x, ErrorBatch) else [x]

    def errors(x: Item) -> list[Item]:
        if isinstance(x, ErrorBatch):
            return [UpdateBatch(x.table, x.lower, x.upper, x.offsets)]
        return [x] if isinstance(x, Progress) else []

    return SplitErrors(op.flat_map("data", up, data), op.flat_map("errors", up, errors))

