#!/usr/bin/env bash
# `weft up` benchmark: the time from `weft up` to a Ready single-node cluster, the time from
# `kubectl apply` of the seed's Deployment to 3 ready pods, and the idle memory (RSS) of every
# process the cluster runs, weft's own and containerd's (with its shims and pods' pause
# processes) apart, printed beside the published figures of k3s (server ~1.6 GB, agent ~275 MB)
# and the issue's target (< 150 MB for weft's own processes).
# WEFT_BIN: directory of the binaries (default: a release build made here).
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."

if [ -z "${WEFT_BIN:-}" ]; then
  cargo build --release --locked --workspace
  WEFT_BIN="$PWD/target/release"
fi
NAME="weft-bench-up"
DIR="/tmp/$NAME"
WEFT="$WEFT_BIN/weft"
trap '"$WEFT" down --name "$NAME" --dir "$DIR" >/dev/null 2>&1 || true' EXIT
"$WEFT" down --name "$NAME" --dir "$DIR" >/dev/null 2>&1 || true

ms() { date +%s%3N; }
t0=$(ms)
"$WEFT" up --name "$NAME" --dir "$DIR" --port 0 --bin-dir "$WEFT_BIN" >/dev/null
t1=$(ms)
export KUBECONFIG="$DIR/kubeconfig"
kubectl apply -f examples/hello-api.yaml >/dev/null
kubectl -n demo rollout status deploy/hello-api --timeout=120s >/dev/null
t2=$(ms)
sleep 10

rss() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
# weft's own processes, from the supervisor's record (supervisor included).
supervisor=$(sed -n 's/.*"supervisor": *\([0-9]*\).*/\1/p' "$DIR/cluster.json")
own=$(rss "$supervisor")
printf '\n%-24s %10s\n' PROCESS "RSS (MiB)"
printf '%-24s %10.1f\n' "supervisor" "$(mib "$own")"
while read -r name pid; do
  kb=$(rss "$pid")
  own=$((own + kb))
  printf '%-24s %10.1f\n' "$name" "$(mib "$kb")"
done < <(python3 -c 'import json,sys; [print(n, p) for n, p in json.load(open(sys.argv[1]))["processes"]]' "$DIR/cluster.json")
runtime=0
for pid in $(pgrep -f "$DIR/nodes/node1/containerd" || true); do runtime=$((runtime + $(rss "$pid"))); done
pods=$(kubectl get pods -A --no-headers | wc -l)

printf '\n%-44s %14s %14s\n' "" "weft (this run)" "k3s (published)"
printf '%-44s %14s %14s\n' "weft up -> node Ready" "$(( (t1 - t0) ))ms" "-"
printf '%-44s %14s %14s\n' "apply seed Deployment -> 3 ready pods" "$(( (t2 - t1) ))ms" "-"
printf '%-44s %13.0fM %14s\n' "control plane + node agent + proxy + CSI RSS" "$(mib "$own")" "1600M+275M"
printf '%-44s %13.0fM %14s\n' "containerd and its shims ($pods pods)" "$(mib "$runtime")" "(in agent)"
printf '%-44s %14s\n' "target for weft's own processes" "< 150M"
