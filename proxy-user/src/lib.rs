//! `weft-proxy`: the user-space half of weft's eBPF datapath.
//!
//! Owns: loading the kernel programs built from `proxy-ebpf/` (embedded in this crate at build
//! time), attaching them (tcx), pinning maps and links in bpffs so traffic survives an agent
//! restart, and reading and programming the maps.
//!
//! What it does: per-interface packet/byte counters ([`counters`]); service load balancing for
//! ClusterIP, externalIPs, LoadBalancer IPs and NodePort at the socket level ([`socklb`]) and
//! per packet at TC for traffic from outside the node and for pods when socket LB is off
//! ([`tcx`], [`services`] over the map seam in [`maps`]: DNAT, SNAT to remote backends, hairpin, RST refusal), with Maglev
//! backend selection ([`maglev`]), session affinity and the internal/external traffic
//! policies ([`model`]); NetworkPolicy compiled incrementally into per-pod rule maps
//! ([`policy`], [`policymap`]) with flow events ([`flowlog`]); Prometheus metrics
//! ([`metrics`]). Desired state comes from a directory of manifests ([`manifests`]) or the
//! Kubernetes API ([`kube_source`]), reconciled by [`agent`].

pub mod agent;
pub mod bpffs;
pub mod counters;
pub mod flowlog;
pub mod kube_source;
pub mod maglev;
pub mod manifests;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod object;
pub mod policy;
pub mod policymap;
pub mod services;
pub mod socklb;
pub mod tcx;

use std::path::PathBuf;

/// Errors of the datapath loader. Messages are lowercase and name the object involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pin directory is not on a BPF filesystem.
    #[error("{path} is not on a bpf filesystem (mount one with: mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs {
        /// The directory that was checked.
        path: PathBuf,
    },
    /// A filesystem operation on a path failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The source of desired state could not start.
    #[error("source of desired state: {0}")]
    Source(String),
    /// The eBPF object could not be loaded (maps created or programs parsed).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be found, loaded or attached.
    #[error("program {name}: {source}")]
    Program {
        /// Program name in the object.
        name: &'static str,
        /// The underlying error.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map could not be opened or used.
    #[error("map {name}: {source}")]
    Map {
        /// Map name or pin path.
        name: String,
        /// The underlying error.
        #[source]
        source: aya::maps::MapError,
    },
    /// A link could not be pinned or opened.
    #[error("link {path}: {message}")]
    Link {
        /// Pin path of the link.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// No interface with that name exists in this network namespace.
    #[error("interface {name}: {source}")]
    NoSuchInterface {
        /// The interface name given.
        name: String,
        /// The lookup error.
        #[source]
        source: nix::Error,
    },
    /// A map is full.
    #[error("map {map} is full ({limit} entries); raise {flag}")]
    Limit {
        /// Map name.
        map: &'static str,
        /// Its size.
        limit: u32,
        /// The option that sets it.
        flag: String,
    },
    /// The object does not contain an expected program or map (a build mismatch).
    #[error("the embedded eBPF object has no {kind} named {name}")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// The missing name.
        name: &'static str,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
