//! Processes and the namespaces and cgroups they live in: killing those of a namespace (what
//! removing one, a test bed's or a cluster `weft up` made, needs first) and starting a command
//! inside a cgroup.

use std::{
    os::unix::{fs::MetadataExt as _, process::CommandExt as _},
    path::Path,
    process::Command,
};

/// Makes `cmd`'s process join the cgroup (v1 or v2 directory) `cgroup` before it execs, so
/// everything it does, cgroup BPF programs' view of its sockets included, happens there.
pub fn join_cgroup_at_exec(cmd: &mut Command, cgroup: &Path) -> std::io::Result<()> {
    let procs = std::fs::File::options()
        .write(true)
        .open(cgroup.join("cgroup.procs"))?;
    // SAFETY: runs in the forked child before exec and only calls write(2) on a descriptor
    // opened before the fork and kept open by the closure, which is async-signal-safe. Writing
    // "0" moves the writing process.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::write(&procs, b"0")
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    Ok(())
}

/// Kills (SIGKILL) every process whose namespace of `kind` (`net`, `mnt`, ...) is the one at
/// `ns` (a bind mount such as `/run/netns/x`), and waits a moment for each to go (reaping the
/// caller's own children), so the namespace can go away with them.
pub fn kill_processes_in(ns: &Path, kind: &str) {
    let Ok(target) = std::fs::metadata(ns) else {
        return;
    };
    let (dev, ino) = (target.dev(), target.ino());
    let me = std::process::id() as i32;
    let mut killed = Vec::new();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            let Ok(m) = std::fs::metadata(p.path().join("ns").join(kind)) else {
                continue;
            };
            if m.dev() == dev && m.ino() == ino {
                let pid = nix::unistd::Pid::from_raw(pid);
                if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).is_ok() {
                    killed.push(pid);
                }
            }
        }
    }
    // Give the kernel a moment to tear them down so the namespace can go away with them.
    for pid in killed {
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            // Our own children stay zombies until reaped.
            let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}
