//! Where weft keeps pinned maps and links in bpffs, and checks that the place really is bpffs.
//!
//! Layout under the pin root (default `/sys/fs/bpf/weft`): `maps/<MAP_NAME>` for maps the programs
//! declare as pinned, `links/<name>` for attachments that must outlive the agent, `progs/<name>`
//! for programs that another process attaches (weft-cni attaches the policy programs to a pod's
//! interface before the pod starts).

use std::{
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use crate::{Error, Result};

/// The default pin root.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/weft";

/// The pinning layout below one root directory.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// A layout rooted at `root`. Nothing is created or checked until [`PinLayout::prepare`].
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of pinned maps.
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Directory of pinned links.
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Pin path of one map.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Pin path of one link.
    pub fn link(&self, name: &str) -> PathBuf {
        self.links_dir().join(name)
    }

    /// Directory of pinned programs.
    pub fn progs_dir(&self) -> PathBuf {
        self.root.join("progs")
    }

    /// Pin path of a program.
    pub fn prog(&self, name: &str) -> PathBuf {
        self.progs_dir().join(name)
    }

    /// Pin name of the link of a policy program on interface `ifindex` (`ingress`: from the pod).
    /// The agent and weft-cni use the same name, so either can create it and the other adopts it.
    pub fn policy_link(&self, ifindex: u32, ingress: bool) -> PathBuf {
        self.link(&format!(
            "policy-{ifindex}-{}",
            if ingress { "from-pod" } else { "to-pod" }
        ))
    }

    /// Checks that the root is on bpffs and creates the `maps/` and `links/` directories.
    pub fn prepare(&self) -> Result<()> {
        check_bpffs(&self.root)?;
        for dir in [self.maps_dir(), self.links_dir(), self.progs_dir()] {
            std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
                op: "creating",
                path: dir.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// Fails unless `path` (or, if it does not exist yet, its nearest existing ancestor) is on bpffs.
pub fn check_bpffs(path: &Path) -> Result<()> {
    match weft_netns::bpffs::is_bpffs(path) {
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
    let fd = match weft_netns::bpfsys::obj_get(path) {
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
    if let Err(e) = weft_netns::bpfsys::link_detach(fd.as_fd()) {
        tracing::debug!(path = %path.display(), error = %e, "link already detached");
    }
    remove_pin(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_paths() {
        let l = PinLayout::new("/sys/fs/bpf/x");
        assert_eq!(l.map("M"), Path::new("/sys/fs/bpf/x/maps/M"));
        assert_eq!(
            l.link("count-3-ingress"),
            Path::new("/sys/fs/bpf/x/links/count-3-ingress")
        );
    }

    #[test]
    fn a_tmp_dir_is_not_bpffs() {
        let err = check_bpffs(&std::env::temp_dir()).unwrap_err();
        assert!(err.to_string().contains("not on a bpf filesystem"), "{err}");
    }
}
