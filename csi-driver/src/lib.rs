//! `weft-csi`: a CSI (Container Storage Interface) v1.9 driver for local and NFS persistent volumes.
//!
//! This crate owns everything between the CSI gRPC socket and the node's storage:
//! * [`service`]: the Identity, Controller and Node services (tonic, with the CSI protobuf types
//!   from `bpfman-csi`), request validation and the status codes the spec assigns;
//! * [`local`]: the `local` backend, a sparse image per volume with its own filesystem (ext4, xfs,
//!   btrfs) or none (block), attached through [`loopdev`], so every volume's size is enforced;
//!   snapshots and clones are image copies ([`fs`]);
//! * [`nfs`]: the `nfs` backend, a directory per volume on an existing export, made and removed over
//!   the NFS protocol by a userspace client and mounted on the node with bounded timeouts;
//! * [`mounts`]: mount operations behind a trait; [`persist`]: crash-safe records;
//!   [`ids`]: IDs that cannot name a path outside the driver's directories;
//!   [`inflight`]: one operation per volume at a time;
//! * [`server`]: serving the services on a unix socket.

pub mod error;
pub mod fs;
pub mod ids;
pub mod inflight;
pub mod local;
pub mod loopdev;
pub mod mounts;
pub mod nfs;
pub mod persist;
pub mod server;
pub mod service;

/// The CSI protobuf messages, clients and servers.
pub use bpfman_csi::v1 as csi;
