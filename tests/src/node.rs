//! A test node for the end-to-end tests and benchmarks that run real pods: a network namespace
//! of the test bed running `weft server`, weft-csi, and `weft node` with the containerd it
//! starts, whose CNI plugin is weft-cni (or, for comparison, the reference bridge + host-local
//! plugins); the workspace's pause and echo images built and loaded. Dropping it stops
//! everything and removes what containerd and runc leave behind (processes, mounts, pod
//! cgroups).

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use weft_testbed::{Host, Lab};

use crate::weft_binary;

/// Which CNI plugin containerd runs for the node's pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cni {
    /// weft-cni (with the reference loopback plugin, as containerd wants one).
    Weft,
    /// The reference `bridge` plugin with `host-local` IPAM (containernetworking-plugins).
    Reference,
}

/// A node of its own with an API server (see the module doc).
pub struct Node {
    /// The node's scratch directory (containerd's root and state, CNI, IPAM, CSI).
    pub dir: PathBuf,
    /// The node's cgroup parent (pods' cgroups are made under it).
    pub cgroup: String,
    server: Option<Child>,
    /// The node agent, when running.
    pub agent: Option<Child>,
    csi: Option<Child>,
    lab: Lab,
}

/// Waits until `f` holds, panicking after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Stops a child with SIGTERM and waits for it.
pub fn stop(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = c.wait();
    }
}

/// Processes whose command line names `dir` (containerd, its shims, the pods' processes'
/// parents).
pub fn processes_under(dir: &Path) -> Vec<i32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// Mount points under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&needle))
        .map(str::to_owned)
        .collect()
}

/// The pod cgroups under the cgroup parent `cgroup`, in every hierarchy.
pub fn pod_cgroups(cgroup: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|h| {
            std::fs::read_dir(h.path().join(cgroup.trim_start_matches('/')))
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pod"))
        })
        .collect()
}

/// SIGKILLs every process in the cgroup directory `dir` and the cgroups below it.
fn kill_cgroup(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            kill_cgroup(&path);
        } else if e.file_name() == "cgroup.procs" {
            for pid in std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.trim().parse::<i32>().ok())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("dir", &self.dir)
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        stop(&mut self.agent);
        stop(&mut self.csi);
        stop(&mut self.server);
        for pid in processes_under(&self.dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // Containers whose shims died with the test (a test that failed half-way) live on,
        // reparented to init, holding their volumes' mounts: everything in the pods' cgroups.
        for c in pod_cgroups(&self.cgroup) {
            kill_cgroup(&c);
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut mounts = mounts_under(&self.dir);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        for c in pod_cgroups(&self.cgroup) {
            if let Ok(children) = std::fs::read_dir(&c) {
                for ch in children.flatten().filter(|e| e.path().is_dir()) {
                    let _ = std::fs::remove_dir(ch.path());
                }
            }
            let _ = std::fs::remove_dir(&c);
        }
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir(h.path().join(self.cgroup.trim_start_matches('/')));
        }
    }
}

impl Node {
    /// The node's namespace.
    pub fn host(&self) -> &Host {
        self.lab.node(0)
    }

