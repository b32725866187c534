//! Privileged: NetworkPolicy enforced by the eBPF programs on pods' host-side interfaces, with real
//! traffic between test-bed pods. For each scenario the whole reachability matrix (every pod to
//! every pod, TCP 80 and 81, UDP 80) measured on the wire must equal what the reference semantics
//! (`weft_proxy::policy`) say, in the style of the upstream NetworkPolicy e2e truth tables.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use weft_proxy::policy::{self, Proto};
use weft_testbed::{Lab, TcpServer, UdpServer};

const BIN: &str = env!("CARGO_BIN_EXE_weft-proxy");

/// (namespace, pod, address).
const PODS: [(&str, &str, &str); 4] = [
    ("x", "a", "10.244.0.11"),
    ("x", "b", "10.244.0.12"),
    ("y", "a", "10.244.0.21"),
    ("y", "b", "10.244.0.22"),
];
const PROBES: [(Proto, u16); 3] = [(Proto::Tcp, 80), (Proto::Tcp, 81), (Proto::Udp, 80)];

struct Env {
    lab: Lab,
    pin: PathBuf,
    cgroup: PathBuf,
    manifests: PathBuf,
    agent: Child,
    _servers: Vec<(Option<TcpServer>, Option<UdpServer>)>,
}

fn label(ns: &str, pod: &str) -> String {
    format!("{ns}-{pod}")
}

/// The namespaces and pods; `extra` adds labels: `(ns, pod, "key: value")`, or `(ns, "*", ...)`
/// for the namespace itself.
fn pods_yaml(extra: &[(&str, &str, &str)]) -> String {
    let mut y = String::new();
    for ns in ["x", "y"] {
        let more: String = extra
            .iter()
            .filter(|(n, p, _)| *n == ns && *p == "*")
            .map(|(_, _, l)| format!(", {l}"))
            .collect();
        y.push_str(&format!(
            "kind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}{more}}}}}\n---\n"
        ));
    }
    for (ns, pod, ip) in PODS {
        let more: String = extra
            .iter()
            .filter(|(n, p, _)| *n == ns && *p == pod)
            .map(|(_, _, l)| format!(", {l}"))
            .collect();
        y.push_str(&format!(
            "---\nkind: Pod\nmetadata: {{namespace: {ns}, name: {pod}, labels: {{pod: {pod}{more}}}}}\n\
             spec: {{nodeName: node0, containers: [{{name: c, ports: [\
             {{name: serve-80, containerPort: 80}}, {{name: serve-81, containerPort: 81}}]}}]}}\n\
             status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
        ));
    }
    y
}

fn start_agent(lab: &Lab, pin: &Path, manifests: &Path, cgroup: &Path) -> Child {
    weft_tests::proxy_agent(lab.node(0), BIN.as_ref(), pin, manifests, cgroup, 50)
        .args([
            "--metrics-addr",
            "127.0.0.1:9402",
            "--policy-iface-prefix",
            "tbv",
        ])
        .spawn()
        .unwrap()
}

impl Env {
    fn new() -> Env {
        let mut lab = Lab::new().unwrap();
        let node = lab.add_node().unwrap();
        let mut servers = Vec::new();
        for (ns, pod, ip) in PODS {
            let host = lab
                .wire_pod(node, &label(ns, pod), ip.parse().unwrap())
                .unwrap();
            let any = |p| format!("0.0.0.0:{p}").parse().unwrap();
            servers.push((host.tcp_echo_server(any(80)).ok(), None));
            servers.push((
                host.tcp_echo_server(any(81)).ok(),
                host.udp_echo_server(any(80)).ok(),
            ));
        }
        let pin = lab.bpffs_dir("policy").unwrap();
        let cgroup = lab.cgroup("pods").unwrap();
        let manifests = lab.temp_dir("manifests").unwrap();
        std::fs::write(manifests.join("pods.yaml"), pods_yaml(&[])).unwrap();
        let agent = start_agent(&lab, &pin, &manifests, &cgroup);
        Env {
            lab,
            pin,
            cgroup,
            manifests,
            agent,
            _servers: servers,
        }
    }

