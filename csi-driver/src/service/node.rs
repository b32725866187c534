//! CSI Node service: staging, publishing, stats and expansion on this node.

use std::path::PathBuf;
use std::sync::Arc;

use bpfman_csi::v1 as csi;
use csi::node_service_capability::rpc::Type as Rpc;
use csi::volume_usage::Unit;
use tonic::{Request, Response, Status};

use super::{Backend, Driver, access, required};
use crate::error::Error;
use crate::local::{Access, bind_dir};
use crate::nfs::{self, Location};

/// Node: makes volumes available to workloads on this node.
#[derive(Debug, Clone)]
pub struct NodeService(pub Arc<Driver>);

fn path(value: &str, field: &str) -> Result<PathBuf, Error> {
    let p = PathBuf::from(required(value, field)?);
    if !p.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "{field} must be an absolute path, not {value:?}"
        )));
    }
    Ok(p)
}

fn read_only_mode(cap: Option<&csi::VolumeCapability>) -> bool {
    use csi::volume_capability::access_mode::Mode;
    cap.and_then(|c| c.access_mode.as_ref())
        .is_some_and(|m| m.mode == Mode::SingleNodeReaderOnly as i32)
}

#[tonic::async_trait]
impl csi::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let staging = path(&r.staging_target_path, "staging_target_path")?;
        let backend = Backend::of(&id, &r.volume_context);
        let access = access(r.volume_capability.as_ref(), "volume_capability", backend)?;
        let key = id.clone();
        if backend == Backend::Nfs {
            let loc = Location::from_context(&r.volume_context)?;
            let Access::Mount { flags, .. } = access else {
                return Err(Error::InvalidArgument("nfs volumes are mounted".into()).into());
            };
            let mounter = self.0.nfs_mounter.clone();
            let deadline = self.0.nfs_timeout;
            self.0
                .run(&key, move |_| {
                    nfs::stage(&mounter, &loc, &staging, &flags, deadline)
                })
                .await?;
            return Ok(Response::new(csi::NodeStageVolumeResponse {}));
        }
        self.0
            .run(&key, move |l| l.stage(&id, &staging, &access))
            .await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let staging = path(&r.staging_target_path, "staging_target_path")?;
        let key = id.clone();
        self.0.run(&key, move |l| l.unstage(&id, &staging)).await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let target = path(&r.target_path, "target_path")?;
        let staging = path(&r.staging_target_path, "staging_target_path")?;
        let backend = Backend::of(&id, &r.volume_context);
        let access = access(r.volume_capability.as_ref(), "volume_capability", backend)?;
        let read_only = r.readonly || read_only_mode(r.volume_capability.as_ref());
        let key = id.clone();
        if backend == Backend::Nfs {
            let mounter = self.0.nfs_mounter.clone();
            self.0
                .run(&key, move |_| {
                    let staged = mounter.mounted_at(&staging)?.ok_or_else(|| {
                        Error::FailedPrecondition(format!(
                            "volume {id} is not staged at {}",
                            staging.display()
                        ))
                    })?;
                    bind_dir(&*mounter, &staging, &target, read_only, &|m| {
                        m.device == staged.device && m.root == staged.root
                    })
                })
                .await?;
            return Ok(Response::new(csi::NodePublishVolumeResponse {}));
        }
        self.0
            .run(&key, move |l| {
                l.publish(&id, &staging, &target, read_only, &access)
            })
            .await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let target = path(&r.target_path, "target_path")?;
        let key = id.clone();
        self.0.run(&key, move |l| l.unpublish(&target)).await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let volume_path = path(&r.volume_path, "volume_path")?;
        let stats = if Backend::of(&id, &Default::default()) == Backend::Nfs {
            let mounter = self.0.nfs_mounter.clone();
            self.0
                .query(move |_| nfs::stats(&*mounter, &volume_path))
                .await?
        } else {
            self.0.query(move |l| l.stats(&id, &volume_path)).await?
        };
        let usage = match stats.usage {
            Some(u) => vec![
                csi::VolumeUsage {
                    available: u.available as i64,
                    total: u.total as i64,
                    used: u.used as i64,
                    unit: Unit::Bytes as i32,
                },
                csi::VolumeUsage {
                    available: u.inodes_free as i64,
                    total: u.inodes as i64,
                    used: u.inodes.saturating_sub(u.inodes_free) as i64,
                    unit: Unit::Inodes as i32,
                },
            ],
            None => vec![csi::VolumeUsage {
                available: 0,
                total: stats.capacity_bytes as i64,
                used: 0,
                unit: Unit::Bytes as i32,
            }],
        };
        Ok(Response::new(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(csi::VolumeCondition {
                abnormal: stats.abnormal.is_some(),
                message: stats.abnormal.unwrap_or_else(|| "ok".into()),
            }),
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        let volume_path = path(&r.volume_path, "volume_path")?;
        let backend = Backend::of(&id, &Default::default());
        if r.volume_capability.is_some() {
            access(r.volume_capability.as_ref(), "volume_capability", backend)?;
        }
        if backend == Backend::Nfs {
            // An NFS directory has no size of its own to grow on the node.
            return Ok(Response::new(csi::NodeExpandVolumeResponse {
                capacity_bytes: 0,
            }));
        }
        let key = id.clone();
        let bytes = self
            .0
            .run(&key, move |l| l.node_expand(&id, &volume_path))
            .await?;
        Ok(Response::new(csi::NodeExpandVolumeResponse {
            capacity_bytes: bytes as i64,
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let rpcs = [
            Rpc::StageUnstageVolume,
            Rpc::GetVolumeStats,
            Rpc::ExpandVolume,
            Rpc::VolumeCondition,
            Rpc::SingleNodeMultiWriter,
        ];
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: rpcs
                .into_iter()
                .map(|t| csi::NodeServiceCapability {
                    r#type: Some(csi::node_service_capability::Type::Rpc(
                        csi::node_service_capability::Rpc { r#type: t as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.0.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(self.0.topology()),
        }))
    }
}
