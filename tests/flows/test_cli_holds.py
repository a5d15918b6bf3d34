"""`shardflow inspect` lists each collection's holds; `shardflow holds list|release`.

The state is set up with the public API in this process (a job's controller, a
collection `a`, a dependent `d` holding `a`, a process hold on `a`); the CLI
runs as a subprocess, as an operator would run it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

import storage
from storage.controller import CollectionDesc, StorageController, ValidFrom, step_back

ROOT = Path(__file__).resolve().parents[2]
CONSOLE = Path(sys.executable).parent / "shardflow"
KV = pa.schema([("k", pa.string()), ("v", pa.int64())])
ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONSOLE), *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def write(client: storage.Client, shard: str, upper: int) -> None:
    """Rows at time 0, and the upper moved to `upper`."""
    w = client.open_writer(shard)
    t = pa.table({"k": ["x", "y"], "v": [1, 2], "_time": [0, 0], "_diff": [1, 1]})
    w.compare_and_append(t.cast(pa.schema([*KV, ("_time", pa.int64()), ("_diff", pa.int64())])), w.upper, upper)


@dataclass
class Setup:
    data: Path
    client: storage.Client
    ctl: StorageController
    a: str  # shard ids
    d: str
    hold_id: str  # the process hold of the job's controller on `a`


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    """`a` (step_back: its policy handle at upper - 1 = 99), `d` depends on `a` (ValidFrom(0):
    its dependency hold keeps `a` at 0), and a process hold of role `job:x` on `a`."""
    data = tmp_path / "data"
    client = storage.open(data, fsync=False)
    ctl = StorageController.open(client, tick_interval_ms=None, role="job:x", compact=False)
    ctl.create_collections(
        [
            CollectionDesc("a", KV, read_policy=step_back()),
            CollectionDesc("d", KV, read_policy=ValidFrom(0), depends_on=("a",)),
        ]
    )
    a, d = ctl.collection("a").shard_id, ctl.collection("d").shard_id
    write(client, a, 100)
    ctl.frontiers("a")  # the controller learns the upper: the policy handle moves to 99
    ctl.acquire_read_holds(["a"])
    (hold_id,) = [k for k in client.state(a).leased_readers if k.startswith("hold:")]
    try:
        yield Setup(data, client, ctl, a, d, hold_id)
    finally:
        ctl.close()
        client.close()


def one_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("shardflow: error: "), r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr[len("shardflow: error: ") : -1]


def rows_of(out: str) -> dict[tuple[str, str], list[str]]:
    """(collection, holder) -> the table row's cells, from the plain-text holds table."""
    rows = {}
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 6 and cells[0] != "collection":
            rows[(cells[0], cells[1])] = cells
    return rows


# ---------------------------------------------------------------- client.inspect


def test_client_inspect_holds(tmp_path: Path) -> None:
    now = [1_000_000]
    s1, s2 = str(storage.ShardId.new()), str(storage.ShardId.new())
    with storage.open(tmp_path, fsync=False, clock=lambda: now[0]) as client:
        w = client.open_writer(s1, KV)
        client.open_critical_since(s1, "controller", opaque=1)
        client.open_critical_since(s1, f"dep:{s2}", opaque=f"dep:{s2}")
        client.open_leased_reader(s1, reader_id="hold:job:a@b:7@box:abc123", lease_ms=500, heartbeat=False)
        client.open_leased_reader(s1, reader_id="r1", lease_ms=5000, heartbeat=False)
        now[0] += 1000
        info = client.inspect(s1)
        assert "critical_readers" in info and "leased_readers" in info  # the old keys stay
        holds = {h["holder"]: h for h in info["holds"]}
        assert [h["holder"] for h in info["holds"]] == [
            "controller", f"dep:{s2}", "hold:job:a@b:7@box:abc123", "r1"
        ]
        assert holds["controller"] == {
            "holder": "controller", "kind": "policy", "durable": True, "since": 0,
            "registered_ms": 1_000_000, "expired": False,
        }
        assert holds[f"dep:{s2}"]["kind"] == "dependency" and holds[f"dep:{s2}"]["dependent_shard"] == s2
        p = holds["hold:job:a@b:7@box:abc123"]
        # the role may hold ':' and '@'; pid and host are the last ones
        assert (p["kind"], p["role"], p["pid"], p["host"]) == ("process", "job:a@b", 7, "box")
        assert p["durable"] is False and p["expired"] is True  # its 500 ms lease ran out
        assert holds["r1"]["kind"] == "reader" and holds["r1"]["expired"] is False
        json.dumps(info)  # JSON-friendly
        del w


# ---------------------------------------------------------------- inspect


