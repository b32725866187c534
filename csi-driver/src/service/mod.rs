//! The CSI gRPC services (Identity, Controller, Node) over the backends: request validation,
//! per-volume serialisation, and translation between CSI messages and backend calls.

mod controller;
mod identity;
mod node;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bpfman_csi::v1 as csi;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessType, MountVolume};

use crate::error::{Error, Result};
use crate::fs::FsType;
use crate::inflight::InFlight;
use crate::local::{Access, LocalBackend};
use crate::mounts::Mounter;
use crate::nfs::NfsBackend;

/// The driver's name, as GetPluginInfo reports it and a CSIDriver object names it.
pub const DRIVER_NAME: &str = "csi.weft.io";
/// The topology key that pins a local volume to its node.
pub const TOPOLOGY_KEY: &str = "topology.weft.io/node";

/// Which services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// Serve the Controller service.
    pub controller: bool,
    /// Serve the Node service.
    pub node: bool,
}

/// The state shared by the three services.
#[derive(Debug)]
pub struct Driver {
    /// This node's ID (NodeGetInfo, topology).
    pub node_id: String,
    /// The local backend.
    pub local: Arc<LocalBackend>,
    /// The nfs backend (controller side).
    pub nfs: Arc<NfsBackend>,
    /// How the node mounts NFS volumes.
    pub nfs_mounter: Arc<dyn Mounter>,
    /// Deadline for NFS operations, including the node's mount call.
    pub nfs_timeout: Duration,
    /// Roles served.
    pub roles: Roles,
    inflight: InFlight,
}

/// Which backend a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Loop-device volumes on this node.
    Local,
    /// Directories on an NFS export.
    Nfs,
}

impl Backend {
    /// The backend of an existing volume: by its ID, or for statically provisioned volumes with
    /// IDs of their own, by `volume_context.backend`.
    pub fn of(id: &str, context: &HashMap<String, String>) -> Backend {
        if crate::ids::parse(id) == Some(crate::ids::Kind::NfsVolume)
            || context.get("backend").is_some_and(|b| b == "nfs")
        {
            Backend::Nfs
        } else {
            Backend::Local
        }
    }
}

impl Driver {
    /// A driver for `node_id` over its backends.
    pub fn new(
        node_id: String,
        local: LocalBackend,
        nfs: NfsBackend,
        nfs_mounter: Arc<dyn Mounter>,
        nfs_timeout: Duration,
        roles: Roles,
    ) -> Arc<Self> {
        Arc::new(Driver {
            node_id,
            local: Arc::new(local),
            nfs: Arc::new(nfs),
            nfs_mounter,
            nfs_timeout,
            roles,
            inflight: InFlight::default(),
        })
    }

    /// Runs async work for `key` with the ID claimed.
    async fn run_async<T>(
        &self,
        key: &str,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T, tonic::Status> {
        let _guard = self.inflight.begin(key)?;
        f.await.map_err(Into::into)
    }

    /// This node's topology segment.
    fn topology(&self) -> csi::Topology {
        csi::Topology {
            segments: HashMap::from([(TOPOLOGY_KEY.to_string(), self.node_id.clone())]),
        }
    }

    /// Runs blocking backend work for `key` (a volume or snapshot ID) on the blocking pool, with the
    /// ID claimed so a concurrent call for the same ID gets `ABORTED`.
    async fn run<T, F>(&self, key: &str, f: F) -> Result<T, tonic::Status>
    where
        T: Send + 'static,
        F: FnOnce(&LocalBackend) -> Result<T> + Send + 'static,
    {
        let guard = self.inflight.begin(key)?;
        let local = self.local.clone();
        let out = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            f(&local)
        })
        .await
        .map_err(|e| tonic::Status::internal(format!("worker failed: {e}")))?;
        out.map_err(Into::into)
    }
}

impl Driver {
    /// Runs blocking read-only backend work on the blocking pool, without claiming an ID.
    async fn query<T, F>(&self, f: F) -> Result<T, tonic::Status>
    where
        T: Send + 'static,
        F: FnOnce(&LocalBackend) -> Result<T> + Send + 'static,
    {
        let local = self.local.clone();
        tokio::task::spawn_blocking(move || f(&local))
            .await
            .map_err(|e| tonic::Status::internal(format!("worker failed: {e}")))?
            .map_err(Into::into)
    }
}

/// Fails with `INVALID_ARGUMENT` naming `field` if `value` is empty.
fn required<'a>(value: &'a str, field: &str) -> Result<&'a str> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    Ok(value)
}

fn fs_type(mount: &MountVolume, field: &str) -> Result<Option<FsType>> {
    if mount.fs_type.is_empty() {
        return Ok(None);
    }
    FsType::parse(&mount.fs_type).map(Some).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{field}.mount.fs_type: {:?} is not one of ext4, xfs, btrfs",
            mount.fs_type
        ))
    })
}

