//! Privileged, cross-component: weft-proxy with the Kubernetes API as its source of desired
//! state. `weft server` (weft's API server) runs in the test node's network namespace, kubectl
//! writes the objects, and weft-proxy's kube-rs watchers program services and NetworkPolicy from
//! them; traffic between test-bed pods shows the result. Also: an agent that restarts while the
//! API is down keeps the datapath it has instead of programming an empty view.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use weft_testbed::Lab;
use weft_tests::{output_with_stdin, weft_binary};

const API: &str = "127.0.0.1:16443";

struct Env {
    lab: Lab,
    dir: PathBuf,
    pin: PathBuf,
    cgroup: PathBuf,
    server: Option<Child>,
    agent: Option<Child>,
    _servers: Vec<weft_testbed::TcpServer>,
}

impl Env {
    fn new() -> Env {
        let mut lab = Lab::new().unwrap();
        let node = lab.add_node().unwrap();
        let mut servers = Vec::new();
        for (label, ip) in [
            ("x-a", "10.244.0.11"),
            ("x-b", "10.244.0.12"),
            ("y-a", "10.244.0.21"),
        ] {
            let host = lab.wire_pod(node, label, ip.parse().unwrap()).unwrap();
            servers.push(host.tcp_echo_server("0.0.0.0:80".parse().unwrap()).unwrap());
        }
        let dir = lab.temp_dir("api").unwrap();
        let pin = lab.bpffs_dir("kube").unwrap();
        let cgroup = lab.cgroup("pods").unwrap();
        let mut env = Env {
            lab,
            dir,
            pin,
            cgroup,
            server: None,
            agent: None,
            _servers: servers,
        };
        env.start_server();
        env
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Starts the server; a restarted one keeps its certificate (in `pki/` beside its store)
    /// and the admin's token (in the kubeconfig), so running clients go on.
    fn start_server(&mut self) {
        let child = self
            .lab
            .node(0)
            .command(weft_binary("weft"))
            .unwrap()
            .args(["server", "--listen", API, "--data"])
            .arg(self.dir.join("store.db"))
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .spawn()
            .unwrap();
        self.server = Some(child);
        wait_for("the API server", || {
            self.kubeconfig().exists()
                && self
                    .lab
                    .node(0)
                    .command("kubectl")
                    .unwrap()
                    .env("KUBECONFIG", self.kubeconfig())
                    .args(["get", "--raw", "/readyz"])
                    .output()
                    .is_ok_and(|o| o.status.success())
        });
    }

    fn stop(child: &mut Option<Child>) {
        if let Some(mut c) = child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    fn start_agent(&mut self) {
        let child = weft_tests::proxy_agent_from(
            self.lab.node(0),
            &weft_binary("weft-proxy"),
            &self.pin,
            ("--kubeconfig", &self.kubeconfig()),
            &self.cgroup,
            100,
        )
        .args(["--metrics-addr", "off", "--policy-iface-prefix", "tbv"])
        .spawn()
        .unwrap();
        self.agent = Some(child);
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        weft_tests::kubectl_in(self.lab.node(0), &self.kubeconfig(), args, stdin)
    }

    /// A TCP exchange from a pod, inside the cgroup where socket load balancing runs.
    fn probe(&self, from: &str, addr: &str) -> Option<String> {
        let host = self.lab.host(from).unwrap();
        weft_tests::probe_tcp(host, &weft_binary("weft-proxy"), &self.cgroup, addr, 500)
    }

    fn agent_alive(&mut self) {
        let agent = self.agent.as_mut().expect("agent running");
        assert!(agent.try_wait().unwrap().is_none(), "the agent exited");
    }

    fn eventually(&mut self, what: &str, want: impl Fn(&Env) -> bool) {
        let start = Instant::now();
        loop {
            self.agent_alive();
            if want(self) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(15), "never: {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        Env::stop(&mut self.agent);
        Env::stop(&mut self.server);
    }
}

fn wait_for(what: &str, ok: impl Fn() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < Duration::from_secs(10), "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const OBJECTS: &str = "
apiVersion: v1
kind: Node
metadata: {name: node0}
spec: {podCIDR: 10.244.0.0/24}
---
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Namespace
metadata: {name: 'y', labels: {team: blue}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: web}}
spec: {nodeName: node0, containers: [{name: c, image: none, ports: [{name: http, containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: client}}
spec: {nodeName: node0, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: 'y', labels: {app: client}}
spec: {nodeName: node0, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec: {selector: {app: web}, ports: [{port: 8000, targetPort: http}]}
";

const POLICY: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-blue, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]
";

fn set_pod_status(env: &Env, ns: &str, name: &str, ip: &str) {
    let status = format!(
        r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}],"conditions":[{{"type":"Ready","status":"True"}}]}}}}"#
    );
    env.kubectl(
        &[
            "patch",
            "pod",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ],
        None,
    );
}

