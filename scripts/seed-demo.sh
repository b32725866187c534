#!/usr/bin/env bash
# The seed demo, run as a user would run it: `weft up`, then the real kubectl on this machine
# against the cluster: deploy, expose (NodePort from the external host, port-forward on
# loopback), scale, rolling update with `kubectl edit`, rollback, self-heal, describe, logs,
# exec, a NetworkPolicy (only the frontend may reach the API) and a persistent volume that
# outlives its pod; `weft down` at the end, also
# when a step fails. A client polls the NodePort during scale, update and rollback and counts
# its failures: the demo fails unless that count is 0.
#
# Environment: WEFT_BIN (directory of weft's binaries, default target/release), WEFT_NAME
# (cluster name, default weft-demo), WEFT_DIR (default /var/lib/weft/$WEFT_NAME), WEFT_PORT
# (API port on loopback, default 0: any free one). scripts/demo.sh builds and runs this;
# tests/tests/up.rs runs it over the debug build.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN="${WEFT_BIN:-$PWD/target/release}"
NAME="${WEFT_NAME:-weft-demo}"
DIR="${WEFT_DIR:-/var/lib/weft/$NAME}"
WEFT="$BIN/weft"
EXT=(ip netns exec "$NAME-ext")
NODEPORT="http://10.200.0.11:30080/"
POLLER=""

step() { printf '\n== %s   [%s]\n' "$*" "$(date +%T)"; }
show() { printf '$ %s\n' "$*"; "$@"; }
fail() { echo "seed demo: FAILED: $*" >&2; exit 1; }

cleanup() {
  [ -n "$POLLER" ] && kill "$POLLER" 2>/dev/null && wait "$POLLER" 2>/dev/null || true
  pkill -f "port-forward svc/hello-svc" 2>/dev/null || true
  step "weft down"
  "$WEFT" down --name "$NAME" --dir "$DIR" || true
}
trap cleanup EXIT

# Retries "$@" (quietly) for up to $1 seconds until its output contains $2.
until_says() {
  local secs=$1 want=$2 out=""; shift 2
  for _ in $(seq $((secs * 5))); do
    out=$("$@" 2>&1 || true)
    if [[ "$out" == *"$want"* ]]; then echo "$out"; return 0; fi
    sleep 0.2
  done
  fail "'$*' never said '$want' (last: $out)"
}

ready_pods() {
  kubectl -n demo get pods -l app=hello-api \
    -o jsonpath='{range .items[*]}{.metadata.deletionTimestamp}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' \
    | grep -c '^ True$' || true
}

step "weft up: a one-node cluster on this machine"
"$WEFT" up --name "$NAME" --dir "$DIR" --port "${WEFT_PORT:-0}" --bin-dir "$BIN"
export KUBECONFIG="$DIR/kubeconfig"
show kubectl get nodes -o wide
show "$WEFT" status --name "$NAME" --dir "$DIR"

step "deploy: Namespace demo, Deployment hello-api (http-echo with probes, limits, runAsUser 10001), NodePort Service hello-svc"
show kubectl apply -f examples/hello-api.yaml
show kubectl -n demo rollout status deploy/hello-api --timeout=120s
show kubectl -n demo get deploy,rs,pods,svc -o wide

step "expose: the NodePort from the underlay's external host, and kubectl port-forward on loopback"
printf '$ ip netns exec %s curl %s\n' "$NAME-ext" "$NODEPORT"
until_says 30 "hello from weft" "${EXT[@]}" curl -s -m 2 "$NODEPORT"
kubectl -n demo port-forward svc/hello-svc :80 >"$DIR/port-forward.log" 2>&1 &
PF=$!
LOCAL=""
for _ in $(seq 75); do
  LOCAL=$(sed -n 's/^Forwarding from 127.0.0.1:\([0-9]*\) .*/\1/p' "$DIR/port-forward.log")
  [ -n "$LOCAL" ] && break
  sleep 0.2
done
[ -n "$LOCAL" ] || fail "kubectl port-forward did not start: $(cat "$DIR/port-forward.log")"
printf '$ kubectl -n demo port-forward svc/hello-svc :80 &\nForwarding from 127.0.0.1:%s -> 5678\n' "$LOCAL"
printf '$ curl http://127.0.0.1:%s/\n' "$LOCAL"
curl -s -m 3 "http://127.0.0.1:$LOCAL/" || fail "port-forward did not answer"
kill "$PF" 2>/dev/null; wait "$PF" 2>/dev/null || true

# From here to the rollback, a client on the external host asks the NodePort every 100 ms.
(
  ok=0; failed=0
  while [ ! -e "$DIR/stop-polling" ]; do
    if "${EXT[@]}" curl -s -f -m 2 -o /dev/null "$NODEPORT"; then ok=$((ok + 1)); else
      code=$?; failed=$((failed + 1)); echo "$(date +%T.%N) curl exit $code" >>"$DIR/poll-failures"
    fi
    echo "$ok $failed" >"$DIR/polled"
    sleep 0.1
  done
) &
POLLER=$!

step "scale to 5"
show kubectl -n demo scale deploy/hello-api --replicas=5
show kubectl -n demo rollout status deploy/hello-api --timeout=120s
show kubectl -n demo get pods -o wide

