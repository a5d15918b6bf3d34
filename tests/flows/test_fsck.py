"""No poisoned collection, through the CLI: a broken system.* collection stops nothing but
itself; fsck checks each collection on its own and names what is broken; bad strings and
counts past int64 are refused on write, or named on read.

Every test works on its own copy of one small demo run (20 ticks).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pytest

import storage
from storage import state as st
from storage.controller.catalog import CatalogStore
from storage.frontier import Frontier
from storage.updates import update_schema

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = Path(sys.executable).parent / "shardflow"
SINK_STATUS = "system.sink_status_history"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fsck") / "demo"
    r = sf("demo", "--data", str(d), "--ticks", "20")
    assert r.returncode == 0, r.stderr
    return d


@pytest.fixture
def data(demo: Path, tmp_path: Path) -> Path:
    d = tmp_path / "data"
    shutil.copytree(demo, d)
    return d


def sf(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CONSOLE), *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def shards(data: Path) -> dict[str, str]:
    client = storage.open(data)
    try:
        return {n: m.shard_id for n, m in CatalogStore(client.consensus).head().collections.items()}
    finally:
        client.close()


def part_paths(data: Path, name: str) -> list[Path]:
    client = storage.open(data)
    try:
        s = client.state(shards(data)[name])
        return [Path(str(client.blob.local_path(p.key))) for b in s.batches for p in b.parts]
    finally:
        client.close()


def fsck_lines(r: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """collection -> its one line (after 'name: ')."""
    out = {}
    for line in r.stdout.splitlines():
        name, _, rest = line.partition(": ")
        assert name not in out, r.stdout  # one line per collection
        out[name] = rest
    return out


def warnings(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "warning:" in ln]


def check_everything_else_works(data: Path, broken: str) -> None:
    """query on a user collection, inspect, demo again: all work, with one warning line at most."""
    r = sf("query", "--data", str(data), "--format", "csv", "SELECT count(*) AS n FROM bids")
    assert r.returncode == 0, r.stderr
    assert [x.strip('"') for x in r.stdout.splitlines()] == ["n", "200"]
    assert len(warnings(r.stderr)) <= 1 and "Traceback" not in r.stderr, r.stderr
    r = sf("inspect", "--data", str(data))
    assert r.returncode == 0, r.stderr
    assert "bids" in r.stdout
    r = sf("demo", "--data", str(data), "--ticks", "20")
    assert r.returncode == 0, r.stderr
    assert "top bid per auction" in r.stdout
    w = warnings(r.stderr)
    assert w and all(broken in ln for ln in w), r.stderr
    assert len(w) == 1, r.stderr  # said once, not per tick
    r = sf("fsck", "--data", str(data))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = fsck_lines(r)
    assert lines[broken].startswith("FAILED "), r.stdout
    assert {n for n, v in lines.items() if not v.startswith("ok")} == {broken}, r.stdout
    assert {"auctions", "bids", "users"} <= set(lines)


def test_missing_part_of_a_system_collection(data: Path) -> None:
    part = sorted(part_paths(data, SINK_STATUS))[0]  # the demo runs twice (ingestion, then its views)
    part.unlink()
    r = sf("fsck", "--data", str(data))
    assert r.returncode == 1
    assert fsck_lines(r)[SINK_STATUS].endswith(f"part {part.parent.name}/{part.name}: missing"), r.stdout
    check_everything_else_works(data, SINK_STATUS)


def test_directory_in_place_of_a_part(data: Path) -> None:
    part = sorted(part_paths(data, SINK_STATUS))[0]  # the demo runs twice (ingestion, then its views)
    part.unlink()
    part.mkdir()
    r = sf("fsck", "--data", str(data))
    assert r.returncode == 1, r.stderr
    assert fsck_lines(r)[SINK_STATUS].endswith("unreadable (Is a directory)"), r.stdout
    assert "Traceback" not in r.stderr and "Is a directory" not in r.stderr
    check_everything_else_works(data, SINK_STATUS)


def test_job_goes_on_when_its_introspection_cannot_be_written(data: Path) -> None:
    """The shard directory of system.sink_status_history is a file: no part of it can be read or put."""
    shard_dir = part_paths(data, SINK_STATUS)[0].parent
    shutil.rmtree(shard_dir)
    shard_dir.write_text("not a directory")
    r = sf("demo", "--data", str(data), "--ticks", "30")
    assert r.returncode == 0, r.stderr
    w = warnings(r.stderr)
    assert len(w) == 1 and SINK_STATUS in w[0], r.stderr
    r = sf("query", "--data", str(data), "--format", "csv", "SELECT count(*) AS n FROM bids")
    assert r.returncode == 0 and [x.strip('"') for x in r.stdout.splitlines()] == ["n", "300"], r.stdout + r.stderr
    r = sf("fsck", "--data", str(data), "sys.sink_status_history")
    assert r.returncode == 1 and "Not a directory" in r.stdout, r.stdout


def _append_unchecked(data: Path, name: str, rows: pa.Table) -> None:
    """Append at the upper the way a shardflow without the write checks did: parts as given, then the CAS."""
    client = storage.open(data)
    try:
        shard = shards(data)[name]
        s = client.state(shard)
        assert s.upper.time is not None
        t = rows.append_column("_time", pa.array([s.upper.time] * rows.num_rows, pa.int64()))
        t = t.append_column("_diff", pa.array([1] * rows.num_rows, pa.int64())).cast(update_schema(s.schema))
        batch = st.BatchMeta(s.upper, Frontier(s.upper.time + 1), Frontier.MIN, client.parts.write(shard, t))
        client.machine(shard).apply(
            st.compare_and_append, batch, writer_id="old", token=None, metadata=None, lease_ms=60_000)
    finally:
        client.close()


def test_fsck_finds_invalid_utf8_in_an_old_part(data: Path) -> None:
    names = pa.array([b"ok", b"bad \xff\xfe"], pa.binary()).view(pa.string())
    _append_unchecked(data, "users", pa.table({"id": pa.array([1000, 1001], pa.int64()),
                                               "org_id": pa.array([1, 1], pa.int64()), "name": names}))
    r = sf("fsck", "--data", str(data), "users")
    assert r.returncode == 1
    assert fsck_lines(r)["users"].endswith("column 'name' row 1: string is not valid UTF-8"), r.stdout


def append_one_user(data: Path, pick: Callable[[pa.Table], tuple[pa.Table, int]]) -> tuple[str, pa.Table]:
    """Append one update to `users` at its upper: `pick(snapshot)` gives the row (no `_diff`) and
    its diff. Returns the shard and the row."""
    client = storage.open(data)
    try:
        shard = shards(data)["users"]
        w = client.open_writer(shard, schema=client.state(shard).schema, compact=False)
        upper = w.upper.time
        assert upper is not None
        row, diff = pick(client.open_leased_reader(shard).snapshot(upper - 1))
        one = row.append_column("_time", pa.array([upper], pa.int64()))
        w.compare_and_append(one.append_column("_diff", pa.array([diff], pa.int64())), upper, upper + 1)
        return shard, row
    finally:
        client.close()


def test_a_count_past_int64_is_named_by_query_and_fsck(data: Path) -> None:
    """Each batch is accepted (its |diffs| fit int64), but user 1's count passes int64."""
    def pick_user_1(snap: pa.Table) -> tuple[pa.Table, int]:
        user = snap.filter(pa.compute.equal(snap.column("id"), 1)).drop_columns(["_diff"])
        assert user.num_rows == 1
        return user, 2**63 - 1

    shard, user = append_one_user(data, pick_user_1)
    row = "{" + ", ".join(f"'{k}': {v}" for k, v in user.to_pylist()[0].items()) + "}"
    r = sf("query", "--data", str(data), "SELECT count(*) FROM users")
    assert r.returncode == 1
    err = r.stderr.strip()
    assert err.count("\n") == 0, err
    assert err.startswith(f"shardflow: error: shard {shard}: the diffs of row {row} sum to "
                          "9223372036854775808, outside int64"), err
    r = sf("fsck", "--data", str(data), "users")
    assert r.returncode == 1
    assert f"the diffs of row {row} sum to 9223372036854775808" in fsck_lines(r)["users"]


