"""Writers racing `compare_and_append` with the same expected upper (issue 2).

Exactly one wins; every loser gets `UpperMismatch` whose `.current` is the
winner's new upper; the shard holds exactly the winner's rows. Each racer uses
its own `new_upper`, so the winner can be told apart by the upper alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pyarrow as pa
import pytest

import storage
from storage import Frontier, ShardId
from storage.errors import UpperMismatch
from storage.state import check_invariants

SCHEMA = pa.schema([("racer", pa.string()), ("round", pa.int64()), ("i", pa.int64())])
ROWS_PER_RACER = 5


def racer_rows(racer: str, rnd: int, lower: int, upper: int) -> pa.Table:
    n = ROWS_PER_RACER
    return pa.table(
        {
            "racer": [racer] * n,
            "round": [rnd] * n,
            "i": list(range(n)),
            "_time": [lower + j % (upper - lower) for j in range(n)],
            "_diff": [1] * n,
        }
    )


def round_contents(client: storage.Client, shard: ShardId, rnd: int, as_of: int) -> list[tuple[Any, ...]]:
    with client.open_leased_reader(shard, heartbeat=False) as r:
        snap = r.snapshot(as_of, timeout=0)
    return sorted((x["racer"], x["i"], x["_diff"]) for x in snap.to_pylist() if x["round"] == rnd)


def check_round(outcomes: dict[str, Any], new_uppers: dict[str, int], client: storage.Client,
                shard: ShardId, rnd: int, lower: int) -> None:
    winners = [k for k, v in outcomes.items() if v == "ok"]
    assert len(winners) == 1, outcomes
    winner = winners[0]
    for k, v in outcomes.items():
        if k == winner:
            continue
        # Every loser saw the winner's upper: nothing else moved it.
        assert v == ("mismatch", lower, new_uppers[winner]), (k, v, winner)
    assert client.state(shard).upper == new_uppers[winner]
    check_invariants(client.state(shard))
    want = sorted((winner, i, 1) for i in range(ROWS_PER_RACER))
    assert round_contents(client, shard, rnd, new_uppers[winner] - 1) == want


def test_threads_race_compare_and_append(tmp_path: Any) -> None:
    n_threads, rounds = 8, 20
    client = storage.open(str(tmp_path), fsync=False)
    shard = ShardId.new()
    writers = [client.open_writer(shard, schema=SCHEMA, writer_id=f"w{i}", compact=False) for i in range(n_threads)]
    lower = 0
    for rnd in range(rounds):
        barrier = threading.Barrier(n_threads)
        outcomes: dict[str, Any] = {}
        new_uppers = {f"w{i}": lower + 1 + i for i in range(n_threads)}
        errors: list[BaseException] = []

        def race(i: int, lower: int = lower, rnd: int = rnd, barrier: threading.Barrier = barrier,
                 outcomes: dict[str, Any] = outcomes, new_uppers: dict[str, int] = new_uppers,
                 errors: list[BaseException] = errors) -> None:
            name = f"w{i}"
            data = racer_rows(name, rnd, lower, new_uppers[name])
            try:
                barrier.wait()
                writers[i].compare_and_append(data, lower, new_uppers[name])
                outcomes[name] = "ok"
            except UpperMismatch as e:
                outcomes[name] = ("mismatch", e.expected.time, e.current.time)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=race, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(outcomes) == n_threads
        check_round(outcomes, new_uppers, client, shard, rnd, lower)
        lower = client.state(shard).upper.time
    # Every round left exactly one batch.
    assert len(client.inspect(shard)["batches"]) == rounds
    assert client.inspect(shard)["rows"] == rounds * ROWS_PER_RACER
    client.close()


# A racer process: creates its writer, prints READY, then for each "GO <round> <lower>"
# line appends its rows at [lower, lower + 1 + index) and prints the outcome as JSON.
RACER = textwrap.dedent(
    """
    import json, sys
    import pyarrow as pa
    import storage
    from storage.errors import UpperMismatch

    root, shard, index, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    schema = pa.schema([("racer", pa.string()), ("round", pa.int64()), ("i", pa.int64())])
    client = storage.open(root)
    name = f"p{index}"
    w = client.open_writer(shard, schema=schema, writer_id=name)
    print("READY", flush=True)
    for line in sys.stdin:
        _, rnd, lower = line.split()
        rnd, lower = int(rnd), int(lower)
        upper = lower + 1 + index
        data = pa.table({
            "racer": [name] * n, "round": [rnd] * n, "i": list(range(n)),
            "_time": [lower + j % (upper - lower) for j in range(n)], "_diff": [1] * n,
        })
        try:
            w.compare_and_append(data, lower, upper)
            out = "ok"
        except UpperMismatch as e:
            out = ["mismatch", e.expected.time, e.current.time]
        print(json.dumps(out), flush=True)
    """
)


def test_processes_race_compare_and_append(tmp_path: Any) -> None:
    n_procs, rounds = 2, 5
    root = str(tmp_path)
    client = storage.open(root)
    shard = ShardId.new()
    client.open_writer(shard, schema=SCHEMA)  # create it, so the racers agree on the schema
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, root, str(shard), str(i), str(ROWS_PER_RACER)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for i in range(n_procs)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "READY"
        lower = 0
        for rnd in range(rounds):
            # Both racers are blocked on stdin; release them as close together as we can.
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(f"GO {rnd} {lower}\n")
            for p in procs:
                assert p.stdin is not None
                p.stdin.flush()
            outcomes: dict[str, Any] = {}
            for i, p in enumerate(procs):
                assert p.stdout is not None
                line = p.stdout.readline()
                assert line, f"racer p{i} died"
                out = json.loads(line)
                outcomes[f"p{i}"] = out if out == "ok" else tuple(out)
            new_uppers = {f"p{i}": lower + 1 + i for i in range(n_procs)}
            check_round(outcomes, new_uppers, client, shard, rnd, lower)
            lower = client.state(shard).upper.time
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in procs:
            assert p.wait(60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert client.inspect(shard)["rows"] == rounds * ROWS_PER_RACER
    assert client.state(shard).upper != Frontier.EMPTY
    client.close()


@pytest.mark.parametrize("n_threads", [2, 4])
def test_threads_race_from_separate_clients(tmp_path: Any, n_threads: int) -> None:
    """Each racer with its own client (own SQLite connection), as separate processes would be."""
    root = str(tmp_path)
    shard = ShardId.new()
    storage.open(root).open_writer(shard, schema=SCHEMA)
    clients = [storage.open(root, fsync=False) for _ in range(n_threads)]
    writers = [c.open_writer(shard, writer_id=f"c{i}") for i, c in enumerate(clients)]
    for rnd in range(5):
        lower = clients[0].state(shard).upper.time
        assert lower is not None
        barrier = threading.Barrier(n_threads)
        outcomes: dict[str, Any] = {}
        new_uppers = {f"c{i}": lower + 1 + i for i in range(n_threads)}

        def race(i: int, lower: int = lower, rnd: int = rnd, barrier: threading.Barrier = barrier,
                 outcomes: dict[str, Any] = outcomes, new_uppers: dict[str, int] = new_uppers) -> None:
            name = f"c{i}"
            data = racer_rows(name, rnd, lower, new_uppers[name])
            barrier.wait()
            try:
                writers[i].compare_and_append(data, lower, new_uppers[name])
                outcomes[name] = "ok"
            except UpperMismatch as e:
                outcomes[name] = ("mismatch", e.expected.time, e.current.time)

        threads = [threading.Thread(target=race, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(outcomes) == n_threads, outcomes
        check_round(outcomes, new_uppers, clients[0], shard, rnd, lower)
