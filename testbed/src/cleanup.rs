//! Removing what the test bed creates: namespaces (and the processes in them), bpffs and scratch
//! directories, both for the current lab and for leftovers of earlier runs that crashed.

use std::path::{Path, PathBuf};

use crate::{NETNS_DIR, PREFIX};

/// Where bpffs is (or gets) mounted.
pub(crate) const BPFFS: &str = weft_bpf::bpffs::BPFFS_MOUNT;

/// The pid embedded in a test bed name (`weft-tb-<pid>-...`).
fn owner_pid(name: &str) -> Option<i32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

fn is_stale(name: &str) -> bool {
    match owner_pid(name) {
        Some(pid) => {
            pid != std::process::id() as i32 && !Path::new(&format!("/proc/{pid}")).exists()
        }
        None => false,
    }
}

/// Removes namespaces and directories left by test bed runs whose process no longer exists.
pub(crate) fn remove_stale() {
    if let Ok(entries) = std::fs::read_dir(NETNS_DIR) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_stale(&name) {
                tracing::info!(netns = name, "removing stale test namespace");
                kill_processes_in(&e.path());
                let _ = weft_netns::NetNs::remove_named(e.path());
            }
        }
    }
    if let Some(root) = cgroup2_root()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        for e in entries.flatten() {
            if is_stale(&e.file_name().to_string_lossy()) {
                remove_cgroup(&e.path());
            }
        }
    }
    for (dev, backing) in loop_devices() {
        // A file on a test's tmpfs pool whose namespace is gone shows as `/weft-tb-.../...`.
        let name = backing
            .strip_prefix(std::env::temp_dir())
            .or_else(|_| backing.strip_prefix("/"))
            .ok()
            .and_then(|p| p.components().next())
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        if name.is_some_and(|n| is_stale(&n)) {
            tracing::info!(device = %dev.display(), "detaching stale test loop device");
            detach_loop(&dev);
        }
    }
    for dir in [Path::new(BPFFS).to_path_buf(), std::env::temp_dir()] {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if is_stale(&e.file_name().to_string_lossy()) {
                    remove_dir(&e.path());
                }
            }
        }
    }
}

/// The root of the cgroup2 hierarchy (from /proc/mounts).
pub(crate) fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

/// Kills every process in a cgroup the lab created and removes it.
pub(crate) fn remove_cgroup(dir: &Path) {
    for _ in 0..200 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<i32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if let Err(e) = std::fs::remove_dir(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(cgroup = %dir.display(), error = %e, "removing test cgroup");
    }
}

/// Every attached loop device with its backing file (from sysfs).
pub(crate) fn loop_devices() -> Vec<(PathBuf, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                return None;
            }
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            let backing = backing.trim_end().trim_end_matches(" (deleted)");
            Some((PathBuf::from("/dev").join(name), PathBuf::from(backing)))
        })
        .collect()
}

/// Detaches a loop device (with util-linux `losetup`), logging on failure.
pub(crate) fn detach_loop(dev: &Path) {
    match std::process::Command::new("losetup")
        .arg("-d")
        .arg(dev)
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            tracing::warn!(device = %dev.display(), stderr = %String::from_utf8_lossy(&o.stderr), "detaching loop device")
        }
        Err(e) => tracing::warn!(device = %dev.display(), error = %e, "running losetup"),
    }
}

/// Removes a directory tree, logging instead of failing (cleanup must go on).
pub(crate) fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "removing test directory");
    }
}

/// Kills (SIGKILL) every process whose network namespace is the one at `ns`.
pub(crate) fn kill_processes_in(ns: &Path) {
    weft_netns::kill_processes_in(ns, "net")
}

/// Kills every process whose namespace of `kind` (`net`, `mnt`, ...) is the one at `ns`.
pub(crate) fn kill_processes_in_ns(ns: &Path, kind: &str) {
    weft_netns::kill_processes_in(ns, kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_is_parsed_from_names() {
        assert_eq!(owner_pid("weft-tb-1234-0-node1"), Some(1234));
        assert_eq!(owner_pid("weft-tb-x-0"), None);
        assert_eq!(owner_pid("other-1234"), None);
    }

    #[test]
    fn own_and_foreign_names_are_never_stale() {
        assert!(!is_stale(&format!(
            "weft-tb-{}-0-node0",
            std::process::id()
        )));
        assert!(!is_stale("cni-1234"));
        // pid 1 always exists.
        assert!(!is_stale("weft-tb-1-0-node0"));
    }
}
