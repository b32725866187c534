//! Privileged, end to end: `weft up` as a user runs it. The seed demo (`scripts/seed-demo.sh`,
//! the same sequence README's main command runs) goes through a one-node cluster with the real
//! kubectl on this machine and must report no failed request; a two-node cluster on etcd
//! (`--store etcd`) runs pods on both nodes that reach each other over the overlay, gives a
//! StatefulSet's pods volumes of their own that a recreated pod finds again, survives the loss
//! of its supervisor, and `weft down` then removes everything: namespaces, processes, cgroups,
//! mounts, pins.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use weft_tests::weft_binary;

/// A cluster name and directory of this test process; `weft down` on drop.
struct Cluster {
    name: String,
    dir: PathBuf,
}

impl Cluster {
    fn new(label: &str) -> Self {
        let name = format!("weft-up-test-{}-{label}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        Self { name, dir }
    }

    fn weft(&self, args: &[&str]) -> std::process::Output {
        Command::new(weft_binary("weft"))
            .args(args)
            .args(["--name", &self.name])
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .unwrap()
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new("kubectl")
            .env("KUBECONFIG", self.dir.join("kubeconfig"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What of the cluster is still on the machine.
    fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = Vec::new();
        let prefix = format!("{}-", self.name);
        for e in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&prefix) {
                left.push(format!("netns {n}"));
            }
        }
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            for e in std::fs::read_dir(h.path()).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    left.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
        for e in std::fs::read_dir("/sys/fs/bpf")
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                left.push(format!("pins {}", e.path().display()));
            }
        }
        let needle = self.dir.display().to_string();
        for m in std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&needle))
        {
            left.push(format!("mount {m}"));
        }
        for pid in std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| *p != std::process::id())
        {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle) {
                left.push(format!("process {pid}: {cmd}"));
            }
        }
        for e in std::fs::read_dir("/sys/block")
            .into_iter()
            .flatten()
            .flatten()
        {
            let backing =
                std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
            if backing.starts_with(&needle) {
                left.push(format!(
                    "loop device {}: {}",
                    e.file_name().to_string_lossy(),
                    backing.trim()
                ));
            }
        }
        if self.dir.exists() {
            left.push(format!("directory {}", self.dir.display()));
        }
        left
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.weft(&["down"]);
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_seed_demo_runs_over_weft_up_without_a_failed_request() {
    let cluster = Cluster::new("seed");
    let bin = weft_binary("weft");
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/seed-demo.sh"))
        .env("WEFT_BIN", bin.parent().unwrap())
        .env("WEFT_NAME", &cluster.name)
        .env("WEFT_DIR", &cluster.dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the seed demo failed:\n{stdout}\n{stderr}"
    );
    for want in [
        "hello from weft",
        "hello again",
        "answered, 0 failed",
        "successfully rolled out",
        "runs as uid 10001",
        "dropped by the policy",
        "written by notes-writer",
        "every step passed",
        "nothing of it is left",
    ] {
        assert!(
            stdout.contains(want),
            "the demo never said {want:?}:\n{stdout}"
        );
    }
    let left = cluster.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

const SPREAD: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: spread, namespace: default}
spec:
  replicas: 4
  selector: {matchLabels: {app: spread}}
  template:
    metadata: {labels: {app: spread}}
    spec:
      containers:
      - name: echo
        image: weft/echo:dev
        args: ["-listen=:5678", "-text=spread"]
        readinessProbe: {httpGet: {path: /, port: 5678}, periodSeconds: 1}
"#;

/// Two pods, each writing its name to its own volume the first time it starts.
const STATEFUL: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: default}
spec:
  serviceName: db
  replicas: 2
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
      - name: db
        image: weft/echo:dev
        command: [sh, -c, '[ -f /data/id ] || cat /etc/hostname > /data/id; exec /weft-echo -listen=:5678 -text=db']
        readinessProbe: {tcpSocket: {port: 5678}, periodSeconds: 1}
        volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 32Mi}}}
"#;