    fn reachable(&self, from: (&str, &str), to: Ipv4Addr, proto: Proto, port: u16) -> bool {
        let host = self.lab.host(&label(from.0, from.1)).unwrap();
        let dst = SocketAddr::from((to, port));
        let t = Duration::from_millis(400);
        match proto {
            Proto::Tcp => host.tcp_roundtrip(dst, b"hi", t).is_ok_and(|r| r == b"hi"),
            _ => host.udp_roundtrip(dst, b"hi", t).is_ok_and(|r| r == b"hi"),
        }
    }

    /// Every pair and probe, measured, against the reference semantics of the manifests.
    fn mismatches(&self, policies: &str, extra_labels: &[(&str, &str, &str)]) -> Vec<String> {
        let (objects, _) = weft_proxy::manifests::parse_str(
            &format!("{}\n---\n{policies}", pods_yaml(extra_labels)),
            "test",
        );
        let (compiled, problems) = policy::compile(
            &objects.network_policies,
            &objects.namespaces,
            &objects.pods,
        );
        assert!(problems.is_empty(), "{problems:?}");
        let mut wrong = Vec::new();
        for (fns, fpod, fip) in PODS {
            for (tns, tpod, tip) in PODS {
                for (proto, port) in PROBES {
                    let (fip, tip): (Ipv4Addr, Ipv4Addr) =
                        (fip.parse().unwrap(), tip.parse().unwrap());
                    let want = compiled.allows(fip, tip, proto, port);
                    let got = self.reachable((fns, fpod), tip, proto, port);
                    if want != got {
                        wrong.push(format!(
                            "{fns}/{fpod} -> {tns}/{tpod} {proto:?}/{port}: expected {}, measured {}",
                            if want { "allow" } else { "deny" },
                            if got { "allow" } else { "deny" }
                        ));
                    }
                }
            }
        }
        wrong
    }

    /// Writes the scenario and waits until the measured matrix equals the expected one.
    fn scenario(&mut self, name: &str, policies: &str, extra_labels: &[(&str, &str, &str)]) {
        std::fs::write(self.manifests.join("pods.yaml"), pods_yaml(extra_labels)).unwrap();
        std::fs::write(self.manifests.join("policies.yaml"), policies).unwrap();
        let start = Instant::now();
        loop {
            assert!(self.agent.try_wait().unwrap().is_none(), "the agent exited");
            std::thread::sleep(Duration::from_millis(300));
            let wrong = self.mismatches(policies, extra_labels);
            if wrong.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "scenario {name}:\n{}",
                wrong.join("\n")
            );
        }
    }
}

