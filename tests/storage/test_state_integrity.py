"""A corrupted consensus entry (shard state or catalog) is detected, named and never acted on.

Each stored version is sealed with a sha256 of its body, and decoding checks it
and the invariants with real checks (not `assert`, so `python -O` changes
nothing). The corruption is made the way it happens: bytes changed in the real
`consensus.sqlite`, then the CLI (`demo`, `run`, `query`, `fsck`) and the API
must stop with one line naming the shard (or catalog) and the seqno.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

import storage
from storage.controller.catalog import CATALOG_KEY, CatalogState
from storage.errors import StateCorrupt
from storage.machine import shard_key

ROOT = Path(__file__).resolve().parents[2]


def sf(*args: str, optimize: bool = False, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """`shardflow ARGS`: in this process (quick), or a `python -O` process with `optimize`."""
    if not optimize:
        from flows.cli import main

        out, err = (io.TextIOWrapper(io.BytesIO(), encoding="utf-8") for _ in range(2))  # with .buffer
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
        text = []
        for f in (out, err):
            f.flush()
            text.append(f.buffer.getvalue().decode())  # type: ignore[attr-defined]
        return subprocess.CompletedProcess(list(args), rc, text[0], text[1])
    py = [sys.executable, "-O", "-m", "flows.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*py, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def head(db: Path, key: str) -> tuple[int, bytes]:
    with sqlite3.connect(db) as con:
        seq, data = con.execute(
            "SELECT sequence_number, data FROM consensus WHERE shard = ? ORDER BY sequence_number DESC LIMIT 1",
            (key,),
        ).fetchone()
    return int(seq), bytes(data)


def poke(db: Path, key: str, seq: int, data: bytes) -> None:
    con = sqlite3.connect(db)
    try:
        con.execute("UPDATE consensus SET data = ? WHERE shard = ? AND sequence_number = ?", (data, key, seq))
        con.commit()
    finally:
        con.close()


def flip_digit(data: bytes, field: bytes) -> bytes:
    """Change the first digit of the JSON number after `"field":` (1 -> 2, as a bit rot would)."""
    m = re.search(rb'"' + field + rb'":(\d)', data)
    assert m is not None, field
    i = m.start(1)
    return data[:i] + bytes([(data[i] - 48 + 1) % 10 + 48]) + data[i + 1 :]


def unseal_legacy(data: bytes) -> bytes:
    """The body without its checksum envelope: what versions written before checksums look like."""
    if not data.startswith(b'{"sha256":"'):
        return data  # already unsealed
    body = json.loads(data)["state"]
    if "batches" in body:  # a shard state: in the field order of those versions (batches after upper)
        body = {**{k: body[k] for k in ("v", "shard_id", "seqno", "schema", "since", "upper", "batches")}, **body}
    return json.dumps(body, separators=(",", ":")).encode()


def one_line_error(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert out.returncode != 0, (out.stdout, out.stderr)
    text = (out.stdout + out.stderr).strip()
    assert "Traceback" not in text, text
    lines = [
        ln
        for ln in text.splitlines()
        if ln.startswith("shardflow: error:") or ("FAILED" in ln and not ln.startswith("fsck:"))
    ]
    assert len(lines) == 1, text
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("demo") / "data"
    out = sf("demo", "--ticks", "200", "--data", str(d))
    assert out.returncode == 0, out.stderr
    return d


@pytest.fixture
def data(demo_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "data"
    shutil.copytree(demo_dir, d)
    return d


def bids_shard(data: Path) -> str:
    out = sf("inspect", "--data", str(data), "--json", "bids")
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["bids"]["shard_id"])


# ---- shard state ----


def test_flipped_upper_digit_stops_every_command(data: Path) -> None:
    db = data / "consensus.sqlite"
    shard = bids_shard(data)
    key = shard_key(shard)
    seq, good = head(db, key)
    poke(db, key, seq, flip_digit(good, b"upper"))
    who = (shard, f"seqno {seq}", "checksum")
    # The demo would have committed only part of the bids (2,000 instead of 2,200) and exited 0.
    line = one_line_error(sf("demo", "--ticks", "220", "--data", str(data)), *who)
    assert "collection 'bids'" in line
    # Nothing was committed over the corrupt version.
    assert head(db, key)[0] == seq
    one_line_error(sf("query", "--data", str(data), "SELECT count(*) FROM bids"), *who)
    one_line_error(sf("fsck", "--data", str(data)), *who)
    # No assert involved: the same under python -O.
    one_line_error(sf("fsck", "--data", str(data), optimize=True), *who)
    one_line_error(sf("demo", "--ticks", "220", "--data", str(data), optimize=True), *who)
    assert head(db, key)[0] == seq


def test_flipped_byte_in_state_api(data: Path) -> None:
    db = data / "consensus.sqlite"
    shard = bids_shard(data)
    key = shard_key(shard)
    seq, good = head(db, key)
    # A byte anywhere in the body: here one letter of a part key.
    i = good.index(b'"key":"') + 9
    poke(db, key, seq, good[:i] + bytes([good[i] ^ 0x01]) + good[i + 1 :])
    client = storage.open(str(data))
    try:
        for op in (
            lambda: client.state(shard),
            lambda: client.inspect(shard),
            lambda: client.open_writer(shard),
            lambda: client.open_leased_reader(shard),
            lambda: client.verify(shard),
        ):
            with pytest.raises(StateCorrupt) as ei:
                op()
            msg = str(ei.value)
            assert "\n" not in msg and shard in msg and f"seqno {seq}" in msg and "checksum" in msg, msg
            assert ei.value.shard == shard
    finally:
        client.close()
    assert head(db, key)[0] == seq


def test_legacy_states_are_read_and_checked(data: Path) -> None:
    """Versions written before checksums are read (invariants checked); new ones are written sealed."""
    db = data / "consensus.sqlite"
    shard = bids_shard(data)
    key = shard_key(shard)
    seq, good = head(db, key)
    poke(db, key, seq, unseal_legacy(good))
    cseq, cgood = head(db, CATALOG_KEY)
    poke(db, CATALOG_KEY, cseq, unseal_legacy(cgood))
    out = sf("query", "--data", str(data), "--format", "csv", "SELECT count(*) FROM bids")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[1:] == ["2000"]
    out = sf("demo", "--ticks", "220", "--data", str(data))
    assert out.returncode == 0, out.stderr
    nseq, new = head(db, key)
    assert nseq > seq and new.startswith(b'{"sha256":"')
    out = sf("query", "--data", str(data), "--format", "csv", "SELECT count(*) FROM bids")
    assert out.stdout.splitlines()[1:] == ["2200"], out.stderr


def test_legacy_state_with_broken_invariant(data: Path) -> None:
    """Without a checksum, the invariants still catch the flipped upper: with and without -O."""
    db = data / "consensus.sqlite"
    shard = bids_shard(data)
    key = shard_key(shard)
    seq, good = head(db, key)
    poke(db, key, seq, flip_digit(unseal_legacy(good), b"upper"))
    for optimize in (False, True):
        line = one_line_error(sf("fsck", "--data", str(data), optimize=optimize), shard, f"seqno {seq}")
        assert "upper is 299001, but its batches end at 199001" in line, line
        one_line_error(sf("demo", "--ticks", "220", "--data", str(data), optimize=optimize), shard, f"seqno {seq}")
    assert head(db, key)[0] == seq


def test_check_invariants_under_python_O(tmp_path: Path) -> None:
    code = (
        "import pyarrow as pa\n"
        "from dataclasses import replace\n"
        "from storage import state as st, Frontier\n"
        "from storage.errors import StateCorrupt\n"
        "s = st.initial('s1', pa.schema([('k', pa.string())]))\n"
        "s = replace(s, upper=Frontier(5), seqno=3)\n"
        "try:\n"
        "    st.check_invariants(s)\n"
        "except StateCorrupt as e:\n"
        "    print('caught', e)\n"
        "try:\n"
        "    st.ShardState.decode(s.encode(), 'shard s1 seqno 3', seqno=3, shard_id='s1')\n"
        "except StateCorrupt as e:\n"
        "    print('caught', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-O", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("caught shard s1 seqno 3: invalid shard state: upper is 5, but its batches end at 0") == 2


def test_version_copied_over_another_is_refused(tmp_path: Path) -> None:
    """A well-sealed version under the wrong key or seqno is corrupt too."""
    client = storage.open(str(tmp_path), fsync=False)
    a, b = storage.ShardId.new(), storage.ShardId.new()
    schema = pa.schema([("k", pa.string())])
    wa = client.open_writer(a, schema=schema)
    client.open_writer(b, schema=schema)
    wa.compare_and_append(pa.table({"k": ["x"], "_time": [1], "_diff": [1]}), 0, 5)
    h = client.consensus.head(shard_key(a))
    assert h is not None and h.seqno == 1
    from storage.consensus import VersionedData

    # a's seqno-1 state as b's seqno 1.
    assert client.consensus.compare_and_set(shard_key(b), 0, VersionedData(1, h.data))
    with pytest.raises(StateCorrupt, match=f"shard {b} seqno 1: stored state belongs to shard {a}"):
        client.state(b)
    client.close()


# ---- catalog ----


def test_flipped_byte_in_catalog_stops_every_command(data: Path, tmp_path: Path) -> None:
    db = data / "consensus.sqlite"
    seq, good = head(db, CATALOG_KEY)
    shard = bids_shard(data)
    # One character of the bids collection's shard id: it would silently point at nothing.
    i = good.index(shard.encode()) + 3
    poke(db, CATALOG_KEY, seq, good[:i] + bytes([good[i] ^ 0x01]) + good[i + 1 :])
    who = (f"catalog seqno {seq}", "checksum")
    one_line_error(sf("demo", "--ticks", "220", "--data", str(data)), *who)
    one_line_error(sf("query", "--data", str(data), "SELECT count(*) FROM bids"), *who)
    one_line_error(sf("fsck", "--data", str(data)), *who)
    one_line_error(sf("fsck", "--data", str(data), optimize=True), *who)
    flow = tmp_path / "flow.py"
    flow.write_text(
        "from bytewax.dataflow import Dataflow\n"
        "import bytewax.operators as op\n"
        "def build(ctx):\n"
        "    flow = Dataflow('x')\n"
        "    ctx.resume_offsets('bids')\n"
        "    op.input('in', flow, __import__('bytewax.testing', fromlist=['TestingSource']).TestingSource([]))\n"
        "    return flow\n"
    )
    one_line_error(sf("run", str(flow), "--data", str(data)), *who)
    assert head(db, CATALOG_KEY)[0] == seq
    with pytest.raises(StateCorrupt, match=f"catalog seqno {seq}: stored catalog fails its checksum"):
        CatalogState.decode(seq, head(db, CATALOG_KEY)[1])


def test_catalog_invariants(data: Path) -> None:
    """A legacy (unsealed) catalog is still checked: two collections on one shard is corrupt."""
    db = data / "consensus.sqlite"
    seq, good = head(db, CATALOG_KEY)
    d = json.loads(unseal_legacy(good))
    d["collections"]["auctions"]["shard_id"] = d["collections"]["bids"]["shard_id"]
    poke(db, CATALOG_KEY, seq, json.dumps(d).encode())
    for optimize in (False, True):
        line = one_line_error(sf("query", "--data", str(data), "SELECT 1", optimize=optimize), f"catalog seqno {seq}")
        assert "both claim shard" in line, line
