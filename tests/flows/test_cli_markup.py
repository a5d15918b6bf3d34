"""Table output shows data as it is (issue 14, item 8).

Before: `shardflow query` passed every cell to rich as markup, so `[/red]` crashed with
MarkupError, `user[admin]` lost its brackets, and raw ANSI escapes reached the terminal.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

import storage
from flows.cli import main
from storage.controller import CollectionDesc, StorageController

S = pa.schema([("s", pa.string())])
VALUES = ["[/red]", "user[admin]", "[bold]x[/bold]", "\x1b[31mred\x1b[0m", "a\nb", "tab\there", "\u202eevil", ":smile:"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    client = storage.open(d, fsync=False)
    ctl = StorageController.open(client, tick_interval_ms=None)
    ctl.create_collections([CollectionDesc("c", S, data_source="other"), CollectionDesc("x", S, data_source="other")])
    shard = ctl.collections()["c"].shard_id
    up = client.state(shard).upper.time
    n = len(VALUES)
    client.open_writer(shard, schema=S).compare_and_append(
        pa.table({"s": VALUES, "_time": [up] * n, "_diff": [1] * n}), up, up + 10)
    ctl.close()
    client.close()
    return d


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_query_table_shows_markup_and_escapes_literally(capsys, data):
    rc, out, err = run(capsys, "query", "--data", str(data), "SELECT s, s AS \"[red]col[/red]\" FROM c")
    assert rc == 0, err
    assert "\x1b" not in out and "\u202e" not in out
    for shown in ["[/red]", "user[admin]", "[bold]x[/bold]", r"\x1b[31mred\x1b[0m", r"a\nb", r"tab\there",
                  r"\u202eevil", ":smile:", "[red]col[/red]"]:
        assert out.count(shown) >= 1, (shown, out)


def test_query_table_keeps_columns_of_the_same_name(capsys, data):
    rc, out, err = run(capsys, "query", "--data", str(data), "SELECT 1 AS a, 2 AS a")
    assert rc == 0, err
    assert "│ 1 │ 2 │" in out, out


def test_inspect_with_a_hostile_data_path(capsys, data, tmp_path):
    odd = tmp_path / "[bold]\x1b[2J"
    data.rename(odd)
    rc, out, err = run(capsys, "inspect", "--data", str(odd))
    assert rc == 0, err
    assert "\x1b" not in out and "[bold]" in out
