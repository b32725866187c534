//! PersistentVolumeClaims through weft-csi, the roles kubelet and external-provisioner (in its
//! per-node mode) play for a CSI driver: a pod's unbound claim whose StorageClass names
//! `csi.weft.io` is provisioned on the node the pod runs on (CreateVolume with this node's
//! topology, which is WaitForFirstConsumer by construction), its PersistentVolume created with
//! the node affinity the volume's topology gives and bound to the claim; the volume is staged
//! once per node and published into the pod (NodeStageVolume, NodePublishVolume), with
//! `fsGroup` applied; what a pod has published is recorded in its state directory, so teardown
//! unpublishes it even after an agent restart. PersistentVolumes this node provisioned whose
//! claim is gone are deleted (DeleteVolume) under the Delete reclaim policy, and claims whose
//! request grew are expanded ([`Csi::expand`]).

use std::{
    collections::BTreeMap,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{PersistentVolume, PersistentVolumeClaim, Pod},
    storage::v1::StorageClass,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tonic::transport::Channel;
use weft_csi::csi;

use crate::volumes::VolumeError;

/// The annotation naming the driver that provisioned a PersistentVolume.
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// The annotation naming the node a claim's volume was made on.
const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// The StorageClass annotation marking the default class.
const DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";

/// A published volume, as recorded in the pod's state directory (`csi.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Published {
    /// The CSI volume id.
    pub volume_id: String,
    /// Where it is staged on the node.
    pub staging: PathBuf,
    /// Where it is published for the pod.
    pub target: PathBuf,
}

/// The node's weft-csi.
#[derive(Clone, Debug)]
pub struct Csi {
    node: csi::node_client::NodeClient<Channel>,
    controller: csi::controller_client::ControllerClient<Channel>,
    node_name: String,
    staging_root: PathBuf,
}

fn failed(volume: &str, e: impl std::fmt::Display) -> VolumeError {
    VolumeError::Claim {
        volume: volume.to_owned(),
        reason: e.to_string(),
    }
}

fn capability(fs_type: &str, mode: &str) -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    let mode = match mode {
        "ReadWriteMany" => Mode::MultiNodeMultiWriter,
        "ReadOnlyMany" => Mode::MultiNodeReaderOnly,
        "ReadWriteOncePod" => Mode::SingleNodeSingleWriter,
        _ => Mode::SingleNodeWriter,
    };
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.to_owned(),
            ..Default::default()
        })),
    }
}

