//! Pod volumes, made on the node before a pod's containers are created and mounted into them
//! through CRI mounts: `emptyDir` (a directory of the pod's), `configMap` and `secret` (their
//! keys as files, `items` and `defaultMode` honoured), `downwardAPI` (the pod's name,
//! namespace, uid, labels and annotations), `projected` (the three together), `hostPath`, and
//! `persistentVolumeClaim` through weft-csi ([`crate::csi`]). Everything lives under
//! `<state dir>/<pod uid>/volumes/` and goes with the pod; a persistent volume is unpublished
//! first, and a pod directory that still has a mount under it is never removed.

use std::{
    collections::{BTreeMap, HashMap},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, Volume},
};
use kube::{Api, Client, ResourceExt};

/// A volume could not be made.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// A ConfigMap or Secret it needs is missing (or the API failed).
    #[error("{kind} {name:?} for volume {volume:?}: {reason}")]
    Source {
        /// ConfigMap or Secret.
        kind: &'static str,
        /// Its name.
        name: String,
        /// The volume.
        volume: String,
        /// Why.
        reason: String,
    },
    /// Writing the files failed.
    #[error("volume {volume:?} at {path}: {source}")]
    Io {
        /// The volume.
        volume: String,
        /// Where.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A persistentVolumeClaim could not be provisioned, bound or mounted.
    #[error("volume {volume:?}: {reason}")]
    Claim {
        /// The volume.
        volume: String,
        /// Why.
        reason: String,
    },
    /// A kind of volume the node does not make yet.
    #[error("volume {0:?}: this kind of volume is not supported by weft node yet")]
    Unsupported(String),
}

/// The directory of the pod `uid`'s volumes.
pub fn pod_dir(state_dir: &Path, uid: &str) -> PathBuf {
    state_dir.join(uid)
}

fn write_files(
    dir: &Path,
    volume: &str,
    files: &BTreeMap<String, Vec<u8>>,
    mode: u32,
) -> Result<(), VolumeError> {
    let io = |path: &Path, source| VolumeError::Io {
        volume: volume.to_owned(),
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    for (rel, bytes) in files {
        // Paths come from the API: no escaping the volume.
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            continue;
        }
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io(&path, e))?;
    }
    Ok(())
}

fn select(
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
) -> BTreeMap<String, Vec<u8>> {
    match items {
        None => data,
        Some(items) => items
            .iter()
            .filter_map(|i| data.get(&i.key).map(|v| (i.path.clone(), v.clone())))
            .collect(),
    }
}

fn downward(pod: &Pod, items: &[DownwardAPIVolumeFile]) -> BTreeMap<String, Vec<u8>> {
    let map = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| format!("{k}={v:?}\n"))
            .collect::<String>()
    };
    items
        .iter()
        .filter_map(|i| {
            let value = match i.field_ref.as_ref()?.field_path.as_str() {
                "metadata.name" => pod.name_any(),
                "metadata.namespace" => pod.namespace().unwrap_or_default(),
                "metadata.uid" => pod.uid().unwrap_or_default(),
                "metadata.labels" => map(pod.labels()),
                "metadata.annotations" => map(pod.annotations()),
                "spec.nodeName" => pod.spec.as_ref()?.node_name.clone().unwrap_or_default(),
                _ => return None,
            };
            Some((i.path.clone(), value.into_bytes()))
        })
        .collect()
}

/// The data of a ConfigMap or Secret (`None` from `get` when it does not exist), as files.
async fn source<K, F>(
    client: &Client,
    ns: &str,
    name: &str,
    volume: &str,
    optional: bool,
    kind: &'static str,
    files: F,
) -> Result<BTreeMap<String, Vec<u8>>, VolumeError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    F: FnOnce(K) -> BTreeMap<String, Vec<u8>>,
{
    let failed = |reason: String| VolumeError::Source {
        kind,
        name: name.to_owned(),
        volume: volume.to_owned(),
        reason,
    };
    match Api::<K>::namespaced(client.clone(), ns).get_opt(name).await {
        Ok(Some(o)) => Ok(files(o)),
        Ok(None) if optional => Ok(BTreeMap::new()),
        Ok(None) => Err(failed(format!("{kind} {name:?} not found"))),
        Err(e) => Err(failed(e.to_string())),
    }
}

/// A ConfigMap's keys (data and binaryData) as files.
pub(crate) async fn config_map(
    client: &Client,
    ns: &str,
    name: &str,
    volume: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>, VolumeError> {
    source(
        client,
        ns,
        name,
        volume,
        optional,
        "configmap",
        |cm: ConfigMap| {
            let mut out: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            out.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, ByteString(v))| (k, v)),
            );
            out
        },
    )
    .await
}

/// A Secret's keys (data and stringData) as files.
pub(crate) async fn secret(
    client: &Client,
    ns: &str,
    name: &str,
    volume: &str,
    optional: bool,
) -> Result<BTreeMap<String, Vec<u8>>, VolumeError> {
    source(client, ns, name, volume, optional, "secret", |s: Secret| {
        let mut out: BTreeMap<String, Vec<u8>> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, ByteString(v))| (k, v))
            .collect();
        out.extend(
            s.string_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes())),
        );
        out
    })
    .await
}

