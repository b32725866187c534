#!/usr/bin/env bash
# weft's main job for now: set up, build, and run a small two-node cluster made of network
# namespaces on this machine (never touching the machine's own namespace, routes or firewall):
#   * weft-overlay programs a VXLAN overlay between the two nodes;
#   * weft-cni wires three pods (a web server on each node, a client on node 1);
#   * weft server (weft's Kubernetes API server) holds the objects, written with kubectl;
#   * weft-proxy reads them through the Kubernetes API and serves a ClusterIP Service for the web
#     pods with socket-level load balancing, and NodePorts that an external host reaches through
#     the TC path (to the pod on node2 too, by source translation);
#   * a NetworkPolicy then admits only the client to the web pods, with flow events;
# then prints what answered and what the kernel holds, and removes everything.
# The main job is now scripts/demo.sh (the seed demo over `weft up`); this one shows the dataplane
# pieces wired by hand.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --release --locked -p weft-proxy -p weft-cni -p weft-control
BIN="$PWD/target/release"

ID="weft-demo-$$"
DIR="$(mktemp -d "/tmp/$ID.XXXX")"
PIN="/sys/fs/bpf/$ID"
CG_ROOT="$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)"
CG="$CG_ROOT/$ID"
NS=(lab node1 node2 web1 web2 client ext)
AGENT=""

cleanup() {
  [ -n "$AGENT" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null || true
  for n in "${NS[@]}"; do
    for pid in $(ip netns pids "$ID-$n" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
  done
  if [ -d "$CG" ]; then
    for pid in $(cat "$CG/cgroup.procs" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    sleep 0.2; rmdir "$CG" 2>/dev/null || true
  fi
  rm -rf "$PIN" "$DIR"
  for n in "${NS[@]}"; do ip netns del "$ID-$n" 2>/dev/null || true; done
}
trap cleanup EXIT

in_ns() { local n="$1"; shift; nsenter --net="/run/netns/$ID-$n" "$@"; }
say() { printf '\n== %s\n' "$*"; }

say "underlay: a bridge in a lab namespace; two nodes and an external host on it"
for n in "${NS[@]}"; do ip netns add "$ID-$n"; ip -n "$ID-$n" link set lo up; done
ip -n "$ID-lab" link add br0 type bridge; ip -n "$ID-lab" link set br0 up
i=11
for n in node1 node2 ext; do
  ip -n "$ID-lab" link add "u-$n" type veth peer name eth0 netns "$ID-$n"
  ip -n "$ID-lab" link set "u-$n" master br0; ip -n "$ID-lab" link set "u-$n" up
  ip -n "$ID-$n" addr add "10.200.0.$i/24" dev eth0; ip -n "$ID-$n" link set eth0 up
  i=$((i + 1))
done
NODE1=10.200.0.11

say "weft-overlay: VXLAN between the nodes"
cat > "$DIR/nodes.json" <<EOF
[{"name": "node1", "address": "10.200.0.11", "podCIDR": "10.244.1.0/24"},
 {"name": "node2", "address": "10.200.0.12", "podCIDR": "10.244.2.0/24"}]
EOF
for n in node1 node2; do
  in_ns "$n" "$BIN/weft-overlay" --nodes "$DIR/nodes.json" --node-name "$n" --once \
    --pod-cidr-file "$DIR/$n/pod-cidr" 2>/dev/null
done
in_ns node1 ip route show dev weft-vxlan

say "weft-cni: three pods"
pod_ip() { # node pod
  local conf="{\"cniVersion\":\"1.1.0\",\"name\":\"demo\",\"type\":\"weft-cni\",\"ipMasq\":true,
    \"clusterCIDR\":\"10.244.0.0/16\",\"ipam\":{\"podCIDRFile\":\"$DIR/$1/pod-cidr\",\"dataDir\":\"$DIR/$1/ipam\"}}"
  echo "$conf" | CNI_COMMAND=ADD CNI_CONTAINERID="$2" CNI_NETNS="/run/netns/$ID-$2" CNI_IFNAME=eth0 \
    in_ns "$1" "$BIN/weft-cni" | jq -r '.ips[0].address | split("/")[0]'
}
WEB1=$(pod_ip node1 web1); WEB2=$(pod_ip node2 web2); CLIENT=$(pod_ip node1 client)
echo "web1 $WEB1 (node1)   web2 $WEB2 (node2)   client $CLIENT (node1)"
for w in web1 web2; do
  mkdir -p "$DIR/www-$w"; echo "hello from $w" > "$DIR/www-$w/index.html"
  in_ns "$w" /usr/bin/python3 -m http.server 8080 --directory "$DIR/www-$w" >/dev/null 2>&1 &
done
for w in web1 web2; do
  for _ in $(seq 1 100); do in_ns "$w" ss -ltnH | grep -q ':8080 ' && break; sleep 0.1; done
done

say "weft server (the Kubernetes API) on node1; kubectl writes the Service, the Node and the Pods"
mkdir -p "$DIR/manifests" "$CG"
export KUBECONFIG="$DIR/kubeconfig"
in_ns node1 "$BIN/weft" server --listen 127.0.0.1:6443 --data "$DIR/store.db" \
  --kubeconfig "$KUBECONFIG" 2>/dev/null &
for _ in $(seq 1 100); do [ -s "$KUBECONFIG" ] && break; sleep 0.1; done
kube() { in_ns node1 kubectl "$@"; }
cat > "$DIR/manifests/web.yaml" <<EOF
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-local, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, nodePort: 30081}]
---
apiVersion: v1
kind: Node
metadata: {name: node1}
EOF
for p in "web1 node1" "web2 node2"; do
  set -- $p
  cat >> "$DIR/manifests/web.yaml" <<EOF
---
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: default, labels: {app: web}}
spec: {nodeName: $2, containers: [{name: web, image: demo, ports: [{name: http, containerPort: 8080}]}]}
EOF
done
kube apply -f "$DIR/manifests/web.yaml"
# What kubelet would report: the node's address and the pods' IPs and readiness.
kube patch node node1 --subresource=status --type=merge \
  -p "{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"$NODE1\"}]}}" >/dev/null
