//! Network namespaces and the netlink operations that weft's node components share.
//!
//! Owns: creating, opening, entering and removing network namespaces ([`NetNs`]), and a small
//! async netlink API over `rtnetlink` bound to one namespace ([`Netlink`]): links (veth, bridge,
//! VXLAN), addresses, routes and neighbours; and listing and destroying sockets through
//! sock_diag ([`sockdiag`]). Used by `weft-cni`, `weft-proxy` and the test bed. bpffs and
//! the raw bpf(2) commands are weft-bpf's. Does not own: any policy about what to create (that
//! is the caller's), nor
//! firewalling.
//!
//! Entering a namespace never changes the calling thread: work runs on a short-lived helper thread
//! that calls `setns(2)`, so a tokio worker or a test thread never ends up in the wrong namespace.

mod nl;
mod ns;
mod procs;
pub mod sockdiag;

pub use nl::{LinkInfo, Netlink, RouteInfo};
pub use ns::NetNs;
pub use procs::{join_cgroup_at_exec, kill_processes_in};

use std::path::PathBuf;

/// Errors from namespace and netlink operations. Messages name the object involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on a namespace path failed.
    #[error("{op} {path}: {source}")]
    Sys {
        /// What was being done.
        op: &'static str,
        /// The namespace path.
        path: PathBuf,
        /// The errno.
        #[source]
        source: nix::Error,
    },
    /// A netlink request failed.
    #[error("netlink {op} {object}: {source}")]
    Netlink {
        /// The request, e.g. "add link".
        op: &'static str,
        /// The object, e.g. an interface name.
        object: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// An object that must exist was not found.
    #[error("{kind} {name} not found")]
    NotFound {
        /// "interface", "namespace", ...
        kind: &'static str,
        /// Its name.
        name: String,
    },
    /// A helper thread could not be run.
    #[error("namespace helper thread: {0}")]
    Thread(String),
    /// Creating a netlink socket failed.
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
}

impl Error {
    /// The errno behind the error, when there is one (netlink or syscall).
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Sys { source, .. } => Some(*source as i32),
            Self::Netlink {
                source: rtnetlink::Error::NetlinkError(msg),
                ..
            } => msg.code.map(|c| -c.get()),
            Self::Socket(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