def test_fsck_names_a_negative_count(data: Path) -> None:
    """A retraction of a user that was never inserted: every read refuses it, and so does fsck."""
    def ghost(snap: pa.Table) -> tuple[pa.Table, int]:
        row = snap.slice(0, 1).drop_columns(["_diff"])
        return row.set_column(0, "id", pa.array([999_999], pa.int64())), -1

    append_one_user(data, ghost)
    r = sf("fsck", "--data", str(data))
    assert r.returncode == 1, r.stdout + r.stderr
    lines = fsck_lines(r)
    assert lines["users"].startswith("FAILED ") and "negative count -1" in lines["users"], r.stdout
    assert "999999" in lines["users"], r.stdout
    assert all(v.startswith("ok") for n, v in lines.items() if n != "users"), r.stdout


FLOW = '''
import os
import bytewax.operators as op
import pyarrow as pa
from bytewax.dataflow import Dataflow
from connectors.files import FileSource
from flows.operators import consolidate

SCHEMA = pa.schema([("id", pa.int64()), ("name", pa.string())])


def build(ctx):
    ctx.collection("events", SCHEMA)
    src = FileSource(os.environ["EVENTS_GLOB"], format="jsonl", schema=SCHEMA, name="events",
                     resume=ctx.resume_offsets("events"))
    flow = Dataflow("events")
    ctx.persist("events_sink", consolidate("events_cons", op.input("files", flow, src)), "events")
    return flow
'''


def test_jsonl_with_invalid_utf8_does_not_poison_the_collection(tmp_path: Path) -> None:
    """Refused at the door (one line naming the column), or routed elsewhere: either way `events` reads back."""
    (tmp_path / "ev.jsonl").write_bytes(b'{"id": 1, "name": "ok"}\n{"id": 2, "name": "bad \xff\xfe"}\n')
    (tmp_path / "flow.py").write_text(FLOW)
    data = str(tmp_path / "data")
    r = sf("run", str(tmp_path / "flow.py"), "--data", data, env={"EVENTS_GLOB": str(tmp_path / "ev.jsonl")})
    if r.returncode != 0:
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("shardflow: error: ") and "'name'" in last and "UTF-8" in last, r.stderr
    r = sf("query", "--data", data, "--format", "csv", "SELECT count(*) AS n FROM events")
    assert r.returncode == 0, r.stderr
    r = sf("fsck", "--data", data, "events")
    assert r.returncode == 0 and fsck_lines(r)["events"].startswith("ok"), r.stdout
