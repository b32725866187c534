//! `weft up`, `weft down`, `weft status`: a whole cluster on this machine in one command.
//!
//! `weft up` starts a supervisor in the background (`--foreground` keeps it attached) and prints
//! its progress until the cluster is ready. The supervisor builds the cluster's network
//! ([`topology`]): a private underlay with the API server's address, one namespace per node and
//! an external host; then runs, each in its place and restarted with back-off when it exits:
//! `weft server` in the underlay namespace (also answering on `127.0.0.1:<port>` in the machine's
//! namespace, through a socket it inherits, for kubectl), and on every node `weft node` (which
//! starts that node's containerd, with weft-cni as its CNI plugin), `weft-csi` (the node's
//! volumes, behind the default StorageClass `weft-local`), `weft-proxy` (Services and
//! NetworkPolicy, its socket load balancer attached to the node's own cgroup) and, with more
//! than one node, `weft-overlay`. The pause and http-echo-compatible images are built from the
//! workspace's binaries and loaded into every node's containerd. It writes a kubeconfig and
//! waits until every Node is Ready.
//!
//! weft-proxy runs as a supervised process rather than a DaemonSet pod: it must be running
//! before the first pod starts (weft-cni attaches its policy programs at ADD) and must not
//! depend on the pods it serves; the same goes for the overlay.
//!
//! `weft down` stops the supervisor (which stops everything) and then removes whatever is left
//! ([`cleanup`]), so it also cleans up after a supervisor that was killed. `weft status` shows
//! the processes and the nodes.

pub mod cleanup;
pub mod pki;
pub mod topology;

