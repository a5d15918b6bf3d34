"""Column names are data, never SQL (issue 14, item 1): through the storage API.

A column named `a'` once made every query fail with a Parser Error (the name went
unescaped into a string literal), and a crafted name could run SQL. Every path that
builds SQL from a schema is exercised here with names holding quotes, backslashes,
`;`, `--`, newlines, braces and unicode: the views of `storage.query` (scan, unnest,
split, consolidate; by path and confined), `changes()`, the negative-count check
that names the row, the overflow check, snapshots and compaction.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

import storage

HOSTILE = [
    "a'", 'b"', "c\\", "d;", "e--", "f\nx", "ü€ 名", "g', read_csv('/etc/passwd')) --",
    "h\"); SELECT 1; --", "{'x': 1}", "$1", "?", "it's \"both\"",
]


SCHEMA = pa.schema([(n, pa.string()) for n in HOSTILE] + [("v", pa.int64())])


def table(rows: list[tuple[str, int, int, int]]) -> pa.Table:
    """Every hostile column holds the row's key; `v` its value."""
    k, v, t, d = zip(*rows, strict=True)
    cols = {n: pa.array(k, pa.string()) for n in HOSTILE}
    return pa.table({**cols, "v": pa.array(v, pa.int64()), "_time": pa.array(t, pa.int64()),
                     "_diff": pa.array(d, pa.int64())})


def row(key: str, v: int, **extra: int) -> dict[str, object]:
    return {**{n: key for n in HOSTILE}, "v": v, **extra}


@pytest.mark.parametrize("confine", [False, True])
def test_hostile_column_names_through_every_read_path(client, confine):
    s = storage.ShardId.new()
    w = client.open_writer(s, schema=SCHEMA, compact=False)
    w.compare_and_append(table([(f"x{i}", i, 0, 1) for i in range(20)] + [("dup", 7, 1, 3)]), 0, 10)
    # Few retractions: the `split` path.
    w.compare_and_append(table([("x0", 0, 10, -1)]), 10, 20)
    q = storage.query.qident
    with storage.query.connect(client, {"t": s}, confine=confine) as con:
        assert con.sql("SELECT count(*), sum(v) FROM t").fetchall() == [(22, sum(range(1, 20)) + 21)]
        for name in HOSTILE:
            got = sorted(con.sql(f"SELECT {q(name)} FROM t WHERE v = 7").fetchall())
            assert got == [("dup",)] * 3 + [("x7",)], name
        assert con.sql("SELECT count(*) FROM changes('t')").fetchall() == [(22,)]
    # Many retractions: the `consolidate` path.
    w.compare_and_append(table([(f"x{i}", i, 20, -1) for i in range(1, 20)]), 20, 30)
    with storage.query.connect(client, {"t": s}, confine=confine) as con:
        assert con.sql("SELECT * FROM t").fetchall() == [(*["dup"] * len(HOSTILE), 7)] * 3
    # A negative count names the row, column names and all.
    w.compare_and_append(table([("dup", 7, 30, -4)]), 30, 40)
    with pytest.raises(storage.NegativeCount, match="has negative count -1") as e:
        storage.query.connect(client, {"t": s}, confine=confine)
    assert all(repr(n) in str(e.value) for n in HOSTILE), str(e.value)
    with pytest.raises(storage.NegativeCount):
        client.open_leased_reader(s).snapshot(as_of=35)
    assert client.open_leased_reader(s).snapshot(as_of=25).to_pylist() == [row("dup", 7, _diff=3)]
    client.compact(s)
    assert client.open_leased_reader(s).snapshot(as_of=29).to_pylist() == [row("dup", 7, _diff=3)]


def test_an_overflow_names_a_hostile_row(client):
    s = storage.ShardId.new()
    w = client.open_writer(s, schema=SCHEMA, compact=False)
    w.compare_and_append(table([("big", 1, 0, 2**62)]), 0, 1)
    w.compare_and_append(table([("big", 1, 1, 2**62)]), 1, 2)
    with pytest.raises(storage.DiffOverflow, match="outside int64"):
        client.open_leased_reader(s).snapshot(as_of=1)