impl Csi {
    /// Connects to weft-csi's unix socket; staging paths go under `staging_root`.
    pub async fn connect(
        socket: &Path,
        node_name: &str,
        staging_root: PathBuf,
    ) -> Result<Self, tonic::transport::Error> {
        let p = socket.to_owned();
        let channel = tonic::transport::Endpoint::try_from("http://[::1]:0")?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                tokio::net::UnixStream::connect(p.clone())
            }))
            .await?;
        Ok(Self {
            node: csi::node_client::NodeClient::new(channel.clone()),
            controller: csi::controller_client::ControllerClient::new(channel),
            node_name: node_name.to_owned(),
            staging_root,
        })
    }

    /// What kubelet's CSI plugin registration does: the driver's topology (NodeGetInfo)
    /// becomes labels of the Node, so the scheduler can match volumes' node affinity, and the
    /// CSINode object lists the driver. Failures are logged: volumes then wait.
    pub async fn register(&self, client: &Client, node: &str) {
        let info = match self
            .node
            .clone()
            .node_get_info(csi::NodeGetInfoRequest {})
            .await
        {
            Ok(i) => i.into_inner(),
            Err(e) => {
                tracing::warn!(error = %e.message(), "weft-csi NodeGetInfo");
                return;
            }
        };
        let segments = info
            .accessible_topology
            .map(|t| t.segments)
            .unwrap_or_default();
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
        if let Err(e) = nodes
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": segments}})),
            )
            .await
        {
            tracing::warn!(error = %e, "labelling the node with the driver's topology");
        }
        let csinode = json!({"apiVersion": "storage.k8s.io/v1", "kind": "CSINode",
            "metadata": {"name": node},
            "spec": {"drivers": [{"name": weft_csi::service::DRIVER_NAME, "nodeID": info.node_id,
                                  "topologyKeys": segments.keys().collect::<Vec<_>>()}]}});
        let csinodes: Api<k8s_openapi::api::storage::v1::CSINode> = Api::all(client.clone());
        let result = match serde_json::from_value(csinode.clone()) {
            Ok(typed) => match csinodes.create(&PostParams::default(), &typed).await {
                Err(kube::Error::Api(r)) if r.code == 409 => csinodes
                    .patch(node, &PatchParams::default(), &Patch::Merge(&csinode))
                    .await
                    .map(|_| ()),
                r => r.map(|_| ()),
            },
            Err(e) => {
                tracing::warn!(error = %e, "the CSINode object");
                return;
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "registering the CSI driver on the node");
        }
    }

    /// The PersistentVolume bound to claim `ns/name`, provisioning it on this node first when
    /// the claim is unbound and its class is weft-csi's.
    pub async fn bound_volume(
        &self,
        client: &Client,
        ns: &str,
        name: &str,
        volume: &str,
    ) -> Result<PersistentVolume, VolumeError> {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let pvc = claims
            .get(name)
            .await
            .map_err(|e| failed(volume, format!("persistentvolumeclaim {name:?}: {e}")))?;
        if let Some(pv) = pvc
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|v| !v.is_empty())
        {
            return pvs
                .get(&pv)
                .await
                .map_err(|e| failed(volume, format!("persistentvolume {pv:?}: {e}")));
        }
        let class = self.class_of(client, &pvc, volume).await?;
        if class.provisioner != weft_csi::service::DRIVER_NAME {
            return Err(failed(
                volume,
                format!(
                    "waiting for a volume to be created by the external provisioner {:?}",
                    class.provisioner
                ),
            ));
        }
        let spec = pvc.spec.clone().unwrap_or_default();
        let request =
            spec.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
                .and_then(|q| crate::quantity(&q.0))
                .ok_or_else(|| failed(volume, "the claim requests no storage"))? as i64;
        let modes = spec.access_modes.clone().unwrap_or_default();
        let fs_type = class
            .parameters
            .as_ref()
            .and_then(|p| p.get("csi.storage.k8s.io/fstype").or(p.get("fsType")))
            .cloned()
            .unwrap_or_else(|| "ext4".into());
        let topology = csi::Topology {
            segments: [(
                weft_csi::service::TOPOLOGY_KEY.to_owned(),
                self.node_name.clone(),
            )]
            .into_iter()
            .collect(),
        };
        let pv_name = format!("pvc-{}", pvc.uid().unwrap_or_default());
        let created = self
            .controller
            .clone()
            .create_volume(csi::CreateVolumeRequest {
                name: pv_name.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: request,
                    limit_bytes: 0,
                }),
                volume_capabilities: modes
                    .iter()
                    .map(|m| capability(&fs_type, m))
                    .chain(modes.is_empty().then(|| capability(&fs_type, "")))
                    .collect(),
                parameters: class
                    .parameters
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(k, _)| !k.starts_with("csi.storage.k8s.io/"))
                    .collect(),
                accessibility_requirements: Some(csi::TopologyRequirement {
                    requisite: vec![topology.clone()],
                    preferred: vec![topology],
                }),
                ..Default::default()
            })
            .await
            .map_err(|e| failed(volume, format!("provisioning: {}", e.message())))?
            .into_inner()
            .volume
            .ok_or_else(|| failed(volume, "the driver returned no volume"))?;
        let node_terms: Vec<serde_json::Value> = created
            .accessible_topology
            .iter()
            .map(|t| {
                json!({"matchExpressions": t.segments.iter().map(|(k, v)| json!({"key": k, "operator": "In", "values": [v]})).collect::<Vec<_>>()})
            })
            .collect();
        let mut pv = json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "annotations": {PROVISIONED_BY: weft_csi::service::DRIVER_NAME, SELECTED_NODE: self.node_name}},
            "spec": {
                "capacity": {"storage": created.capacity_bytes.max(request).to_string()},
                "accessModes": if modes.is_empty() { vec!["ReadWriteOnce".to_owned()] } else { modes.clone() },
                "persistentVolumeReclaimPolicy": class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
                "storageClassName": class.name_any(),
                "volumeMode": "Filesystem",
                "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": ns, "name": name, "uid": pvc.uid()},
                "csi": {"driver": weft_csi::service::DRIVER_NAME, "volumeHandle": created.volume_id, "fsType": fs_type,
                        "volumeAttributes": created.volume_context},
            },
        });
        if !node_terms.is_empty() {
            pv["spec"]["nodeAffinity"] = json!({"required": {"nodeSelectorTerms": node_terms}});
        }
        let pv: PersistentVolume = serde_json::from_value(pv).map_err(|e| failed(volume, e))?;
        let pv = match pvs.create(&PostParams::default(), &pv).await {
            Ok(pv) => pv,
            Err(kube::Error::Api(r)) if r.code == 409 => {
                pvs.get(&pv_name).await.map_err(|e| failed(volume, e))?
            }
            Err(e) => {
                return Err(failed(
                    volume,
                    format!("creating the persistentvolume: {e}"),
                ));
            }
        };
        let bound = json!({"phase": "Bound"});
        let _ = pvs
            .patch_status(
                &pv_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": bound})),
            )
            .await;
        claims
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {SELECTED_NODE: self.node_name,
                                                                 "pv.kubernetes.io/bind-completed": "yes"}},
                                     "spec": {"volumeName": pv_name}})),
            )
            .await
            .map_err(|e| failed(volume, format!("binding the claim: {e}")))?;
        let capacity = pv
            .spec
            .as_ref()
            .and_then(|s| s.capacity.clone())
            .unwrap_or_default();
        claims
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Bound", "accessModes": pv.spec.as_ref().and_then(|s| s.access_modes.clone()),
                                                "capacity": capacity}})),
            )
            .await
            .map_err(|e| failed(volume, format!("binding the claim: {e}")))?;
        Ok(pv)
    }

    async fn class_of(
        &self,
        client: &Client,
        pvc: &PersistentVolumeClaim,
        volume: &str,
    ) -> Result<StorageClass, VolumeError> {
        let classes: Api<StorageClass> = Api::all(client.clone());
        match pvc.spec.as_ref().and_then(|s| s.storage_class_name.clone()) {
            Some(c) if !c.is_empty() => classes
                .get(&c)
                .await
                .map_err(|e| failed(volume, format!("storageclass {c:?}: {e}"))),
            _ => classes
                .list(&ListParams::default())
                .await
                .map_err(|e| failed(volume, e))?
                .items
                .into_iter()
                .find(|c| c.annotations().get(DEFAULT_CLASS).map(String::as_str) == Some("true"))
                .ok_or_else(|| {
                    failed(
                        volume,
                        "the claim names no storage class and there is no default one",
                    )
                }),
        }
    }

    /// Stages (once per node) and publishes `pv` at `target` for `pod`, applying its fsGroup.
    pub async fn publish(
        &self,
        pod: &Pod,
        pv: &PersistentVolume,
        target: &Path,
        readonly: bool,
        volume: &str,
    ) -> Result<Published, VolumeError> {
        let source = pv
            .spec
            .as_ref()
            .and_then(|s| s.csi.clone())
            .filter(|c| c.driver == weft_csi::service::DRIVER_NAME)
            .ok_or_else(|| {
                failed(
                    volume,
                    format!(
                        "persistentvolume {} is not a weft-csi volume",
                        pv.name_any()
                    ),
                )
            })?;
        let mode = pv
            .spec
            .as_ref()
            .and_then(|s| s.access_modes.as_ref())
            .and_then(|m| m.first().cloned())
            .unwrap_or_default();
        let cap = capability(source.fs_type.as_deref().unwrap_or("ext4"), &mode);
        let staging = self.staging_root.join(pv.name_any());
        let io = |p: &Path, e| VolumeError::Io {
            volume: volume.to_owned(),
            path: p.to_owned(),
            source: e,
        };
        std::fs::create_dir_all(&staging).map_err(|e| io(&staging, e))?;
        let context = source.volume_attributes.clone().unwrap_or_default();
        let mut node = self.node.clone();
        node.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: source.volume_handle.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(cap.clone()),
            volume_context: context.clone().into_iter().collect(),
            ..Default::default()
        })
        .await
        .map_err(|e| {
            failed(
                volume,
                format!("MountVolume.MountDevice failed: {}", e.message()),
            )
        })?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        node.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: source.volume_handle.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(cap),
            readonly,
            volume_context: context.into_iter().collect(),
            ..Default::default()
        })
        .await
        .map_err(|e| failed(volume, format!("MountVolume.SetUp failed: {}", e.message())))?;
        if let Some(group) = pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .and_then(|s| s.fs_group)
            && !readonly
        {
            set_group(target, group as u32).map_err(|e| io(target, e))?;
        }
        Ok(Published {
            volume_id: source.volume_handle,
            staging,
            target: target.to_owned(),
        })
    }

    /// Unpublishes `p` and unstages it when nothing else on the node uses it.
    pub async fn unpublish(&self, p: &Published) -> Result<(), tonic::Status> {
        let mut node = self.node.clone();
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: p.volume_id.clone(),
            target_path: p.target.display().to_string(),
        })
        .await?;
        match node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: p.volume_id.clone(),
                staging_target_path: p.staging.display().to_string(),
            })
            .await
        {
            // Still published for another pod: it stays staged.
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Ok(()),
            Err(s) => Err(s),
            Ok(_) => {
                let _ = std::fs::remove_dir(&p.staging);
                Ok(())
            }
        }
    }

    /// The node's periodic volume work, on one listing of the PersistentVolumes this node
    /// provisioned: reclaiming released ones ([`Csi::reclaim`]) and expanding grown claims
    /// ([`Csi::expand`]).
    pub async fn tend(&self, client: &Client) {
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let Ok(list) = pvs.list(&ListParams::default()).await else {
            return;
        };
        let ours: Vec<PersistentVolume> = list
            .items
            .into_iter()
            .filter(|pv| {
                pv.annotations().get(PROVISIONED_BY).map(String::as_str)
                    == Some(weft_csi::service::DRIVER_NAME)
                    && pv.annotations().get(SELECTED_NODE) == Some(&self.node_name)
            })
            .collect();
        self.reclaim(client, &ours).await;
        self.expand(client, &ours).await;
    }

    /// Deletes the volumes among `ours` (this node's) whose claim is gone (reclaim policy
    /// Delete), and their PersistentVolumes.
    async fn reclaim(&self, client: &Client, ours: &[PersistentVolume]) {
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        for pv in ours {
            let spec = pv.spec.clone().unwrap_or_default();
            if spec.persistent_volume_reclaim_policy.as_deref() != Some("Delete") {
                continue;
            }
            let Some(claim) = spec.claim_ref else {
                continue;
            };
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(
                client.clone(),
                claim.namespace.as_deref().unwrap_or("default"),
            );
            let gone = match claims.get_opt(claim.name.as_deref().unwrap_or("")).await {
                Ok(None) => true,
                Ok(Some(c)) => c.uid() != claim.uid,
                Err(_) => false,
            };
            if !gone {
                continue;
            }
            let Some(handle) = spec.csi.map(|c| c.volume_handle) else {
                continue;
            };
            match self
                .controller
                .clone()
                .delete_volume(csi::DeleteVolumeRequest {
                    volume_id: handle.clone(),
                    ..Default::default()
                })
                .await
            {
                Ok(_) => {
                    tracing::info!(pv = %pv.name_any(), volume = %handle, "deleted the volume of a released claim");
                    let _ = pvs.delete(&pv.name_any(), &DeleteParams::default()).await;
                }
                // Still in use (a pod being torn down): next time.
                Err(s) => tracing::debug!(pv = %pv.name_any(), error = %s.message(), "reclaiming"),
            }
        }
    }
}