/// Checks one capability for `backend` and turns it into an [`Access`].
fn access(cap: Option<&csi::VolumeCapability>, field: &str, backend: Backend) -> Result<Access> {
    let cap = cap.ok_or_else(|| Error::InvalidArgument(format!("{field} is required")))?;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument(format!("{field}.access_mode is required")))?;
    match Mode::try_from(mode.mode) {
        Ok(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => {}
        Ok(
            Mode::MultiNodeReaderOnly | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter,
        ) if backend == Backend::Nfs => {}
        Ok(m) => {
            return Err(Error::InvalidArgument(format!(
                "{field}.access_mode: {} is not supported by local volumes (they live on one node)",
                m.as_str_name()
            )));
        }
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "{field}.access_mode: unknown mode {}",
                mode.mode
            )));
        }
    }
    if backend == Backend::Nfs {
        return match &cap.access_type {
            Some(AccessType::Mount(m)) if ["", "nfs", "nfs4"].contains(&m.fs_type.as_str()) => {
                Ok(Access::Mount {
                    fs: None,
                    flags: m.mount_flags.clone(),
                })
            }
            Some(AccessType::Mount(m)) => Err(Error::InvalidArgument(format!(
                "{field}.mount.fs_type: nfs volumes are nfs, not {:?}",
                m.fs_type
            ))),
            Some(AccessType::Block(_)) => Err(Error::InvalidArgument(format!(
                "{field}.access_type: nfs volumes have no block access"
            ))),
            None => Err(Error::InvalidArgument(format!(
                "{field}.access_type is required"
            ))),
        };
    }
    match &cap.access_type {
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(m)) => Ok(Access::Mount {
            fs: fs_type(m, field)?,
            flags: m.mount_flags.clone(),
        }),
        None => Err(Error::InvalidArgument(format!(
            "{field}.access_type is required"
        ))),
    }
}

/// Checks a list of capabilities: every one must be supported.
fn accesses(caps: &[csi::VolumeCapability], field: &str, backend: Backend) -> Result<Vec<Access>> {
    if caps.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    caps.iter()
        .enumerate()
        .map(|(i, c)| access(Some(c), &format!("{field}[{i}]"), backend))
        .collect()
}

/// Pagination over an ID-ordered list: entries from `token` on, at most `max` of them, and the
/// token for the rest. A token is the ID of the next entry; one this driver could not have made
/// gets `ABORTED`, as the spec asks.
fn page<T>(
    items: Vec<T>,
    id: impl Fn(&T) -> &str,
    token: &str,
    max: i32,
) -> Result<(Vec<T>, String)> {
    if max < 0 {
        return Err(Error::InvalidArgument(
            "max_entries must not be negative".into(),
        ));
    }
    if !token.is_empty() && crate::ids::parse(token).is_none() {
        return Err(Error::Aborted(format!(
            "starting_token {token:?} is not a token this driver returned"
        )));
    }
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|i| token.is_empty() || id(i) >= token)
        .collect();
    let max = if max == 0 { usize::MAX } else { max as usize };
    let next = if rest.len() > max {
        let tail = rest.split_off(max);
        id(&tail[0]).to_string()
    } else {
        String::new()
    };
    Ok((rest, next))
}

pub use controller::{ControllerService, validate_parameters};
pub use identity::IdentityService;
pub use node::NodeService;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_cover_everything_once() {
        let ids: Vec<String> = (0..7)
            .map(|i| crate::ids::for_name(crate::ids::Kind::LocalVolume, &i.to_string()))
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let (items, next) = page(sorted.clone(), |s| s.as_str(), &token, 3).unwrap();
            assert!(items.len() <= 3);
            seen.extend(items);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, sorted);
        assert!(matches!(
            page(sorted.clone(), |s| s.as_str(), "bogus", 1),
            Err(Error::Aborted(_))
        ));
        assert!(matches!(
            page(sorted, |s| s.as_str(), "", -1),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn capabilities_are_checked() {
        use csi::volume_capability::{AccessMode, BlockVolume};
        let cap = |mode: Mode, t: Option<AccessType>| csi::VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: t,
        };
        let mount = |fs: &str| {
            Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            }))
        };
        assert_eq!(
            access(
                Some(&cap(
                    Mode::SingleNodeWriter,
                    Some(AccessType::Block(BlockVolume {}))
                )),
                "c",
                Backend::Local
            )
            .unwrap(),
            Access::Block
        );
        assert!(matches!(
            access(
                Some(&cap(Mode::SingleNodeWriter, mount("xfs"))),
                "c",
                Backend::Local
            )
            .unwrap(),
            Access::Mount {
                fs: Some(FsType::Xfs),
                ..
            }
        ));
        for bad in [
            cap(Mode::MultiNodeMultiWriter, mount("")),
            cap(Mode::SingleNodeWriter, None),
            cap(Mode::SingleNodeWriter, mount("ntfs")),
        ] {
            let e = access(Some(&bad), "c", Backend::Local).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        }
        assert!(access(None, "volume_capability", Backend::Local).is_err());
        // NFS volumes are shared filesystems: multi-node modes, no block.
        assert!(
            access(
                Some(&cap(Mode::MultiNodeMultiWriter, mount(""))),
                "c",
                Backend::Nfs
            )
            .is_ok()
        );
        assert!(
            access(
                Some(&cap(
                    Mode::SingleNodeWriter,
                    Some(AccessType::Block(BlockVolume {}))
                )),
                "c",
                Backend::Nfs
            )
            .is_err()
        );
    }
}
