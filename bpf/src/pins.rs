//! Where weft pins maps, links and programs in bpffs.
//!
//! Layout under the pin root (default `/sys/fs/bpf/weft`): `maps/<MAP_NAME>` for maps the
//! programs declare as pinned, `links/<name>` for attachments that must outlive the agent,
//! `progs/<name>` for programs another process attaches (weft-cni attaches the policy programs
//! to a pod's interface before the pod starts, and pins their links where the agent finds them).

use std::path::{Path, PathBuf};

/// The default pin root.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/weft";

/// The pinning layout below one root directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// A layout rooted at `root`. Nothing is created or checked here.
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

    /// Directory of pinned programs.
    pub fn progs_dir(&self) -> PathBuf {
        self.root.join("progs")
    }

    /// Pin path of one map.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Pin path of one link.
    pub fn link(&self, name: &str) -> PathBuf {
        self.links_dir().join(name)
    }

    /// Pin path of a program.
    pub fn prog(&self, name: &str) -> PathBuf {
        self.progs_dir().join(name)
    }

    /// Pin path of the link of a policy program on interface `ifindex` (`ingress`: traffic from
    /// the pod). weft-proxy and weft-cni both use it, so either can create the link and the
    /// other adopts it.
    pub fn policy_link(&self, ifindex: u32, ingress: bool) -> PathBuf {
        self.link(&format!(
            "policy-{ifindex}-{}",
            if ingress { "from-pod" } else { "to-pod" }
        ))
    }
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
        assert_eq!(
            l.policy_link(7, true),
            Path::new("/sys/fs/bpf/x/links/policy-7-from-pod")
        );
        assert_eq!(l.prog("p"), Path::new("/sys/fs/bpf/x/progs/p"));
    }
}
