//! Mounting, behind a trait so the code around it can be unit-tested and so kernels without an NFS
//! client can substitute the NFS mount (see [`crate::nfs`]). Production uses [`SysMounter`]:
//! `mount(2)`, `umount2(2)` and `/proc/self/mountinfo`.

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use crate::error::{Error, Result};

/// One line of `/proc/self/mountinfo`, the parts the driver looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted.
    pub target: PathBuf,
    /// The device number of the mounted filesystem.
    pub device: (u32, u32),
    /// The path inside that filesystem that is mounted (`/` unless it is a bind of a subtree).
    pub root: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source as the kernel reports it.
    pub source: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// How a filesystem gets mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountRequest {
    /// Filesystem type (`ext4`, `nfs4`, ...).
    pub fstype: String,
    /// Mount flags (`MS_RDONLY`, `MS_NOATIME`, ...).
    pub flags: u64,
    /// Filesystem-specific options.
    pub data: String,
}

/// The mount operations the node service needs.
pub trait Mounter: Debug + Send + Sync {
    /// Mounts `source` on `target`.
    fn mount(&self, source: &str, target: &Path, req: &MountRequest) -> Result<()>;
    /// Bind-mounts `source` on `target`, read-only if asked.
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()>;
    /// Unmounts whatever is mounted on `target`.
    fn unmount(&self, target: &Path) -> Result<()>;
    /// Every mount visible to the driver, in mount order.
    fn list(&self) -> Result<Vec<MountEntry>>;
    /// The topmost mount on `target`, if `target` is a mount point.
    fn mounted_at(&self, target: &Path) -> Result<Option<MountEntry>> {
        let target = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
        Ok(self.list()?.into_iter().rev().find(|m| m.target == target))
    }
}

/// The real thing.
#[derive(Debug, Default)]
pub struct SysMounter;

/// Splits CSI `mount_flags` into kernel flags and a filesystem data string.
pub fn parse_flags(flags: &[String]) -> (u64, String) {
    let mut bits = MsFlags::empty();
    let mut data = Vec::new();
    for f in flags.iter().flat_map(|f| f.split(',')).map(str::trim) {
        match f {
            "" | "rw" | "defaults" => {}
            "ro" => bits |= MsFlags::MS_RDONLY,
            "noatime" => bits |= MsFlags::MS_NOATIME,
            "nodiratime" => bits |= MsFlags::MS_NODIRATIME,
            "relatime" => bits |= MsFlags::MS_RELATIME,
            "nosuid" => bits |= MsFlags::MS_NOSUID,
            "nodev" => bits |= MsFlags::MS_NODEV,
            "noexec" => bits |= MsFlags::MS_NOEXEC,
            "sync" => bits |= MsFlags::MS_SYNCHRONOUS,
            other => data.push(other.to_string()),
        }
    }
    (bits.bits(), data.join(","))
}

fn nix_err(context: String) -> impl FnOnce(nix::Error) -> Error {
    move |e| Error::io(context)(e.into())
}

impl Mounter for SysMounter {
    fn mount(&self, source: &str, target: &Path, req: &MountRequest) -> Result<()> {
        let flags = MsFlags::from_bits_truncate(req.flags);
        let data = (!req.data.is_empty()).then_some(req.data.as_str());
        nix::mount::mount(Some(source), target, Some(req.fstype.as_str()), flags, data).map_err(
            nix_err(format!(
                "mount {source} ({}) on {}",
                req.fstype,
                target.display()
            )),
        )
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> Result<()> {
        let ctx = format!("bind {} on {}", source.display(), target.display());
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(nix_err(ctx.clone()))?;
        if read_only {
            let r = nix::mount::mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            );
            if let Err(e) = r {
                // Never leave a writable bind behind a request for a read-only one.
                let _ = nix::mount::umount2(target, MntFlags::MNT_DETACH);
                return Err(nix_err(format!("{ctx} read-only"))(e));
            }
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        nix::mount::umount2(target, MntFlags::empty())
            .map_err(nix_err(format!("unmount {}", target.display())))
    }

    fn list(&self) -> Result<Vec<MountEntry>> {
        let infos = procfs::process::Process::myself()
            .and_then(|p| p.mountinfo())
            .map_err(|e| Error::Io {
                context: "read /proc/self/mountinfo".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(infos
            .into_iter()
            .map(|m| {
                let (major, minor) = m
                    .majmin
                    .split_once(':')
                    .map(|(a, b)| (a.parse().unwrap_or(0), b.parse().unwrap_or(0)))
                    .unwrap_or((0, 0));
                MountEntry {
                    target: m.mount_point.clone(),
                    device: (major, minor),
                    root: PathBuf::from(&m.root),
                    fstype: m.fs_type.clone(),
                    source: m.mount_source.clone().unwrap_or_default(),
                    read_only: m.mount_options.contains_key("ro"),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_split_into_bits_and_data() {
        let (bits, data) = parse_flags(&["noatime".into(), "ro,discard".into(), "nouuid".into()]);
        let bits = MsFlags::from_bits_truncate(bits);
        assert!(bits.contains(MsFlags::MS_NOATIME | MsFlags::MS_RDONLY));
        assert_eq!(data, "discard,nouuid");
    }
}
