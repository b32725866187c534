#!/usr/bin/env bash
# Control-plane benchmark, in one run:
#  1. scheduler throughput for N pending pods on simulated nodes, a Deployment scaled to 1,000
#     replicas, API write latency during it, and the processes' memory (control-bench);
#  2. write and watch latency on the embedded store vs etcd at 10,000 and 100,000 objects
#     (store-bench, as scripts/bench-store.sh);
#  3. `weft up` to a Ready single-node cluster and the idle memory of the whole cluster beside
#     k3s's published figures (scripts/bench-up.sh; needs root, skipped without it).
# Arguments go to control-bench (--quick, --pods 1000,10000, --nodes N, --json PATH);
# --quick also limits the store part to 10,000 objects; --control-only runs part 1 alone.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."

args=()
quick=0
only=0
for a in "$@"; do
  case "$a" in
    --control-only) only=1 ;;
    --quick) quick=1; args+=("$a") ;;
    *) args+=("$a") ;;
  esac
done

cargo build --release --locked --workspace
echo "== scheduler, controllers, API write latency"
./target/release/control-bench "${args[@]}"
[ "$only" = 1 ] && exit 0

echo
echo "== store: embedded SQLite vs etcd"
if [ "$quick" = 1 ]; then
  ./target/release/store-bench --sizes 10000 --stores sqlite,etcd
else
  ./target/release/store-bench --stores sqlite,etcd
fi

echo
echo "== weft up"
if [ "$(id -u)" = 0 ]; then
  WEFT_BIN="$PWD/target/release" bash scripts/bench-up.sh
else
  echo "(skipped: weft up needs root)"
fi