fn mode(m: Option<i32>) -> u32 {
    u32::try_from(m.unwrap_or(0o644)).unwrap_or(0o644)
}

/// Makes every volume of `pod` under `state_dir` and returns where each is on the node.
pub async fn prepare(
    client: &Client,
    pod: &Pod,
    state_dir: &Path,
    csi: Option<&crate::csi::Csi>,
) -> Result<HashMap<String, PathBuf>, VolumeError> {
    let uid = pod.uid().unwrap_or_default();
    let ns = pod.namespace().unwrap_or_default();
    let base = pod_dir(state_dir, &uid).join("volumes");
    let mut out = HashMap::new();
    let volumes: Vec<Volume> = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for v in volumes {
        let dir = base.join(&v.name);
        let io = |path: &Path, source| VolumeError::Io {
            volume: v.name.clone(),
            path: path.to_owned(),
            source,
        };
        if let Some(c) = &v.persistent_volume_claim {
            let csi = csi.ok_or_else(|| VolumeError::Claim {
                volume: v.name.clone(),
                reason: "this node runs no CSI driver (weft node --csi-socket)".into(),
            })?;
            let pv = csi
                .bound_volume(client, &ns, &c.claim_name, &v.name)
                .await?;
            let published = csi
                .publish(pod, &pv, &dir, c.read_only == Some(true), &v.name)
                .await?;
            let pod_dir = pod_dir(state_dir, &uid);
            crate::csi::record(&pod_dir, &[published]).map_err(|e| io(&pod_dir, e))?;
            out.insert(v.name.clone(), dir);
            continue;
        }
        if let Some(h) = &v.host_path {
            let path = PathBuf::from(&h.path);
            if matches!(h.type_.as_deref(), Some("DirectoryOrCreate")) {
                std::fs::create_dir_all(&path).map_err(|e| io(&path, e))?;
            }
            out.insert(v.name.clone(), path);
            continue;
        }
        if v.empty_dir.is_some() {
            std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| io(&dir, e))?;
        } else if let Some(c) = &v.config_map {
            let data = config_map(client, &ns, &c.name, &v.name, c.optional == Some(true)).await?;
            write_files(
                &dir,
                &v.name,
                &select(data, c.items.as_ref()),
                mode(c.default_mode),
            )?;
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let data = secret(client, &ns, &name, &v.name, s.optional == Some(true)).await?;
            write_files(
                &dir,
                &v.name,
                &select(data, s.items.as_ref()),
                mode(s.default_mode),
            )?;
        } else if let Some(d) = &v.downward_api {
            write_files(
                &dir,
                &v.name,
                &downward(pod, d.items.as_deref().unwrap_or(&[])),
                mode(d.default_mode),
            )?;
        } else if let Some(p) = &v.projected {
            let mut files = BTreeMap::new();
            for src in p.sources.iter().flatten() {
                if let Some(c) = &src.config_map {
                    let data =
                        config_map(client, &ns, &c.name, &v.name, c.optional == Some(true)).await?;
                    files.extend(select(data, c.items.as_ref()));
                }
                if let Some(s) = &src.secret {
                    let data =
                        secret(client, &ns, &s.name, &v.name, s.optional == Some(true)).await?;
                    files.extend(select(data, s.items.as_ref()));
                }
                if let Some(d) = &src.downward_api {
                    files.extend(downward(pod, d.items.as_deref().unwrap_or(&[])));
                }
            }
            write_files(&dir, &v.name, &files, mode(p.default_mode))?;
        } else {
            return Err(VolumeError::Unsupported(v.name.clone()));
        }
        out.insert(v.name.clone(), dir);
    }
    Ok(out)
}

/// Mount points under `dir`.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Unpublishes the persistent volumes the pod `uid` has, then removes everything it had on
/// the node. A directory with a mount left under it stays (removing it would delete the
/// volume's data); the next teardown tries again.
pub async fn release(state_dir: &Path, uid: &str, csi: Option<&crate::csi::Csi>) {
    let dir = pod_dir(state_dir, uid);
    for p in crate::csi::recorded(&dir) {
        let Some(csi) = csi else { break };
        if let Err(e) = csi.unpublish(&p).await {
            tracing::warn!(target = %p.target.display(), error = %e.message(), "unpublishing a volume");
        }
    }
    let left = mounts_under(&dir);
    if !left.is_empty() {
        tracing::error!(dir = %dir.display(), mounts = ?left, "a pod's directory still has mounts; not removing it");
        return;
    }
    remove(state_dir, uid);
}

/// Removes everything the pod `uid` had on the node.
fn remove(state_dir: &Path, uid: &str) {
    let dir = pod_dir(state_dir, uid);
    if dir.exists()
        && let Err(e) = std::fs::remove_dir_all(&dir)
    {
        tracing::warn!(dir = %dir.display(), error = %e, "removing a pod's volumes");
    }
}
