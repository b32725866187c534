//! Privileged: socket-level service load balancing against the real kernel. Pods are namespaces
//! on a test-bed node; their processes run in a cgroup the test creates, where `weft-proxy run`
//! attaches its programs; services come from a manifests directory.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Output},
    time::{Duration, Instant},
};

use serde_json::Value;
use weft_testbed::{Host, Lab, TcpServer, UdpServer};

const BIN: &str = env!("CARGO_BIN_EXE_weft-proxy");

fn pod_yaml(name: &str, ip: &str, ready: bool) -> String {
    pod_on("node0", name, ip, ready)
}

fn pod_on(node: &str, name: &str, ip: &str, ready: bool) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: web}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, image: x, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
         status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"{}\"}}]}}\n",
        if ready { "True" } else { "False" }
    )
}

/// The Node object of the test node, with its underlay address (for NodePort frontends).
fn node_yaml(ip: std::net::Ipv4Addr) -> String {
    format!(
        "\n---\napiVersion: v1\nkind: Node\nmetadata: {{name: node0}}\n\
         status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
    )
}

const SERVICES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec: {clusterIP: 10.96.0.99, selector: {app: nothing}, ports: [{port: 80}]}
";

const DNS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: default}
spec: {clusterIP: 10.96.0.53, ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, namespace: default, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}]
endpoints: [{addresses: [10.244.0.3]}]
";

struct Env {
    lab: Lab,
    pin: PathBuf,
    cgroup: PathBuf,
    manifests: PathBuf,
    agent: Option<Child>,
    _servers: (TcpServer, TcpServer, UdpServer, UdpServer),
}

impl Env {
    fn new() -> Self {
        let mut lab = Lab::new().unwrap();
        let node = lab.add_node().unwrap();
        for (label, ip) in [
            ("client", "10.244.0.2"),
            ("be1", "10.244.0.3"),
            ("be2", "10.244.0.4"),
        ] {
            lab.wire_pod(node, label, ip.parse().unwrap()).unwrap();
        }
        let any = |p| format!("0.0.0.0:{p}").parse().unwrap();
        let servers = (
            lab.host("be1").unwrap().tcp_echo_server(any(8080)).unwrap(),
            lab.host("be2").unwrap().tcp_echo_server(any(8080)).unwrap(),
            lab.host("be1").unwrap().udp_echo_server(any(5353)).unwrap(),
            lab.host("be2").unwrap().udp_echo_server(any(5353)).unwrap(),
        );
        lab.add_external("ext").unwrap();
        let pin = lab.bpffs_dir("proxy").unwrap();
        let cgroup = lab.cgroup("pods").unwrap();
        let manifests = lab.temp_dir("manifests").unwrap();
        let env = Self {
            lab,
            pin,
            cgroup,
            manifests,
            agent: None,
            _servers: servers,
        };
        env.write_pods(true);
        std::fs::write(env.manifests.join("services.yaml"), SERVICES).unwrap();
        std::fs::write(env.manifests.join("dns.yaml"), DNS).unwrap();
        env
    }

    fn write_pods(&self, be2_ready: bool) {
        self.write_pods_ready(true, be2_ready);
    }

    fn write_pods_ready(&self, be1_ready: bool, be2_ready: bool) {
        let pods =
            pod_yaml("be1", "10.244.0.3", be1_ready) + &pod_yaml("be2", "10.244.0.4", be2_ready);
        std::fs::write(self.manifests.join("pods.yaml"), pods).unwrap();
    }

    fn node(&self) -> &Host {
        self.lab.node(0)
    }

    fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    fn start_agent_with(&mut self, extra: &[&str]) {
        self.agent = Some(self.spawn_agent(extra));
    }

    fn spawn_agent(&self, extra: &[&str]) -> Child {
        weft_tests::proxy_agent(
            self.node(),
            BIN.as_ref(),
            &self.pin,
            &self.manifests,
            &self.cgroup,
            50,
        )
        .args(["--nodeport-iface", "eth0"])
        .args(extra)
        .spawn()
        .unwrap()
    }

    fn stop_agent(&mut self) {
        if let Some(c) = self.agent.take() {
            stop_child(c);
        }
    }

    /// Writes `yaml` into the manifests directory as `file`, followed by the test node's Node
    /// object (so NodePort frontends get the node's address).
    fn write_with_node(&self, file: &str, yaml: &str) {
        let ip = self.lab.node(0).underlay_addr().unwrap();
        std::fs::write(
            self.manifests.join(file),
            format!("{yaml}{}", node_yaml(ip)),
        )
        .unwrap();
    }

    /// Runs `weft-proxy --pin-dir PIN ARGS` in the node's namespace.
    fn proxy(&self, args: &[&str]) -> Output {
        self.node()
            .command(BIN)
            .unwrap()
            .arg("--pin-dir")
            .arg(&self.pin)
            .args(args)
            .output()
            .unwrap()
    }