impl Csi {
    /// Volume expansion, as external-resizer and kubelet do it together: a bound claim of a
    /// StorageClass with `allowVolumeExpansion` whose request grew past its volume, on a volume
    /// this node provisioned, is expanded (ControllerExpandVolume) and its PersistentVolume's
    /// capacity raised; the claim then shows `FileSystemResizePending` until the filesystem has
    /// grown on the node (NodeExpandVolume on the staged volume — at once when a pod uses it,
    /// else when one next stages it), when `status.capacity` becomes the new size.
    async fn expand(&self, client: &Client, ours: &[PersistentVolume]) {
        if ours.is_empty() {
            return;
        }
        let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
        let Ok(list) = claims.list(&ListParams::default()).await else {
            return;
        };
        let by_name: BTreeMap<String, &PersistentVolume> =
            ours.iter().map(|pv| (pv.name_any(), pv)).collect();
        for pvc in list.items {
            let Some(pv) = pvc
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.as_ref())
                .and_then(|n| by_name.get(n))
            else {
                continue;
            };
            if let Err(e) = self.expand_claim(client, &pvc, pv).await {
                tracing::warn!(claim = %pvc.name_any(), error = %e, "expanding a volume");
            }
        }
    }

    async fn expand_claim(
        &self,
        client: &Client,
        pvc: &PersistentVolumeClaim,
        pv: &PersistentVolume,
    ) -> Result<(), String> {
        let storage = |q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>| {
            q.and_then(|q| crate::quantity(&q.0))
                .map_or(0, |b| b as u64)
        };
        let request = pvc
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .cloned();
        let requested = storage(request.as_ref());
        // Capacities are written as the claim asked (`128Mi`) when the volume is that size.
        let written = |bytes: u64| match &request {
            Some(q) if bytes == requested => q.0.clone(),
            _ => bytes.to_string(),
        };
        let pv_spec = pv.spec.clone().unwrap_or_default();
        let mut volume_bytes = storage(pv_spec.capacity.as_ref().and_then(|c| c.get("storage")));
        let status = pvc.status.clone().unwrap_or_default();
        let claim_bytes = storage(status.capacity.as_ref().and_then(|c| c.get("storage")));
        let Some(source) = pv_spec.csi.clone() else {
            return Ok(());
        };
        let ns = pvc.namespace().unwrap_or_default();
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let set_status = |status: &serde_json::Value| {
            let (claims, name, patch) = (claims.clone(), pvc.name_any(), status.clone());
            async move {
                claims
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(drop)
                    .map_err(|e| format!("updating the claim's status: {e}"))
            }
        };
        if requested > volume_bytes {
            let class = self.class_of(client, pvc, &pvc.name_any()).await.ok();
            if class.is_none_or(|c| c.allow_volume_expansion != Some(true)) {
                return Ok(());
            }
            let answer = self
                .controller
                .clone()
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: source.volume_handle.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: requested as i64,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("ControllerExpandVolume: {}", e.message()))?
                .into_inner();
            volume_bytes = u64::try_from(answer.capacity_bytes).unwrap_or(requested);
            let capacity = json!({"spec": {"capacity": {"storage": written(volume_bytes)}}});
            pvs.patch(
                &pv.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&capacity),
            )
            .await
            .map_err(|e| format!("updating the persistentvolume's capacity: {e}"))?;
            // Grown offline by the controller (an unused ext4): nothing left for the node.
            let pending = if answer.node_expansion_required {
                json!({"status": {"conditions": [{
                    "type": "FileSystemResizePending",
                    "status": "True",
                    "message": "Waiting for user to (re-)start a pod to finish file system resize of volume on node.",
                }]}})
            } else {
                json!({"status": {"capacity": {"storage": written(volume_bytes)}, "conditions": []}})
            };
            set_status(&pending).await?;
            tracing::info!(claim = %pvc.name_any(), bytes = volume_bytes, "volume expanded");
            if !answer.node_expansion_required {
                return Ok(());
            }
        }
        if volume_bytes <= claim_bytes {
            return Ok(());
        }
        // The filesystem grows where the volume is staged; unstaged, it grows when next staged.
        let staging = self.staging_root.join(pv.name_any());
        if !staging.exists() {
            return Ok(());
        }
        let mode = pv_spec
            .access_modes
            .as_ref()
            .and_then(|m| m.first().cloned())
            .unwrap_or_default();
        self.node
            .clone()
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: source.volume_handle.clone(),
                volume_path: staging.display().to_string(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(capability(
                    source.fs_type.as_deref().unwrap_or("ext4"),
                    &mode,
                )),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: volume_bytes as i64,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("NodeExpandVolume: {}", e.message()))?;
        let done = json!({"status": {
            "capacity": {"storage": written(volume_bytes)},
            "conditions": [],
        }});
        set_status(&done).await?;
        tracing::info!(claim = %pvc.name_any(), bytes = volume_bytes, "filesystem expanded");
        Ok(())
    }
}

