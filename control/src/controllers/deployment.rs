//! The Deployment controller: one ReplicaSet per pod template (named and labelled by the
//! template's hash, `pod-template-hash`), the newest the template in force; `RollingUpdate`
//! moves pods from the old ReplicaSets to the new one within maxSurge/maxUnavailable
//! ([`super::rolling`]), `Recreate` empties the old ones first. ReplicaSets carry
//! `deployment.kubernetes.io/revision` (a template used again, as by `kubectl rollout undo`,
//! gets the next revision), old empty ones beyond `revisionHistoryLimit` are deleted, and the
//! status (`replicas`, `updatedReplicas`, `readyReplicas`, `availableReplicas`,
//! `observedGeneration`, the Available and Progressing conditions) is what `kubectl rollout
//! status` reads. It acts only on ReplicaSets whose status has caught up with their spec
//! (`observedGeneration`), so its view of available pods is never ahead of the pods.

use std::{sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        apps::v1::{Deployment, ReplicaSet, ReplicaSetSpec},
        core::v1::PodTemplateSpec,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{Controller, controller::Action, watcher},
};
use serde_json::{Value, json};

use super::{
    Ctx, Error, claim, drive, not_found, owner_ref, retry,
    rolling::{self, Rs},
};
use crate::selector::LabelSelector;
use weft_events::Kind;

const COMPONENT: &str = "deployment-controller";
/// The label that ties a ReplicaSet and its pods to one template.
pub const HASH_LABEL: &str = "pod-template-hash";
/// The revision annotation on Deployments and their ReplicaSets.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";
/// The Deployment's replicas when a ReplicaSet was last scaled for it.
const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
/// Those replicas plus the surge, which proportional scaling divides by.
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";

/// Runs the controller until the API goes away for good.
pub async fn run(ctx: Arc<Ctx>) {
    let client = ctx.client.clone();
    let c = Controller::new(
        Api::<Deployment>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<ReplicaSet>::all(client), watcher::Config::default())
    .run(reconcile, retry, ctx);
    drive(COMPONENT, c).await;
}

/// A template as compared and hashed: without the hash label.
fn without_hash(template: &PodTemplateSpec) -> Value {
    let mut v = serde_json::to_value(template).unwrap_or_default();
    if let Some(labels) = v
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        labels.remove(HASH_LABEL);
    }
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.retain(|k, x| k != "labels" || x.as_object().is_some_and(|l| !l.is_empty()));
    }
    if let Some(o) = v.as_object_mut() {
        o.retain(|k, x| k != "metadata" || x.as_object().is_some_and(|m| !m.is_empty()));
    }
    v
}

/// The template's hash (FNV-1a over its JSON and the collision count), in the alphabet
/// Kubernetes uses for generated names.
pub fn template_hash(template: &PodTemplateSpec, collisions: i32) -> String {
    let mut h: u32 = 0x811c_9dc5;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
    };
    feed(&serde_json::to_vec(&without_hash(template)).unwrap_or_default());
    if collisions > 0 {
        feed(&collisions.to_le_bytes());
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()]))
        .collect()
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn rs_view(rs: &ReplicaSet) -> Rs {
    let s = rs.status.clone().unwrap_or_default();
    Rs {
        spec: rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
        existing: s.replicas,
        available: s.available_replicas.unwrap_or(0),
    }
}

fn settled(rs: &ReplicaSet) -> bool {
    rs.status
        .as_ref()
        .and_then(|s| s.observed_generation)
        .unwrap_or(0)
        >= rs.metadata.generation.unwrap_or(0)
}

/// What one pass did, for the Progressing condition.
#[derive(Debug, Default)]
struct Progress {
    created: Option<String>,
    scaled: bool,
}

