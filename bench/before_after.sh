#!/usr/bin/env bash
# Before/after in one run: the append, snapshot and ingest benches over two trees, alternated.
#   bash bench/before_after.sh REV [ROUNDS]     # REV = the "before" commit; "after" = this tree
# Each bench reports ours against its own baseline in the same process; this prints the
# lines with those ratios, per round and side, so that both sides meet the same load.
set -euo pipefail
rev=${1:?usage: bench/before_after.sh REV [ROUNDS]}
rounds=${2:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
py="$here/.venv/bin/python"
base=$(mktemp -d)/before
git -C "$here" worktree add -q --detach "$base" "$rev"
trap 'git -C "$here" worktree remove --force "$base"' EXIT
for round in $(seq "$rounds"); do
  for side in before after; do
    tree=$here; [ "$side" = before ] && tree=$base
    for b in "append.py --rows 2000000 --repeat 3 --no-fsync --summary median" \
             "snapshot.py --rows 2000000 --batches 100 --repeat 3" \
             "ingest.py --updates 2000000"; do
      # shellcheck disable=SC2086
      out=$(cd /tmp && PYTHONPATH=$tree "$py" "$tree/bench/"$b 2>&1 | grep -iE "ratio|rows/s" | tr '\n' ' ')
      echo "round $round $side [$b]: $out"
    done
  done
done
