//! CSI Controller service: volume and snapshot lifecycle, capacity, expansion.

use std::collections::HashMap;
use std::sync::Arc;

use bpfman_csi::v1 as csi;
use csi::controller_service_capability::rpc::Type as Rpc;
use csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use tonic::{Request, Response, Status};

use super::{Backend, Driver, TOPOLOGY_KEY, accesses, page, required};
use crate::error::Error;
use crate::fs::FsType;
use crate::ids::{self, Kind};
use crate::local::{Access, CreateRequest, SnapshotRecord, Source, VolumeRecord};
use crate::nfs::{self, NfsVolume};

/// Controller: creates, deletes, lists, snapshots and expands volumes.
#[derive(Debug, Clone)]
pub struct ControllerService(pub Arc<Driver>);

/// StorageClass parameters this driver understands.
const PARAM_BACKEND: &str = "backend";
const PARAM_FS_TYPE: &str = "fsType";
/// Prefix of the keys Kubernetes' external-provisioner adds on its own.
const PROVISIONER_PREFIX: &str = "csi.storage.k8s.io/";

fn range(r: Option<&csi::CapacityRange>) -> Result<(u64, u64), Error> {
    let Some(r) = r else { return Ok((0, 0)) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Error::InvalidArgument(
            "capacity_range: sizes must not be negative".into(),
        ));
    }
    Ok((r.required_bytes as u64, r.limit_bytes as u64))
}

fn content_source(src: &Option<csi::VolumeContentSource>) -> Result<Option<Source>, Error> {
    match src.as_ref().and_then(|s| s.r#type.as_ref()) {
        None => Ok(None),
        Some(SourceType::Snapshot(s)) => Ok(Some(Source::Snapshot(
            required(&s.snapshot_id, "volume_content_source.snapshot.snapshot_id")?.into(),
        ))),
        Some(SourceType::Volume(v)) => Ok(Some(Source::Volume(
            required(&v.volume_id, "volume_content_source.volume.volume_id")?.into(),
        ))),
    }
}

fn source_message(src: &Option<Source>) -> Option<csi::VolumeContentSource> {
    src.as_ref().map(|s| csi::VolumeContentSource {
        r#type: Some(match s {
            Source::Snapshot(id) => SourceType::Snapshot(SnapshotSource {
                snapshot_id: id.clone(),
            }),
            Source::Volume(id) => SourceType::Volume(VolumeSource {
                volume_id: id.clone(),
            }),
        }),
    })
}

fn snapshot_message(s: &SnapshotRecord) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created.0,
            nanos: s.created.1,
        }),
        ready_to_use: true,
        group_snapshot_id: String::new(),
    }
}

impl ControllerService {
    fn volume_message(&self, v: &VolumeRecord) -> csi::Volume {
        let mut context = HashMap::from([("backend".to_string(), "local".to_string())]);
        if let Some(fs) = v.fs {
            context.insert("fsType".into(), fs.name().into());
        }
        csi::Volume {
            capacity_bytes: v.capacity_bytes as i64,
            volume_id: v.id.clone(),
            volume_context: context,
            content_source: source_message(&v.source),
            accessible_topology: vec![self.0.topology()],
        }
    }

    /// The volume's health as the controller sees it: its image is there and whole.
    fn condition(&self, v: &VolumeRecord) -> csi::VolumeCondition {
        match std::fs::metadata(self.0.local.image(&v.id)) {
            Ok(m) if m.len() >= v.capacity_bytes => csi::VolumeCondition {
                abnormal: false,
                message: "ok".into(),
            },
            Ok(m) => csi::VolumeCondition {
                abnormal: true,
                message: format!("image is {} bytes, expected {}", m.len(), v.capacity_bytes),
            },
            Err(e) => csi::VolumeCondition {
                abnormal: true,
                message: format!("image unreadable: {e}"),
            },
        }
    }

    fn nfs_volume_message(v: &NfsVolume) -> csi::Volume {
        csi::Volume {
            capacity_bytes: v.capacity_bytes as i64,
            volume_id: v.id.clone(),
            volume_context: v.context(),
            content_source: None,
            // Reachable from every node.
            accessible_topology: vec![],
        }
    }

