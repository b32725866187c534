#!/usr/bin/env bash
# Control-plane benchmark: scheduler throughput for N pending pods on simulated nodes, a
# Deployment scaled to 1,000 replicas, API write latency during it, and the processes' memory.
# Extra arguments go to control-bench (--quick, --pods 1000,10000, --nodes N, --json PATH).
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
cargo build --release --locked -p weft-control -p weft-tests
exec ./target/release/control-bench "$@"
