//! A private mount namespace for storage tests: mounts made inside it are invisible to the rest of
//! the machine and vanish with it, loop devices backing files in its directory are detached at the
//! end, and every process started in it is killed when it is dropped (or when the test process dies).

use std::ffi::OsStr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use crate::{Error, Result, cleanup};

/// A mount namespace held open by a helper process, with a scratch directory.
#[derive(Debug)]
pub struct MountSandbox {
    dir: PathBuf,
    holder: Child,
    /// Mount points of the sandbox's own tmpfs pools (not counted as mounts left behind).
    pools: Vec<PathBuf>,
}

/// Makes a child die with the thread that started it (the test), so nothing outlives a crashed
/// test.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

impl MountSandbox {
    /// Starts the namespace and creates `<tmp>/weft-tb-<pid>-<seq>-<label>`.
    pub fn new(label: &str) -> Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(Error::NotRoot);
        }
        cleanup::remove_stale();
        let seq = crate::LAB_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "{}{}-{seq}-{label}",
            crate::PREFIX,
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sleep", "infinity"])
            .stdin(Stdio::null());
        die_with_parent(&mut cmd);
        let holder = cmd.spawn().map_err(|source| Error::Io {
            what: "starting unshare".into(),
            source,
        })?;
        let sandbox = MountSandbox {
            dir,
            holder,
            pools: Vec::new(),
        };
        // Wait until the holder is inside its own namespace.
        let mine = std::fs::read_link("/proc/self/ns/mnt").ok();
        for _ in 0..500 {
            let theirs = std::fs::read_link(format!("/proc/{}/ns/mnt", sandbox.pid())).ok();
            let exe = std::fs::read_link(format!("/proc/{}/exe", sandbox.pid())).ok();
            if theirs.is_some() && theirs != mine && exe.is_some_and(|e| e.ends_with("sleep")) {
                return Ok(sandbox);
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Err(Error::Io {
            what: "waiting for the mount namespace".into(),
            source: std::io::Error::other("unshare did not start"),
        })
    }

    /// The scratch directory (visible both inside and outside the namespace).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Mounts a tmpfs of `bytes` inside the namespace and returns a directory on it, as seen from
    /// inside. A filesystem of the test's own makes free-space figures exact: what the machine's
    /// other users write elsewhere does not move them. The directory is named after the sandbox, so
    /// a loop device still backed by a file on it after the namespace is gone is recognisable.
    pub fn tmpfs_pool(&mut self, bytes: u64) -> Result<PathBuf> {
        let mount = self.dir.join(format!("pool{}", self.pools.len()));
        let name = self.dir.file_name().unwrap_or_default().to_string_lossy();
        let out = self.sh(&format!(
            "mkdir -p {m} && mount -t tmpfs -o size={bytes},mode=0700 weft-test-pool {m} && mkdir {m}/{name}",
            m = mount.display()
        ))?;
        if !out.status.success() {
            return Err(Error::Io {
                what: format!("mounting a tmpfs pool on {}", mount.display()),
                source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).into_owned()),
            });
        }
        let dir = mount.join(&*name);
        self.pools.push(mount);
        Ok(dir)
    }

    /// The path through which the test (outside the namespace) sees `path` as the namespace does,
    /// including what is on the namespace's own mounts.
    pub fn outside(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(rel)
    }

    /// The holder's pid.
    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// A command that runs `program` inside the namespace; it is killed if the test process dies.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.pid().to_string())
            .arg("-m")
            .arg("--")
            .arg(program);
        die_with_parent(&mut cmd);
        cmd
    }

    /// Runs a shell script inside the namespace.
    pub fn sh(&self, script: &str) -> Result<Output> {
        self.command("sh")
            .args(["-c", script])
            .output()
            .map_err(|source| Error::Io {
                what: format!("running {script:?}"),
                source,
            })
    }

    /// Mount points inside the namespace under the scratch directory.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let info =
            std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid())).unwrap_or_default();
        info.lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(&self.dir) && !self.pools.contains(p))
            .collect()
    }

    /// Loop devices whose backing file is under the scratch directory.
    pub fn loop_devices(&self) -> Vec<PathBuf> {
        cleanup::loop_devices()
            .into_iter()
            .filter(|(_, backing)| backing.starts_with(&self.dir))
            .map(|(dev, _)| dev)
            .collect()
    }
}

impl Drop for MountSandbox {
    fn drop(&mut self) {
        let ns = PathBuf::from(format!("/proc/{}/ns/mnt", self.pid()));
        cleanup::kill_processes_in_ns(&ns, "mnt");
        // Devices backed by files on a tmpfs pool lose their full path with the namespace: detach
        // them while it still resolves (a mounted one is then cleared when its mount goes).
        if !self.pools.is_empty() {
            for d in self.loop_devices() {
                cleanup::detach_loop(&d);
            }
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        // Filesystem volumes' devices clear themselves when the namespace's mounts go; anything
        // else backed by our files is detached here.
        for _ in 0..50 {
            let devs = self.loop_devices();
            if devs.is_empty() {
                break;
            }
            for d in devs {
                cleanup::detach_loop(&d);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        cleanup::remove_dir(&self.dir);
    }
}