pod_status() { # name ip
  kube patch pod "$1" --subresource=status --type=merge -p "{\"status\":{\"phase\":\"Running\",
    \"podIP\":\"$2\",\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\"}]}}" >/dev/null
}
pod_status web1 "$WEB1"; pod_status web2 "$WEB2"
kube get services,pods -o wide
VIP=$(kube get service web -o jsonpath='{.spec.clusterIP}')

say "weft-proxy on node1, reading the Kubernetes API"
in_ns node1 "$BIN/weft-proxy" --pin-dir "$PIN" run --kubeconfig "$KUBECONFIG" --node-name node1 \
  --cgroup "$CG" --nodeport-iface eth0 2>/dev/null &
AGENT=$!
for _ in $(seq 1 100); do
  in_ns node1 "$BIN/weft-proxy" --pin-dir "$PIN" services 2>/dev/null | grep -q "$VIP:80/tcp.*10.244" && break
  sleep 0.1
done
in_ns node1 "$BIN/weft-proxy" --pin-dir "$PIN" services

# What a probe printed: the peer the application saw and the page that answered, or the error.
SHOW='if .error then "error: " + .error else "peer " + .peer + " -> " + ((.reply | split("\n") | map(select(startswith("hello"))) | .[0]) // .reply) end'

say "the client pod (in the pods' cgroup) asks the ClusterIP $VIP 6 times"
for _ in 1 2 3 4 5 6; do
  in_ns client sh -c "echo 0 > '$CG/cgroup.procs'; exec '$BIN/weft-proxy' probe tcp $VIP:80 \
    --payload 'GET /index.html HTTP/1.0
' " | jq -r "$SHOW"
done

say "the external host asks NodePort $NODE1:30080 4 times (TC path; web2 on node2 is reached by SNAT to node1's address)"
for _ in 1 2 3 4; do
  in_ns ext "$BIN/weft-proxy" probe tcp "$NODE1:30080" --payload 'GET /index.html HTTP/1.0
' | jq -r "$SHOW"
done
echo "-- NodePort $NODE1:30081 has externalTrafficPolicy: Local: only web1 (node1's own pod) answers, with the client address kept"
in_ns ext "$BIN/weft-proxy" probe tcp "$NODE1:30081" --payload 'GET /index.html HTTP/1.0
' | jq -r "$SHOW"

say "NetworkPolicy: the web pods now accept only pods labelled app=client (enforced on node1's pod interfaces)"
cat > "$DIR/manifests/policy.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: client, image: demo}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-clients, namespace: default}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: http}]}]
EOF
kube apply -f "$DIR/manifests/policy.yaml"
pod_status client "$CLIENT"
for _ in $(seq 1 50); do
  in_ns node1 "$BIN/weft-proxy" --pin-dir "$PIN" policy status | grep -q '"isolated":1' && break
  sleep 0.1
done
in_ns node1 "$BIN/weft-proxy" --pin-dir "$PIN" flows observe >/dev/null # start from here
echo "-- the client asks web1 directly: allowed by the policy"
in_ns client "$BIN/weft-proxy" probe tcp "$WEB1:8080" --payload 'GET /index.html HTTP/1.0
' | jq -r "$SHOW"
echo "-- the external host asks NodePort 30081 again: web1 is isolated now, so it is dropped"
in_ns ext "$BIN/weft-proxy" probe tcp "$NODE1:30081" --timeout-ms 1000 --payload 'GET / HTTP/1.0
' | jq -r "$SHOW" || true  # the probe exits 1 when it gets no answer
echo "-- the verdicts, as 'weft-proxy flows observe' shows them"
in_ns node1 "$BIN/weft-proxy" --pin-dir "$PIN" flows observe

say "kernel drop and verdict counters, programming latency (Prometheus, 127.0.0.1:9402 in node1)"
in_ns node1 /usr/bin/python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9402/metrics').read().decode())" \
  | grep -E '^weft_proxy_(services|backends|drops_total|policy_verdicts_total|network_programming_duration_seconds_count)'

say "cleaning up"