step "rolling update: kubectl edit changes the text (maxSurge 1, maxUnavailable 1)"
printf '$ KUBE_EDITOR=... kubectl -n demo edit deploy/hello-api\n'
KUBE_EDITOR="sed -i 's/-text=hello from weft/-text=hello again/'" kubectl -n demo edit deploy/hello-api
show kubectl -n demo rollout status deploy/hello-api --timeout=180s
until_says 20 "hello again" "${EXT[@]}" curl -s -m 2 "$NODEPORT"
show kubectl -n demo rollout history deploy/hello-api

step "rollback: kubectl rollout undo"
show kubectl -n demo rollout undo deploy/hello-api
show kubectl -n demo rollout status deploy/hello-api --timeout=180s
until_says 20 "hello from weft" "${EXT[@]}" curl -s -m 2 "$NODEPORT"

touch "$DIR/stop-polling"
wait "$POLLER" || true
POLLER=""
read -r OK FAILED <"$DIR/polled"
echo "the client polling the NodePort through scale, update and rollback: $OK answered, $FAILED failed"
[ "$FAILED" = 0 ] || fail "$FAILED requests failed: $(cat "$DIR/poll-failures")"

step "self-heal: delete every pod, watch the ReplicaSet replace them"
show kubectl -n demo delete pod -l app=hello-api --force --grace-period=0
printf '$ kubectl -n demo get pods -l app=hello-api -w   (for 8 s)\n'
timeout 8 kubectl -n demo get pods -l app=hello-api -w || true
for _ in $(seq 300); do [ "$(ready_pods)" = 5 ] && break; sleep 0.2; done
[ "$(ready_pods)" = 5 ] || fail "the deployment did not heal to 5 ready pods"
show kubectl -n demo get pods -o wide

step "describe and logs"
show kubectl -n demo describe deploy/hello-api
printf '$ kubectl -n demo logs -l app=hello-api --tail=50   (last lines)\n'
kubectl -n demo logs -l app=hello-api --tail=50 | tail -n 8

step "exec: inside a pod"
show kubectl -n demo exec deploy/hello-api -- sh -c 'echo "$(cat /etc/hostname 2>/dev/null || hostname) runs as uid $(id -u)"'

step "NetworkPolicy: only the frontend may reach hello-api"
kubectl apply -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: demo, labels: {app: frontend}}
spec:
  containers: [{name: client, image: weft/echo:dev, imagePullPolicy: IfNotPresent, args: ["-listen=:8080", "-text=frontend"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: demo, labels: {app: intruder}}
spec:
  containers: [{name: client, image: weft/echo:dev, imagePullPolicy: IfNotPresent, args: ["-listen=:8080", "-text=intruder"]}]
EOF
for _ in $(seq 150); do
  [ "$(kubectl -n demo get pod frontend intruder -o jsonpath='{.items[*].status.phase}')" = "Running Running" ] && break
  sleep 0.2
done
SVC=$(kubectl -n demo get svc hello-svc -o jsonpath='{.spec.clusterIP}')
printf '$ kubectl -n demo exec intruder -- curl http://%s/   (before the policy)\n' "$SVC"
until_says 20 "hello from weft" kubectl -n demo exec intruder -- curl -s -m 2 "http://$SVC/"
show kubectl apply -f examples/hello-api-policy.yaml
printf '$ kubectl -n demo exec frontend -- curl http://%s/\n' "$SVC"
until_says 20 "hello from weft" kubectl -n demo exec frontend -- curl -s -m 2 "http://$SVC/"
printf '$ kubectl -n demo exec intruder -- curl http://%s/\n' "$SVC"
for _ in $(seq 20); do
  if ! kubectl -n demo exec intruder -- curl -s -m 2 -o /dev/null "http://$SVC/" 2>/dev/null; then DENIED=1; break; fi
  sleep 0.5
done
[ "${DENIED:-0}" = 1 ] || fail "the intruder still reaches hello-api"
echo "(timed out: dropped by the policy)"
show kubectl -n demo delete networkpolicy hello-api-from-frontend

step "storage: a pod writes to a weft-csi volume, is deleted, and its successor reads the data"
show kubectl apply -f examples/notes.yaml
phase() { kubectl -n demo get pod "$1" -o jsonpath='{.status.phase}' 2>/dev/null || true; }
for _ in $(seq 300); do [ "$(phase notes-writer)" = Running ] && break; sleep 0.2; done
[ "$(phase notes-writer)" = Running ] || fail "the writer did not start: $(kubectl -n demo describe pod notes-writer)"
show kubectl -n demo get pvc,pv
show kubectl -n demo delete pod notes-writer
show kubectl apply -f examples/notes-reader.yaml
for _ in $(seq 300); do [ "$(phase notes-reader)" = Running ] && break; sleep 0.2; done
[ "$(phase notes-reader)" = Running ] || fail "the reader did not start: $(kubectl -n demo describe pod notes-reader)"
printf '$ kubectl -n demo exec notes-reader -- cat /data/note\n'
NOTE=$(kubectl -n demo exec notes-reader -- cat /data/note)
echo "$NOTE"
[ "$NOTE" = "written by notes-writer" ] || fail "the successor read '$NOTE'"

echo
echo "seed demo: every step passed"
