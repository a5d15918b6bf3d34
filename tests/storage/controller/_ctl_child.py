"""Child process for the controller's fencing and crash tests.

    python _ctl_child.py fence ROOT   # writes until fenced; prints "fenced N" and exits 0
    python _ctl_child.py drop ROOT    # creates, writes and drops "doomed"; prints its shard first
"""

from __future__ import annotations

import sys
import time

import pyarrow as pa

import storage
from storage.controller import Append, CollectionDesc, StorageController
from storage.errors import Fenced

KV = pa.schema([("k", pa.string()), ("v", pa.int64())])


def main() -> int:
    mode, root = sys.argv[1], sys.argv[2]
    client = storage.open(root, fsync=False)
    ctl = StorageController.open(client, tick_interval_ms=None, compact=False)
    if mode == "fence":
        ctl.create_collections([CollectionDesc("kv", KV)])
        print("ready", flush=True)
        i = 0
        try:
            while True:
                ctl.differential_write("kv", Append(pa.table({"k": [f"old{i}"], "v": [i]}, schema=KV)))
                ctl.tick()
                i += 1
                time.sleep(0.01)
        except Fenced as e:
            print(f"fenced {i} {e}", flush=True)
            ctl.close()
            return 0
    if mode == "drop":
        ctl.create_collections([CollectionDesc("doomed", KV)])
        ctl.differential_write("doomed", Append(pa.table({"k": ["x"], "v": [1]}, schema=KV)))
        print(ctl.collection("doomed").shard_id, flush=True)
        ctl.drop_collections(["doomed"])  # SIGKILLed right after the catalog CAS
        print("not killed", flush=True)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