    /// The admin's kubeconfig (for clients in the node's namespace).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// containerd's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("node/containerd/containerd.sock")
    }

    /// Starts a node whose pods are networked by `cni`.
    pub fn start(cni: Cni) -> Node {
        let mut lab = Lab::new().unwrap();
        lab.add_node().unwrap();
        lab.add_external("ext").unwrap();
        let dir = lab.temp_dir("node").unwrap();
        let cgroup = format!("/{}", dir.file_name().unwrap().to_string_lossy());
        // CNI as containerd's CRI plugin runs it: weft-cni (CNI 1.0.0 results: containerd 1.6's
        // libcni reads no newer) or the reference bridge + host-local, and the reference
        // loopback plugin.
        let bin = dir.join("cni/bin");
        let conf = dir.join("cni/net.d");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::copy(weft_binary("weft-cni"), bin.join("weft-cni")).unwrap();
        for plugin in ["loopback", "bridge", "host-local"] {
            std::fs::copy(format!("/usr/lib/cni/{plugin}"), bin.join(plugin))
                .expect("the reference CNI plugins (scripts/setup.sh)");
        }
        let ipam = dir.join("ipam");
        let conflist = match cni {
            Cni::Weft => format!(
                r#"{{"cniVersion": "1.0.0", "name": "weft", "plugins": [{{"type": "weft-cni", "bridge": "weft0",
                    "ipam": {{"subnet": "10.244.1.0/24", "dataDir": "{}"}}}}]}}"#,
                ipam.display()
            ),
            Cni::Reference => format!(
                r#"{{"cniVersion": "1.0.0", "name": "reference", "plugins": [{{"type": "bridge", "bridge": "cni0",
                    "isGateway": true, "ipam": {{"type": "host-local", "dataDir": "{}",
                    "ranges": [[{{"subnet": "10.244.1.0/24"}}]], "routes": [{{"dst": "0.0.0.0/0"}}]}}}}]}}"#,
                ipam.display()
            ),
        };
        std::fs::write(conf.join("10-pods.conflist"), conflist).unwrap();
        let server = lab
            .node(0)
            .command(weft_binary("weft"))
            .unwrap()
            .args(["server", "--listen", "127.0.0.1:0", "--kubeconfig"])
            .arg(dir.join("kubeconfig"))
            .spawn()
            .unwrap();
        // weft-csi, the node's CSI driver (controller and node roles, the local backend).
        let csi = Command::new(weft_binary("weft-csi"))
            .arg("--endpoint")
            .arg(format!("unix://{}", dir.join("csi/csi.sock").display()))
            .args(["--node-id", "node0", "--capacity", "1Gi", "--state-dir"])
            .arg(dir.join("csi"))
            .spawn()
            .unwrap();
        let mut node = Node {
            dir,
            cgroup,
            server: Some(server),
            agent: None,
            csi: Some(csi),
            lab,
        };
        wait_for("the API server", Duration::from_secs(10), || {
            node.kubeconfig().exists()
        });
        node.start_agent();
        wait_for("containerd's socket", Duration::from_secs(30), || {
            node.socket().exists()
        });
        for (bin, tag) in [
            ("weft-pause", "weft/pause:dev"),
            ("weft-echo", "weft/echo:dev"),
        ] {
            let archive = node.dir.join(format!("{bin}.tar"));
            let mut build = Command::new(weft_binary("weft"));
            build
                .args(["image", "build", "--from"])
                .arg(weft_binary(bin));
            if bin == "weft-echo" {
                // A shell and tar inside, for kubectl exec and kubectl cp.
                for tool in ["sh", "cat", "tar", "id"] {
                    build.arg("--add").arg(format!("/usr/bin/{tool}"));
                }
            }
            let ok = build
                .args(["--tag", tag, "-o"])
                .arg(&archive)
                .status()
                .unwrap()
                .success();
            assert!(ok, "weft image build {tag}");
            let out = Command::new(weft_binary("weft"))
                .args(["image", "load"])
                .arg(&archive)
                .arg("--address")
                .arg(node.socket())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "weft image load: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        wait_for("node0 Ready", Duration::from_secs(20), || {
            node.kubectl(&["get", "node", "node0"], None)
                .contains(" Ready ")
        });
        node
    }

    /// Starts `weft node`.
    pub fn start_agent(&mut self) {
        let agent = self
            .host()
            .command(weft_binary("weft"))
            .unwrap()
            .args([
                "node",
                "--node-name",
                "node0",
                "--address",
                &self.lab.node(0).underlay_addr().unwrap().to_string(),
                "--pod-cidr",
                "10.244.1.0/24",
                "--kubeconfig",
            ])
            .arg(self.kubeconfig())
            .arg("--root-dir")
            .arg(self.dir.join("node"))
            .arg("--cni-bin-dir")
            .arg(self.dir.join("cni/bin"))
            .arg("--cni-conf-dir")
            .arg(self.dir.join("cni/net.d"))
            .args(["--cgroup-parent", &self.cgroup])
            .arg("--csi-socket")
            .arg(self.dir.join("csi/csi.sock"))
            // Small, so that the test sees logs rotate.
            .args([
                "--container-log-max-size",
                "64Ki",
                "--container-log-max-files",
                "2",
            ])
            .spawn()
            .unwrap();
        self.agent = Some(agent);
    }

    /// kubectl in the node's namespace; its stdout, asserting success.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        crate::kubectl_in(self.host(), &self.kubeconfig(), args, stdin)
    }

    /// kubectl in the node's namespace, expected to fail; its stderr.
    pub fn try_kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = crate::kubectl_output(self.host(), &self.kubeconfig(), args, stdin);
        assert!(!out.status.success(), "kubectl {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Waits until no pod labelled `app=<app>` is left.
    pub fn wait_gone(&self, app: &str) {
        wait_for(
            &format!("the {app} pod gone"),
            Duration::from_secs(60),
            || {
                self.json(&["get", "pods", "-l", &format!("app={app}")])["items"]
                    .as_array()
                    .is_some_and(Vec::is_empty)
            },
        );
    }

    /// `kubectl ... -o json`.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all, None)).unwrap()
    }

    /// The Running pods with an IP among those labelled `label`.
    pub fn running(&self, label: &str) -> Vec<serde_json::Value> {
        self.json(&["get", "pods", "-l", label])["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| {
                p["status"]["phase"] == "Running"
                    && p["status"]["podIP"]
                        .as_str()
                        .is_some_and(|ip| !ip.is_empty())
            })
            .cloned()
            .collect()
    }

    /// An HTTP GET from the node's namespace.
    pub fn get(&self, addr: &str) -> Option<String> {
        get_from(self.host(), addr)
    }

    /// The names of the node namespace's interfaces.
    pub fn links(&self) -> Vec<String> {
        let out = self.host().output("ip", ["-br", "link"]).unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().next().unwrap_or("").to_owned())
            .collect()
    }
}

/// An HTTP GET from `host`; the answer, if it is a 200.
pub fn get_from(host: &Host, addr: &str) -> Option<String> {
    let addr = addr.to_owned();
    host.run(move || {
        let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok::<_, std::io::Error>(body)
    })
    .ok()
    .and_then(Result::ok)
    .filter(|b| b.starts_with("HTTP/1.1 200"))
}
