#!/usr/bin/env bash
# Runs every test tier (unit, privileged, end-to-end) and then checks that nothing the tests create
# was left behind. Needs root for the privileged tiers (run scripts/setup.sh once first).
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "test: the privileged tests need root (network namespaces, BPF, mounts)" >&2
  exit 1
fi

# Cross-component tests exec binaries of other packages (weft, weft-cni, weft-proxy); build them
# all first, since `cargo test` builds only the binaries of packages with their own tests.
cargo build --workspace --locked
cargo test --workspace --locked "$@"

# Leak check: the test bed names everything weft-tb-<pid>-...
leaks=$( { ls /run/netns 2>/dev/null; ls /sys/fs/bpf 2>/dev/null; ls "${TMPDIR:-/tmp}" 2>/dev/null; } | grep '^weft-tb-' || true)
# ...and loop devices whose backing file was in a test's directory, and processes still using one.
leaks+=$(losetup --list --noheadings --output NAME,BACK-FILE 2>/dev/null | grep 'weft-tb-' || true)
leaks+=$(pgrep -a -f '/weft-tb-' || true)
# ...and the clusters tests/tests/up.rs starts with weft up (weft-up-test-<pid>-...).
leaks+=$( { ls /run/netns 2>/dev/null; ls /sys/fs/bpf 2>/dev/null; ls /sys/fs/cgroup/*/ 2>/dev/null; } | grep '^weft-up-test-' || true)
leaks+=$(pgrep -a -f 'weft-up-test-' || true)
if [ -n "$leaks" ]; then
  echo "test: objects left behind by the tests:" >&2
  echo "$leaks" >&2
  exit 1
fi
echo "test: nothing left behind"