    fn services(&self) -> BTreeMap<String, Vec<String>> {
        let out = self.proxy(&["services", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let b = r["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_str().unwrap().to_owned())
                    .collect();
                (r["frontend"].as_str().unwrap().to_owned(), b)
            })
            .collect()
    }

    /// How many backends of `frontend` the kernel holds as local.
    fn local_backends(&self, frontend: &str) -> Option<u64> {
        let out = self.proxy(&["services", "--json"]);
        let rows: Value = serde_json::from_slice(&out.stdout).ok()?;
        rows.as_array()?
            .iter()
            .find(|r| r["frontend"] == frontend)?["local"]
            .as_u64()
    }

    /// Panics at once if the agent has exited (instead of waiting for a timeout).
    fn assert_agent_alive(&self) {
        if let Some(c) = &self.agent {
            let alive = std::path::Path::new(&format!("/proc/{}", c.id())).exists()
                && !std::fs::read_to_string(format!("/proc/{}/stat", c.id()))
                    .unwrap_or_default()
                    .contains(") Z ");
            assert!(alive, "the agent exited; see its log above");
        }
    }

    /// Waits until the kernel holds `frontend` with `n` backends.
    fn wait_for_frontend(&self, frontend: &str, n: usize) {
        let start = Instant::now();
        while self.services().get(frontend).map(Vec::len) != Some(n) {
            self.assert_agent_alive();
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{frontend} never got {n} backends; the kernel holds {:?}",
                self.services()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the kernel's view matches `want` (frontend → number of backends).
    fn wait_for(&self, want: &[(&str, usize)]) {
        let start = Instant::now();
        loop {
            let have = self.services();
            let got: Vec<(String, usize)> =
                have.iter().map(|(k, v)| (k.clone(), v.len())).collect();
            let want: Vec<(String, usize)> =
                want.iter().map(|(k, n)| ((*k).to_owned(), *n)).collect();
            if got == want {
                return;
            }
            self.assert_agent_alive();
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "services {got:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `n` echoed TCP exchanges from `from` to `addr`; the peers be1 and be2 saw for them.
    fn exchanges(&self, from: &Host, addr: &str, n: usize) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        let before = (self._servers.0.peers().len(), self._servers.1.peers().len());
        for _ in 0..n {
            let got = from
                .tcp_roundtrip(addr.parse().unwrap(), b"hello", Duration::from_secs(2))
                .unwrap();
            assert_eq!(got, b"hello");
        }
        (
            self._servers.0.peers()[before.0..].to_vec(),
            self._servers.1.peers()[before.1..].to_vec(),
        )
    }

    /// `weft-proxy probe` from the client pod, inside the pods' cgroup.
    fn probe_from_client(&self, proto: &str, addr: &str) -> Value {
        self.probe(self.lab.host("client").unwrap(), proto, addr)
    }

    /// `weft-proxy probe` from `host`, inside the pods' cgroup.
    fn probe(&self, host: &Host, proto: &str, addr: &str) -> Value {
        let out: Output = host
            .command_in_cgroup(BIN, &self.cgroup)
            .unwrap()
            .args(["probe", proto, addr, "--timeout-ms", "2000"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("probe output ({e}): {out:?}"))
    }
}

/// Stops an agent the way a node does (SIGTERM) and checks it exited cleanly.
fn stop_child(mut c: Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = c.wait().unwrap();
    assert!(status.success(), "agent exited with {status}");
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.node().command(BIN).map(|mut c| {
            c.arg("--pin-dir")
                .arg(&self.pin)
                .args(["socklb", "detach", "--cgroup"])
                .arg(&self.cgroup)
                .output()
        });
    }
}

const ALL: [(&str, usize); 3] = [
    ("10.96.0.10:80/tcp", 2),
    ("10.96.0.53:53/udp", 1),
    ("10.96.0.99:80/tcp", 0),
];

#[test]
fn cluster_ip_tcp_and_udp_from_a_pod_and_from_the_node() {
    let mut env = Env::new();
    env.start_agent();
    env.wait_for(&ALL);
    let client = env.lab.host("client").unwrap();

    // TCP: every connection lands on a backend, the application sees the service as its peer,
    // and the backend sees the pod's own address (no NAT anywhere).
    for _ in 0..30 {
        let r = env.probe(client, "tcp", "10.96.0.10:80");
        assert_eq!(r["reply"], "weft-probe", "{r}");
        assert_eq!(
            r["peer"], "10.96.0.10:80",
            "getpeername shows the service: {r}"
        );
    }
    let (hits1, hits2) = (env._servers.0.peers(), env._servers.1.peers());
    assert_eq!(hits1.len() + hits2.len(), 30);
    assert!(
        !hits1.is_empty() && !hits2.is_empty(),
        "both backends get connections: {} / {}",
        hits1.len(),
        hits2.len()
    );
    assert!(
        hits1
            .iter()
            .chain(&hits2)
            .all(|p| p.ip().to_string() == "10.244.0.2")
    );

    // UDP: the reply appears to come from the service address.
    let r = env.probe(client, "udp", "10.96.0.53:53");
    assert_eq!(r["reply"], "weft-probe", "{r}");
    assert_eq!(r["peer"], "10.96.0.53:53", "{r}");

    // From the node itself.
    let r = env.probe(env.node(), "tcp", "10.96.0.10:80");
    assert_eq!(r["reply"], "weft-probe", "{r}");

    // No endpoints: refused at once, not a hang.
    let t0 = Instant::now();
    let r = env.probe(client, "tcp", "10.96.0.99:80");
    assert_eq!(r["os_error"], 1, "EPERM: {r}");
    // A hang would last the probe's 2 s timeout.
    assert!(t0.elapsed() < Duration::from_millis(1500));

    // Metrics: what is programmed, the refusal above by reason, and programming latency.
    let text = env
        .node()
        .scrape("127.0.0.1:9402".parse().unwrap())
        .unwrap();
    let value = |name: &str| -> f64 {
        weft_testbed::metric(&text, name).unwrap_or_else(|| panic!("{name} missing in:\n{text}"))
    };
    assert_eq!(value("weft_proxy_services "), 3.0);
    assert_eq!(value("weft_proxy_backends "), 3.0);
    assert!(
        value("weft_proxy_drops_total{reason=\"no_endpoints\"} ") >= 1.0,
        "{text}"
    );
    assert!(value("weft_proxy_network_programming_duration_seconds_count ") >= 1.0);

    // A process outside the cgroup is not load-balanced.
    let out = client
        .command(BIN)
        .unwrap()
        .args(["probe", "tcp", "10.96.0.10:80", "--timeout-ms", "300"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    env.stop_agent();
}

#[test]
fn backend_changes_restart_and_stale_entries() {
    let mut env = Env::new();
    env.start_agent();
    env.wait_for(&ALL);

    // be2 stops being ready: new connections go to be1 only.
    env.write_pods(false);
    env.wait_for(&[
        ("10.96.0.10:80/tcp", 1),
        ("10.96.0.53:53/udp", 1),
        ("10.96.0.99:80/tcp", 0),
    ]);
    let before = env._servers.1.peers().len();
    for _ in 0..15 {
        assert_eq!(
            env.probe_from_client("tcp", "10.96.0.10:80")["reply"],
            "weft-probe"
        );
    }
    assert_eq!(
        env._servers.1.peers().len(),
        before,
        "no new connection reached the unready backend"
    );

    // The agent stops: the pinned programs and maps keep serving.
    env.stop_agent();
    for _ in 0..5 {
        assert_eq!(
            env.probe_from_client("tcp", "10.96.0.10:80")["reply"],
            "weft-probe"
        );
    }
    // While it is down, the DNS service goes away and be2 comes back.
    std::fs::remove_file(env.manifests.join("dns.yaml")).unwrap();
    env.write_pods(true);
    // On start it reconciles: the stale frontend is removed, the backend is added.
    env.start_agent();
    env.wait_for(&[("10.96.0.10:80/tcp", 2), ("10.96.0.99:80/tcp", 0)]);
    let r = env.probe_from_client("udp", "10.96.0.53:53");
    assert!(
        r.get("error").is_some(),
        "the removed service no longer answers: {r}"
    );
    assert_eq!(
        env.probe_from_client("tcp", "10.96.0.10:80")["reply"],
        "weft-probe"
    );
    env.stop_agent();
}

#[test]
fn bad_manifests_do_not_disturb_good_services() {
    let mut env = Env::new();
    std::fs::write(
        env.manifests.join("broken.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {clusterIP: 10.96.0.999, ports: [{port: 80}]}\n---\n\
         kind: Service\nspec: {ports: 7}\n---\n: not yaml [\n",
    )
    .unwrap();
    env.start_agent();
    env.wait_for(&ALL);
    assert_eq!(
        env.probe(env.lab.host("client").unwrap(), "tcp", "10.96.0.10:80")["reply"],
        "weft-probe"
    );
    env.stop_agent();
}

#[test]
fn nodeport_from_outside_the_node_keeps_the_client_address() {
    let mut env = Env::new();
    let node_ip = env.lab.node(0).underlay_addr().unwrap();
    env.write_with_node(
        "nodeport.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: np, namespace: default}\n\
             spec: {type: NodePort, clusterIP: 10.96.0.30, selector: {app: web}, ports: [\
             {name: http, port: 80, targetPort: http, nodePort: 30080},\
             {name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30053}]}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {name: nobody, namespace: default}\n\
             spec: {type: NodePort, clusterIP: 10.96.0.31, selector: {app: nobody}, ports: [\
             {port: 80, nodePort: 30099}]}\n",
    );
    env.start_agent();
    env.wait_for_frontend(&format!("{node_ip}:30080/tcp"), 2);
    env.wait_for_frontend(&format!("{node_ip}:30099/tcp"), 0);
    env.wait_for_frontend(&format!("{node_ip}:30053/udp"), 2);
    let ext = env.lab.host("ext").unwrap();
    let ext_ip = ext.underlay_addr().unwrap();
    let (before1, before2) = (env._servers.0.peers().len(), env._servers.1.peers().len());

    // TCP from outside: several connections, each with a payload bigger than a window, so every
    // packet of a flow must keep going to the same backend.
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    for _ in 0..16 {
        let got = ext
            .tcp_roundtrip(
                SocketAddr::from((node_ip, 30080)),
                &payload,
                Duration::from_secs(5),
            )
            .unwrap();
        assert!(got == payload, "echo differs ({} bytes)", got.len());
    }
    let hits1: Vec<_> = env._servers.0.peers()[before1..].to_vec();
    let hits2: Vec<_> = env._servers.1.peers()[before2..].to_vec();
    assert_eq!(hits1.len() + hits2.len(), 16);
    assert!(
        !hits1.is_empty() && !hits2.is_empty(),
        "both backends: {} / {}",
        hits1.len(),
        hits2.len()
    );
    // The backends see the external client's own address (no SNAT).
    assert!(
        hits1
            .iter()
            .chain(&hits2)
            .all(|p| p.ip() == std::net::IpAddr::V4(ext_ip))
    );

    // UDP from outside: the reply comes back from the node's address and port.
    let got = ext
        .udp_roundtrip(
            SocketAddr::from((node_ip, 30053)),
            b"query",
            Duration::from_secs(2),
        )
        .unwrap();
    assert_eq!(got, b"query");

    // A NodePort without endpoints refuses at once instead of leaving the client retrying.
    let t0 = Instant::now();
    let err = ext
        .tcp_roundtrip(
            SocketAddr::from((node_ip, 30099)),
            b"x",
            Duration::from_secs(3),
        )
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_millis(1500) && err.to_string().contains("refused"),
        "{err} after {:?}",
        t0.elapsed()
    );

    // A port that is no service passes through untouched (nothing listens: refused).
    assert!(
        ext.tcp_roundtrip(
            SocketAddr::from((node_ip, 30999)),
            b"x",
            Duration::from_secs(1)
        )
        .is_err()
    );
    env.stop_agent();
}

#[test]
fn session_affinity_keeps_each_client_on_one_backend() {
    let mut env = Env::new();
    let node_ip = env.lab.node(0).underlay_addr().unwrap();
    env.write_with_node(
        "sticky.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: sticky, namespace: default}\n\
             spec: {type: NodePort, clusterIP: 10.96.0.60, selector: {app: web}, sessionAffinity: ClientIP,\n\
             \x20 sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}},\n\
             \x20 ports: [{name: http, port: 80, targetPort: http, nodePort: 30060}]}\n"
    );
    env.start_agent();
    env.wait_for_frontend("10.96.0.60:80/tcp", 2);
    env.wait_for_frontend(&format!("{node_ip}:30060/tcp"), 2);
    let hits = |env: &Env| (env._servers.0.peers().len(), env._servers.1.peers().len());

    // A pod (socket LB: the client is the pod's network namespace).
    let before = hits(&env);
    for _ in 0..12 {
        assert_eq!(
            env.probe_from_client("tcp", "10.96.0.60:80")["reply"],
            "weft-probe"
        );
    }
    let after = hits(&env);
    let (d1, d2) = (after.0 - before.0, after.1 - before.1);
    assert!(
        (d1, d2) == (12, 0) || (d1, d2) == (0, 12),
        "a pod stays on one backend: {d1} / {d2}"
    );

    // An external client (TC path: the client is its address).
    let ext = env.lab.host("ext").unwrap();
    let before = hits(&env);
    for _ in 0..12 {
        let got = ext
            .tcp_roundtrip(
                SocketAddr::from((node_ip, 30060)),
                b"hi",
                Duration::from_secs(2),
            )
            .unwrap();
        assert_eq!(got, b"hi");
    }
    let after = hits(&env);
    let (d1, d2) = (after.0 - before.0, after.1 - before.1);
    assert!(
        (d1, d2) == (12, 0) || (d1, d2) == (0, 12),
        "an external client stays on one backend: {d1} / {d2}"
    );
    env.stop_agent();
}

#[test]
fn traffic_policies_choose_local_backends() {
    let mut env = Env::new();
    let node_ip = env.lab.node(0).underlay_addr().unwrap();
    // be2 is declared to run on another node.
    let pods = pod_yaml("be1", "10.244.0.3", true) + &pod_on("node1", "be2", "10.244.0.4", true);
    std::fs::write(env.manifests.join("pods.yaml"), pods).unwrap();
    let svc = |name: &str, extra: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{selector: {{app: web}}, {extra}}}\n"
        )
    };
    let manifests = svc(
        "itp",
        "clusterIP: 10.96.0.70, internalTrafficPolicy: Local, ports: [{name: http, port: 80, targetPort: http}]",
    ) + &svc(
        "etp",
        "type: NodePort, clusterIP: 10.96.0.71, ports: [{name: http, port: 80, targetPort: http, nodePort: 30071}]",
    ) + &svc(
        "etpl",
        "type: NodePort, clusterIP: 10.96.0.72, externalTrafficPolicy: Local, ports: [{name: http, port: 80, targetPort: http, nodePort: 30072}]",
    );
    env.write_with_node("policies.yaml", &manifests);
    // be2 is not really on another node here, so the per-packet path must not send it
    // source-translated traffic (see nodeport_reaches_remote_backends_through_snat).
    env.start_agent_with(&["--snat-addr", "0.0.0.0"]);
    env.wait_for_frontend("10.96.0.70:80/tcp", 1);
    env.wait_for_frontend(&format!("{node_ip}:30071/tcp"), 2);
    env.wait_for_frontend(&format!("{node_ip}:30072/tcp"), 1);
    let spread = |env: &Env, f: &dyn Fn()| {
        let hits = || (env._servers.0.peers().len(), env._servers.1.peers().len());
        let before = hits();
        for _ in 0..16 {
            f();
        }
        let after = hits();
        (after.0 - before.0, after.1 - before.1)
    };
    let pod = |addr: String| assert_eq!(env.probe_from_client("tcp", &addr)["reply"], "weft-probe");
    let ext = env.lab.host("ext").unwrap();
    let outside = |port: u16| {
        let got = ext
            .tcp_roundtrip(
                SocketAddr::from((node_ip, port)),
                b"x",
                Duration::from_secs(2),
            )
            .unwrap();
        assert_eq!(got, b"x");
    };

    // internalTrafficPolicy: Local: the cluster IP reaches only this node's backend.
    assert_eq!(spread(&env, &|| pod("10.96.0.70:80".into())), (16, 0));
    // externalTrafficPolicy: Cluster, from a pod: every backend.
    let (a, b) = spread(&env, &|| pod(format!("{node_ip}:30071")));
    assert!(a > 0 && b > 0, "both backends: {a} / {b}");
    // externalTrafficPolicy: Local, from a pod: only the local backend.
    assert_eq!(spread(&env, &|| pod(format!("{node_ip}:30072"))), (16, 0));
    // From outside (TC path) with source translation turned off, only local backends are
    // reachable, whatever the policy.
    assert_eq!(spread(&env, &|| outside(30071)), (16, 0));
    assert_eq!(spread(&env, &|| outside(30072)), (16, 0));

    // be2 is now declared on this node: the same backends, but both local. The TC path must see
    // the change even though the backend set did not change.
    let pods = pod_yaml("be1", "10.244.0.3", true) + &pod_yaml("be2", "10.244.0.4", true);
    std::fs::write(env.manifests.join("pods.yaml"), pods).unwrap();
    let start = Instant::now();
    while env.local_backends(&format!("{node_ip}:30071/tcp")) != Some(2) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "local count never reached 2"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (a, b) = spread(&env, &|| outside(30071));
    assert!(
        a > 0 && b > 0,
        "from outside, both local backends now: {a} / {b}"
    );
    env.stop_agent();
}

#[test]
fn tc_flows_follow_endpoint_changes() {
    let mut env = Env::new();
    let node_ip = env.lab.node(0).underlay_addr().unwrap();
    // Two UDP servers of this test's own, one per backend, so one can really go away.
    let any = |p| format!("0.0.0.0:{p}").parse().unwrap();
    let mut udp1 = Some(
        env.lab
            .host("be1")
            .unwrap()
            .udp_echo_server(any(5454))
            .unwrap(),
    );
    let mut udp2 = Some(
        env.lab
            .host("be2")
            .unwrap()
            .udp_echo_server(any(5454))
            .unwrap(),
    );
    env.write_with_node(
        "flows.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: flows, namespace: default}\n\
             spec: {type: NodePort, clusterIP: 10.96.0.80, selector: {app: web}, ports: [\
             {name: http, port: 80, targetPort: http, nodePort: 30080},\
             {name: u, port: 54, protocol: UDP, targetPort: 5454, nodePort: 30054}]}\n",
    );
    env.start_agent();
    env.wait_for_frontend(&format!("{node_ip}:30054/udp"), 2);
    let ext = env.lab.host("ext").unwrap();

    // UDP: one flow (fixed source port) lands on a backend; that backend goes away (server stopped,
    // pod no longer ready); the same flow moves to the other backend instead of blackholing.
    let sock = ext
        .run(|| std::net::UdpSocket::bind("0.0.0.0:40123"))
        .unwrap()
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let dst = SocketAddr::from((node_ip, 30054));
    let ask = || {
        let mut buf = [0u8; 64];
        sock.send_to(b"q", dst).unwrap();
        sock.recv_from(&mut buf).map(|(n, _)| n)
    };
    assert_eq!(ask().unwrap(), 1);
    let on_be1 = !udp1.as_ref().unwrap().peers().is_empty();
    if on_be1 {
        udp1.take();
        env.write_pods_ready(false, true);
    } else {
        udp2.take();
        env.write_pods_ready(true, false);
    }
    env.wait_for_frontend(&format!("{node_ip}:30054/udp"), 1);
    assert_eq!(ask().expect("the flow moved to the remaining backend"), 1);
    let survivor = if on_be1 { udp2.as_ref() } else { udp1.as_ref() }.unwrap();
    assert!(!survivor.peers().is_empty());

    // TCP: a connection established from outside keeps working when its backend becomes
    // terminating (not ready): established flows keep their backend.
    env.write_pods_ready(true, true);
    env.wait_for_frontend(&format!("{node_ip}:30080/tcp"), 2);
    let mut conn = ext
        .run(|| {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::from((node_ip, 30080)),
                Duration::from_secs(2),
            )
        })
        .unwrap()
        .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let echo = |c: &mut std::net::TcpStream| {
        use std::io::{Read as _, Write as _};
        let mut b = [0u8; 5];
        c.write_all(b"hello").unwrap();
        c.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");
    };
    echo(&mut conn);
    env.write_pods_ready(false, false);
    env.wait_for_frontend(&format!("{node_ip}:30080/tcp"), 0);
    echo(&mut conn);
    env.stop_agent();
}

#[test]
fn maglev_keeps_flows_on_their_backends() {
    let mut env = Env::new();
    let node_ip = env.lab.node(0).underlay_addr().unwrap();
    env.lab
        .wire_pod(0, "be3", "10.244.0.5".parse().unwrap())
        .unwrap();
    let any = |p| format!("0.0.0.0:{p}").parse().unwrap();
    let servers: Vec<UdpServer> = ["be1", "be2", "be3"]
        .iter()
        .map(|b| env.lab.host(b).unwrap().udp_echo_server(any(5454)).unwrap())
        .collect();
    let svc = |name: &str, port: u16, annotation: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default{annotation}}}\n\
             spec: {{type: NodePort, clusterIP: 10.96.1.{}, selector: {{app: web}}, \
             ports: [{{name: u, port: 54, protocol: UDP, targetPort: 5454, nodePort: {port}}}]}}\n",
            port % 100
        )
    };
    let manifests =
        svc("mg", 30055, ", annotations: {weft.io/lb-algorithm: maglev}") + &svc("rnd", 30056, "");
    env.write_with_node("maglev.yaml", &manifests);
    env.start_agent();
    env.wait_for_frontend(&format!("{node_ip}:30055/udp"), 2);
    env.wait_for_frontend(&format!("{node_ip}:30056/udp"), 2);

    let ext = env.lab.host("ext").unwrap();
    let socks: Vec<std::net::UdpSocket> = (0..24)
        .map(|i| {
            let s = ext
                .run(|| std::net::UdpSocket::bind(("0.0.0.0", 42000 + i)))
                .unwrap()
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s
        })
        .collect();
    // One datagram per flow; returns which server (0, 1, 2) each source port reached.
    let round = |port: u16| -> BTreeMap<u16, usize> {
        let before: Vec<usize> = servers.iter().map(|s| s.peers().len()).collect();
        let mut buf = [0u8; 16];
        for s in &socks {
            s.send_to(b"q", SocketAddr::from((node_ip, port))).unwrap();
            s.recv_from(&mut buf).unwrap();
        }
        let mut out = BTreeMap::new();
        for (k, server) in servers.iter().enumerate() {
            for p in &server.peers()[before[k]..] {
                out.insert(p.port(), k);
            }
        }
        assert_eq!(out.len(), socks.len());
        out
    };
    let flush = || {
        let out = env.proxy(&["flows", "flush"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    let maglev1 = round(30055);
    let random1 = round(30056);
    flush();
    // Flow state lost: Maglev sends every flow where it went before; random choice does not.
    assert_eq!(round(30055), maglev1);
    assert_ne!(
        round(30056),
        random1,
        "random choice should move some of 24 flows"
    );

    // A third backend joins: Maglev moves only about a third of the flows (to it).
    std::fs::write(
        env.manifests.join("be3.yaml"),
        pod_yaml("be3", "10.244.0.5", true),
    )
    .unwrap();
    env.wait_for_frontend(&format!("{node_ip}:30055/udp"), 3);
    flush();
    let maglev3 = round(30055);
    let kept = maglev1
        .iter()
        .filter(|(port, b)| maglev3.get(port) == Some(b))
        .count();
    let moved_elsewhere = maglev1
        .iter()
        .filter(|(port, b)| maglev3[port] != **b && maglev3[port] != 2)
        .count();
    assert!(kept >= 12, "Maglev kept only {kept} of 24 flows");
    assert_eq!(moved_elsewhere, 0, "flows only move to the new backend");
    env.stop_agent();
}

/// NodePort from an external host to a node with one local and one remote backend (on a second
/// node, reached through the underlay): with `externalTrafficPolicy: Cluster` both serve, the
/// local one sees the client's address and the remote one the node's (SNAT, so replies come back
/// through the node); with `Local`, only the local one, with the client's address.
#[test]
fn nodeport_reaches_remote_backends_through_snat() {
    let mut lab = Lab::new().unwrap();
    let (n0, n1) = (lab.add_node().unwrap(), lab.add_node().unwrap());
    lab.wire_pod(n0, "local", "10.244.0.3".parse().unwrap())
        .unwrap();
    lab.wire_pod(n1, "remote", "10.244.1.3".parse().unwrap())
        .unwrap();
    lab.add_external("ext").unwrap();
    let node0_ip = lab.node(0).underlay_addr().unwrap();
    let node1_ip = lab.node(1).underlay_addr().unwrap();
    // node0 reaches node1's pods through node1, as an overlay or a routed underlay provides.
    lab.node(0)
        .exec(
            "ip",
            [
                "route",
                "add",
                "10.244.1.0/24",
                "via",
                &node1_ip.to_string(),
            ],
        )
        .unwrap();
    let any = |p| format!("0.0.0.0:{p}").parse().unwrap();
    let (local, remote) = (lab.host("local").unwrap(), lab.host("remote").unwrap());
    let tcp = (
        local.tcp_echo_server(any(8080)).unwrap(),
        remote.tcp_echo_server(any(8080)).unwrap(),
    );
    let udp = (
        local.udp_echo_server(any(5353)).unwrap(),
        remote.udp_echo_server(any(5353)).unwrap(),
    );
    let pin = lab.bpffs_dir("snat").unwrap();
    let cgroup = lab.cgroup("snat").unwrap();
    let manifests = lab.temp_dir("snat").unwrap();
    let svc = |name: &str, policy: &str, np: u16, udp_np: u16| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{type: NodePort, externalTrafficPolicy: {policy}, selector: {{app: web}}, ports: [\
             {{name: http, port: 80, targetPort: http, nodePort: {np}}},\
             {{name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: {udp_np}}}]}}\n"
        )
    };
    let yaml = pod_on("node0", "local", "10.244.0.3", true)
        + &pod_on("node1", "remote", "10.244.1.3", true)
        + &svc("cluster", "Cluster", 30081, 30053)
        + &svc("onlylocal", "Local", 30082, 30054)
        + &node_yaml(node0_ip);
    std::fs::write(manifests.join("all.yaml"), yaml).unwrap();
    let mut agent =
        weft_tests::proxy_agent(lab.node(0), BIN.as_ref(), &pin, &manifests, &cgroup, 50)
            .args(["--nodeport-iface", "eth0", "--metrics-addr", "off"])
            .spawn()
            .unwrap();
    let ext = lab.host("ext").unwrap();
    let ext_ip = std::net::IpAddr::V4(ext.underlay_addr().unwrap());
    let node0 = std::net::IpAddr::V4(node0_ip);
    let start = Instant::now();
    while ext
        .tcp_roundtrip(
            SocketAddr::from((node0_ip, 30082)),
            b"x",
            Duration::from_millis(500),
        )
        .is_err()
    {
        assert!(agent.try_wait().unwrap().is_none(), "the agent exited");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "NodePort never answered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // externalTrafficPolicy: Cluster. Payloads bigger than a window, so every packet of a flow
    // must be translated the same way, both ways.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let before = (tcp.0.peers().len(), tcp.1.peers().len());
    for _ in 0..20 {
        let got = ext
            .tcp_roundtrip(
                SocketAddr::from((node0_ip, 30081)),
                &payload,
                Duration::from_secs(5),
            )
            .unwrap();
        assert!(got == payload, "echo differs ({} bytes)", got.len());
    }
    let (on_local, on_remote) = (
        tcp.0.peers()[before.0..].to_vec(),
        tcp.1.peers()[before.1..].to_vec(),
    );
    assert_eq!(on_local.len() + on_remote.len(), 20);
    assert!(
        !on_local.is_empty() && !on_remote.is_empty(),
        "both backends: {on_local:?} / {on_remote:?}"
    );
    assert!(
        on_local.iter().all(|p| p.ip() == ext_ip),
        "the local backend sees the client: {on_local:?}"
    );
    assert!(
        on_remote
            .iter()
            .all(|p| p.ip() == node0 && (61000..=65535).contains(&p.port())),
        "the remote backend sees the node's address and a port of its range: {on_remote:?}"
    );
    let before_udp = (udp.0.peers().len(), udp.1.peers().len());
    for _ in 0..16 {
        let got = ext
            .udp_roundtrip(
                SocketAddr::from((node0_ip, 30053)),
                b"query",
                Duration::from_secs(2),
            )
            .unwrap();
        assert_eq!(got, b"query");
    }
    let remote_udp = udp.1.peers()[before_udp.1..].to_vec();
    assert!(
        !remote_udp.is_empty() && udp.0.peers().len() > before_udp.0,
        "UDP to both backends"
    );
    assert!(remote_udp.iter().all(|p| p.ip() == node0), "{remote_udp:?}");

    // externalTrafficPolicy: Local: only the local backend, which sees the client.
    let before = (tcp.0.peers().len(), tcp.1.peers().len());
    for _ in 0..12 {
        let got = ext
            .tcp_roundtrip(
                SocketAddr::from((node0_ip, 30082)),
                b"x",
                Duration::from_secs(2),
            )
            .unwrap();
        assert_eq!(got, b"x");
    }
    assert_eq!(
        tcp.1.peers().len(),
        before.1,
        "no traffic to the remote backend"
    );
    assert!(tcp.0.peers()[before.0..].iter().all(|p| p.ip() == ext_ip));
    let _ = agent.kill();
    let _ = agent.wait();
}

