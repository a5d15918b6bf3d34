"""The upsert envelope of `KafkaSource` (Materialize's ENVELOPE UPSERT), with its state in DuckDB on disk.

A record sets its key's value; a record with a null value (a tombstone) deletes
the key. For every record the source emits, at the record's time, the retraction
(`-1`) of the key's previous row (if any) and the insertion (`+1`) of the new one
(none for a tombstone), so the collection holds the latest row of every live key.
A record whose key is null is a decode error (it goes to `<name>_errors`).

Keys are per Kafka partition (the default partitioner sends a key to one
partition), so the state is too: one DuckDB file per Kafka partition,
`<upsert_state>/<topic>:<partition>.duckdb`, with two tables:

- `cur`: the latest row of every live key (one row per key, on disk, not in Python);
- `undo`: for each key changed by a batch whose offsets may not be committed yet,
  its row before that batch (`__had = false`: it had none) and the batch's first
  offset of that key (`__off`).

Each consumed batch updates both tables in one DuckDB transaction before its
updates leave the source. Restart: the shard's committed next offset `N` says
which batches are durable. For every key with undo entries at `__off >= N`
(batches not committed), the earliest such entry's row is put back into `cur`;
then `undo` is emptied. So `cur` is exactly the state as of the committed
offsets, whatever moment the previous run was killed at. `KafkaSource.ack(offsets)`
(call it with the sink's committed offsets) lets the partitions drop undo entries
below them as they go; without acks `undo` grows by one row per changed key per
batch until the next restart.
"""

from __future__ import annotations

import os
import re
from typing import Any

import duckdb
import pyarrow as pa

from storage import update_schema

__all__ = ["UpsertState"]


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class UpsertState:
    """The upsert state of one Kafka partition (see the module docstring)."""

    def __init__(self, folder: str, tp: str, row_schema: pa.Schema, next_offset: int | None) -> None:
        os.makedirs(folder, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9._:-]", "_", tp)
        self.path = os.path.join(folder, f"{safe}.duckdb")
        self.schema = row_schema
        self.cols = ", ".join(_q(n) for n in row_schema.names)
        self.con = duckdb.connect(self.path)
        self.con.execute("SET threads = 2")
        self.con.execute("SET memory_limit = '512MB'")
        self.con.execute("SET preserve_insertion_order = false")
        empty = row_schema.empty_table()
        self.con.register("__empty", empty)
        self.con.execute(f"CREATE TABLE IF NOT EXISTS cur AS SELECT ''::BLOB AS __key, {self.cols} FROM __empty LIMIT 0")
        self.con.execute(
            f"CREATE TABLE IF NOT EXISTS undo AS SELECT ''::BLOB AS __key, 0::BIGINT AS __off, "
            f"true AS __had, {self.cols} FROM __empty LIMIT 0"
        )
        self.con.unregister("__empty")
        self.con.execute("CREATE TABLE IF NOT EXISTS meta (recovered_at BIGINT)")
        have = [r[0] for r in self.con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'cur'").fetchall()]
        if have[1:] != list(row_schema.names):
            from .kafka import KafkaSourceError

            raise KafkaSourceError(f"upsert state {self.path} has columns {have[1:]}, the source {row_schema.names}: "
                                   "delete it together with the collection, or keep the schema")
        self._recover(next_offset)

    def _recover(self, next_offset: int | None) -> None:
        con = self.con
        row = con.execute("SELECT max(recovered_at) FROM meta").fetchall()
        before = row[0][0] if row and row[0][0] is not None else None
        n = next_offset or 0
        if next_offset is not None and before is not None and n < before:
            from .kafka import KafkaSourceError

            raise KafkaSourceError(f"upsert state {self.path} was rolled to offset {before}, but the collection's "
                                   f"committed next offset is {n}: delete the state folder to rebuild it")
        con.execute("BEGIN")
        if next_offset is None:  # nothing committed: nothing in the state either
            con.execute("DELETE FROM cur")
            con.execute("DELETE FROM undo")
        con.execute(
            "CREATE TEMP TABLE __back AS SELECT * FROM undo WHERE __off >= ? "
            "QUALIFY row_number() OVER (PARTITION BY __key ORDER BY __off) = 1", [n]
        )
        con.execute("DELETE FROM cur WHERE __key IN (SELECT __key FROM __back)")
        con.execute(f"INSERT INTO cur SELECT __key, {self.cols} FROM __back WHERE __had")
        con.execute("DELETE FROM undo")
        con.execute("DROP TABLE __back")
        con.execute("DELETE FROM meta")
        con.execute("INSERT INTO meta VALUES (?)", [n])
        con.execute("COMMIT")
        con.execute("CHECKPOINT")

    def ack(self, next_offset: int) -> None:
        """Batches before `next_offset` are durable: their undo entries are no longer needed."""
        self.con.execute("DELETE FROM undo WHERE __off < ?", [next_offset])

    def apply(self, rows: pa.Table, key: pa.Array, offset: pa.Array, tomb: pa.Array) -> pa.Table:
        """`rows` (row columns + `_time`, in offset order) -> the updates (retractions and inserts)."""
        b = rows.append_column("__key", key).append_column("__off", offset).append_column("__tomb", tomb)
        con, cols = self.con, self.cols
        con.register("__b", b)
        try:
            con.execute("BEGIN")
            out = con.sql(
                f"""
                SELECT {cols}, _time, 1::BIGINT AS _diff FROM __b WHERE NOT __tomb
                UNION ALL
                SELECT {cols}, __nt, -1 FROM (
                    SELECT *, lead(_time) OVER (PARTITION BY __key ORDER BY __off) AS __nt FROM __b
                ) WHERE NOT __tomb AND __nt IS NOT NULL
                UNION ALL
                SELECT {", ".join("c." + _q(n) for n in self.schema.names)}, f._time, -1
                FROM cur c JOIN (SELECT __key, arg_min(_time, __off) AS _time FROM __b GROUP BY __key) f
                  ON c.__key = f.__key
                """
            ).to_arrow_table()
            con.execute(
                f"""INSERT INTO undo SELECT f.__key, f.__off, c.__key IS NOT NULL,
                    {", ".join("c." + _q(n) for n in self.schema.names)}
                    FROM (SELECT __key, min(__off) AS __off FROM __b GROUP BY __key) f
                    LEFT JOIN cur c ON c.__key = f.__key"""
            )
            con.execute("DELETE FROM cur WHERE __key IN (SELECT __key FROM __b)")
            con.execute(
                f"""INSERT INTO cur SELECT __key, {cols} FROM __b
                    QUALIFY row_number() OVER (PARTITION BY __key ORDER BY __off DESC) = 1 AND NOT __tomb"""
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.unregister("__b")
        return _cast(out, self.schema)

    def close(self) -> None:
        self.con.close()


def _cast(t: Any, schema: pa.Schema) -> pa.Table:
    t = t.read_all() if hasattr(t, "read_all") else t
    return t.rename_columns(update_schema(schema).names).cast(update_schema(schema))
