#!/usr/bin/env bash
# Store benchmark: write and watch latency (p50/p99), load rate, restart time, memory and disk
# of weft server on its embedded SQLite store, on etcd (one member on loopback, started by the
# benchmark) and in memory, with 10,000 and 100,000 objects stored.
# Extra arguments go to store-bench (--sizes 10000,100000, --stores sqlite,etcd,memory,
# --json PATH).
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
cargo build --release --locked -p weft-control -p weft-tests
exec ./target/release/store-bench "$@"
