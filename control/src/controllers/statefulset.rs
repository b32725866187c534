//! The StatefulSet controller, as kube-controller-manager's: pods with stable names
//! `<set>-<ordinal>` (labels `statefulset.kubernetes.io/pod-name` and
//! `apps.kubernetes.io/pod-index`, hostname = pod name, subdomain = `serviceName`), each with its
//! own PersistentVolumeClaims from `volumeClaimTemplates` (`<template>-<set>-<ordinal>`, created
//! before the pod, kept after it unless `persistentVolumeClaimRetentionPolicy` says `Delete`).
//!
//! `OrderedReady` (the default) creates ordinal n only when 0..n are Running and Ready, and
//! scales down from the highest ordinal, one pod at a time, while the rest are healthy;
//! `Parallel` creates and deletes all at once. A template change is a new ControllerRevision
//! ([`super::history`]); `RollingUpdate` replaces pods from the highest ordinal down to
//! `partition`, one at a time, each once the previous is Ready again (pods below the partition
//! are recreated at the current revision); `OnDelete` waits for pods to be deleted. Failed pods
//! are deleted and recreated under the same name. Status carries what `kubectl get sts` and
//! `kubectl rollout status|history|undo sts` read.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::{
    apps::v1::{ControllerRevision, StatefulSet},
    core::v1::{
        PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodTemplateSpec, Volume,
    },
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
    runtime::{Controller, controller::Action, watcher},
};
use serde_json::json;

use super::{Ctx, Error, claim, create_pod, drive, history, not_found, owner_ref, retry};
use crate::{
    controllers::{
        daemonset::HASH_LABEL,
        replicaset::{is_active, is_ready, ready_since},
    },
    selector::LabelSelector,
};
use weft_events::Kind;

const COMPONENT: &str = "statefulset-controller";
/// The label naming a StatefulSet pod.
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
/// The label carrying a StatefulSet pod's ordinal.
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

/// Runs the controller until the API goes away for good.
pub async fn run(ctx: Arc<Ctx>) {
    let client = ctx.client.clone();
    let c = Controller::new(
        Api::<StatefulSet>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Pod>::all(client), watcher::Config::default())
    .run(reconcile, retry, ctx);
    drive(COMPONENT, c).await;
}

/// The ordinal of `pod` in the set named `set` (`None` for a name that is not `<set>-<n>`).
fn ordinal(set: &str, pod: &str) -> Option<i32> {
    let n: i32 = pod.strip_prefix(set)?.strip_prefix('-')?.parse().ok()?;
    (n >= 0 && format!("{set}-{n}") == pod).then_some(n)
}

/// The claim a pod of ordinal `n` gets from the claim template named `template`.
fn claim_name(template: &str, set: &str, n: i32) -> String {
    format!("{template}-{set}-{n}")
}

/// Running and Ready: what OrderedReady waits for.
fn healthy(p: &Pod) -> bool {
    is_active(p)
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && is_ready(p)
}

fn failed(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
}

/// Pod `n` of the set from `template`, at revision `revision`.
fn new_pod(
    set: &StatefulSet,
    template: &PodTemplateSpec,
    n: i32,
    revision: &str,
) -> Result<Pod, Error> {
    let name = format!("{}-{n}", set.name_any());
    let spec = set.spec.clone().unwrap_or_default();
    let mut meta = template.metadata.clone().unwrap_or_default();
    meta.name = Some(name.clone());
    meta.generate_name = None;
    meta.namespace = set.namespace();
    meta.owner_references = Some(vec![owner_ref(set)]);
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(HASH_LABEL.into(), revision.into());
    labels.insert(POD_NAME_LABEL.into(), name.clone());
    labels.insert(POD_INDEX_LABEL.into(), n.to_string());
    let mut pod_spec = template
        .spec
        .clone()
        .ok_or_else(|| Error::Invalid(format!("statefulset {}: no pod spec", set.name_any())))?;
    pod_spec.hostname = Some(name.clone());
    if !spec.service_name.as_deref().unwrap_or("").is_empty() {
        pod_spec.subdomain = spec.service_name.clone();
    }
    let volumes = pod_spec.volumes.get_or_insert_with(Vec::new);
    for t in spec.volume_claim_templates.iter().flatten() {
        let tname = t.name_any();
        volumes.retain(|v| v.name != tname);
        volumes.push(Volume {
            name: tname.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(&tname, &set.name_any(), n),
                read_only: None,
            }),
            ..Volume::default()
        });
    }
    Ok(Pod {
        metadata: meta,
        spec: Some(pod_spec),
        status: None,
    })
}

