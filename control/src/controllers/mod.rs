//! The controllers: reconcile loops (kube-rs `Controller`s, level-triggered and idempotent)
//! that turn what objects ask for into other objects, through the Kubernetes API, as
//! kube-controller-manager's do. Each reads the current state from the API when it acts (the
//! server's lists are consistent), so a restart or a missed event only delays convergence.
//!
//! * [`replicaset`]: a ReplicaSet keeps its number of pods.
//! * [`deployment`]: a Deployment owns ReplicaSets by pod-template hash and rolls between them
//!   ([`rolling`] is the pure planner).
//! * [`daemonset`]: a DaemonSet keeps one pod on every eligible node.
//! * [`statefulset`]: a StatefulSet keeps ordered pods with stable names and their own claims.
//! * [`history`]: the ControllerRevisions of StatefulSets (`kubectl rollout history/undo`).
//! * [`endpointslice`]: Services' EndpointSlices and Endpoints from their pods' readiness.
//! * [`job`]: a Job runs pods until enough of them succeed.
//! * [`disruption`]: PodDisruptionBudgets' status, and the budget evictions are held to.
//! * [`gc`]: ownerReference cascading deletion.
//! * [`nodelifecycle`]: nodes whose Lease stops being renewed turn NotReady and lose their pods.

pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpointslice;
pub mod gc;
pub mod history;
pub mod job;
pub mod nodelifecycle;
pub mod replicaset;
pub mod rolling;
pub mod statefulset;

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::controller::Action,
};

/// A controller's failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API refused or could not be reached.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object the controller cannot act on (named in the message).
    #[error("{0}")]
    Invalid(String),
}

/// What every controller gets.
pub struct Ctx {
    /// The API.
    pub client: Client,
    /// Where Events are recorded.
    pub events: weft_events::Recorder,
    /// Timing knobs.
    pub options: Options,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Timing knobs of the controllers (kube-controller-manager's flags of the same meaning).
#[derive(Clone, Debug)]
pub struct Options {
    /// A node whose Lease is older than this is NotReady (`--node-monitor-grace-period`).
    pub node_grace: Duration,
    /// How often nodes are checked (`--node-monitor-period`).
    pub node_monitor_period: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            node_grace: Duration::from_secs(40),
            node_monitor_period: Duration::from_secs(5),
        }
    }
}

/// The ownerReference marking `meta` as controlled, if any.
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

/// A controller ownerReference to `owner`.
pub fn owner_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.name_any(),
        uid: owner.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Takes the objects `owner` should control among `items`: those it controls whose labels
/// still match, and orphans that match and are not being deleted, which it adopts; it releases
/// those it controls that stopped matching. Writes carry the object's resourceVersion, so a
/// race with another controller is a conflict, not a double owner.
pub async fn claim<K, O>(
    api: &Api<K>,
    items: Vec<K>,
    owner: &O,
    selector: &crate::selector::LabelSelector,
) -> Result<Vec<K>, Error>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    O: Resource<DynamicType = ()>,
{
    let uid = owner.uid().unwrap_or_default();
    let mut mine = Vec::new();
    for item in items {
        let matches = !selector.is_empty() && selector.matches_labels(item.meta().labels.as_ref());
        match controller_of(item.meta()) {
            Some(o) if o.uid == uid => {
                if matches {
                    mine.push(item);
                } else {
                    set_controller(api, &item, None).await?;
                }
            }
            Some(_) => {}
            None if matches && item.meta().deletion_timestamp.is_none() => {
                mine.push(set_controller(api, &item, Some(owner_ref(owner))).await?);
            }
            None => {}
        }
    }
    Ok(mine)
}

/// Sets `item`'s controller reference to `owner` (or drops it), keeping other references.
async fn set_controller<K>(
    api: &Api<K>,
    item: &K,
    owner: Option<OwnerReference>,
) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut refs: Vec<OwnerReference> = item
        .meta()
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.controller != Some(true))
        .cloned()
        .collect();
    refs.extend(owner);
    let patch = serde_json::json!({"metadata": {"ownerReferences": refs, "resourceVersion": item.resource_version()}});
    Ok(api
        .patch(
            &item.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?)
}

/// Creates `pod` for `owner` and records the Event kube-controller-manager records for it
/// (`SuccessfulCreate`, or `FailedCreate` with the error, which is returned).
pub async fn create_pod<O: Resource<DynamicType = ()>>(
    ctx: &Ctx,
    api: &Api<k8s_openapi::api::core::v1::Pod>,
    owner: &O,
    component: &str,
    pod: &k8s_openapi::api::core::v1::Pod,
) -> Result<k8s_openapi::api::core::v1::Pod, Error> {
    match api.create(&kube::api::PostParams::default(), pod).await {
        Ok(p) => {
            ctx.events
                .record(
                    owner,
                    component,
                    weft_events::Kind::Normal,
                    "SuccessfulCreate",
                    &format!("Created pod: {}", p.name_any()),
                )
                .await;
            Ok(p)
        }
        Err(e) => {
            ctx.events
                .record(
                    owner,
                    component,
                    weft_events::Kind::Warning,
                    "FailedCreate",
                    &format!("Error creating: {e}"),
                )
                .await;
            Err(e.into())
        }
    }
}

/// Patches `status` into `object`'s status when any of its fields differs from the status the
/// controller last read (a missing field counts as 0), so that reconciling an object that has
/// not changed writes nothing.
pub async fn patch_status_if_changed<K>(
    client: &Client,
    object: &K,
    status: serde_json::Value,
) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let current = serde_json::to_value(object)
        .ok()
        .and_then(|o| o.get("status").cloned())
        .unwrap_or_default();
    let changed = status
        .as_object()
        .into_iter()
        .flatten()
        .any(|(k, v)| current.get(k).cloned().unwrap_or(serde_json::json!(0)) != *v);
    if changed {
        Api::<K>::namespaced(client.clone(), &object.namespace().unwrap_or_default())
            .patch_status(
                &object.name_any(),
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": status})),
            )
            .await?;
    }
    Ok(())
}

/// Whether an API error is a 404.
pub fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(r) if r.code == 404)
}

/// Seconds since a timestamp (0 for none or one in the future).
pub fn age_secs(t: Option<&Time>) -> i64 {
    t.map_or(0, |t| {
        (k8s_openapi::jiff::Timestamp::now().as_second() - t.0.as_second()).max(0)
    })
}

/// The back-off a failed reconcile waits before it is tried again.
pub fn retry<K>(_: Arc<K>, error: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// Drains a controller's result stream, logging failures at debug level (the error policy
/// already reported them).
pub async fn drive<S, T, E>(name: &'static str, stream: S)
where
    S: futures::Stream<Item = Result<T, E>>,
    E: std::fmt::Debug,
{
    stream
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(controller = name, error = ?e, "reconcile");
            }
        })
        .await;
}

/// Runs every controller and the scheduler against the API until one of them ends.
pub async fn run(client: Client, options: Options) {
    let ctx = Arc::new(Ctx {
        events: weft_events::Recorder::new(client.clone()),
        client,
        options,
    });
    tokio::join!(
        replicaset::run(ctx.clone()),
        deployment::run(ctx.clone()),
        daemonset::run(ctx.clone()),
        statefulset::run(ctx.clone()),
        job::run(ctx.clone()),
        disruption::run(ctx.clone()),
        endpointslice::run(ctx.clone()),
        gc::run(ctx.clone()),
        nodelifecycle::run(ctx.clone()),
        crate::scheduler::run(ctx.clone()),
    );
}