/// A pod's connected UDP socket to a service (what a DNS resolver holds) is translated once, at
/// connect(2), and never passes the load balancer again. When its backend leaves the service the
/// agent destroys the socket (its owner sees ECONNABORTED) instead of letting it send into the
/// void; a new socket gets the remaining backend.
#[test]
fn connected_udp_sockets_of_departed_backends_are_terminated() {
    use std::io::{BufRead as _, BufReader, Write as _};
    let mut env = Env::new();
    env.start_agent();
    env.wait_for_frontend("10.96.0.53:53/udp", 1);
    let script = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect(("10.96.0.53", 53))
s.send(b"first")
print("reply", s.recv(64).decode(), flush=True)
sys.stdin.readline()
deadline = time.time() + 10
err = 0
while time.time() < deadline and err == 0:
    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    time.sleep(0.05)
print("error", err, flush=True)
t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
t.settimeout(2)
t.connect(("10.96.0.53", 53))
t.send(b"second")
print("reply", t.recv(64).decode(), flush=True)
"#;
    let mut child = env
        .lab
        .host("client")
        .unwrap()
        .command_in_cgroup("python3", &env.cgroup)
        .unwrap()
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "reply first");
    let be1_udp = env._servers.2.peers().len();
    assert_eq!(be1_udp, 1, "the first query went to be1");

    // The service's only endpoint moves from be1 to be2.
    std::fs::write(
        env.manifests.join("dns.yaml"),
        DNS.replace("addresses: [10.244.0.3]", "addresses: [10.244.0.4]"),
    )
    .unwrap();
    let start = Instant::now();
    while env.services().get("10.96.0.53:53/udp") != Some(&vec!["10.244.0.4:5353".to_string()]) {
        env.assert_agent_alive();
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            env.services()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        format!("error {}", libc::ECONNABORTED),
        "the old socket was aborted"
    );
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "reply second");
    assert_eq!(
        env._servers.3.peers().len(),
        1,
        "the new socket reached be2"
    );
    assert!(child.wait().unwrap().success());
    env.stop_agent();
}

