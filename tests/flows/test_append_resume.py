"""Append-only collections resume after their committed offsets (no re-read, no duplicates)."""

from __future__ import annotations

import textwrap

from flows.job import run_flow

FLOW = textwrap.dedent('''
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from connectors.loadgen import Counter
    from connectors.loadgen_source import LoadgenSource

    def build(ctx):
        gen = Counter(seed=0, rows_per_tick=3)
        flow = Dataflow("events")
        ctx.collection("events", gen.schemas()["counter"], data_source="ingestion")
        src = LoadgenSource(gen, "counter", ticks=TICKS, resume=ctx.resume_offsets("events"))
        ctx.append("sink", op.input("in", flow, src), "events", batch_duration=0.0)
        return flow
''')


def test_append_sink_rerun_resumes_after_committed_offsets(tmp_path):
    data = tmp_path / "data"
    (tmp_path / "f5.py").write_text("TICKS = 5\n" + FLOW)
    (tmp_path / "f8.py").write_text("TICKS = 8\n" + FLOW)
    first = run_flow(tmp_path / "f5.py", data)
    assert first.rows == 15
    again = run_flow(tmp_path / "f5.py", data)
    assert again.rows == 0  # nothing re-read
    more = run_flow(tmp_path / "f8.py", data)
    assert more.rows == 9  # only ticks 5..7

    import storage
    from flows.job import open_controller

    client = storage.open(data)
    ctl = open_controller(client, read_only=True)
    try:
        shard = ctl.collection("events").shard_id
    finally:
        ctl.close()
    with storage.query.connect(client, {"events": shard}) as con:
        assert con.sql("SELECT count(*), count(DISTINCT counter) FROM events").fetchall() == [(24, 24)]
    client.close()