    async fn create_nfs(
        &self,
        r: csi::CreateVolumeRequest,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        accesses(&r.volume_capabilities, "volume_capabilities", Backend::Nfs)?;
        if r.volume_content_source.is_some() {
            return Err(Error::InvalidArgument(
                "volume_content_source: nfs volumes cannot be made from snapshots or volumes"
                    .into(),
            )
            .into());
        }
        let (required_bytes, limit) = range(r.capacity_range.as_ref())?;
        let capacity = if required_bytes > 0 {
            required_bytes
        } else {
            limit
        };
        let planned = nfs::plan(&r.name, &r.parameters, capacity)?;
        let id = planned.id.clone();
        let vol = self.0.run_async(&id, self.0.nfs.create(planned)).await?;
        tracing::info!(volume = %vol.id, name = %vol.name, dir = %vol.sub_dir, "created nfs volume");
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(Self::nfs_volume_message(&vol)),
        }))
    }

    /// Whether capabilities fit a local volume.
    fn local_verdict(vol: &VolumeRecord, caps: &[csi::VolumeCapability]) -> Result<(), Error> {
        for a in accesses(caps, "volume_capabilities", Backend::Local)? {
            if let Access::Mount { fs, .. } = a {
                match vol.fs {
                    None => {
                        return Err(Error::InvalidArgument(
                            "the volume is a block volume with no filesystem".into(),
                        ));
                    }
                    Some(have) if fs.is_some_and(|f| f != have) => {
                        return Err(Error::InvalidArgument(format!(
                            "the volume carries {}",
                            have.name()
                        )));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Whether a topology requirement lets the volume live on this node.
    fn topology_allows(&self, req: Option<&csi::TopologyRequirement>) -> bool {
        let Some(req) = req else { return true };
        if req.requisite.is_empty() {
            return true;
        }
        req.requisite.iter().any(|t| {
            t.segments
                .get(TOPOLOGY_KEY)
                .is_some_and(|n| *n == self.0.node_id)
        })
    }
}

/// Checks StorageClass parameters as CreateVolume would, without creating anything: the `local`
/// backend's, or the `nfs` backend's for `backend: nfs`.
pub fn validate_parameters(params: &HashMap<String, String>) -> Result<(), Error> {
    if params.get(PARAM_BACKEND).is_some_and(|b| b == "nfs") {
        nfs::plan("validate", params, 0).map(drop)
    } else {
        check_parameters(params).map(drop)
    }
}

fn check_parameters(params: &HashMap<String, String>) -> Result<Option<FsType>, Error> {
    let mut fs = None;
    for (k, v) in params {
        match k.as_str() {
            PARAM_BACKEND if v == "local" => {}
            PARAM_BACKEND if v == "nfs" => {
                return Err(Error::InvalidArgument(
                    "parameters.backend: nfs exports have no capacity this driver tracks; \
                     GetCapacity is for local volumes"
                        .into(),
                ));
            }
            PARAM_BACKEND => {
                return Err(Error::InvalidArgument(format!(
                    "parameters.backend: {v:?} is not a backend of this driver (local, nfs)"
                )));
            }
            PARAM_FS_TYPE => {
                fs = Some(FsType::parse(v).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "parameters.fsType: {v:?} is not one of ext4, xfs, btrfs"
                    ))
                })?);
            }
            k if k.starts_with(PROVISIONER_PREFIX) => {}
            k => {
                return Err(Error::InvalidArgument(format!(
                    "parameters: unknown parameter {k:?} for the local backend (known: backend, fsType)"
                )));
            }
        }
    }
    Ok(fs)
}

