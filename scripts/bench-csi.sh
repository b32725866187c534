#!/usr/bin/env bash
# CSI benchmark: weft-csi create + stage + publish of a 1 GiB volume per filesystem, against the
# same work done with the standard tools, and N volumes provisioned sequentially vs concurrently.
# Extra arguments go to csi-bench (--quick, --rounds N, --count N, --json PATH).
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
cargo build --release --locked -p weft-csi -p weft-tests
exec ./target/release/csi-bench "$@"
