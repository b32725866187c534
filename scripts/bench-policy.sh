#!/usr/bin/env bash
# NetworkPolicy benchmark: new connections/s and request/response/s between two pods with no
# policy and with 10, 1,000 and 10,000 rules selecting the destination, interleaved in one run.
# Extra arguments go to policy-bench (--quick, --rules 0,10,1000,10000, --rounds N, --secs S, --json PATH).
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
cargo build --release --locked -p weft-proxy -p weft-tests
exec ./target/release/policy-bench "$@"