impl Env {
    /// Waits until `weft-proxy policy status` counts `n` endpoints in the kernel's maps.
    fn wait_for_endpoints(&self, n: usize) {
        let start = Instant::now();
        loop {
            let out = self
                .lab
                .node(0)
                .command(BIN)
                .unwrap()
                .arg("--pin-dir")
                .arg(&self.pin)
                .args(["policy", "status"])
                .output()
                .unwrap();
            let counts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if counts["endpoints"].as_u64() == Some(n as u64) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the agent did not program {n} endpoints: {counts}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `weft-proxy flows observe --json` in the node: the verdicts waiting in the ring.
    fn observe(&self) -> Vec<serde_json::Value> {
        let out = self
            .lab
            .node(0)
            .command(BIN)
            .unwrap()
            .arg("--pin-dir")
            .arg(&self.pin)
            .args(["flows", "observe", "--json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.agent.kill();
        let _ = self.agent.wait();
    }
}

#[test]
fn reachability_matrices_match_the_reference_semantics() {
    let mut env = Env::new();
    env.scenario("no policy", "", &[]);
    // "No policy" holds before the agent has done anything; the connection below must be one
    // the agent saw, so wait until the kernel holds every pod's endpoint (the agent attaches
    // its programs to the interfaces before it writes them).
    env.wait_for_endpoints(PODS.len());
    // A connection established before a policy isolates its destination keeps working (upstream
    // leaves this to the implementation; weft keeps established connections, as Cilium does).
    let established = env
        .lab
        .host(&label("x", "b"))
        .unwrap()
        .run(|| std::net::TcpStream::connect("10.244.0.11:80"))
        .unwrap()
        .unwrap();
    env.scenario(
        "default deny ingress in x",
        "kind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec: {podSelector: {}, policyTypes: [Ingress]}",
        &[],
    );
    {
        use std::io::{Read, Write};
        let mut s = &established;
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"still").unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(
            &buf, b"still",
            "the established connection survived the new policy"
        );
    }
    drop(established);
    env.scenario(
        "x/a from namespace y on TCP 81 only",
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 81}]}]",
        &[],
    );
    // Every verdict is an event naming who decided.
    env.observe();
    let xa: Ipv4Addr = "10.244.0.11".parse().unwrap();
    assert!(env.reachable(("y", "a"), xa, Proto::Tcp, 81));
    assert!(!env.reachable(("x", "b"), xa, Proto::Tcp, 81));
    let flows = env.observe();
    let find = |src: &str, verdict: &str| {
        flows.iter().find(|f| {
            f["src"] == src
                && f["dst"] == "10.244.0.11"
                && f["dport"] == 81
                && f["verdict"] == verdict
        })
    };
    let allowed = find("10.244.0.21", "allowed").unwrap_or_else(|| panic!("{flows:#?}"));
    assert_eq!(allowed["reason"], "policy x/p");
    assert_eq!(allowed["direction"], "ingress");
    assert_eq!(allowed["pod"], "10.244.0.11");
    let denied = find("10.244.0.12", "denied").unwrap_or_else(|| panic!("{flows:#?}"));
    assert_eq!(denied["reason"], "default deny");
    assert_eq!(denied["proto"], "tcp");
    // ...and counted: verdicts by direction, drops by reason.
    let text = env
        .lab
        .node(0)
        .scrape("127.0.0.1:9402".parse().unwrap())
        .unwrap();
    let value = |series: &str| {
        weft_testbed::metric(&text, series)
            .unwrap_or_else(|| panic!("{series} missing in:\n{text}"))
    };
    for series in [
        "weft_proxy_policy_verdicts_total{direction=\"ingress\",verdict=\"allowed\"} ",
        "weft_proxy_policy_verdicts_total{direction=\"ingress\",verdict=\"denied\"} ",
        "weft_proxy_drops_total{reason=\"policy_denied\"} ",
    ] {
        assert!(value(series) >= 1.0, "{series}: {text}");
    }
    env.scenario(
        "y/b egress only to namespace x (named port serve-80)",
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: y}\nspec:
  podSelector: {matchLabels: {pod: b}}
  policyTypes: [Egress]
  egress: [{to: [{namespaceSelector: {matchLabels: {ns: x}}}], ports: [{port: serve-80}]}]",
        &[],
    );
    let block = "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:
  podSelector: {matchLabels: {pod: b}}
  ingress: [{from: [{ipBlock: {cidr: 10.244.0.16/28, except: [10.244.0.22/32]}}]}]";
    env.scenario("x/b from a CIDR with an except", block, &[]);
    let labelled = "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:
  podSelector: {}
  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}]}]";
    env.scenario("x from role=client anywhere", labelled, &[]);
    env.scenario(
        "... after y/b is labelled role=client",
        labelled,
        &[("y", "b", "role: client")],
    );
    let by_team = "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]";
    env.scenario("x/a from team=blue namespaces (none yet)", by_team, &[]);
    env.scenario(
        "... after namespace y is labelled team=blue",
        by_team,
        &[("y", "*", "team: blue")],
    );
    env.scenario("policies removed", "", &[]);

    // Isolation before the agent knows a pod: with the node's pod range known, a new pod is
    // isolated (pending) until the agent has processed it, then gets exactly its policy.
    std::fs::write(
        env.manifests.join("node.yaml"),
        "kind: Node\nmetadata: {name: node0}\nspec: {podCIDR: 10.244.0.0/24}\n",
    )
    .unwrap();
    env.scenario("pod range known", "", &[]);
    let new_ip: Ipv4Addr = "10.244.0.13".parse().unwrap();
    let host = env.lab.wire_pod(0, "x-n", new_ip).unwrap();
    let any = |p| format!("0.0.0.0:{p}").parse().unwrap();
    env._servers
        .push((host.tcp_echo_server(any(80)).ok(), None));
    std::thread::sleep(Duration::from_millis(500)); // the agent attaches to the new interface
    assert!(
        !env.reachable(("x", "a"), new_ip, Proto::Tcp, 80),
        "pending pod reachable"
    );
    assert!(
        !env.reachable(("x", "n"), xa, Proto::Tcp, 80),
        "pending pod sends"
    );
    let pending = env.observe();
    assert!(
        pending
            .iter()
            .any(|f| f["pod"] == "10.244.0.13"
                && f["reason"].as_str().unwrap().starts_with("pending")),
        "{pending:#?}"
    );
    // Now the agent learns the pod and a policy that isolates its ingress.
    std::fs::write(
        env.manifests.join("new.yaml"),
        "kind: Pod\nmetadata: {namespace: x, name: n, labels: {pod: n}}\n\
         spec: {nodeName: node0}\nstatus: {podIP: 10.244.0.13}\n---\n\
         kind: NetworkPolicy\nmetadata: {name: n-in, namespace: x}\n\
         spec: {podSelector: {matchLabels: {pod: n}}, policyTypes: [Ingress]}\n",
    )
    .unwrap();
    let start = Instant::now();
    while !env.reachable(("x", "n"), xa, Proto::Tcp, 80) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the new pod never got its policy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !env.reachable(("x", "a"), new_ip, Proto::Tcp, 80),
        "its ingress stays denied"
    );
}