/// kubelet's fsGroup ownership change: every file's group becomes `group`, readable and
/// writable by it, directories setgid so new files inherit the group.
fn set_group(dir: &Path, group: u32) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    std::os::unix::fs::lchown(dir, None, Some(group))?;
    let mut mode = meta.mode() & 0o7777;
    mode |= 0o060;
    if meta.is_dir() {
        mode |= 0o2010;
        for e in std::fs::read_dir(dir)? {
            set_group(&e?.path(), group)?;
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

/// The record of what a pod published (`<pod dir>/csi.json`).
pub fn record_path(pod_dir: &Path) -> PathBuf {
    pod_dir.join("csi.json")
}

/// What the pod whose state directory is `pod_dir` has published.
pub fn recorded(pod_dir: &Path) -> Vec<Published> {
    std::fs::read(record_path(pod_dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Records what the pod published.
pub fn record(pod_dir: &Path, published: &[Published]) -> std::io::Result<()> {
    std::fs::create_dir_all(pod_dir)?;
    let mut all: BTreeMap<PathBuf, Published> = recorded(pod_dir)
        .into_iter()
        .map(|p| (p.target.clone(), p))
        .collect();
    for p in published {
        all.insert(p.target.clone(), p.clone());
    }
    let list: Vec<&Published> = all.values().collect();
    std::fs::write(
        record_path(pod_dir),
        serde_json::to_vec(&list).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_accumulate_by_target() {
        let dir = std::env::temp_dir().join(format!("weft-csi-record-{}", std::process::id()));
        let p = |t: &str| Published {
            volume_id: "local-1".into(),
            staging: "/s".into(),
            target: PathBuf::from(t),
        };
        record(&dir, &[p("/a")]).unwrap();
        record(&dir, &[p("/b"), p("/a")]).unwrap();
        assert_eq!(recorded(&dir), vec![p("/a"), p("/b")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn access_modes_map_to_csi_modes() {
        use csi::volume_capability::access_mode::Mode;
        let m = |s: &str| capability("ext4", s).access_mode.unwrap().mode;
        assert_eq!(m("ReadWriteOnce"), Mode::SingleNodeWriter as i32);
        assert_eq!(m("ReadWriteOncePod"), Mode::SingleNodeSingleWriter as i32);
        assert_eq!(m("ReadWriteMany"), Mode::MultiNodeMultiWriter as i32);
    }
}
