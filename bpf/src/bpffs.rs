//! Detecting and mounting bpffs, where weft pins maps and links.

use std::path::Path;

use crate::{Error, Result};

/// `statfs` magic number of bpffs (`BPF_FS_MAGIC` in `linux/magic.h`).
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// The conventional bpffs mount point.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// Whether `path` (or, if it does not exist yet, its nearest existing ancestor) is on bpffs.
/// Returns the directory that was checked along with the answer.
pub fn is_bpffs(path: &Path) -> Result<(bool, &Path)> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let fs = nix::sys::statfs::statfs(existing).map_err(|source| Error {
        op: "statfs",
        path: existing.to_path_buf(),
        source,
    })?;
    // The field is a signed word on some targets; compare the low 32 bits.
    let magic = fs.filesystem_type().0 as u32;
    Ok((magic == BPF_FS_MAGIC, existing))
}

/// Mounts bpffs at [`BPFFS_MOUNT`] unless it is already there.
pub fn ensure_mounted() -> Result<()> {
    if is_bpffs(Path::new(BPFFS_MOUNT))?.0 {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS_MOUNT,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| Error {
        op: "mounting bpffs at",
        path: BPFFS_MOUNT.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tmp_dir_is_not_bpffs() {
        assert!(!is_bpffs(&std::env::temp_dir()).unwrap().0);
    }
}
