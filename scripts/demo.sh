#!/usr/bin/env bash
# weft's main job for now: set up, build, and show what works today on this machine.
# Builds two network namespaces joined by a veth pair (never touching the root namespace), attaches
# weft-proxy's eBPF packet counters to one end, sends real traffic, prints the kernel's counts, and
# removes everything again. This command becomes `weft up` once the control plane exists.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release --locked -p weft-proxy
PROXY="$PWD/target/release/weft-proxy"

ID="weft-demo-$$"
A="$ID-a"; B="$ID-b"; PIN="/sys/fs/bpf/$ID"
cleanup() {
  "$PROXY" --pin-dir "$PIN" counters detach --all >/dev/null 2>&1 || true
  rm -rf "$PIN"
  ip netns del "$A" 2>/dev/null || true
  ip netns del "$B" 2>/dev/null || true
}
trap cleanup EXIT

ip netns add "$A"; ip netns add "$B"
ip -n "$A" link add v0 type veth peer name v1 netns "$B"
ip -n "$A" addr add 10.9.0.1/30 dev v0; ip -n "$A" link set v0 up; ip -n "$A" link set lo up
ip -n "$B" addr add 10.9.0.2/30 dev v1; ip -n "$B" link set v1 up; ip -n "$B" link set lo up
# nsenter changes only the network namespace, so /sys/fs/bpf stays visible.
in_a() { nsenter --net="/run/netns/$A" "$@"; }

echo "== attaching weft-proxy's tcx counters to v0 in namespace $A"
in_a "$PROXY" --pin-dir "$PIN" counters attach v0
echo "== sending traffic: 10 pings and 1 s of iperf3 from $A to $B"
in_a ping -c 10 -i 0.05 -q 10.9.0.2 | tail -2
nsenter --net="/run/netns/$B" iperf3 -s -1 -B 10.9.0.2 >/dev/null &
sleep 0.3
in_a iperf3 -c 10.9.0.2 -t 1 | grep -E 'sender|receiver'
wait
echo "== counters as the kernel holds them (the loader exited; the pinned links kept counting)"
in_a "$PROXY" --pin-dir "$PIN" counters show
echo "== cleaning up"
