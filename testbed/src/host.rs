//! One namespace of the lab (node, pod, external client or the underlay itself).

use std::{
    ffi::OsStr,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use weft_netns::NetNs;

use crate::{Error, NETNS_DIR, Result, cleanup};

/// A network namespace owned by a [`crate::Lab`].
#[derive(Debug)]
pub struct Host {
    label: String,
    name: String,
    path: PathBuf,
    ns: NetNs,
    underlay_addr: Option<Ipv4Addr>,
    destroyed: bool,
}

impl Host {
    pub(crate) fn create(name: &str, label: &str) -> Result<Self> {
        let ns = NetNs::create_named(NETNS_DIR, name)?;
        Ok(Self {
            label: label.to_owned(),
            name: name.to_owned(),
            path: Path::new(NETNS_DIR).join(name),
            ns,
            underlay_addr: None,
            destroyed: false,
        })
    }

    pub(crate) fn set_underlay_addr(&mut self, addr: Ipv4Addr) {
        self.underlay_addr = Some(addr);
    }

    /// The label given when it was added (e.g. `node0`, `pod-a`).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The namespace's unique name (under `/run/netns`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace (what a CNI runtime passes as `CNI_NETNS`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace handle.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The address of `eth0` on the underlay, for nodes and external clients.
    pub fn underlay_addr(&self) -> Option<Ipv4Addr> {
        self.underlay_addr
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        Ok(self.ns.run(f)?)
    }

    /// A command that runs inside this namespace (network namespace only).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        Ok(self.ns.command(program)?)
    }

    /// A command that runs inside this namespace and inside the cgroup `cgroup` (it joins the
    /// cgroup before exec, so cgroup BPF programs see all of its sockets).
    pub fn command_in_cgroup(&self, program: impl AsRef<OsStr>, cgroup: &Path) -> Result<Command> {
        let mut cmd = self.command(program)?;
        weft_netns::join_cgroup_at_exec(&mut cmd, cgroup).map_err(|source| Error::Io {
            what: format!("opening {}/cgroup.procs", cgroup.display()),
            source,
        })?;
        Ok(cmd)
    }

    /// Runs a command inside the namespace and returns its output, whatever its exit status.
    pub fn output<I, S>(&self, program: &str, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command(program)?
            .args(args)
            .output()
            .map_err(|source| Error::Io {
                what: format!("running {program} in {}", self.name),
                source,
            })
    }

    /// Runs a command inside the namespace; fails unless it exits 0. Returns its stdout.
    pub fn exec<I, S>(&self, program: &str, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<_> = args
            .into_iter()
            .map(|a| a.as_ref().to_os_string())
            .collect();
        let out = self.output(program, &args)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let line = std::iter::once(program.to_owned())
                .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(" ");
            Err(Error::Command {
                command: format!("{line} (in {})", self.name),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    /// Sends `count` ICMP echo requests to `dst`; true if any reply came back.
    pub fn ping(&self, dst: Ipv4Addr, count: u32) -> Result<bool> {
        let out = self.output(
            "ping",
            [
                "-c",
                &count.to_string(),
                "-i",
                "0.05",
                "-W",
                "1",
                "-q",
                &dst.to_string(),
            ],
        )?;
        Ok(out.status.success())
    }

    /// Writes a sysctl of this namespace, e.g. `net/ipv4/ip_forward`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key);
        self.run(|| std::fs::write(&path, value))?
            .map_err(|source| Error::Io {
                what: format!("writing {} in {}", path.display(), self.name),
                source,
            })
    }

    /// Kills every process in the namespace and removes it. Idempotent.
    pub(crate) fn destroy(&mut self) {
        if std::mem::replace(&mut self.destroyed, true) {
            return;
        }
        cleanup::kill_processes_in(&self.path);
        if let Err(e) = NetNs::remove_named(&self.path) {
            tracing::warn!(netns = %self.path.display(), error = %e, "removing test namespace");
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.destroy();
    }
}
