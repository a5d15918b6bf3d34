"""A plain script for tests/storage/test_exit.py: open a client, append, snapshot, exit.

argv: root [close|with|plain]. Not a test module.
"""

from __future__ import annotations

import sys

import pyarrow as pa

import storage

SCHEMA = pa.schema([("k", pa.string()), ("v", pa.int64())])


def work(c: storage.Client) -> None:
    shard = storage.ShardId.new()
    w = c.open_writer(shard, schema=SCHEMA)
    ks = [f"k{i}" for i in range(2000)]
    for t in range(30):
        tbl = pa.table({"k": ks, "v": list(range(t, t + 2000)), "_time": [t] * 2000, "_diff": [1] * 2000})
        w.compare_and_append(tbl, t, t + 1)
    r = c.open_leased_reader(shard)
    assert r.snapshot(as_of=29).num_rows == 60000


def main() -> None:
    root, how = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "plain"
    if how == "with":
        with storage.open(root) as c:
            work(c)
    else:
        c = storage.open(root)
        work(c)
        if how == "close":
            c.close()


if __name__ == "__main__":
    main()
