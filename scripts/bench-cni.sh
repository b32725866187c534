#!/usr/bin/env bash
# CNI benchmark: weft-cni vs the reference plugins vs the kernel floor, then pod-to-pod datapath.
# Extra arguments go to cni-bench (--quick, --reps N, --pods N, --json PATH).
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
cargo build --release --locked -p weft-cni -p weft-tests
exec ./target/release/cni-bench "$@"