async fn scale(
    ctx: &Ctx,
    d: &Deployment,
    rs: &ReplicaSet,
    to: i32,
    max_surge: i32,
) -> Result<(), Error> {
    let from = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let (desired, max) = (replicas.to_string(), (replicas + max_surge).to_string());
    let noted = |k: &str, v: &str| rs.annotations().get(k).map(String::as_str) == Some(v);
    let annotated = noted(DESIRED_REPLICAS, &desired) && noted(MAX_REPLICAS, &max);
    if from == to && (annotated || to == 0) {
        return Ok(());
    }
    let api: Api<ReplicaSet> =
        Api::namespaced(ctx.client.clone(), &rs.namespace().unwrap_or_default());
    let patch = json!({
        "metadata": {"annotations": {DESIRED_REPLICAS: desired, MAX_REPLICAS: max}},
        "spec": {"replicas": to},
    });
    api.patch(
        &rs.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    if from == to {
        // Only the annotations were behind (a scale that left this set's size as it was).
        return Ok(());
    }
    let verb = if to > from { "up" } else { "down" };
    ctx.events
        .record(
            d,
            COMPONENT,
            Kind::Normal,
            "ScalingReplicaSet",
            &format!(
                "Scaled {verb} replica set {} from {from} to {to}",
                rs.name_any()
            ),
        )
        .await;
    Ok(())
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = d.namespace().unwrap_or_default();
    let name = d.name_any();
    let spec = d.spec.clone().unwrap_or_default();
    let selector = LabelSelector::from_api(Some(&spec.selector))
        .map_err(|e| Error::Invalid(format!("deployment {name}: {e}")))?;
    if selector.is_empty() {
        return Err(Error::Invalid(format!("deployment {name}: empty selector")));
    }
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let strategy = spec.strategy.clone().unwrap_or_default();
    let recreate = strategy.type_.as_deref() == Some("Recreate");
    let rolling_cfg = strategy.rolling_update.unwrap_or_default();
    let (surge, unavailable) = if recreate {
        (0, replicas)
    } else {
        rolling::bounds(
            rolling_cfg.max_surge.as_ref(),
            rolling_cfg.max_unavailable.as_ref(),
            replicas,
        )
        .map_err(|e| Error::Invalid(format!("deployment {name}: {e}")))?
    };
    let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let all = api.list(&ListParams::default()).await?.items;
    let mut owned = claim(&api, all, &*d, &selector).await?;
    owned.sort_by_key(|rs| rs.metadata.creation_timestamp.as_ref().map(|t| t.0));
    let wanted = without_hash(&spec.template);
    let new_at = owned.iter().position(|rs| {
        rs.spec
            .as_ref()
            .and_then(|s| s.template.as_ref())
            .map(without_hash)
            == Some(wanted.clone())
    });
    let mut new = new_at.map(|i| owned.remove(i));
    let old = owned;
    let max_old_revision = old.iter().map(revision).max().unwrap_or(0);
    let mut progress = Progress::default();
    let paused = spec.paused == Some(true);

    if new.is_none() && !paused {
        let collisions = d
            .status
            .as_ref()
            .and_then(|s| s.collision_count)
            .unwrap_or(0);
        let hash = template_hash(&spec.template, collisions);
        let mut template = spec.template.clone();
        let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
        meta.labels
            .get_or_insert_default()
            .insert(HASH_LABEL.into(), hash.clone());
        let mut rs_selector = spec.selector.clone();
        rs_selector
            .match_labels
            .get_or_insert_default()
            .insert(HASH_LABEL.into(), hash.clone());
        let olds: Vec<Rs> = old.iter().map(rs_view).collect();
        let initial = if recreate {
            0
        } else {
            rolling::new_replicas(replicas, surge, Rs::default(), &olds)
        };
        let mut annotations = std::collections::BTreeMap::new();
        annotations.insert(REVISION.to_owned(), (max_old_revision + 1).to_string());
        annotations.insert(DESIRED_REPLICAS.into(), replicas.to_string());
        annotations.insert(
            "deployment.kubernetes.io/max-replicas".into(),
            (replicas + surge).to_string(),
        );
        if let Some(cause) = d.annotations().get(CHANGE_CAUSE) {
            annotations.insert(CHANGE_CAUSE.into(), cause.clone());
        }
        let rs = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(format!("{name}-{hash}")),
                namespace: Some(ns.clone()),
                labels: meta.labels.clone(),
                annotations: Some(annotations),
                owner_references: Some(vec![owner_ref(&*d)]),
                ..ObjectMeta::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(initial),
                min_ready_seconds: spec.min_ready_seconds,
                selector: rs_selector,
                template: Some(template),
            }),
            status: None,
        };
        match api.create(&PostParams::default(), &rs).await {
            Ok(created) => {
                ctx.events
                    .record(
                        &*d,
                        COMPONENT,
                        Kind::Normal,
                        "ScalingReplicaSet",
                        &format!(
                            "Scaled up replica set {} from 0 to {initial}",
                            created.name_any()
                        ),
                    )
                    .await;
                progress.created = Some(created.name_any());
                new = Some(created);
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // A ReplicaSet of that name exists but is not this template's: count the
                // collision so the next hash differs.
                let d_api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
                let patch = json!({"status": {"collisionCount": collisions + 1}});
                d_api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                return Ok(Action::requeue(Duration::from_millis(100)));
            }
            Err(e) => return Err(e.into()),
        }
    }

    // The ReplicaSet in force carries the newest revision.
    if let Some(rs) = &new {
        let rev = revision(rs);
        if rev <= max_old_revision || rev == 0 {
            let patch = json!({"metadata": {"annotations": {REVISION: (max_old_revision + 1).to_string()}}});
            new = Some(
                api.patch(
                    &rs.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?,
            );
        }
    }
    let current_revision = new.as_ref().map(revision).unwrap_or(max_old_revision);
    if current_revision > 0
        && d.annotations().get(REVISION).map(String::as_str) != Some(&current_revision.to_string())
    {
        let d_api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"metadata": {"annotations": {REVISION: current_revision.to_string()}}});
        d_api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }

    let everything_settled = new.iter().chain(old.iter()).all(settled);
    // Scaled while several ReplicaSets have pods (a rollout in flight, or paused halfway):
    // the change is shared among them in proportion, as kube-controller-manager does.
    let active: Vec<(usize, &ReplicaSet)> = old
        .iter()
        .chain(new.iter())
        .enumerate()
        .filter(|(_, rs)| rs_view(rs).spec > 0)
        .collect();
    let scaling_event = !recreate
        && active.len() > 1
        && active
            .iter()
            .any(|(_, rs)| rs.annotations().get(DESIRED_REPLICAS) != Some(&replicas.to_string()));
    if everything_settled && progress.created.is_none() && scaling_event {
        let sets: Vec<rolling::Scaled> = active
            .iter()
            .map(|(age, rs)| rolling::Scaled {
                spec: rs_view(rs).spec,
                max_replicas: rs
                    .annotations()
                    .get(MAX_REPLICAS)
                    .and_then(|v| v.parse().ok()),
                age: *age,
            })
            .collect();
        let fallback = d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let sizes = rolling::proportional(replicas, surge, fallback, &sets);
        for ((_, rs), to) in active.iter().zip(sizes) {
            scale(&ctx, &d, rs, to, surge).await?;
        }
        progress.scaled = true;
    } else if everything_settled && progress.created.is_none() {
        let olds: Vec<Rs> = old.iter().map(rs_view).collect();
        match (&new, paused) {
            (Some(n), true) => {
                // Paused: only a plain scale (no rollout in flight) is carried out.
                if olds.iter().all(|o| o.spec == 0) {
                    scale(&ctx, &d, n, replicas, surge).await?;
                }
            }
            (None, _) => {}
            (Some(n), false) if recreate => {
                for (rs, view) in old.iter().zip(&olds) {
                    if view.spec > 0 {
                        scale(&ctx, &d, rs, 0, surge).await?;
                        progress.scaled = true;
                    }
                }
                if olds.iter().all(|o| o.spec == 0 && o.existing == 0) {
                    let before = rs_view(n).spec;
                    scale(&ctx, &d, n, replicas, surge).await?;
                    progress.scaled |= before != replicas;
                }
            }
            (Some(n), false) => {
                let view = rs_view(n);
                let target = rolling::new_replicas(replicas, surge, view, &olds);
                if target != view.spec {
                    scale(&ctx, &d, n, target, surge).await?;
                    progress.scaled = true;
                } else {
                    let targets = rolling::old_replicas(replicas, unavailable, view, &olds);
                    for ((rs, view), to) in old.iter().zip(&olds).zip(targets) {
                        if to != view.spec {
                            scale(&ctx, &d, rs, to, surge).await?;
                            progress.scaled = true;
                        }
                    }
                }
            }
        }
        cleanup(&ctx, &api, &d, &old).await?;
    }
    write_status(
        &ctx,
        &d,
        new.as_ref(),
        &old,
        replicas,
        unavailable,
        &progress,
    )
    .await
}

