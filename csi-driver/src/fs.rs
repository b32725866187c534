//! Filesystems on volume images: making them, growing them, freezing them for a snapshot, and
//! copying images cheaply (reflink where the host filesystem has it, else a sparse copy).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A filesystem a volume can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// ext4 (`mkfs.ext4`); grows offline, or online where the kernel lets the driver.
    Ext4,
    /// XFS; grows online.
    Xfs,
    /// btrfs; grows online.
    Btrfs,
}

impl FsType {
    /// Parses a `fsType` parameter or a capability's `fs_type`.
    pub fn parse(s: &str) -> Option<FsType> {
        match s {
            "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            "btrfs" => Some(FsType::Btrfs),
            _ => None,
        }
    }

    /// The name `mount(2)` knows it by.
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
        }
    }

    /// The smallest volume this filesystem can be made on (mkfs refuses below it).
    pub fn min_bytes(self) -> u64 {
        match self {
            FsType::Ext4 => 8 << 20,
            FsType::Xfs => 300 << 20,
            FsType::Btrfs => 128 << 20,
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(Error::io(format!("run {shown}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Tool(format!(
        "{shown} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Makes a filesystem on an image file (no loop device needed).
pub fn mkfs(fs: FsType, image: &Path) -> Result<()> {
    match fs {
        // No reserved blocks: the volume's size is what its user can write.
        FsType::Ext4 => run(Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
            ])
            .arg(image)),
        FsType::Xfs => run(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(image)),
        FsType::Btrfs => run(Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(image)),
    }
}

/// Grows a mounted filesystem to fill its (already enlarged) device.
pub fn grow_online(fs: FsType, device: &Path, mountpoint: &Path) -> Result<()> {
    match fs {
        FsType::Ext4 => run(Command::new("resize2fs").arg(device)),
        FsType::Xfs => run(Command::new("xfs_growfs").arg("-d").arg(mountpoint)),
        FsType::Btrfs => run(Command::new("btrfs")
            .args(["filesystem", "resize", "max"])
            .arg(mountpoint)),
    }
}

/// Grows an unmounted filesystem on an image file, where the filesystem allows it. Returns false
/// if this filesystem only grows while mounted.
pub fn grow_offline(fs: FsType, image: &Path) -> Result<bool> {
    match fs {
        FsType::Ext4 => {
            run(Command::new("e2fsck").args(["-f", "-p"]).arg(image))?;
            run(Command::new("resize2fs").arg(image))?;
            Ok(true)
        }
        FsType::Xfs | FsType::Btrfs => Ok(false),
    }
}

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);
nix::ioctl_write_int!(ficlone, 0x94, 9);

/// A frozen filesystem; thawed when dropped.
#[derive(Debug)]
pub struct Frozen(File);

/// Freezes the filesystem mounted at `mountpoint` so that its image is consistent while copied.
pub fn freeze(mountpoint: &Path) -> Result<Frozen> {
    let dir =
        File::open(mountpoint).map_err(Error::io(format!("open {}", mountpoint.display())))?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE reads an int through the pointer, which is valid for the call; the fd is an
    // open directory on the filesystem.
    unsafe { fifreeze(dir.as_raw_fd(), &mut arg) }
        .map_err(|e| Error::io(format!("freeze {}", mountpoint.display()))(e.into()))?;
    Ok(Frozen(dir))
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let mut arg: libc::c_int = 0;
        // SAFETY: as for FIFREEZE; the fd is the one the filesystem was frozen through.
        if let Err(e) = unsafe { fithaw(self.0.as_raw_fd(), &mut arg) } {
            tracing::error!(error = %e, "thawing a frozen volume failed");
        }
    }
}

/// Copies an image file: a reflink where the host filesystem supports it, else a copy of only the
/// allocated extents, so sparse images stay sparse.
pub fn copy_image(from: &Path, to: &Path) -> Result<()> {
    let src = File::open(from).map_err(Error::io(format!("open {}", from.display())))?;
    let dst = File::create(to).map_err(Error::io(format!("create {}", to.display())))?;
    // SAFETY: FICLONE takes the source fd as its integer argument; both fds are open.
    if unsafe { ficlone(dst.as_raw_fd(), src.as_raw_fd() as _) }.is_ok() {
        return Ok(());
    }
    sparse_copy(&src, &dst).map_err(Error::io(format!(
        "copy {} to {}",
        from.display(),
        to.display()
    )))?;
    dst.sync_all()
        .map_err(Error::io(format!("sync {}", to.display())))
}

fn sparse_copy(src: &File, dst: &File) -> std::io::Result<()> {
    use nix::unistd::{Whence, lseek};
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        let data = match lseek(src, pos, Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole remains
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(src, data, Whence::SeekHole)?;
        let mut off_in = data;
        let mut off_out = data;
        let mut left = (hole - data) as usize;
        while left > 0 {
            let n =
                nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), left)?;
            if n == 0 {
                break;
            }
            left -= n;
        }
        pos = hole;
    }
    Ok(())
}

/// Bytes in use and in total, and inodes, of a mounted filesystem.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Total bytes.
    pub total: u64,
    /// Bytes available to an unprivileged writer.
    pub available: u64,
    /// Bytes used.
    pub used: u64,
    /// Total inodes (0 if the filesystem does not count them, like btrfs).
    pub inodes: u64,
    /// Free inodes.
    pub inodes_free: u64,
}

/// statvfs on a mounted path.
pub fn usage(path: &Path) -> Result<Usage> {
    let s = nix::sys::statvfs::statvfs(path)
        .map_err(|e| Error::io(format!("statvfs {}", path.display()))(e.into()))?;
    let frag = s.fragment_size();
    let total = s.blocks() * frag;
    let free = s.blocks_free() * frag;
    Ok(Usage {
        total,
        available: s.blocks_available() * frag,
        used: total.saturating_sub(free),
        inodes: s.files(),
        inodes_free: s.files_free(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_holes_and_data() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = std::env::temp_dir().join(format!("weft-csi-fs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a");
        let b = dir.join("b");
        let mut f = File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(10 << 20)).unwrap();
        f.write_all(b"hello").unwrap();
        f.seek(SeekFrom::Start(50 << 20)).unwrap();
        f.write_all(b"world").unwrap();
        drop(f);
        let src = File::open(&a).unwrap();
        let dst = File::create(&b).unwrap();
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&b).unwrap().blocks() * 512 < 1 << 20,
            "copy stayed sparse"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
