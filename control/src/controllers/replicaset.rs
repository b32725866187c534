//! The ReplicaSet controller: keeps `spec.replicas` pods of the template running. It adopts
//! orphan pods its selector matches, releases pods whose labels stopped matching, creates
//! missing pods and deletes surplus ones, the least useful first (unscheduled, pending, not
//! ready, ready the shortest time, restarted most, newest), and reports `status` after acting,
//! with `observedGeneration`, so the Deployment controller can trust it.

use std::{sync::Arc, time::Duration};

use k8s_openapi::api::{apps::v1::ReplicaSet, core::v1::Pod};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{Controller, controller::Action, watcher},
};
use serde_json::json;

use super::{Ctx, Error, age_secs, claim, drive, not_found, owner_ref, retry};
use crate::selector::LabelSelector;
use weft_events::Kind;

const COMPONENT: &str = "replicaset-controller";

/// Runs the controller until the API goes away for good.
pub async fn run(ctx: Arc<Ctx>) {
    let client = ctx.client.clone();
    let c = Controller::new(
        Api::<ReplicaSet>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Pod>::all(client), watcher::Config::default())
    .run(reconcile, retry, ctx);
    drive(COMPONENT, c).await;
}

/// Whether a pod counts towards its owner's replicas: not being deleted, not finished.
pub fn is_active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// When the pod's Ready condition turned true, if it is ready.
pub fn ready_since(pod: &Pod) -> Option<i64> {
    pod.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready" && c.status == "True")
        .map(|c| age_secs(c.last_transition_time.as_ref()))
}

/// Whether the pod is ready.
pub fn is_ready(pod: &Pod) -> bool {
    ready_since(pod).is_some()
}

/// Deletion preference among active pods: smaller keys go first (kube-controller-manager's
/// ranking).
fn deletion_rank(
    pod: &Pod,
) -> (
    bool,
    i32,
    bool,
    i64,
    std::cmp::Reverse<i32>,
    std::cmp::Reverse<i64>,
) {
    let assigned = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    let phase = match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Pending") | None => 0,
        Some("Running") => 2,
        _ => 1,
    };
    let ready = ready_since(pod);
    let restarts: i32 = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |c| c.iter().map(|c| c.restart_count).sum());
    let created = pod
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(i64::MAX, |t| t.0.as_second());
    (
        assigned,
        phase,
        ready.is_some(),
        ready.unwrap_or(0),
        std::cmp::Reverse(restarts),
        std::cmp::Reverse(created),
    )
}

/// A pod of the template, owned by `rs`.
fn new_pod(rs: &ReplicaSet) -> Result<Pod, Error> {
    let template = rs
        .spec
        .as_ref()
        .and_then(|s| s.template.clone())
        .ok_or_else(|| Error::Invalid(format!("replicaset {} has no template", rs.name_any())))?;
    let mut meta = template.metadata.unwrap_or_default();
    meta.name = None;
    meta.generate_name = Some(format!("{}-", rs.name_any()));
    meta.namespace = rs.namespace();
    meta.owner_references = Some(vec![owner_ref(rs)]);
    Ok(Pod {
        metadata: meta,
        spec: template.spec,
        status: None,
    })
}

async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if rs.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = rs.namespace().unwrap_or_default();
    let spec = rs.spec.clone().unwrap_or_default();
    let selector = LabelSelector::from_api(Some(&spec.selector))
        .map_err(|e| Error::Invalid(format!("replicaset {}: {e}", rs.name_any())))?;
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pods = api.list(&ListParams::default()).await?.items;
    let mine = claim(&api, pods, &*rs, &selector).await?;
    let mut active: Vec<Pod> = mine.into_iter().filter(is_active).collect();
    let want = usize::try_from(spec.replicas.unwrap_or(1).max(0)).unwrap_or(0);
    let mut failure = None;
    if active.len() < want {
        // Slow start, as kube-controller-manager: batches of 1, 2, 4, ... so a template that
        // cannot be created fails once, not `replicas` times.
        let mut missing = want - active.len();
        let mut batch = 1;
        'create: while missing > 0 {
            for _ in 0..batch.min(missing) {
                match api.create(&PostParams::default(), &new_pod(&rs)?).await {
                    Ok(pod) => {
                        ctx.events
                            .record(
                                &*rs,
                                COMPONENT,
                                Kind::Normal,
                                "SuccessfulCreate",
                                &format!("Created pod: {}", pod.name_any()),
                            )
                            .await;
                        active.push(pod);
                        missing -= 1;
                    }
                    Err(e) => {
                        let message = format!("Error creating: {e}");
                        ctx.events
                            .record(&*rs, COMPONENT, Kind::Warning, "FailedCreate", &message)
                            .await;
                        failure = Some(message);
                        break 'create;
                    }
                }
            }
            batch *= 2;
        }
    } else if active.len() > want {
        active.sort_by_cached_key(deletion_rank);
        let surplus: Vec<Pod> = active.drain(..active.len() - want).collect();
        for pod in surplus {
            match api.delete(&pod.name_any(), &DeleteParams::default()).await {
                Err(e) if !not_found(&e) => return Err(e.into()),
                _ => {
                    ctx.events
                        .record(
                            &*rs,
                            COMPONENT,
                            Kind::Normal,
                            "SuccessfulDelete",
                            &format!("Deleted pod: {}", pod.name_any()),
                        )
                        .await;
                }
            }
        }
    }
    let min_ready = i64::from(spec.min_ready_seconds.unwrap_or(0));
    let ready: Vec<i64> = active.iter().filter_map(ready_since).collect();
    let available = ready.iter().filter(|s| **s >= min_ready).count();
    let mut status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": active.len(),
        "readyReplicas": ready.len(),
        "availableReplicas": available,
        "observedGeneration": rs.metadata.generation,
    });
    status["conditions"] = match &failure {
        Some(m) => {
            json!([{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": m,
                           "lastTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())}])
        }
        None => serde_json::Value::Null,
    };
    let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let current = serde_json::to_value(&rs.status).unwrap_or_default();
    let changed = [
        "replicas",
        "fullyLabeledReplicas",
        "readyReplicas",
        "availableReplicas",
        "observedGeneration",
    ]
    .iter()
    .any(|k| current.get(k).cloned().unwrap_or(json!(0)) != status[k])
        || failure.is_some() != current.get("conditions").is_some_and(|c| !c.is_null());
    if changed {
        rs_api
            .patch_status(
                &rs.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
    }
    if failure.is_some() {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    // Pods that are ready but not yet for minReadySeconds become available later.
    if let Some(wait) = ready
        .iter()
        .filter(|s| **s < min_ready)
        .map(|s| min_ready - s)
        .min()
    {
        return Ok(Action::requeue(Duration::from_secs(wait.max(1) as u64)));
    }
    Ok(Action::await_change())
}