/// A steady stream of new connections through a ClusterIP, from a pod, while the backends scale
/// down and up and the agent restarts twice: none fails, and both backends serve.
#[test]
fn connections_keep_working_while_backends_scale_and_the_agent_restarts() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let env = Env::new();
    let agent = env.spawn_agent(&[]);
    env.wait_for(&ALL);
    let stop = AtomicBool::new(false);
    let ((ok, failed), agent) = std::thread::scope(|s| {
        let stream = s.spawn(|| {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let r = env.probe_from_client("tcp", "10.96.0.10:80");
                if r["reply"] == "weft-probe" {
                    ok += 1;
                } else {
                    failed.push(r);
                }
            }
            (ok, failed)
        });
        let web = |n| {
            [
                ("10.96.0.10:80/tcp", n),
                ("10.96.0.53:53/udp", 1),
                ("10.96.0.99:80/tcp", 0),
            ]
        };
        let pause = || std::thread::sleep(Duration::from_millis(400));
        pause();
        env.write_pods_ready(true, false);
        env.wait_for(&web(1));
        pause();
        env.write_pods_ready(true, true);
        env.wait_for(&web(2));
        pause();
        // Restart with a change made while the agent is down.
        let mut agent = agent;
        stop_child(agent);
        env.write_pods_ready(false, true);
        pause();
        agent = env.spawn_agent(&[]);
        env.wait_for(&web(1));
        pause();
        env.write_pods_ready(true, true);
        env.wait_for(&web(2));
        stop_child(agent);
        pause();
        agent = env.spawn_agent(&[]);
        env.wait_for(&web(2));
        pause();
        stop.store(true, Ordering::Relaxed);
        (stream.join().unwrap(), agent)
    });
    stop_child(agent);
    assert!(
        failed.is_empty(),
        "{} of {} connections failed: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert!(ok >= 20, "only {ok} connections in the stream");
    assert!(!env._servers.0.peers().is_empty() && !env._servers.1.peers().is_empty());
}

