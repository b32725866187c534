//! Removing what a `weft up` cluster leaves on the machine, whether it stopped cleanly or its
//! supervisor was killed: the processes in its namespaces and in its pods' cgroups, the mounts
//! under its directory (containerd's overlay snapshots, pod network namespaces, volumes), the
//! loop devices of its volume images, its cgroups in every hierarchy, its bpffs pins and its
//! namespaces. Every step is idempotent.

use std::path::{Path, PathBuf};

/// Every cgroup hierarchy's mount point (v1 controllers and the unified v2 one).
pub fn hierarchies() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
            matches!(fstype, "cgroup" | "cgroup2").then(|| PathBuf::from(path))
        })
        .collect()
}

/// The unified (v2) hierarchy's mount point.
pub fn unified() -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
}

/// Every directory of the cgroup tree at `dir`, deepest first.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(tree(&e.path()));
        }
    }
    if dir.is_dir() {
        out.push(dir.to_owned());
    }
    out
}

/// Kills every process in the cgroup `relative` (and below) of every hierarchy, then removes
/// the cgroups, deepest first.
pub fn remove_cgroups(relative: &str) {
    let relative = relative.trim_start_matches('/');
    for _ in 0..50 {
        let mut alive = false;
        for h in hierarchies() {
            for dir in tree(&h.join(relative)) {
                for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                {
                    alive = true;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        if !alive {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for h in hierarchies() {
        for dir in tree(&h.join(relative)) {
            if let Err(e) = std::fs::remove_dir(&dir) {
                tracing::warn!(cgroup = %dir.display(), error = %e, "removing a cgroup");
            }
        }
    }
}

/// Processes whose command line names `dir` (containerd and its shims, started with paths
/// under it).
pub fn kill_processes_naming(dir: &Path) {
    let needle = dir.display().to_string();
    let me = std::process::id() as i32;
    for pid in std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
    {
        let named = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle));
        if named {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Mount points under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut mounts: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    mounts.dedup();
    mounts
}

/// Unmounts everything under `dir` (lazily, so a busy mount still goes).
pub fn unmount_under(dir: &Path) {
    for m in mounts_under(dir) {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            tracing::warn!(mount = %m.display(), error = %e, "unmounting");
        }
    }
}

/// Detaches the loop devices whose backing file is under `dir` (weft-csi's volume images), with
/// util-linux `losetup`.
pub fn detach_loops_under(dir: &Path) {
    for e in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = backing.trim_end().trim_end_matches(" (deleted)");
        if Path::new(backing).starts_with(dir) {
            let dev = Path::new("/dev").join(&name);
            match std::process::Command::new("losetup")
                .arg("-d")
                .arg(&dev)
                .output()
            {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    tracing::warn!(device = %dev.display(), stderr = %String::from_utf8_lossy(&o.stderr), "detaching a loop device")
                }
                Err(e) => tracing::warn!(error = %e, "running losetup"),
            }
        }
    }
}

/// The task ids (sandboxes and containers) containerd ran from the directory `containerd_dir`
/// (its root and state there, as `weft node` lays them out).
fn containerd_tasks(containerd_dir: &Path) -> Vec<String> {
    [
        "state/io.containerd.runtime.v2.task/k8s.io",
        "root/io.containerd.grpc.v1.cri/sandboxes",
    ]
    .iter()
    .flat_map(|d| {
        std::fs::read_dir(containerd_dir.join(d))
            .into_iter()
            .flatten()
            .flatten()
    })
    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
    .collect()
}

/// containerd 1.6 keeps two things outside its own directories for every pod: its shim's
/// socket (`/run/containerd/s/<sha256 of address/namespace/id>`) and libcni's cached results
/// (`/var/lib/cni/results/<network>-<sandbox id>-<interface>`). A pod stopped one by one leaves
/// neither; one whose containerd and shims were killed (weft down) leaves both. Removes those of
/// every sandbox and task of the containerd in `containerd_dir`.
pub fn forget_containerd_leftovers(containerd_dir: &Path) {
    use sha2::Digest as _;
    let tasks = containerd_tasks(containerd_dir);
    if tasks.is_empty() {
        return;
    }
    let address = containerd_dir.join("containerd.sock");
    for id in &tasks {
        let key = address.join("k8s.io").join(id);
        let hex: String = sha2::Sha256::digest(key.as_os_str().as_encoded_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let _ = std::fs::remove_file(Path::new("/run/containerd/s").join(hex));
    }
    for e in std::fs::read_dir("/var/lib/cni/results")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if tasks.iter().any(|id| name.contains(&format!("-{id}-"))) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
