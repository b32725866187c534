//! Finding and killing the processes that live in a namespace: what removing a namespace (a
//! test bed's, or a cluster `weft up` made) needs first.

use std::{os::unix::fs::MetadataExt as _, path::Path};

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
