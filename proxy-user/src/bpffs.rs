//! The agent's side of the pin layout (weft-bpf's [`PinLayout`], shared with weft-cni): checking
//! that the pin root really is bpffs, making its directories, and removing pins and the links
//! behind them.

use std::{io, os::fd::AsFd as _, path::Path};

use crate::{Error, Result};

pub use weft_bpf::pins::{DEFAULT_PIN_ROOT, PinLayout};

/// Checks that the layout's root is on bpffs and creates its `maps/`, `links/` and `progs/`
/// directories.
pub fn prepare(layout: &PinLayout) -> Result<()> {
    check_bpffs(layout.root())?;
    for dir in [layout.maps_dir(), layout.links_dir(), layout.progs_dir()] {
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            op: "creating",
            path: dir.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Fails unless `path` (or, if it does not exist yet, its nearest existing ancestor) is on bpffs.
pub fn check_bpffs(path: &Path) -> Result<()> {
    match weft_bpf::bpffs::is_bpffs(path) {
        Ok((true, _)) => Ok(()),
        Ok((false, checked)) => Err(Error::NotBpffs {
            path: checked.to_path_buf(),
        }),
        Err(e) => Err(Error::Io {
            op: "checking",
            path: path.to_path_buf(),
            source: std::io::Error::other(e),
        }),
    }
}

/// Removes a pin; a missing pin is fine.
pub fn remove_pin(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::Io {
            op: "removing",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Detaches the link pinned at `path` synchronously (BPF_LINK_DETACH: no program is still running
/// when this returns) and removes the pin. A missing pin is fine.
pub fn unpin_and_detach(path: &Path) -> Result<()> {
    let fd = match weft_bpf::sys::obj_get(path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Io {
                op: "opening pinned link",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    // A link whose interface is gone is already detached; that is not an error here.
    if let Err(e) = weft_bpf::sys::link_detach(fd.as_fd()) {
        tracing::debug!(path = %path.display(), error = %e, "link already detached");
    }
    remove_pin(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tmp_dir_is_not_bpffs() {
        let err = check_bpffs(&std::env::temp_dir()).unwrap_err();
        assert!(err.to_string().contains("not on a bpf filesystem"), "{err}");
    }
}
