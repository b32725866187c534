//! Attaching the socket-level load balancer to a cgroup (v2): connect4, sendmsg4, recvmsg4 and
//! getpeername4, every link pinned so the programs keep working while the agent is down. When the
//! agent starts again and a pinned link exists, the freshly loaded program replaces the old one
//! atomically (BPF_LINK_UPDATE), so an upgrade never leaves the hook empty.
//!
//! In a cluster the cgroup is the root of the cgroup2 hierarchy, covering every pod and the node
//! itself; tests use a child cgroup they create.

use std::{
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use weft_proxy_common::names;

use crate::{
    Error, Result,
    bpffs::{PinLayout, unpin_and_detach},
};

const HOOKS: [(&str, &str); 4] = [
    (names::PROG_CONNECT4, "connect4"),
    (names::PROG_SENDMSG4, "sendmsg4"),
    (names::PROG_RECVMSG4, "recvmsg4"),
    (names::PROG_GETPEERNAME4, "getpeername4"),
];

/// The root of the cgroup2 hierarchy on this machine (from /proc/mounts).
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

fn link_names(cgroup: &Path) -> Result<Vec<(&'static str, String)>> {
    let ino = std::fs::metadata(cgroup)
        .map_err(|source| Error::Io {
            op: "reading",
            path: cgroup.to_path_buf(),
            source,
        })?
        .ino();
    Ok(HOOKS
        .iter()
        .map(|(prog, hook)| (*prog, format!("socklb-{ino}-{hook}")))
        .collect())
}

/// Attaches (or upgrades in place) the four programs on `cgroup`.
pub fn attach(ebpf: &mut Ebpf, layout: &PinLayout, cgroup: &Path) -> Result<()> {
    let cg = std::fs::File::open(cgroup).map_err(|source| Error::Io {
        op: "opening cgroup",
        path: cgroup.to_path_buf(),
        source,
    })?;
    for (prog_name, link_name) in link_names(cgroup)? {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(prog_name)
            .ok_or(Error::Missing {
                kind: "program",
                name: prog_name,
            })?
            .try_into()
            .map_err(|source| Error::Program {
                name: prog_name,
                source,
            })?;
        prog.load().map_err(|source| Error::Program {
            name: prog_name,
            source,
        })?;
        let pin = layout.link(&link_name);
        if let Ok(link) = weft_bpf::sys::obj_get(&pin) {
            let fd = prog.fd().map_err(|source| Error::Program {
                name: prog_name,
                source,
            })?;
            match weft_bpf::sys::link_update(link.as_fd(), fd.as_fd()) {
                Ok(()) => {
                    tracing::info!(program = prog_name, cgroup = %cgroup.display(), "upgraded in place");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(program = prog_name, error = %e, "pinned link unusable; attaching afresh");
                    unpin_and_detach(&pin)?;
                }
            }
        }
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|source| Error::Program {
                name: prog_name,
                source,
            })?;
        let link = prog.take_link(id).map_err(|source| Error::Program {
            name: prog_name,
            source,
        })?;
        let link = FdLink::try_from(link).map_err(|e| Error::Link {
            path: pin.clone(),
            message: e.to_string(),
        })?;
        link.pin(&pin).map_err(|e| Error::Link {
            path: pin.clone(),
            message: e.to_string(),
        })?;
        tracing::info!(program = prog_name, cgroup = %cgroup.display(), "attached");
    }
    Ok(())
}

/// Detaches the four programs from `cgroup` and removes their pins. Idempotent.
pub fn detach(layout: &PinLayout, cgroup: &Path) -> Result<()> {
    for (_, link_name) in link_names(cgroup)? {
        unpin_and_detach(&layout.link(&link_name))?;
    }
    Ok(())
}

/// Process ids in `cgroup` and every cgroup below it.
fn pids_under(cgroup: &Path, out: &mut Vec<i32>) {
    if let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
        out.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(children) = std::fs::read_dir(cgroup) {
        for c in children.flatten() {
            if c.file_type().is_ok_and(|t| t.is_dir()) {
                pids_under(&c.path(), out);
            }
        }
    }
}

/// Destroys the UDP sockets that the socket load balancer connected to a backend that has
/// left its service (`gone`: frontend address and port → backend address and port), in every
/// network namespace of the processes under `cgroup`. A connected UDP socket never passes the
/// load balancer again, so without this it would keep sending to the departed backend (a
/// resolver's DNS queries into the void); destroyed, its owner gets ECONNABORTED and opens a new
/// one, which gets a live backend. Only sockets the load balancer itself translated (found in
/// its reverse map under the same frontend) are touched. Returns how many were destroyed.
pub fn terminate_udp(
    layout: &PinLayout,
    cgroup: &Path,
    gone: &std::collections::BTreeSet<(std::net::SocketAddrV4, std::net::SocketAddrV4)>,
) -> Result<usize> {
    use aya::maps::{HashMap, Map, MapData};
    use weft_proxy_common::{Be16, Be32, SockRevKey, SockRevValue};
    if gone.is_empty() {
        return Ok(0);
    }
    let path = layout.map(names::MAP_SOCK_REVNAT);
    let map_err = |source| Error::Map {
        name: names::MAP_SOCK_REVNAT.into(),
        source,
    };
    let revnat: HashMap<MapData, SockRevKey, SockRevValue> =
        HashMap::try_from(Map::LruHashMap(MapData::from_pin(&path).map_err(map_err)?))
            .map_err(map_err)?;
    let backends: std::collections::BTreeSet<std::net::SocketAddrV4> =
        gone.iter().map(|(_, b)| *b).collect();
    let mut pids = Vec::new();
    pids_under(cgroup, &mut pids);
    let mut seen = std::collections::BTreeSet::new();
    let mut destroyed = 0;
    for pid in pids {
        let ns_path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        let Ok(meta) = std::fs::metadata(&ns_path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let Ok(ns) = weft_netns::NetNs::open(&ns_path) else {
            continue;
        };
        let victims = ns.run(|| -> std::io::Result<usize> {
            let mut n = 0;
            for s in weft_netns::sockdiag::udp4_sockets()? {
                if !backends.contains(&s.dst) {
                    continue;
                }
                let key = SockRevKey {
                    cookie: s.cookie,
                    addr: Be32(u32::from(*s.dst.ip()).to_be()),
                    port: Be16(s.dst.port().to_be()),
                    _pad: 0,
                };
                let Ok(front) = revnat.get(&key, 0) else {
                    continue;
                };
                let front = std::net::SocketAddrV4::new(
                    u32::from_be(front.addr.0).into(),
                    u16::from_be(front.port.0),
                );
                if gone.contains(&(front, s.dst)) {
                    weft_netns::sockdiag::destroy(&s)?;
                    n += 1;
                }
            }
            Ok(n)
        });
        match victims {
            Ok(Ok(n)) => destroyed += n,
            Ok(Err(e)) => tracing::warn!(pid, error = %e, "terminating UDP sockets"),
            Err(e) => tracing::warn!(pid, error = %e, "entering a network namespace"),
        }
    }
    Ok(destroyed)
}
