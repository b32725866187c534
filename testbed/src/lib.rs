//! The namespaced test bed that every privileged test and benchmark of weft builds on.
//!
//! Owns: building a small "cluster" out of network namespaces on this one machine, and tearing it
//! down. A [`Lab`] has a private underlay (a bridge inside a lab namespace, never the root
//! namespace), any number of *nodes* (namespaces with `eth0` on the underlay and forwarding on), an
//! optional *external client* on the underlay, and *pods* (bare namespaces for a CNI plugin to
//! wire, or hosts a test wires itself). It runs commands, TCP and UDP servers and clients inside any
//! of them, and hands out unique bpffs and cgroup directories.
//!
//! Names are unique per process and per lab (`weft-tb-<pid>-<seq>-...`), so tests run in parallel.
//! Everything is removed when the `Lab` is dropped, including during a panic, and leftovers of an
//! earlier run whose process died are removed when the next `Lab` starts. Does not own: what gets
//! wired into pods (that is the code under test).

mod cleanup;
mod host;
mod storage;
mod traffic;

pub use host::Host;
pub use storage::MountSandbox;
pub use traffic::{EchoServer, TcpServer, UdpServer, metric};
pub use weft_netns::{NetNs, Netlink};

use std::{
    future::Future,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use ipnet::{IpNet, Ipv4Net};

/// Where test namespaces are bind-mounted (the same place `ip netns` uses, for debugging).
pub const NETNS_DIR: &str = "/run/netns";
/// Prefix of every object the test bed creates.
pub const PREFIX: &str = "weft-tb-";
/// The underlay subnet inside a lab (private to the lab namespace).
pub const UNDERLAY: &str = "10.200.0.0/24";

/// Errors of the test bed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A namespace or netlink operation failed.
    #[error(transparent)]
    Netns(#[from] weft_netns::Error),
    /// Mounting bpffs failed.
    #[error(transparent)]
    Bpf(#[from] weft_bpf::Error),
    /// An I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("command {command} failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status.
        status: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// The test bed needs root.
    #[error(
        "the test bed needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN); run the privileged tests as root"
    )]
    NotRoot,
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// A set of namespaces joined by a private underlay. Dropping it removes everything it created.
#[derive(Debug)]
pub struct Lab {
    id: String,
    rt: tokio::runtime::Runtime,
    underlay: Host,
    bridge_index: u32,
    nodes: Vec<Host>,
    others: Vec<Host>,
    dirs: Vec<PathBuf>,
    cgroups: Vec<PathBuf>,
    next_underlay_host: u8,
    next_veth: u32,
}

impl Lab {
    /// Creates an empty lab: the underlay namespace with its bridge. Removes stale leftovers of
    /// earlier crashed runs first.
    pub fn new() -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            return Err(Error::NotRoot);
        }
        cleanup::remove_stale();
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("{PREFIX}{}-{seq}", std::process::id());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| Error::Io {
                what: "starting a tokio runtime".into(),
                source,
            })?;
        let underlay = Host::create(&format!("{id}-underlay"), "underlay")?;
        let mut lab = Self {
            id,
            rt,
            underlay,
            bridge_index: 0,
            nodes: Vec::new(),
            others: Vec::new(),
            dirs: Vec::new(),
            cgroups: Vec::new(),
            next_underlay_host: 10,
            next_veth: 0,
        };
        let ns = lab.underlay.ns().try_clone()?;
        lab.bridge_index = lab.block_on(async move {
            let nl = Netlink::connect(&ns).await?;
            nl.add_bridge("br0", None).await?;
            let br = nl.require_link("br0").await?;
            nl.set_up(br.index).await?;
            Ok::<_, Error>(br.index)
        })?;
        Ok(lab)
    }

    /// This lab's unique id (also the prefix of its namespace names).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Runs a future to completion on the lab's runtime (for netlink work in tests).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The underlay (lab) namespace, which holds the `br0` bridge every node is plugged into.
    pub fn underlay(&self) -> &Host {
        &self.underlay
    }

    /// The underlay prefix.
    pub fn underlay_net() -> Ipv4Net {
        UNDERLAY.parse().expect("valid constant")
    }

    /// Plugs a namespace into the underlay: a veth whose `eth0` end is in the host, with the next
    /// free underlay address.
    fn attach_to_underlay(&mut self, host: &mut Host) -> Result<Ipv4Addr> {
        let n = self.next_underlay_host;
        self.next_underlay_host += 1;
        let addr = Ipv4Addr::new(10, 200, 0, n);
        let port = format!("u{n}");
        let (under, inside, bridge) = (
            self.underlay.ns().try_clone()?,
            host.ns().try_clone()?,
            self.bridge_index,
        );
        self.block_on(async move {
            let unl = Netlink::connect(&under).await?;
            unl.add_veth(&port, "eth0", Some(&inside), None).await?;
            let p = unl.require_link(&port).await?;
            unl.set_controller(p.index, bridge).await?;
            unl.set_up(p.index).await?;
            let hnl = Netlink::connect(&inside).await?;
            let eth0 = IpNet::new(addr.into(), 24).expect("valid prefix");
            configure(&hnl, "eth0", eth0, &[]).await?;
            Ok::<_, Error>(())
        })?;
        host.set_underlay_addr(addr);
        Ok(addr)
    }

    /// Adds a node: a namespace on the underlay (`eth0`, 10.200.0.x/24) with IPv4 forwarding on.
    /// Returns its index in [`Lab::nodes`].
    pub fn add_node(&mut self) -> Result<usize> {
        let i = self.nodes.len();
        let mut host = Host::create(&format!("{}-node{i}", self.id), &format!("node{i}"))?;
        self.attach_to_underlay(&mut host)?;
        host.sysctl("net/ipv4/ip_forward", "1")?;
        self.nodes.push(host);
        Ok(i)
    }

    /// The nodes, in the order they were added.
    pub fn nodes(&self) -> &[Host] {
        &self.nodes
    }

    /// One node.
    pub fn node(&self, i: usize) -> &Host {
        &self.nodes[i]
    }

    /// Adds an "external client": a namespace on the underlay that is not a node.
    pub fn add_external(&mut self, label: &str) -> Result<&Host> {
        let mut host = Host::create(&format!("{}-ext-{label}", self.id), label)?;
        self.attach_to_underlay(&mut host)?;
        self.others.push(host);
        Ok(self.others.last().expect("just pushed"))
    }

    /// Adds a bare namespace (for example a pod for a CNI plugin to wire). `label` must be unique
    /// within the lab.
    pub fn add_namespace(&mut self, label: &str) -> Result<&Host> {
        let host = Host::create(&format!("{}-{label}", self.id), label)?;
        self.others.push(host);
        Ok(self.others.last().expect("just pushed"))
    }

    /// A namespace added with [`Lab::add_namespace`] or [`Lab::add_external`], by label.
    pub fn host(&self, label: &str) -> Option<&Host> {
        self.others.iter().find(|h| h.label() == label)
    }

    /// A fresh, unique directory in bpffs for this lab's pinned objects, removed with the lab.
    pub fn bpffs_dir(&mut self, label: &str) -> Result<PathBuf> {
        weft_bpf::bpffs::ensure_mounted()?;
        let dir = Path::new(cleanup::BPFFS).join(format!("{}-{label}", self.id));
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        self.dirs.push(dir.clone());
        Ok(dir)
    }

    /// A fresh child cgroup (v2) for this lab's processes, so cgroup BPF programs are attached
    /// there and never at the root. Removed with the lab, after killing what runs in it.
    pub fn cgroup(&mut self, label: &str) -> Result<PathBuf> {
        let root = cleanup::cgroup2_root().ok_or_else(|| Error::Io {
            what: "finding the cgroup2 hierarchy".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        let dir = root.join(format!("{}-{label}", self.id));
        std::fs::create_dir(&dir).map_err(|source| Error::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        self.cgroups.push(dir.clone());
        Ok(dir)
    }

    /// Adds a pod namespace wired to `node` by hand (no CNI plugin): a veth whose pod end is
    /// `eth0` with `ip/32` and a default route via 169.254.1.1 (the node end's address), and a
    /// /32 route to the pod on the node. Several pods per node work; addresses are the caller's.
    pub fn wire_pod(&mut self, node: usize, label: &str, ip: Ipv4Addr) -> Result<&Host> {
        let host = Host::create(&format!("{}-{label}", self.id), label)?;
        let node_side = format!("tbv{}", self.next_veth);
        self.next_veth += 1;
        let (node_ns, pod_ns) = (self.nodes[node].ns().try_clone()?, host.ns().try_clone()?);
        self.others.push(host);
        let gw = Ipv4Addr::new(169, 254, 1, 1);
        self.block_on(async move {
            let host32 = |a: Ipv4Addr| IpNet::new(a.into(), 32).expect("valid");
            let n = Netlink::connect(&node_ns).await?;
            n.add_veth(&node_side, "eth0", Some(&pod_ns), None).await?;
            configure(&n, &node_side, host32(gw), &[(host32(ip), None)]).await?;
            let p = Netlink::connect(&pod_ns).await?;
            let default = "0.0.0.0/0".parse().expect("valid");
            configure(
                &p,
                "eth0",
                host32(ip),
                &[(host32(gw), None), (default, Some(gw))],
            )
            .await?;
            Ok::<_, Error>(())
        })?;
        Ok(self.others.last().expect("just pushed"))
    }

    /// A fresh, unique scratch directory under the system temp dir, removed with the lab.
    pub fn temp_dir(&mut self, label: &str) -> Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!("{}-{label}", self.id));
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        self.dirs.push(dir.clone());
        Ok(dir)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for mut host in self.others.drain(..).chain(self.nodes.drain(..)) {
            host.destroy();
        }
        self.underlay.destroy();
        for cg in self.cgroups.drain(..) {
            cleanup::remove_cgroup(&cg);
        }
        for dir in self.dirs.drain(..) {
            cleanup::remove_dir(&dir);
        }
    }
}

/// Gives the link `name` the address `addr`, sets it up and adds `routes` (destination, next
/// hop) through it: one end of a veth as the test bed wires it.
async fn configure(
    nl: &Netlink,
    name: &str,
    addr: IpNet,
    routes: &[(IpNet, Option<Ipv4Addr>)],
) -> Result<()> {
    let link = nl.require_link(name).await?;
    nl.add_address(link.index, addr).await?;
    nl.set_up(link.index).await?;
    for (dst, via) in routes {
        nl.add_route_v4(*dst, *via, Some(link.index), false).await?;
    }
    Ok(())
}