/// The retention policy's answer for `when` (`whenDeleted` / `whenScaled`): whether claims go.
fn claims_go(set: &StatefulSet, when: &str) -> bool {
    let policy = set
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_claim_retention_policy.as_ref());
    let value = match when {
        "whenDeleted" => policy.and_then(|p| p.when_deleted.as_deref()),
        _ => policy.and_then(|p| p.when_scaled.as_deref()),
    };
    value == Some("Delete")
}

/// Creates the claims pod `n` needs (those that exist are kept as they are).
async fn ensure_claims(ctx: &Ctx, set: &StatefulSet, n: i32) -> Result<(), Error> {
    let ns = set.namespace().unwrap_or_default();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let spec = set.spec.clone().unwrap_or_default();
    let match_labels = spec.selector.match_labels.clone().unwrap_or_default();
    for t in spec.volume_claim_templates.iter().flatten() {
        let mut pvc = t.clone();
        pvc.metadata.name = Some(claim_name(&t.name_any(), &set.name_any(), n));
        pvc.metadata.namespace = Some(ns.clone());
        pvc.metadata.resource_version = None;
        pvc.metadata.uid = None;
        pvc.status = None;
        let labels = pvc.metadata.labels.get_or_insert_with(BTreeMap::new);
        labels.extend(match_labels.clone());
        if claims_go(set, "whenDeleted") {
            pvc.metadata.owner_references = Some(vec![owner_ref(set)]);
        }
        match api.create(&PostParams::default(), &pvc).await {
            Ok(_) => {
                ctx.events
                    .record(
                        set,
                        COMPONENT,
                        Kind::Normal,
                        "SuccessfulCreate",
                        &format!(
                            "create Claim {} Pod {}-{n} in StatefulSet {} success",
                            pvc.name_any(),
                            set.name_any(),
                            set.name_any()
                        ),
                    )
                    .await;
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The template of revision `name` (the current revision of pods below the partition).
async fn template_of(ctx: &Ctx, ns: &str, name: &str) -> Result<Option<PodTemplateSpec>, Error> {
    let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), ns);
    let Some(r) = api.get_opt(name).await? else {
        return Ok(None);
    };
    let mut t = r
        .data
        .map(|d| d.0)
        .and_then(|d| d.pointer("/spec/template").cloned())
        .unwrap_or_default();
    if let Some(o) = t.as_object_mut() {
        o.remove("$patch");
    }
    Ok(serde_json::from_value(t).ok())
}

async fn delete_pod(ctx: &Ctx, set: &StatefulSet, api: &Api<Pod>, p: &Pod) -> Result<(), Error> {
    match api.delete(&p.name_any(), &DeleteParams::default()).await {
        Err(e) if !not_found(&e) => Err(e.into()),
        _ => {
            ctx.events
                .record(
                    set,
                    COMPONENT,
                    Kind::Normal,
                    "SuccessfulDelete",
                    &format!(
                        "delete Pod {} in StatefulSet {} successful",
                        p.name_any(),
                        set.name_any()
                    ),
                )
                .await;
            Ok(())
        }
    }
}

async fn reconcile(set: Arc<StatefulSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if set.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = set.name_any();
    let ns = set.namespace().unwrap_or_default();
    let spec = set.spec.clone().unwrap_or_default();
    let selector = LabelSelector::from_api(Some(&spec.selector))
        .map_err(|e| Error::Invalid(format!("statefulset {name}: {e}")))?;
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let parallel = spec.pod_management_policy.as_deref() == Some("Parallel");
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.type_.as_deref())
        .unwrap_or("RollingUpdate")
        == "RollingUpdate";
    let partition = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.partition)
        .unwrap_or(0)
        .max(0);
    let status = set.status.clone().unwrap_or_default();
    let keep: Vec<String> = status.current_revision.iter().cloned().collect();
    let limit = usize::try_from(spec.revision_history_limit.unwrap_or(10)).unwrap_or(10);
    let update = history::sync(
        &ctx.client,
        &*set,
        &spec.template,
        &spec.selector.match_labels.clone().unwrap_or_default(),
        limit,
        &keep,
    )
    .await?;
    let current = status
        .current_revision
        .clone()
        .unwrap_or_else(|| update.name.clone());
    // Pods below the partition are recreated at the current revision.
    let current_template = if current != update.name && rolling && partition > 0 {
        template_of(&ctx, &ns, &current)
            .await?
            .unwrap_or_else(|| spec.template.clone())
    } else {
        spec.template.clone()
    };

    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pods = pods_api.list(&ListParams::default()).await?.items;
    let mine = claim(&pods_api, pods, &*set, &selector).await?;
    let mut by_ordinal: BTreeMap<i32, Pod> = BTreeMap::new();
    for p in mine {
        match ordinal(&name, &p.name_any()) {
            Some(n) => {
                by_ordinal.insert(n, p);
            }
            // Not a name of this set: it does not belong here.
            None if p.metadata.deletion_timestamp.is_none() => {
                delete_pod(&ctx, &set, &pods_api, &p).await?;
            }
            None => {}
        }
    }

    let mut blocked = false;
    // Failed pods go; they come back under the same name.
    for p in by_ordinal
        .values()
        .filter(|p| failed(p) && p.metadata.deletion_timestamp.is_none())
    {
        delete_pod(&ctx, &set, &pods_api, p).await?;
        blocked = true;
    }
    // Create what is missing, in order.
    if !blocked {
        for n in 0..replicas {
            match by_ordinal.get(&n) {
                None => {
                    ensure_claims(&ctx, &set, n).await?;
                    let (template, revision) = if rolling && n < partition {
                        (&current_template, current.as_str())
                    } else {
                        (&spec.template, update.name.as_str())
                    };
                    create_pod(
                        &ctx,
                        &pods_api,
                        &*set,
                        COMPONENT,
                        &new_pod(&set, template, n, revision)?,
                    )
                    .await?;
                    if !parallel {
                        blocked = true;
                        break;
                    }
                }
                Some(p) if !parallel && !healthy(p) => {
                    blocked = true;
                    break;
                }
                Some(_) => {}
            }
        }
    }
    // Scale down from the highest ordinal.
    let condemned: Vec<&Pod> = by_ordinal
        .range(replicas..)
        .rev()
        .map(|(_, p)| p)
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    if !condemned.is_empty() && (parallel || !blocked) {
        let all_healthy = by_ordinal
            .values()
            .all(|p| healthy(p) || p.metadata.deletion_timestamp.is_some());
        let terminating = by_ordinal
            .values()
            .any(|p| p.metadata.deletion_timestamp.is_some());
        if parallel {
            for p in &condemned {
                delete_pod(&ctx, &set, &pods_api, p).await?;
            }
        } else if all_healthy && !terminating {
            delete_pod(&ctx, &set, &pods_api, condemned[0]).await?;
        }
        blocked = true;
    }
    // Claims of ordinals that are gone, when the policy says so.
    if claims_go(&set, "whenScaled") {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        for t in spec.volume_claim_templates.iter().flatten() {
            let prefix = format!("{}-", t.name_any());
            for pvc in pvcs.list(&ListParams::default()).await?.items {
                let Some(n) = pvc
                    .name_any()
                    .strip_prefix(&prefix)
                    .and_then(|rest| ordinal(&name, rest))
                else {
                    continue;
                };
                if n >= replicas && !by_ordinal.contains_key(&n) {
                    match pvcs.delete(&pvc.name_any(), &DeleteParams::default()).await {
                        Err(e) if !not_found(&e) => return Err(e.into()),
                        _ => {}
                    }
                }
            }
        }
    }
    // RollingUpdate: from the highest ordinal down to the partition, one at a time.
    if rolling && !blocked {
        for n in (partition..replicas).rev() {
            let Some(p) = by_ordinal.get(&n) else { break };
            if p.labels().get(HASH_LABEL) != Some(&update.name) {
                if p.metadata.deletion_timestamp.is_none() {
                    delete_pod(&ctx, &set, &pods_api, p).await?;
                }
                break;
            }
            if !healthy(p) {
                break;
            }
        }
    }
    write_status(&set, &ctx, &pods_api, &update, &current, replicas).await?;
    Ok(Action::await_change())
}

