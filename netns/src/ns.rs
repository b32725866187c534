//! Network namespace handles: create (bind-mounted, like `ip netns add`), open, run code inside,
//! spawn processes inside, remove.

use std::{
    fs::File,
    os::fd::{AsFd, BorrowedFd},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use nix::{
    mount::{MntFlags, MsFlags},
    sched::CloneFlags,
};

use crate::{Error, Result};

/// An open network namespace. Holding it keeps the namespace alive.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

fn sys<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> Error + 'a {
    move |source| Error::Sys {
        op,
        path: path.to_path_buf(),
        source,
    }
}

impl NetNs {
    /// Opens the namespace at `path` (a bind mount such as `/run/netns/x`, or `/proc/PID/ns/net`).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::Sys {
            op: "opening",
            path: path.into(),
            source: io_errno(&e),
        })?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self> {
        Self::open("/proc/thread-self/ns/net")
    }

    /// Creates a new network namespace and bind-mounts it at `dir/name`, so it persists without a
    /// process in it (what `ip netns add` does). `dir` is created if missing. Its loopback is up.
    pub fn create_named(dir: impl AsRef<Path>, name: &str) -> Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::Sys {
            op: "creating",
            path: dir.into(),
            source: io_errno(&e),
        })?;
        let target = dir.join(name);
        File::options()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(|e| Error::Sys {
                op: "creating",
                path: target.clone(),
                source: io_errno(&e),
            })?;
        let t = target.clone();
        let made = std::thread::spawn(move || -> Result<()> {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(sys("unshare for", &t))?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &t,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(sys("bind-mounting", &t))
        })
        .join()
        .map_err(|_| Error::Thread("unshare thread panicked".into()))?;
        if let Err(e) = made {
            let _ = std::fs::remove_file(&target);
            return Err(e);
        }
        let ns = Self::open(&target)?;
        ns.set_loopback_up()?;
        Ok(ns)
    }

    /// Removes a namespace created by [`NetNs::create_named`] (unmount + unlink). Idempotent.
    /// The namespace itself disappears when nothing else holds it.
    pub fn remove_named(path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::Error::EINVAL | nix::Error::ENOENT) => {}
            Err(e) => return Err(sys("unmounting", path)(e)),
        }
        match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Sys {
                op: "removing",
                path: path.into(),
                source: io_errno(&e),
            }),
        }
    }

    /// Another handle to the same namespace.
    pub fn try_clone(&self) -> Result<Self> {
        let file = self.file.try_clone().map_err(|e| Error::Sys {
            op: "duplicating fd of",
            path: self.path.clone(),
            source: io_errno(&e),
        })?;
        Ok(Self {
            file,
            path: self.path.clone(),
        })
    }

    /// The path this handle was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace file descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Whether two handles refer to the same namespace (same inode).
    pub fn same_as(&self, other: &NetNs) -> Result<bool> {
        let a = nix::sys::stat::fstat(self.fd()).map_err(sys("fstat", &self.path))?;
        let b = nix::sys::stat::fstat(other.fd()).map_err(sys("fstat", &other.path))?;
        Ok(a.st_dev == b.st_dev && a.st_ino == b.st_ino)
    }

    /// Runs `f` on a helper thread that has entered this namespace, and returns its result.
    /// Sockets created inside `f` stay in this namespace when used from any thread afterwards.
    pub fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(self.fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(sys("entering", &self.path))?;
                Ok(f())
            })
            .join()
            .map_err(|_| Error::Thread(format!("closure in {} panicked", self.path.display())))?
        })
    }

    /// A [`Command`] whose process starts inside this namespace (only the network namespace
    /// changes; mounts, including bpffs and `/sys`, stay as the caller sees them).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let fd = self.try_clone()?.file;
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the forked child before exec and only calls setns(2), which
        // is async-signal-safe; `fd` is an owned descriptor that stays open until exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        Ok(cmd)
    }

    fn set_loopback_up(&self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Socket)?;
        rt.block_on(async {
            let nl = crate::Netlink::connect(self).await?;
            let lo = nl.link_by_name("lo").await?.ok_or(Error::NotFound {
                kind: "interface",
                name: "lo".into(),
            })?;
            nl.set_up(lo.index).await
        })
    }
}

fn io_errno(e: &std::io::Error) -> nix::Error {
    nix::Error::from_raw(e.raw_os_error().unwrap_or(libc_eio()))
}

const fn libc_eio() -> i32 {
    5
}