def test_inspect_lists_holds(setup: Setup) -> None:
    r = cli("inspect", "--data", str(setup.data))
    assert r.returncode == 0, r.stderr
    rows = rows_of(r.stdout)
    assert rows[("a", "controller")][2:4] == ["policy", "99"]
    assert rows[("a", "controller")][5] == "durable"
    dep = rows[("a", f"dep:{setup.d}")]
    assert dep[2:4] == ["dependency of d", "0"] and dep[5] == "durable"
    proc = rows[("a", setup.hold_id)]
    assert proc[2] == f"process job:x (pid {os.getpid()} on {socket.gethostname()})"
    assert proc[3] == "0" and proc[5] == "leased"
    assert all(ISO.fullmatch(c[4]) for c in (dep, proc))
    assert rows[("d", "controller")][2] == "policy"
    assert not [k for k in rows if k[0] == "d" and k[1] != "controller"]

    r = cli("inspect", "--data", str(setup.data), "--json")
    assert r.returncode == 0, r.stderr
    holds = {h["holder"]: h for h in json.loads(r.stdout)["a"]["holds"]}
    assert holds[f"dep:{setup.d}"]["dependent"] == "d"
    assert holds[f"dep:{setup.d}"]["dependent_shard"] == setup.d
    assert holds[setup.hold_id]["role"] == "job:x" and holds[setup.hold_id]["pid"] == os.getpid()
    assert holds["controller"]["kind"] == "policy" and holds["controller"]["since"] == 99

    r = cli("inspect", "--data", str(setup.data), "a")
    assert r.returncode == 0 and "holds on a:" in r.stdout and "dependency of d" in r.stdout


def test_inspect_names_a_dropped_dependent(setup: Setup) -> None:
    setup.client.open_critical_since(setup.a, "dep:s-gone", opaque="gone")
    r = cli("inspect", "--data", str(setup.data), "a")
    assert r.returncode == 0, r.stderr
    assert rows_of(r.stdout)[("a", "dep:s-gone")][2] == "dependency of (dropped)"


# ---------------------------------------------------------------- holds list


def test_holds_list(setup: Setup) -> None:
    r = cli("holds", "list", "--data", str(setup.data))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[1].strip()) == [
        "collection", "holder", "kind", "since", "registered", "state"
    ]
    rows = rows_of(r.stdout)
    assert set(rows) == {("a", "controller"), ("a", f"dep:{setup.d}"), ("a", setup.hold_id), ("d", "controller")}
    assert rows[("a", setup.hold_id)][5] == "leased"

    r = cli("holds", "list", "--data", str(setup.data), "d")
    assert r.returncode == 0 and set(rows_of(r.stdout)) == {("d", "controller")}
    r = cli("holds", "list", "--data", str(setup.data), "--json", "a")
    assert r.returncode == 0
    assert {h["kind"] for h in json.loads(r.stdout)["a"]} == {"policy", "dependency", "process"}
    r = cli("holds", "list", "--data", str(setup.data), "nope")
    assert r.returncode == 1 and "'nope' does not exist" in r.stderr


# ---------------------------------------------------------------- holds release


def test_release_dependency_hold_moves_since(setup: Setup) -> None:
    # A crashed job: its process hold ended with it; d's durable hold still pins a at 0.
    setup.ctl.close()
    assert setup.client.state(setup.a).since == storage.Frontier(0)
    r = cli("holds", "release", "--data", str(setup.data), "a", f"dep:{setup.d}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1
    assert f"released d's dependency hold dep:{setup.d} on 'a'" in r.stdout
    assert "since is now 99" in r.stdout and "ReadBeforeSince" in r.stdout
    assert setup.client.state(setup.a).since == storage.Frontier(99)
    assert f"dep:{setup.d}" not in setup.client.state(setup.a).critical_readers
    r = cli("holds", "list", "--data", str(setup.data), "a")
    assert set(rows_of(r.stdout)) == {("a", "controller")}


def test_release_process_hold(setup: Setup) -> None:
    r = cli("holds", "release", "--data", str(setup.data), "a", setup.hold_id)
    assert r.returncode == 0, r.stderr
    assert f"released the process hold of job:x (pid {os.getpid()}" in r.stdout and "LeaseExpired" in r.stdout
    assert setup.hold_id not in setup.client.state(setup.a).leased_readers


def test_release_refusals(setup: Setup) -> None:
    before = setup.client.state(setup.a)
    msg = one_error(cli("holds", "release", "--data", str(setup.data), "nope", "controller"))
    assert "collection 'nope' does not exist" in msg and "known: a, d" in msg
    msg = one_error(cli("holds", "release", "--data", str(setup.data), "a", "dep:nope"))
    assert "'a' has no holder 'dep:nope'" in msg
    assert f"controller, dep:{setup.d}, {setup.hold_id}" in msg
    msg = one_error(cli("holds", "release", "--data", str(setup.data), "a", "controller"))
    assert "read-policy handle" in msg and "re-registers" in msg and "meaningless" in msg
    assert "drop the collection" in msg and "read policy" in msg
    after = setup.client.state(setup.a)
    assert after.critical_readers.keys() == before.critical_readers.keys()
    assert after.leased_readers.keys() == before.leased_readers.keys()
    assert after.since == before.since


# ---------------------------------------------------------------- help


def test_holds_help() -> None:
    r = cli("holds", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: shardflow holds")
    for word in ("list", "release", "policy", "dependency", "process", "crashed", "ReadBeforeSince"):
        assert word in r.stdout, word
    r = cli("holds", "release", "--help")
    assert r.returncode == 0 and "COLLECTION" in r.stdout and "HOLDER" in r.stdout
    assert "exit 2" in r.stdout
    r = cli("--help")
    assert r.returncode == 0 and "holds" in r.stdout