#[tonic::async_trait]
impl csi::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = required(&r.name, "name")?.to_string();
        if r.parameters.get(PARAM_BACKEND).is_some_and(|b| b == "nfs") {
            return self.create_nfs(r).await;
        }
        let access = accesses(
            &r.volume_capabilities,
            "volume_capabilities",
            Backend::Local,
        )?;
        let param_fs = check_parameters(&r.parameters)?;
        let (required_bytes, limit) = range(r.capacity_range.as_ref())?;
        let source = content_source(&r.volume_content_source)?;
        if !self.topology_allows(r.accessibility_requirements.as_ref()) {
            return Err(Error::ResourceExhausted(format!(
                "accessibility_requirements: local volumes are made on node {} only, which the \
                 requisite topology excludes",
                self.0.node_id
            ))
            .into());
        }
        // A filesystem is made when some capability mounts the volume; the capability's fs_type
        // wins over the fsType parameter, and ext4 is the default.
        let mut fs = None;
        for a in &access {
            if let Access::Mount { fs: f, .. } = a {
                let f = f.or(param_fs).unwrap_or(FsType::Ext4);
                if fs.is_some_and(|x| x != f) {
                    return Err(Error::InvalidArgument(
                        "volume_capabilities: capabilities ask for different filesystems".into(),
                    )
                    .into());
                }
                fs = Some(f);
            }
        }
        let req = CreateRequest {
            name: name.clone(),
            required: required_bytes,
            limit,
            fs,
            source,
        };
        let id = ids::for_name(Kind::LocalVolume, &name);
        let vol = self.0.run(&id, move |l| l.create_volume(&req)).await?;
        tracing::info!(volume = %vol.id, name = %vol.name, bytes = vol.capacity_bytes, "created volume");
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(self.volume_message(&vol)),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let id = required(&request.get_ref().volume_id, "volume_id")?.to_string();
        let key = id.clone();
        if Backend::of(&id, &HashMap::new()) == Backend::Nfs {
            self.0.run_async(&key, self.0.nfs.delete(&id)).await?;
            return Ok(Response::new(csi::DeleteVolumeResponse {}));
        }
        self.0.run(&key, move |l| l.delete_volume(&id)).await?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "local volumes need no attach step (PUBLISH_UNPUBLISH_VOLUME is not advertised)",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "local volumes need no attach step (PUBLISH_UNPUBLISH_VOLUME is not advertised)",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        if r.volume_capabilities.is_empty() {
            return Err(Error::InvalidArgument("volume_capabilities is required".into()).into());
        }
        let key = id.clone();
        let not_found = || Error::NotFound(format!("volume {key} not found"));
        let verdict = if Backend::of(&id, &HashMap::new()) == Backend::Nfs {
            self.0.nfs.volume(&id)?.ok_or_else(not_found)?;
            accesses(&r.volume_capabilities, "volume_capabilities", Backend::Nfs).map(drop)
        } else {
            let vol = self.0.query(move |l| l.volume(&id)).await?;
            let vol = vol.ok_or_else(not_found)?;
            Self::local_verdict(&vol, &r.volume_capabilities)
        };
        let response = match verdict {
            Ok(()) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: HashMap::new(),
                }),
                message: String::new(),
            },
            Err(e) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            },
        };
        Ok(Response::new(response))
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = request.into_inner();
        let local = self.0.query(|l| l.list_volumes()).await?;
        let mut all: Vec<csi::list_volumes_response::Entry> = local
            .iter()
            .map(|v| csi::list_volumes_response::Entry {
                volume: Some(self.volume_message(v)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: vec![],
                    volume_condition: Some(self.condition(v)),
                }),
            })
            .collect();
        all.extend(
            self.0
                .nfs
                .list()?
                .iter()
                .map(|v| csi::list_volumes_response::Entry {
                    volume: Some(Self::nfs_volume_message(v)),
                    status: Some(csi::list_volumes_response::VolumeStatus {
                        published_node_ids: vec![],
                        volume_condition: Some(csi::VolumeCondition {
                            abnormal: false,
                            message: "ok".into(),
                        }),
                    }),
                }),
        );
        fn id_of(e: &csi::list_volumes_response::Entry) -> &str {
            e.volume.as_ref().map_or("", |v| v.volume_id.as_str())
        }
        all.sort_by(|a, b| id_of(a).cmp(id_of(b)));
        let (entries, next_token) = page(all, id_of, &r.starting_token, r.max_entries)?;
        Ok(Response::new(csi::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = request.into_inner();
        let param_fs = check_parameters(&r.parameters)?;
        let caps = if r.volume_capabilities.is_empty() {
            vec![]
        } else {
            accesses(
                &r.volume_capabilities,
                "volume_capabilities",
                Backend::Local,
            )?
        };
        let elsewhere = r.accessible_topology.as_ref().is_some_and(|t| {
            t.segments
                .get(TOPOLOGY_KEY)
                .is_none_or(|n| *n != self.0.node_id)
        });
        if elsewhere {
            return Ok(Response::new(csi::GetCapacityResponse {
                available_capacity: 0,
                maximum_volume_size: Some(0),
                minimum_volume_size: None,
            }));
        }
        let fs = caps
            .iter()
            .find_map(|a| match a {
                Access::Mount { fs, .. } => Some(fs.or(param_fs).unwrap_or(FsType::Ext4)),
                Access::Block => None,
            })
            .or(param_fs);
        let available = self.0.query(|l| Ok(l.available())).await?;
        let available = available / crate::local::ALIGN * crate::local::ALIGN;
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: available as i64,
            maximum_volume_size: Some(available as i64),
            minimum_volume_size: Some(fs.map_or(crate::local::ALIGN, FsType::min_bytes) as i64),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        let rpcs = [
            Rpc::CreateDeleteVolume,
            Rpc::ListVolumes,
            Rpc::GetCapacity,
            Rpc::CreateDeleteSnapshot,
            Rpc::ListSnapshots,
            Rpc::CloneVolume,
            Rpc::ExpandVolume,
            Rpc::VolumeCondition,
            Rpc::GetVolume,
            Rpc::SingleNodeMultiWriter,
        ];
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: rpcs
                .into_iter()
                .map(|t| csi::ControllerServiceCapability {
                    r#type: Some(csi::controller_service_capability::Type::Rpc(
                        csi::controller_service_capability::Rpc { r#type: t as i32 },
                    )),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let source = required(&r.source_volume_id, "source_volume_id")?.to_string();
        let name = required(&r.name, "name")?.to_string();
        if Backend::of(&source, &HashMap::new()) == Backend::Nfs {
            return Err(Error::InvalidArgument(
                "source_volume_id: snapshots are taken of local volumes only".into(),
            )
            .into());
        }
        if let Some(k) = r
            .parameters
            .keys()
            .find(|k| !k.starts_with("csi.storage.k8s.io/"))
        {
            return Err(Error::InvalidArgument(format!(
                "parameters: unknown parameter {k:?} (snapshots take none)"
            ))
            .into());
        }
        let id = ids::for_name(Kind::Snapshot, &name);
        let snap = self
            .0
            .run(&id, move |l| l.create_snapshot(&name, &source))
            .await?;
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(snapshot_message(&snap)),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let id = required(&request.get_ref().snapshot_id, "snapshot_id")?.to_string();
        let key = id.clone();
        self.0.run(&key, move |l| l.delete_snapshot(&id)).await?;
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        let all = self.0.query(|l| l.list_snapshots()).await?;
        let filtered: Vec<SnapshotRecord> = all
            .into_iter()
            .filter(|s| r.snapshot_id.is_empty() || s.id == r.snapshot_id)
            .filter(|s| r.source_volume_id.is_empty() || s.source_volume_id == r.source_volume_id)
            .collect();
        let (items, next_token) = page(
            filtered,
            |s| s.id.as_str(),
            &r.starting_token,
            r.max_entries,
        )?;
        Ok(Response::new(csi::ListSnapshotsResponse {
            entries: items
                .iter()
                .map(|s| csi::list_snapshots_response::Entry {
                    snapshot: Some(snapshot_message(s)),
                })
                .collect(),
            next_token,
        }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?.to_string();
        if r.capacity_range.is_none() {
            return Err(Error::InvalidArgument("capacity_range is required".into()).into());
        }
        let (required_bytes, limit) = range(r.capacity_range.as_ref())?;
        let key = id.clone();
        if Backend::of(&id, &HashMap::new()) == Backend::Nfs {
            let bytes = self.0.nfs.expand(&id, required_bytes)?;
            return Ok(Response::new(csi::ControllerExpandVolumeResponse {
                capacity_bytes: bytes as i64,
                node_expansion_required: false,
            }));
        }
        let e = self
            .0
            .run(&key, move |l| l.expand_volume(&id, required_bytes, limit))
            .await?;
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: e.capacity_bytes as i64,
            node_expansion_required: e.node_expansion_required,
        }))
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let id = required(&request.get_ref().volume_id, "volume_id")?.to_string();
        let key = id.clone();
        if let Some(v) = self.0.nfs.volume(&id)? {
            return Ok(Response::new(csi::ControllerGetVolumeResponse {
                volume: Some(Self::nfs_volume_message(&v)),
                status: Some(csi::controller_get_volume_response::VolumeStatus {
                    published_node_ids: vec![],
                    volume_condition: Some(csi::VolumeCondition {
                        abnormal: false,
                        message: "ok".into(),
                    }),
                }),
            }));
        }
        let vol = self.0.query(move |l| l.volume(&id)).await?;
        let vol = vol.ok_or_else(|| Error::NotFound(format!("volume {key} not found")))?;
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(self.volume_message(&vol)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: vec![],
                volume_condition: Some(self.condition(&vol)),
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "volumes have no mutable parameters (MODIFY_VOLUME is not advertised)",
        ))
    }
}