async fn write_status(
    set: &StatefulSet,
    ctx: &Ctx,
    pods_api: &Api<Pod>,
    update: &history::Revision,
    current: &str,
    replicas: i32,
) -> Result<(), Error> {
    let uid = set.uid().unwrap_or_default();
    let name = set.name_any();
    let pods: Vec<Pod> = pods_api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| {
            super::controller_of(&p.metadata).is_some_and(|o| o.uid == uid)
                && ordinal(&name, &p.name_any()).is_some()
                && is_active(p)
        })
        .collect();
    let min_ready = i64::from(
        set.spec
            .as_ref()
            .and_then(|s| s.min_ready_seconds)
            .unwrap_or(0),
    );
    let count = |f: &dyn Fn(&Pod) -> bool| pods.iter().filter(|p| f(p)).count();
    let ready = count(&|p| healthy(p));
    let available = count(&|p| healthy(p) && ready_since(p).is_some_and(|s| s >= min_ready));
    let at = |rev: &str| count(&|p| p.labels().get(HASH_LABEL).map(String::as_str) == Some(rev));
    let updated = at(&update.name);
    let replicas = usize::try_from(replicas).unwrap_or(0);
    // The rollout is done once every pod runs the update revision and is ready.
    let (current, current_count) =
        if updated == replicas && ready == replicas && pods.len() == replicas {
            (update.name.as_str(), updated)
        } else {
            (current, at(current))
        };
    let status = json!({
        "replicas": pods.len(),
        "readyReplicas": ready,
        "availableReplicas": available,
        "currentReplicas": current_count,
        "updatedReplicas": updated,
        "currentRevision": current,
        "updateRevision": update.name,
        "collisionCount": 0,
        "observedGeneration": set.metadata.generation,
    });
    super::patch_status_if_changed(&ctx.client, set, status).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_are_exact_suffixes() {
        assert_eq!(ordinal("web", "web-0"), Some(0));
        assert_eq!(ordinal("web", "web-12"), Some(12));
        assert_eq!(ordinal("web", "web-01"), None);
        assert_eq!(ordinal("web", "web-x"), None);
        assert_eq!(ordinal("web", "webx-1"), None);
        assert_eq!(ordinal("web", "web--1"), None);
        assert_eq!(claim_name("data", "web", 2), "data-web-2");
    }

    #[test]
    fn pods_get_stable_names_hostnames_and_their_own_claims() {
        let set: StatefulSet = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "demo", "uid": "u1"},
            "spec": {"serviceName": "web", "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "i"}],
                                           "volumes": [{"name": "data", "emptyDir": {}}]}},
                     "volumeClaimTemplates": [{"metadata": {"name": "data"},
                         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}
        }))
        .unwrap();
        let spec = set.spec.clone().unwrap();
        let pod = new_pod(&set, &spec.template, 2, "web-abc").unwrap();
        assert_eq!(pod.name_any(), "web-2");
        let labels = pod.labels();
        assert_eq!(labels[POD_NAME_LABEL], "web-2");
        assert_eq!(labels[POD_INDEX_LABEL], "2");
        assert_eq!(labels[HASH_LABEL], "web-abc");
        let ps = pod.spec.unwrap();
        assert_eq!(
            (ps.hostname.as_deref(), ps.subdomain.as_deref()),
            (Some("web-2"), Some("web"))
        );
        let volumes = ps.volumes.unwrap();
        assert_eq!(
            volumes.len(),
            1,
            "the claim replaces the template's volume of its name"
        );
        assert_eq!(
            volumes[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "data-web-2"
        );
    }
}
