#!/usr/bin/env bash
# Service-routing benchmark: weft socket LB and weft TC-only vs direct vs kube-proxy-style iptables
# and nftables, at 1, 1,000 and 10,000 services, backend on the same node and across nodes. Extra
# arguments go to svc-bench (--quick, --services 1,1000,10000, --topology same|across,
# --rounds N, --secs S, --out DIR).
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
cargo build --release --locked -p weft-tests
exec ./target/release/svc-bench "$@"