/// externalIPs: from a pod through the socket load balancer, and from an external host that
/// routes the address to the node through the per-packet path (client address kept).
#[test]
fn external_ips_from_a_pod_and_from_outside() {
    let mut env = Env::new();
    let node_ip = env.lab.node(0).underlay_addr().unwrap();
    env.write_with_node(
        "extip.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: default}\n\
         spec: {clusterIP: 10.96.0.40, externalIPs: [192.0.2.7], selector: {app: web}, \
         ports: [{name: http, port: 80, targetPort: http}]}\n",
    );
    env.start_agent();
    env.wait_for_frontend("192.0.2.7:80/tcp", 2);
    assert_eq!(
        env.probe_from_client("tcp", "192.0.2.7:80")["reply"],
        "weft-probe"
    );
    let ext = env.lab.host("ext").unwrap();
    // The external network routes the address to the node (what a router or BGP would do);
    // only inside the test's own namespace.
    ext.exec(
        "ip",
        ["route", "add", "192.0.2.7/32", "via", &node_ip.to_string()],
    )
    .unwrap();
    let ext_ip = std::net::IpAddr::V4(ext.underlay_addr().unwrap());
    let (a, b) = env.exchanges(ext, "192.0.2.7:80", 12);
    let hits: Vec<_> = a.into_iter().chain(b).collect();
    assert_eq!(hits.len(), 12);
    assert!(hits.iter().all(|p| p.ip() == ext_ip), "{hits:?}");
    env.stop_agent();
}