/// `weft-proxy probe tcp ADDR` from a pod, inside the cgroup where socket load balancing runs:
/// the reply, or `None` if the connection failed.
fn probe(env: &Env, from: (&str, &str), addr: &str) -> Option<String> {
    let host = env.lab.host(&label(from.0, from.1)).unwrap();
    weft_tests::probe_tcp(host, BIN.as_ref(), &env.cgroup, addr, 1000)
}

#[test]
fn policy_applies_behind_services_and_survives_agent_restarts() {
    let mut env = Env::new();
    let only_y = "kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}]}]";
    env.scenario("x/a from y only", only_y, &[]);
    std::fs::write(
        env.manifests.join("svc.yaml"),
        "kind: Service\nmetadata: {name: web, namespace: x}\n\
         spec: {clusterIP: 10.96.0.10, selector: {pod: a}, ports: [{port: 8000, targetPort: 80}]}\n",
    )
    .unwrap();
    // Through the ClusterIP, the backend's policy decides (after translation), and replies
    // come back from the service address.
    let start = Instant::now();
    while probe(&env, ("y", "b"), "10.96.0.10:8000").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "service never answered y/b"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        probe(&env, ("y", "a"), "10.96.0.10:8000").as_deref(),
        Some("weft-probe")
    );
    assert_eq!(
        probe(&env, ("x", "b"), "10.96.0.10:8000"),
        None,
        "x/b is denied behind the service"
    );

    // The agent stops: pinned programs and maps keep enforcing.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(env.agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(env.agent.wait().unwrap().success());
    let xa: Ipv4Addr = "10.244.0.11".parse().unwrap();
    assert!(
        !env.reachable(("x", "b"), xa, Proto::Tcp, 80),
        "still denied without the agent"
    );
    assert!(
        env.reachable(("y", "b"), xa, Proto::Tcp, 80),
        "still allowed without the agent"
    );
    // And after it comes back, with nothing to change, the same.
    env.agent = start_agent(&env.lab, &env.pin, &env.manifests, &env.cgroup);
    env.scenario("after restart", only_y, &[]);
}