/// Deletes old, empty ReplicaSets beyond `revisionHistoryLimit` (default 10), oldest first.
async fn cleanup(
    ctx: &Ctx,
    api: &Api<ReplicaSet>,
    d: &Deployment,
    old: &[ReplicaSet],
) -> Result<(), Error> {
    let limit = d
        .spec
        .as_ref()
        .and_then(|s| s.revision_history_limit)
        .unwrap_or(10)
        .max(0);
    let mut empty: Vec<&ReplicaSet> = old
        .iter()
        .filter(|rs| {
            let v = rs_view(rs);
            v.spec == 0 && v.existing == 0 && rs.metadata.deletion_timestamp.is_none()
        })
        .collect();
    empty.sort_by_key(|rs| revision(rs));
    let surplus = empty
        .len()
        .saturating_sub(usize::try_from(limit).unwrap_or(0));
    for rs in &empty[..surplus] {
        match api
            .delete(&rs.name_any(), &DeleteParams::background())
            .await
        {
            Err(e) if !not_found(&e) => return Err(e.into()),
            _ => {
                tracing::debug!(deployment = %d.name_any(), replicaset = %rs.name_any(), "old revision deleted")
            }
        }
    }
    let _ = ctx;
    Ok(())
}

fn condition(
    kind: &str,
    status: &str,
    reason: &str,
    message: &str,
    previous: Option<&Value>,
    touch: bool,
) -> Value {
    let now = json!(Time(Timestamp::now()));
    let same = previous.is_some_and(|p| p["status"] == status);
    let same_reason = same && previous.is_some_and(|p| p["reason"] == reason);
    json!({
        "type": kind, "status": status, "reason": reason, "message": message,
        "lastTransitionTime": if same { previous.map(|p| p["lastTransitionTime"].clone()).unwrap_or(now.clone()) } else { now.clone() },
        "lastUpdateTime": if same_reason && !touch { previous.map(|p| p["lastUpdateTime"].clone()).unwrap_or(now.clone()) } else { now },
    })
}