/// With socket-level load balancing off, a pod's service traffic is translated per packet on its
/// host-side interface: TCP and UDP through the ClusterIP work and replies come from the service
/// address; a pod reaching itself through the service (hairpin) works too, its backend side
/// seeing 169.254.42.1; and NetworkPolicy applies to the backend after translation.
#[test]
fn pod_traffic_is_translated_per_packet_when_socket_lb_is_off() {
    let mut env = Env::new();
    env.start_agent_with(&["--socket-lb=false", "--policy-iface-prefix", "tbv"]);
    env.wait_for(&ALL);
    let client = env.lab.host("client").unwrap();
    let start = Instant::now();
    // The programs are attached to the pods' interfaces right after the first sync.
    while client
        .tcp_roundtrip(
            "10.96.0.10:80".parse().unwrap(),
            b"x",
            Duration::from_millis(300),
        )
        .is_err()
    {
        env.assert_agent_alive();
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the service never answered"
        );
    }
    // Not in the cgroup: nothing but the per-packet path can translate this.
    let (a, b) = env.exchanges(client, "10.96.0.10:80", 20);
    assert!(!a.is_empty() && !b.is_empty(), "both backends");
    let hits: Vec<_> = a.into_iter().chain(b).collect();
    assert!(
        hits.iter().all(|p| p.ip().to_string() == "10.244.0.2"),
        "{hits:?}"
    );
    // No endpoints: refused at once (a RST from the service address), not a hang.
    let t0 = Instant::now();
    let err = client
        .tcp_roundtrip(
            "10.96.0.99:80".parse().unwrap(),
            b"x",
            Duration::from_secs(3),
        )
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_millis(1500) && err.to_string().contains("refused"),
        "{err} after {:?}",
        t0.elapsed()
    );
    // UDP, and the reply's source is the service (a connected socket would drop anything else).
    let r = env.probe(client, "udp", "10.96.0.53:53");
    assert_eq!(r["reply"], "weft-probe", "{r}");
    assert_eq!(r["peer"], "10.96.0.53:53", "{r}");

    // Hairpin: be1 reaches the service that selects it; some connections land on be1 itself.
    let be1 = env.lab.host("be1").unwrap();
    let (to_self, _) = env.exchanges(be1, "10.96.0.10:80", 20);
    assert!(!to_self.is_empty(), "no connection landed on be1 itself");
    assert!(
        to_self.iter().all(|p| p.ip().to_string() == "169.254.42.1"),
        "{to_self:?}"
    );

    // NetworkPolicy sees the backend: be2 admits nobody, so every connection lands on be1.
    env.write_with_node(
        "policy.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: be2-closed, namespace: default}\n\
         spec: {podSelector: {matchLabels: {app: web, only: be2}}}\n",
    );
    let pods = pod_yaml("be1", "10.244.0.3", true)
        + &pod_yaml("be2", "10.244.0.4", true)
            .replace("labels: {app: web}", "labels: {app: web, only: be2}");
    std::fs::write(env.manifests.join("pods.yaml"), pods).unwrap();
    let start = Instant::now();
    loop {
        let before = (env._servers.0.peers().len(), env._servers.1.peers().len());
        let results: Vec<bool> = (0..12)
            .map(|_| {
                client
                    .tcp_roundtrip(
                        "10.96.0.10:80".parse().unwrap(),
                        b"p",
                        Duration::from_millis(500),
                    )
                    .is_ok()
            })
            .collect();
        let to_be2 = env._servers.1.peers().len() - before.1;
        let ok = results.iter().filter(|r| **r).count();
        if to_be2 == 0 && ok > 0 && ok < 12 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "policy never applied behind the service: {ok}/12 ok, {to_be2} reached be2"
        );
    }
    env.stop_agent();
}
