//! weft-bpf owns what weft's user-space components agree on about BPF outside the programs
//! themselves: detecting and mounting bpffs ([`bpffs`]), the few raw bpf(2) commands weft needs
//! beyond aya ([`sys`]: opening and pinning objects, tcx links, detaching and updating links),
//! and the pin layout under the pin root ([`pins`]: where maps, links and programs are pinned,
//! and the name of a policy program's link on an interface) — one contract with one home, which
//! weft-proxy (which pins) and weft-cni (which attaches the pinned policy programs to a new pod's
//! interface) both follow. Does not own: loading programs (aya, in weft-proxy) or what the maps
//! hold (weft-proxy-common).

pub mod bpffs;
pub mod pins;
pub mod sys;

use std::path::PathBuf;

/// A failed system call on a path.
#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct Error {
    /// What was being done.
    pub op: &'static str,
    /// The path.
    pub path: PathBuf,
    /// The errno.
    #[source]
    pub source: nix::Error,
}

/// A result of this crate.
pub type Result<T> = std::result::Result<T, Error>;