#[test]
fn two_nodes_on_etcd_run_pods_that_reach_each_other_and_weft_down_cleans_up_after_a_crash() {
    let cluster = Cluster::new("two");
    let out = cluster.weft(&["up", "--nodes", "2", "--port", "0", "--store", "etcd"]);
    assert!(
        out.status.success(),
        "weft up: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        std::fs::read_to_string(cluster.dir.join("up.log")).unwrap_or_default()
    );
    let nodes = cluster.kubectl(&["get", "nodes"]);
    assert_eq!(nodes.matches(" Ready ").count(), 2, "{nodes}");
    // kubectl reaches the API over TLS with the admin's certificate; each node's agent and
    // proxy with its own, which may change that node and not the other.
    let admin = std::fs::read_to_string(cluster.dir.join("kubeconfig")).unwrap();
    assert!(
        admin.contains("server: https://127.0.0.1:") && admin.contains("client-certificate-data"),
        "{admin}"
    );
    let as_node1 = |args: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec"])
            .arg(format!("{}-node1", cluster.name))
            .args(["kubectl", "--kubeconfig"])
            .arg(cluster.dir.join("nodes/node1/kubeconfig"))
            .args(args)
            .output()
            .unwrap()
    };
    let label = |node: &str| as_node1(&["label", "node", node, "weft.test/touched=yes"]);
    let own = label("node1");
    assert!(
        own.status.success(),
        "node1 labels itself: {}",
        String::from_utf8_lossy(&own.stderr)
    );
    let other = label("node2");
    assert!(
        !other.status.success()
            && String::from_utf8_lossy(&other.stderr)
                .contains(r#"User "system:node:node1" cannot patch resource "nodes""#),
        "node1 labels node2: {}",
        String::from_utf8_lossy(&other.stderr)
    );

    // The node endpoints (logs, exec, port-forward) serve TLS and take only the API server's
    // client certificate: node1's own is refused at node2's, and no certificate fails the
    // handshake.
    let pki = cluster.dir.join("pki");
    let curl_node2 = |cert: Option<&str>| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"])
            .arg(format!("{}-node1", cluster.name))
            .args(["curl", "-s", "-m", "5", "--cacert"])
            .arg(pki.join("ca.crt"));
        if let Some(c) = cert {
            cmd.arg("--cert")
                .arg(pki.join(format!("{c}.crt")))
                .arg("--key")
                .arg(pki.join(format!("{c}.key")));
        }
        let out = cmd
            .arg("https://10.200.0.12:10250/healthz")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(
        curl_node2(Some("apiserver-kubelet-client")),
        (true, "ok".to_owned())
    );
    let (_, refused) = curl_node2(Some("node1"));
    assert!(
        refused.starts_with("Forbidden (user=system:node:node1"),
        "{refused}"
    );
    assert!(!curl_node2(None).0, "no client certificate");

    let manifest = cluster.dir.join("spread.yaml");
    std::fs::write(&manifest, SPREAD).unwrap();
    cluster.kubectl(&["apply", "-f", &manifest.display().to_string()]);
    let running = || -> Vec<(String, String, String)> {
        let pods: serde_json::Value = serde_json::from_str(&cluster.kubectl(&[
            "get",
            "pods",
            "-l",
            "app=spread",
            "-o",
            "json",
        ]))
        .unwrap();
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
            .map(|p| {
                (
                    p["metadata"]["name"].as_str().unwrap().to_owned(),
                    p["spec"]["nodeName"].as_str().unwrap_or("").to_owned(),
                    p["status"]["podIP"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    wait_for("four running pods", Duration::from_secs(90), || {
        running().len() == 4
    });
    let pods = running();
    let on = |n: &str| {
        pods.iter()
            .filter(|p| p.1 == n)
            .cloned()
            .collect::<Vec<_>>()
    };
    let (one, two) = (on("node1"), on("node2"));
    assert!(
        !one.is_empty() && !two.is_empty(),
        "spread over both nodes: {pods:?}"
    );
    assert!(two[0].2.starts_with("10.244.2."), "{pods:?}");
    // A pod on node1 reaches a pod on node2 across the VXLAN overlay.
    let mut reply = String::new();
    wait_for(
        "node1's pod reaching node2's",
        Duration::from_secs(30),
        || {
            let out = Command::new("kubectl")
                .env("KUBECONFIG", cluster.dir.join("kubeconfig"))
                .args(["exec", &one[0].0, "--", "curl", "-s", "-m", "2"])
                .arg(format!("http://{}:5678/", two[0].2))
                .output()
                .unwrap();
            reply = String::from_utf8_lossy(&out.stdout).into_owned();
            reply.contains("spread")
        },
    );

    // A claim's volume is made on its first pod's node; the pod's successors go to that node
    // (the PersistentVolume's node affinity against the labels weft-csi's topology gave the
    // nodes), five times over, though spreading alone would pick the other node about half the
    // time.
    let claim = cluster.dir.join("claim.yaml");
    let pod_on_claim = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
             volumes: [{{name: d, persistentVolumeClaim: {{claimName: shared}}}}]\n  \
             containers: [{{name: c, image: weft/echo:dev, volumeMounts: [{{name: d, mountPath: /d}}]}}]\n"
        )
    };
    std::fs::write(
        &claim,
        format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: shared, namespace: default}}\n\
             spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 32Mi}}}}}}\n---\n{}",
            pod_on_claim("first")
        ),
    )
    .unwrap();
    cluster.kubectl(&["apply", "-f", &claim.display().to_string()]);
    let node_of = |name: &str| -> Option<String> {
        let p: serde_json::Value =
            serde_json::from_str(&cluster.kubectl(&["get", "pod", name, "-o", "json"])).ok()?;
        (p["status"]["phase"] == "Running")
            .then(|| p["spec"]["nodeName"].as_str().unwrap_or("").to_owned())
    };
    let mut home = None;
    wait_for(
        "the first claim pod running",
        Duration::from_secs(60),
        || {
            home = node_of("first");
            home.is_some()
        },
    );
    let home = home.unwrap();
    for i in 0..5 {
        let name = format!("next{i}");
        let previous = if i == 0 {
            "first".to_owned()
        } else {
            format!("next{}", i - 1)
        };
        cluster.kubectl(&["delete", "pod", &previous, "--wait=false"]);
        std::fs::write(&claim, pod_on_claim(&name)).unwrap();
        cluster.kubectl(&["apply", "-f", &claim.display().to_string()]);
        let mut at = None;
        wait_for("the successor running", Duration::from_secs(60), || {
            at = node_of(&name);
            at.is_some()
        });
        assert_eq!(at.as_ref(), Some(&home), "{name} left its volume's node");
    }

    // A StatefulSet's pods get claims of their own from its volumeClaimTemplates, provisioned by
    // weft-csi where they land; a deleted pod comes back under its name to its own data.
    let sts = cluster.dir.join("sts.yaml");
    std::fs::write(&sts, STATEFUL).unwrap();
    cluster.kubectl(&["apply", "-f", &sts.display().to_string()]);
    let status = cluster.kubectl(&["rollout", "status", "statefulset/db", "--timeout=120s"]);
    assert!(status.contains("roll out complete"), "{status}");
    let id = |pod: &str| {
        let out = Command::new("kubectl")
            .env("KUBECONFIG", cluster.dir.join("kubeconfig"))
            .args(["exec", pod, "--", "cat", "/data/id"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(
        (id("db-0"), id("db-1")),
        ("db-0".to_owned(), "db-1".to_owned())
    );
    let claims = cluster.kubectl(&["get", "pvc", "data-db-0", "data-db-1"]);
    assert_eq!(claims.matches(" Bound ").count(), 2, "{claims}");
    cluster.kubectl(&["delete", "pod", "db-0"]);
    let status = cluster.kubectl(&["rollout", "status", "statefulset/db", "--timeout=120s"]);
    assert!(status.contains("roll out complete"), "{status}");
    wait_for("db-0 back with its data", Duration::from_secs(60), || {
        id("db-0") == "db-0"
    });

    let status = String::from_utf8_lossy(&cluster.weft(&["status"]).stdout).into_owned();
    assert!(status.contains("store: etcd"), "{status}");
    for want in [
        ["etcd", "running"],
        ["api", "running"],
        ["overlay2", "running"],
        ["proxy1", "running"],
        ["node2", "true"],
    ] {
        assert!(
            status.lines().any(|l| l
                .split_whitespace()
                .step_by(if want[1] == "true" { 1 } else { 2 })
                .eq(want)),
            "weft status lacks {want:?}:\n{status}"
        );
    }

    // The supervisor dies (kill -9): the cluster's processes are orphaned but weft down still
    // finds and removes everything.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cluster.dir.join("cluster.json")).unwrap()).unwrap();
    let supervisor = state["supervisor"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for(
        "weft status to see the supervisor gone",
        Duration::from_secs(10),
        || String::from_utf8_lossy(&cluster.weft(&["status"]).stdout).contains("NOT RUNNING"),
    );
    // The pods' sandboxes as containerd recorded them: killed with it, each leaves libcni's
    // cached results, which weft down must remove too.
    let sandboxes: Vec<String> = (1..=2)
        .flat_map(|i| {
            std::fs::read_dir(cluster.dir.join(format!(
                "nodes/node{i}/containerd/root/io.containerd.grpc.v1.cri/sandboxes"
            )))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    assert!(!sandboxes.is_empty());
    let tasks: Vec<(usize, String)> = (1..=2)
        .flat_map(|i| {
            std::fs::read_dir(cluster.dir.join(format!(
                "nodes/node{i}/containerd/state/io.containerd.runtime.v2.task/k8s.io"
            )))
            .into_iter()
            .flatten()
            .flatten()
            .map(move |e| (i, e.file_name().to_string_lossy().into_owned()))
        })
        .collect();
    let down = cluster.weft(&["down"]);
    assert!(
        down.status.success(),
        "weft down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    let left = cluster.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
    let cached: Vec<String> = std::fs::read_dir("/var/lib/cni/results")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| sandboxes.iter().any(|id| n.contains(id.as_str())))
        .collect();
    assert!(cached.is_empty(), "libcni results left: {cached:?}");
    // ...and the shims' sockets, named by a hash of containerd's address, namespace and id.
    for (i, id) in &tasks {
        use sha2::Digest as _;
        let key = cluster.dir.join(format!(
            "nodes/node{i}/containerd/containerd.sock/k8s.io/{id}"
        ));
        let hex: String = sha2::Sha256::digest(key.as_os_str().as_encoded_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let socket = Path::new("/run/containerd/s").join(hex);
        assert!(!socket.exists(), "shim socket left: {}", socket.display());
    }
}
