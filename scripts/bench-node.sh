#!/usr/bin/env bash
# Node benchmark: pod start latency (API create -> Ready) p50/p99 for one pod at a time and for
# 50 created at once, and teardown latency (delete -> gone), with containerd + weft-cni vs
# containerd + the reference bridge/host-local plugins in the same run; idle RSS of weft node.
# Root. Extra arguments go to node-bench (--quick, --rounds N, --pods N, --json PATH).
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
cargo build --release --locked --workspace
exec ./target/release/node-bench "$@"