async fn write_status(
    ctx: &Ctx,
    d: &Deployment,
    new: Option<&ReplicaSet>,
    old: &[ReplicaSet],
    replicas: i32,
    unavailable: i32,
    progress: &Progress,
) -> Result<Action, Error> {
    let all: Vec<&ReplicaSet> = new.into_iter().chain(old.iter()).collect();
    let st = |f: fn(&k8s_openapi::api::apps::v1::ReplicaSetStatus) -> i32| -> i32 {
        all.iter().filter_map(|rs| rs.status.as_ref()).map(f).sum()
    };
    let total = st(|s| s.replicas);
    let ready = st(|s| s.ready_replicas.unwrap_or(0));
    let available = st(|s| s.available_replicas.unwrap_or(0));
    let updated = new
        .and_then(|rs| rs.status.as_ref())
        .map_or(0, |s| s.replicas);
    let updated_available = new
        .and_then(|rs| rs.status.as_ref())
        .map_or(0, |s| s.available_replicas.unwrap_or(0));
    let spec_total: i32 = all.iter().map(|rs| rs_view(rs).spec).sum();
    let before = serde_json::to_value(&d.status).unwrap_or_default();
    let find = |kind: &str| {
        before
            .get("conditions")
            .and_then(Value::as_array)
            .and_then(|c| c.iter().find(|c| c["type"] == kind))
            .cloned()
    };
    let prev_progressing = find("Progressing");
    let prev_available = find("Available");
    let available_cond = if available >= replicas - unavailable {
        condition(
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
            prev_available.as_ref(),
            false,
        )
    } else {
        condition(
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
            prev_available.as_ref(),
            false,
        )
    };
    let new_name = new.map(|rs| rs.name_any()).unwrap_or_default();
    let complete =
        new.is_some() && updated == replicas && updated_available == replicas && total == replicas;
    let moved = [
        "replicas",
        "updatedReplicas",
        "readyReplicas",
        "availableReplicas",
    ]
    .iter()
    .zip([total, updated, ready, available])
    .any(|(k, v)| before.get(*k).and_then(Value::as_i64).unwrap_or(0) != i64::from(v));
    let deadline = i64::from(
        d.spec
            .as_ref()
            .and_then(|s| s.progress_deadline_seconds)
            .unwrap_or(600),
    );
    let paused = d.spec.as_ref().and_then(|s| s.paused) == Some(true);
    let p = prev_progressing.as_ref();
    let progressing = if paused {
        condition(
            "Progressing",
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused",
            p,
            false,
        )
    } else if complete {
        condition(
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            &format!("ReplicaSet {new_name:?} has successfully progressed."),
            p,
            false,
        )
    } else if let Some(created) = &progress.created {
        condition(
            "Progressing",
            "True",
            "NewReplicaSetCreated",
            &format!("Created new replica set {created:?}"),
            p,
            true,
        )
    } else if progress.scaled || moved {
        condition(
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            &format!("ReplicaSet {new_name:?} is progressing."),
            p,
            true,
        )
    } else if p.is_some_and(|c| c["reason"] == "DeploymentPaused") {
        condition(
            "Progressing",
            "Unknown",
            "DeploymentResumed",
            "Deployment is resumed",
            p,
            true,
        )
    } else if p.is_some_and(|c| {
        c["status"] == "True"
            && c["reason"] != "NewReplicaSetAvailable"
            && c["lastUpdateTime"]
                .as_str()
                .and_then(|t| t.parse::<Timestamp>().ok())
                .is_some_and(|t| Timestamp::now().as_second() - t.as_second() > deadline)
    }) {
        condition(
            "Progressing",
            "False",
            "ProgressDeadlineExceeded",
            &format!("ReplicaSet {new_name:?} has timed out progressing."),
            p,
            true,
        )
    } else {
        p.cloned().unwrap_or_else(|| {
            condition(
                "Progressing",
                "True",
                "FoundNewReplicaSet",
                &format!("Found new replica set {new_name:?}"),
                None,
                true,
            )
        })
    };
    let status = json!({
        "observedGeneration": d.metadata.generation,
        "replicas": total,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": (spec_total.max(replicas) - available).max(0),
        "collisionCount": d.status.as_ref().and_then(|s| s.collision_count),
        "conditions": [available_cond, progressing],
    });
    let strip = |v: &Value| {
        let mut v = v.clone();
        for c in v
            .get_mut("conditions")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(c) = c.as_object_mut() {
                c.remove("lastUpdateTime");
            }
        }
        for k in [
            "replicas",
            "updatedReplicas",
            "readyReplicas",
            "availableReplicas",
            "unavailableReplicas",
        ] {
            if v.get(k).is_some_and(|x| x == 0)
                && let Some(m) = v.as_object_mut()
            {
                m.remove(k);
            }
        }
        if let Some(m) = v.as_object_mut() {
            m.retain(|_, x| !x.is_null());
        }
        v
    };
    if strip(&status) != strip(&before) || progress.created.is_some() || progress.scaled || moved {
        let d_api: Api<Deployment> =
            Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
        d_api
            .patch_status(
                &d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
    }
    if !complete && !paused {
        // Look again when the progress deadline could have passed.
        return Ok(Action::requeue(Duration::from_secs(
            u64::try_from(deadline.clamp(1, 600)).unwrap_or(600),
        )));
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_ignores_its_own_label_and_changes_with_the_template() {
        let t: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": "echo:1"}]}}))
        .unwrap();
        let mut labelled = t.clone();
        labelled
            .metadata
            .as_mut()
            .unwrap()
            .labels
            .as_mut()
            .unwrap()
            .insert(HASH_LABEL.into(), "x".into());
        assert_eq!(template_hash(&t, 0), template_hash(&labelled, 0));
        assert_eq!(without_hash(&t), without_hash(&labelled));
        let mut other = t.clone();
        other.spec.as_mut().unwrap().containers[0].image = Some("echo:2".into());
        assert_ne!(template_hash(&t, 0), template_hash(&other, 0));
        assert_ne!(template_hash(&t, 0), template_hash(&t, 1));
        assert!(
            template_hash(&t, 0)
                .bytes()
                .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
        );
    }
}