#[test]
fn services_and_policy_follow_the_kubernetes_api() {
    let mut env = Env::new();
    env.kubectl(&["apply", "-f", "-"], Some(OBJECTS));
    for (ns, name, ip) in [
        ("x", "a", "10.244.0.11"),
        ("x", "b", "10.244.0.12"),
        ("y", "a", "10.244.0.21"),
    ] {
        set_pod_status(&env, ns, name, ip);
    }
    let cluster_ip = env.kubectl(
        &[
            "get",
            "svc",
            "web",
            "-n",
            "x",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ],
        None,
    );
    assert!(
        cluster_ip.starts_with("10.96."),
        "allocated by the server: {cluster_ip:?}"
    );
    let vip = format!("{cluster_ip}:8000");
    env.start_agent();

    // The service, with endpoints derived from the ready pod its selector picks.
    env.eventually("x/b reaches the service", |e| {
        e.probe("x-b", &vip).as_deref() == Some("weft-probe")
    });

    // A NetworkPolicy written through the API isolates the backend: only namespace y (team
    // blue) gets in, through the service too.
    env.kubectl(&["apply", "-f", "-"], Some(POLICY));
    env.eventually("x/b is denied", |e| e.probe("x-b", &vip).is_none());
    assert_eq!(env.probe("y-a", &vip).as_deref(), Some("weft-probe"));

    // A namespace label change through the API moves x into the allowed set.
    env.kubectl(&["label", "namespace", "x", "team=blue"], None);
    env.eventually("x/b allowed after labelling x", |e| {
        e.probe("x-b", &vip).is_some()
    });
    env.kubectl(&["label", "namespace", "x", "team-"], None);
    env.eventually("x/b denied again", |e| e.probe("x-b", &vip).is_none());

    // The agent restarts while the API server is down: until it has listed everything again
    // it keeps the datapath as it was (service and isolation both still in force).
    Env::stop(&mut env.agent);
    Env::stop(&mut env.server);
    env.start_agent();
    std::thread::sleep(Duration::from_secs(1));
    env.agent_alive();
    assert_eq!(
        env.probe("y-a", &vip).as_deref(),
        Some("weft-probe"),
        "service kept"
    );
    assert_eq!(env.probe("x-b", &vip), None, "isolation kept");

    // The server comes back with its store; changes made now reach the datapath.
    env.start_server();
    env.kubectl(
        &["delete", "networkpolicy", "web-from-blue", "-n", "x"],
        None,
    );
    env.eventually("x/b allowed once the policy is deleted", |e| {
        e.probe("x-b", &vip).is_some()
    });
    env.kubectl(&["delete", "service", "web", "-n", "x"], None);
    env.eventually("the service is gone", |e| e.probe("y-a", &vip).is_none());
}

#[test]
fn kubectl_errors_are_kubernetes_statuses() {
    let env = Env::new();
    let apply = |yaml: &str| {
        let mut cmd: Command = env.lab.node(0).command("kubectl").unwrap();
        cmd.env("KUBECONFIG", env.kubeconfig())
            .args(["apply", "-f", "-"]);
        let out = output_with_stdin(cmd, yaml.as_bytes());
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s, namespace: nowhere}\nspec: {ports: [{port: 80}]}\n",
    );
    assert!(
        !ok && (err.contains("NotFound") || err.contains("not found")),
        "{err}"
    );
    let (ok, err) =
        apply("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {portz: 80}\n");
    assert!(!ok && err.contains("unknown field \"spec.portz\""), "{err}");
}