use std::{
    fs::File,
    io::Write as _,
    net::{SocketAddr, TcpListener},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Errors of `weft up`, `down` and `status`.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// Building the network failed.
    #[error("building the cluster's network: {0}")]
    Network(#[from] weft_netns::Error),
    /// Mounting bpffs failed.
    #[error("mounting bpffs: {0}")]
    Bpf(#[from] weft_bpf::Error),
    /// Something did not come up.
    #[error("{0}")]
    Failed(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpError {
    let what = what.into();
    move |source| UpError::Io { what, source }
}

/// What `weft up` is asked for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Options {
    /// The cluster's name: the prefix of its namespaces and cgroups.
    pub name: String,
    /// Where everything of the cluster is kept.
    pub dir: PathBuf,
    /// How many nodes.
    pub nodes: usize,
    /// The API server's port on the machine's loopback (0: any free port).
    pub port: u16,
    /// Where weft's binaries are (weft, weft-cni, weft-proxy, weft-overlay, weft-pause,
    /// weft-echo).
    pub bin_dir: PathBuf,
    /// The API server's store.
    #[serde(default)]
    pub store: StoreKind,
}

/// Which store the cluster's API server keeps its objects in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The embedded SQLite database `<dir>/store.db`.
    #[default]
    Sqlite,
    /// An etcd member the supervisor runs in the underlay namespace (data in `<dir>/etcd`),
    /// on that namespace's loopback.
    Etcd,
}

/// The client URL of a cluster's etcd, on the underlay namespace's loopback.
const ETCD_CLIENT: &str = "http://127.0.0.1:2379";

/// What a running cluster records about itself (`<dir>/cluster.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    /// The options it was started with.
    pub options: Options,
    /// The API server's address on the machine's loopback.
    pub api: SocketAddr,
    /// The supervisor's pid.
    pub supervisor: u32,
    /// The supervised processes: name → pid.
    pub processes: Vec<(String, u32)>,
}

impl Options {
    fn state_file(&self) -> PathBuf {
        self.dir.join("cluster.json")
    }

    /// The kubeconfig for kubectl on this machine.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Node `i`'s kubeconfig (its own client certificate).
    fn node_kubeconfig(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("kubeconfig")
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join("nodes").join(format!("node{i}"))
    }

    fn csi_socket(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("csi/csi.sock")
    }

    fn cgroup(&self, i: usize) -> String {
        format!("/{}-node{i}", self.name)
    }

    fn pin_dir(&self, i: usize) -> PathBuf {
        Path::new(weft_bpf::bpffs::BPFFS_MOUNT).join(format!("{}-node{i}", self.name))
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// Reads the state of the cluster kept in `dir`.
pub fn state(dir: &Path) -> Option<State> {
    serde_json::from_slice(&std::fs::read(dir.join("cluster.json")).ok()?).ok()
}

fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// `weft up`: starts the supervisor in the background and follows its progress until the
/// cluster is ready (or failed). Returns the kubeconfig's path.
pub fn up(opts: &Options) -> Result<PathBuf, UpError> {
    if let Some(s) = state(&opts.dir)
        && alive(s.supervisor)
    {
        return Err(UpError::Failed(format!(
            "cluster {:?} is already up (supervisor pid {}); see weft status, or weft down first",
            s.options.name, s.supervisor
        )));
    }
    std::fs::create_dir_all(&opts.dir).map_err(io(format!("creating {}", opts.dir.display())))?;
    let progress = opts.dir.join("progress");
    let _ = std::fs::remove_file(&progress);
    let log = File::create(opts.dir.join("up.log")).map_err(io("creating up.log"))?;
    let out = File::create(&progress).map_err(io("creating the progress file"))?;
    let exe = std::env::current_exe().map_err(io("finding weft's own binary"))?;
    let mut child = Command::new(exe)
        .arg("up")
        .arg("--foreground")
        .args(["--name", &opts.name, "--nodes", &opts.nodes.to_string()])
        .args(["--port", &opts.port.to_string()])
        .arg("--dir")
        .arg(&opts.dir)
        .arg("--bin-dir")
        .arg(&opts.bin_dir)
        .args([
            "--store",
            match opts.store {
                StoreKind::Sqlite => "sqlite",
                StoreKind::Etcd => "etcd",
            },
        ])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(io("starting the supervisor"))?;
    let mut printed = 0;
    loop {
        let exited = child.try_wait().ok().flatten();
        let text = std::fs::read_to_string(&progress).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        for line in complete.lines().skip(printed) {
            println!("{line}");
            printed += 1;
            if line.starts_with("ready") {
                return Ok(opts.kubeconfig());
            }
        }
        if let Some(status) = exited {
            return Err(UpError::Failed(format!(
                "the supervisor stopped ({status}); its log is {}",
                opts.dir.join("up.log").display()
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One supervised process.
struct Proc {
    name: String,
    make: Box<dyn Fn() -> Result<Command, UpError>>,
    child: Option<Child>,
    restarts: u32,
    next_start: Instant,
}

impl Proc {
    fn start(&mut self, logs: &Path) -> Result<(), UpError> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(logs.join(format!("{}.log", self.name)))
            .map_err(io(format!("opening {}'s log", self.name)))?;
        let err = log.try_clone().map_err(io("opening a log"))?;
        let child = (self.make)()?
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(io(format!("starting {}", self.name)))?;
        tracing::info!(process = self.name, pid = child.id(), "started");
        self.child = Some(child);
        Ok(())
    }
}

fn say(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

/// A command whose process starts in the namespace at `ns` and, when `cgroup` is given, in
/// that cgroup (its `cgroup.procs`, opened here).
fn command_in(program: &Path, ns: &Path, cgroup: Option<&Path>) -> Result<Command, UpError> {
    let mut cmd = weft_netns::NetNs::open(ns)?.command(program)?;
    if let Some(cg) = cgroup {
        weft_netns::join_cgroup_at_exec(&mut cmd, cg)
            .map_err(io(format!("opening {}", cg.display())))?;
    }
    Ok(cmd)
}

/// The cluster's default StorageClass: weft-csi's local volumes, made on the node of the first
/// pod that uses a claim.
fn storage_class() -> Value {
    serde_json::json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "weft-local", "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": "csi.weft.io", "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer", "allowVolumeExpansion": true,
        "parameters": {"csi.storage.k8s.io/fstype": "ext4"},
    })
}

/// The Nodes and whether each is Ready.
pub fn nodes(api: &pki::Client) -> Option<Vec<(String, bool)>> {
    let list: Value = serde_json::from_str(&api.get("/api/v1/nodes")?).ok()?;
    Some(
        list["items"]
            .as_array()?
            .iter()
            .map(|n| {
                let ready = n["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                });
                (
                    n["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                    ready,
                )
            })
            .collect(),
    )
}

fn wait(
    what: &str,
    timeout: Duration,
    stop: &AtomicBool,
    mut f: impl FnMut() -> bool,
) -> Result<(), UpError> {
    let deadline = Instant::now() + timeout;
    while !f() {
        if stop.load(Ordering::Relaxed) {
            return Err(UpError::Failed("stopped".into()));
        }
        if Instant::now() > deadline {
            return Err(UpError::Failed(format!("timed out waiting for {what}")));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// The CNI configuration containerd gives weft-cni on node `i` (CNI 1.0.0 results: containerd
/// 1.6's libcni reads no newer).
fn conflist(opts: &Options, i: usize) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0", "name": "weft",
        "plugins": [{
            "type": "weft-cni", "bridge": "weft0", "hairpinMode": true,
            "ipMasq": true, "clusterCIDR": topology::CLUSTER_CIDR,
            "policyPinDir": opts.pin_dir(i),
            "ipam": {"subnet": topology::pod_cidr(i), "dataDir": opts.node_dir(i).join("ipam")},
        }],
    })
    .to_string()
}

/// Prepares the files every node shares: the CNI plugins, the certificates and kubeconfigs,
/// the node list for the overlay, and the images.
fn prepare(opts: &Options, api: SocketAddr) -> Result<Vec<PathBuf>, UpError> {
    let cni_bin = opts.dir.join("cni/bin");
    std::fs::create_dir_all(&cni_bin).map_err(io("creating the CNI directory"))?;
    std::fs::copy(opts.bin("weft-cni"), cni_bin.join("weft-cni"))
        .map_err(io(format!("copying {}", opts.bin("weft-cni").display())))?;
    let loopback = ["/usr/lib/cni/loopback", "/opt/cni/bin/loopback"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| UpError::Failed("the reference CNI loopback plugin is missing (scripts/setup.sh installs containernetworking-plugins)".into()))?;
    std::fs::copy(loopback, cni_bin.join("loopback")).map_err(io("copying loopback"))?;
    pki::create(opts, api)?;
    let list: Vec<Value> = (1..=opts.nodes)
        .map(|i| {
            serde_json::json!({"name": format!("node{i}"), "address": topology::node_addr(i).to_string(),
                               "podCIDR": topology::pod_cidr(i)})
        })
        .collect();
    std::fs::write(opts.dir.join("nodes.json"), Value::from(list).to_string())
        .map_err(io("writing the node list"))?;
    for i in 1..=opts.nodes {
        let cni = opts.node_dir(i).join("cni");
        std::fs::create_dir_all(&cni).map_err(io("creating a node's directory"))?;
        std::fs::write(cni.join("10-weft.conflist"), conflist(opts, i))
            .map_err(io("writing the CNI configuration"))?;
        std::fs::create_dir_all(opts.pin_dir(i)).map_err(io("creating a pin directory"))?;
        for h in [cleanup::unified()].into_iter().flatten() {
            std::fs::create_dir_all(h.join(opts.cgroup(i).trim_start_matches('/')))
                .map_err(io("creating a node's cgroup"))?;
        }
    }
    let images = opts.dir.join("images");
    std::fs::create_dir_all(&images).map_err(io("creating the image directory"))?;
    let tools: Vec<PathBuf> = ["sh", "cat", "ls", "tar", "id", "curl"]
        .iter()
        .map(|t| Path::new("/usr/bin").join(t))
        .filter(|p| p.exists())
        .collect();
    let mut archives = Vec::new();
    for (bin, tag, tools) in [
        ("weft-pause", "weft/pause:dev", &[][..]),
        ("weft-echo", "weft/echo:dev", &tools[..]),
    ] {
        let out = images.join(format!("{bin}.tar"));
        weft_node::image::build(&opts.bin(bin), tools, tag, &[], &out)
            .map_err(|e| UpError::Failed(format!("building {tag}: {e}")))?;
        archives.push(out);
    }
    Ok(archives)
}

/// The supervised processes of the cluster.
fn processes(opts: &Options, listener_fd: i32) -> Vec<Proc> {
    let mut procs = Vec::new();
    let mut add = |name: String, make: Box<dyn Fn() -> Result<Command, UpError>>| {
        procs.push(Proc {
            name,
            make,
            child: None,
            restarts: 0,
            next_start: Instant::now(),
        });
    };
    if opts.store == StoreKind::Etcd {
        let o = opts.clone();
        add(
            "etcd".into(),
            Box::new(move || {
                let mut cmd = command_in(
                    Path::new("etcd"),
                    &topology::netns_path(&o.name, "underlay"),
                    None,
                )?;
                let peer = "http://127.0.0.1:2380";
                cmd.arg("--name=weft")
                    .arg(format!("--data-dir={}", o.dir.join("etcd").display()))
                    .arg(format!("--listen-client-urls={ETCD_CLIENT}"))
                    .arg(format!("--advertise-client-urls={ETCD_CLIENT}"))
                    .arg(format!("--listen-peer-urls={peer}"))
                    .arg(format!("--initial-advertise-peer-urls={peer}"))
                    .arg(format!("--initial-cluster=weft={peer}"));
                Ok(cmd)
            }),
        );
    }
    let o = opts.clone();
    add(
        "api".into(),
        Box::new(move || {
            let mut cmd = command_in(
                &o.bin("weft"),
                &topology::netns_path(&o.name, "underlay"),
                None,
            )?;
            cmd.arg("server")
                .args(["--listen", &format!("{}:6443", topology::API_ADDR)])
                .args(["--listen-fd", "3"])
                .args(pki::server_args(&o));
            match o.store {
                StoreKind::Sqlite => cmd.arg("--data").arg(o.dir.join("store.db")),
                StoreKind::Etcd => cmd.args(["--etcd-servers", ETCD_CLIENT]),
            };
            // SAFETY: runs in the forked child before exec and only calls dup2(2), which is
            // async-signal-safe; the listener stays open in the parent for every restart.
            unsafe {
                cmd.pre_exec(move || {
                    if inherit_as(listener_fd, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Ok(cmd)
        }),
    );
    let unified = cleanup::unified();
    for i in 1..=opts.nodes {
        let ns = topology::netns_path(&opts.name, &format!("node{i}"));
        let cgroup = unified
            .as_ref()
            .map(|u| u.join(opts.cgroup(i).trim_start_matches('/')));
        let (o, n) = (opts.clone(), ns.clone());
        add(
            format!("csi{i}"),
            Box::new(move || {
                let mut cmd = command_in(&o.bin("weft-csi"), &n, None)?;
                cmd.arg("--endpoint")
                    .arg(format!("unix://{}", o.csi_socket(i).display()))
                    .args(["--node-id", &format!("node{i}"), "--capacity", "4Gi"])
                    .arg("--state-dir")
                    .arg(o.node_dir(i).join("csi"));
                Ok(cmd)
            }),
        );
        let (o, n, cg) = (opts.clone(), ns.clone(), cgroup.clone());
        add(
            format!("node{i}"),
            Box::new(move || {
                let mut cmd = command_in(&o.bin("weft"), &n, cg.as_deref())?;
                cmd.args(["node", "--node-name", &format!("node{i}")])
                    .args(["--address", &topology::node_addr(i).to_string()])
                    .args(["--pod-cidr", &topology::pod_cidr(i)])
                    .arg("--kubeconfig")
                    .arg(o.node_kubeconfig(i))
                    .arg("--root-dir")
                    .arg(o.node_dir(i))
                    .arg("--cni-bin-dir")
                    .arg(o.dir.join("cni/bin"))
                    .arg("--cni-conf-dir")
                    .arg(o.node_dir(i).join("cni"))
                    .args(["--cgroup-parent", &o.cgroup(i)])
                    .arg("--csi-socket")
                    .arg(o.csi_socket(i))
                    .args(pki::node_args(&o, i));
                Ok(cmd)
            }),
        );
        let (o, n, cg) = (opts.clone(), ns.clone(), cgroup.clone());
        add(
            format!("proxy{i}"),
            Box::new(move || {
                let mut cmd = command_in(&o.bin("weft-proxy"), &n, cg.as_deref())?;
                cmd.arg("--pin-dir")
                    .arg(o.pin_dir(i))
                    .args(["run", "--node-name", &format!("node{i}")])
                    .arg("--kubeconfig")
                    .arg(o.node_kubeconfig(i))
                    .args(["--nodeport-iface", "eth0"]);
                if let Some(cg) = &cg {
                    cmd.arg("--cgroup").arg(cg);
                }
                Ok(cmd)
            }),
        );
        if opts.nodes > 1 {
            let (o, n) = (opts.clone(), ns.clone());
            add(
                format!("overlay{i}"),
                Box::new(move || {
                    let mut cmd = command_in(&o.bin("weft-overlay"), &n, None)?;
                    cmd.arg("--nodes")
                        .arg(o.dir.join("nodes.json"))
                        .args(["--node-name", &format!("node{i}")]);
                    Ok(cmd)
                }),
            );
        }
    }
    procs
}

/// Makes `from` available as descriptor `to` across exec (dup2, which clears close-on-exec;
/// when they are the same descriptor, close-on-exec is cleared directly).
fn inherit_as(from: i32, to: i32) -> i32 {
    if from == to {
        // SAFETY: fcntl(2) with F_SETFD only reads its integer arguments; an invalid
        // descriptor is reported as -1, nothing is dereferenced.
        unsafe { nix::libc::fcntl(from, nix::libc::F_SETFD, 0) }
    } else {
        // SAFETY: dup2(2) only reads its two integer arguments; an invalid descriptor is
        // reported as -1, nothing is dereferenced.
        unsafe { nix::libc::dup2(from, to) }
    }
}

/// Stops every supervised process: SIGTERM, then SIGKILL after 10 s.
fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter_mut().rev() {
        if let Some(c) = &p.child {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in procs.iter_mut() {
        if let Some(mut c) = p.child.take() {
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn write_state(opts: &Options, api: SocketAddr, procs: &[Proc]) {
    let state = State {
        options: opts.clone(),
        api,
        supervisor: std::process::id(),
        processes: procs
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.child.as_ref()?.id())))
            .collect(),
    };
    if let Ok(bytes) = serde_json::to_vec_pretty(&state) {
        let tmp = opts.state_file().with_extension("tmp");
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, opts.state_file());
        }
    }
}

/// The supervisor (`weft up --foreground`): builds and runs the cluster until SIGTERM or
/// SIGINT, then stops it and removes what it made (the directory stays for `weft down`).
pub fn supervise(opts: &Options) -> Result<(), UpError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).map_err(io("handling signals"))?;
    }
    // Leftovers of an earlier run that was not taken down.
    teardown(opts);
    std::fs::create_dir_all(&opts.dir).map_err(io(format!("creating {}", opts.dir.display())))?;
    let result = run(opts, &stop);
    if let Err(e) = &result {
        say(&format!("failed: {e}"));
    }
    say("stopping the cluster");
    teardown(opts);
    let _ = std::fs::remove_file(opts.state_file());
    result
}

fn run(opts: &Options, stop: &AtomicBool) -> Result<(), UpError> {
    let listener = TcpListener::bind(("127.0.0.1", opts.port))
        .map_err(io(format!("listening on 127.0.0.1:{}", opts.port)))?;
    let api = listener
        .local_addr()
        .map_err(io("the listener's address"))?;
    say(&format!(
        "» the network: underlay {}/24, {} node namespace(s), an external host",
        topology::API_ADDR,
        opts.nodes
    ));
    topology::create(&opts.name, opts.nodes)?;
    weft_bpf::bpffs::ensure_mounted()?;
    say("» images: weft/pause:dev, weft/echo:dev (built from the workspace's binaries)");
    let archives = prepare(opts, api)?;
    let client = pki::Client::new(&opts.dir, api)?;
    let logs = opts.dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(io("creating the log directory"))?;
    let mut procs = processes(opts, listener.as_raw_fd());
    // The control plane comes first in `procs`: etcd (when asked for), then the API server.
    let control = if opts.store == StoreKind::Etcd { 2 } else { 1 };
    let result = (|| {
        say(&format!(
            "» {}the API server, controllers and scheduler (https://{api})",
            if control == 2 { "etcd, " } else { "" }
        ));
        for p in procs.iter_mut().take(control) {
            p.start(&logs)?;
        }
        write_state(opts, api, &procs);
        wait("the API server", Duration::from_secs(30), stop, || {
            client.get("/readyz").is_some()
        })?;
        if !client.post("/apis/storage.k8s.io/v1/storageclasses", &storage_class()) {
            return Err(UpError::Failed(
                "creating the default StorageClass failed".into(),
            ));
        }
        say(&format!(
            "» {} node(s): containerd, weft node, weft-cni, weft-proxy, weft-csi{}",
            opts.nodes,
            if opts.nodes > 1 { ", weft-overlay" } else { "" }
        ));
        for p in procs.iter_mut().skip(control) {
            p.start(&logs)?;
        }
        write_state(opts, api, &procs);
        for i in 1..=opts.nodes {
            let socket = opts.node_dir(i).join("containerd/containerd.sock");
            wait(
                &format!("node{i}'s containerd"),
                Duration::from_secs(60),
                stop,
                || socket.exists(),
            )?;
            for a in &archives {
                weft_node::image::load(a, &socket).map_err(|e| {
                    UpError::Failed(format!("loading {} into node{i}: {e}", a.display()))
                })?;
            }
        }
        wait("every node Ready", Duration::from_secs(120), stop, || {
            nodes(&client).is_some_and(|n| n.len() == opts.nodes && n.iter().all(|(_, r)| *r))
        })
    })();
    if let Err(e) = result {
        stop_all(&mut procs);
        return Err(e);
    }
    say(&format!(
        "ready: {} node(s); export KUBECONFIG={}",
        opts.nodes,
        opts.kubeconfig().display()
    ));
    while !stop.load(Ordering::Relaxed) {
        let mut changed = false;
        for p in procs.iter_mut() {
            match p.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => {
                    p.child = None;
                    p.restarts += 1;
                    let backoff = Duration::from_secs(1 << p.restarts.min(5));
                    tracing::warn!(process = p.name, %status, restarts = p.restarts, ?backoff, "exited; restarting");
                    p.next_start = Instant::now() + backoff;
                }
                None if Instant::now() >= p.next_start => {
                    if let Err(e) = p.start(&logs) {
                        tracing::warn!(process = p.name, error = %e, "restarting");
                        p.next_start = Instant::now() + Duration::from_secs(5);
                    }
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            write_state(opts, api, &procs);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop_all(&mut procs);
    Ok(())
}

/// Removes everything the cluster put on the machine, but its directory. Idempotent; works
/// without a supervisor (after a crash).
pub fn teardown(opts: &Options) {
    // The node agents, proxies and containerds first (they live in the node namespaces), then
    // the pods (in the nodes' cgroups), then mounts, cgroups, pins and namespaces.
    let namespaces = topology::existing(&opts.name);
    for ns in &namespaces {
        weft_netns::kill_processes_in(ns, "net");
    }
    cleanup::kill_processes_naming(&opts.dir.join("nodes"));
    for i in 1..=opts.nodes.max(namespaces.len()) {
        cleanup::forget_containerd_leftovers(&opts.node_dir(i).join("containerd"));
    }
    let nodes = opts.nodes.max(namespaces.len());
    for i in 1..=nodes {
        cleanup::remove_cgroups(&opts.cgroup(i));
    }
    cleanup::unmount_under(&opts.dir);
    cleanup::detach_loops_under(&opts.dir);
    for i in 1..=nodes {
        let pins = opts.pin_dir(i);
        if pins.exists()
            && let Err(e) = std::fs::remove_dir_all(&pins)
        {
            tracing::warn!(dir = %pins.display(), error = %e, "removing pins");
        }
    }
    topology::remove(&opts.name);
}

/// `weft down`: stops the supervisor (waiting for it to take the cluster down), removes what
/// is left and the cluster's directory.
pub fn down(opts: &Options) -> Result<(), UpError> {
    let mut opts = opts.clone();
    if let Some(s) = state(&opts.dir) {
        opts.nodes = opts.nodes.max(s.options.nodes);
        if alive(s.supervisor) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(s.supervisor as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            while alive(s.supervisor) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            if alive(s.supervisor) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(s.supervisor as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    teardown(&opts);
    if opts.dir.exists() {
        std::fs::remove_dir_all(&opts.dir)
            .map_err(io(format!("removing {}", opts.dir.display())))?;
    }
    Ok(())
}

/// `weft status`: the supervisor, its processes and the nodes, as text.
pub fn status(dir: &Path) -> Result<String, UpError> {
    let Some(s) = state(dir) else {
        return Err(UpError::Failed(format!(
            "no cluster is up in {}",
            dir.display()
        )));
    };
    let mut out = String::new();
    let up = alive(s.supervisor);
    out.push_str(&format!(
        "cluster {:?}: supervisor pid {} {}\nAPI server: https://{} (export KUBECONFIG={})\nstore: {}\n\nPROCESS     PID      STATE\n",
        s.options.name,
        s.supervisor,
        if up { "running" } else { "NOT RUNNING (weft down cleans up)" },
        s.api,
        s.options.kubeconfig().display(),
        match s.options.store {
            StoreKind::Sqlite => format!("sqlite {}", s.options.dir.join("store.db").display()),
            StoreKind::Etcd => format!("etcd {ETCD_CLIENT} (in the underlay namespace)"),
        },
    ));
    for (name, pid) in &s.processes {
        out.push_str(&format!(
            "{name:<11} {pid:<8} {}\n",
            if alive(*pid) { "running" } else { "exited" }
        ));
    }
    out.push_str("\nNODE        READY\n");
    match pki::Client::new(&s.options.dir, s.api)
        .ok()
        .and_then(|c| nodes(&c))
    {
        Some(list) => {
            for (name, ready) in list {
                out.push_str(&format!("{name:<11} {ready}\n"));
            }
        }
        None => out.push_str("(the API server does not answer)\n"),
    }
    Ok(out)
}
