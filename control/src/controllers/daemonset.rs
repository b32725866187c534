//! The DaemonSet controller: one pod of the template on every eligible node (its node selector
//! and required affinity match, it tolerates the node's NoSchedule/NoExecute taints), as
//! kube-controller-manager's does. Each pod is pinned to its node with a required node affinity
//! on `metadata.name` and scheduled by the scheduler (so resources are still checked), and gets
//! the tolerations daemon pods always have (not-ready, unreachable, the pressure conditions,
//! unschedulable), so a cordoned or failing node keeps its daemons. Extra pods on a node,
//! pods on nodes that stopped being eligible and failed pods are deleted. A template change
//! rolls out node by node (`RollingUpdate`, at most `maxUnavailable` nodes without a ready
//! updated pod) or waits for pods to be deleted (`OnDelete`); pods carry the template's
//! `controller-revision-hash`, and each template is a ControllerRevision ([`super::history`])
//! for `kubectl rollout history|undo ds`. Status has the fields `kubectl rollout status ds`
//! reads.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{
        Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
        Toleration,
    },
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams},
    runtime::{Controller, controller::Action, reflector::ObjectRef, watcher},
};
use serde_json::json;

use super::{Ctx, Error, claim, create_pod, drive, not_found, owner_ref, retry};
use crate::{
    controllers::replicaset::{is_active, is_ready, ready_since},
    scheduler::plugins::{NodeInfo, daemon_eligible},
    selector::LabelSelector,
};
use weft_events::Kind;

const COMPONENT: &str = "daemonset-controller";
/// The label carrying the template's hash.
pub const HASH_LABEL: &str = "controller-revision-hash";

/// Runs the controller until the API goes away for good.
pub async fn run(ctx: Arc<Ctx>) {
    let client = ctx.client.clone();
    let controller = Controller::new(
        Api::<DaemonSet>::all(client.clone()),
        watcher::Config::default(),
    );
    // Any node change (a new node, new labels or taints) concerns every DaemonSet.
    let store = controller.store();
    let c = controller
        .owns(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .watches(
            Api::<Node>::all(client),
            watcher::Config::default(),
            move |_node| {
                store
                    .state()
                    .iter()
                    .map(|ds| ObjectRef::from_obj(&**ds))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile, retry, ctx);
    drive(COMPONENT, c).await;
}

/// The node a daemon pod is for: its nodeName, else the node its affinity pins it to.
fn node_of(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(n) = spec.node_name.as_ref().filter(|n| !n.is_empty()) {
        return Some(n.clone());
    }
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|r| r.key == "metadata.name" && r.operator == "In")
        .and_then(|r| r.values.as_ref()?.first().cloned())
}

/// The tolerations every daemon pod has (kube's `AddOrUpdateDaemonPodTolerations`).
fn daemon_tolerations(host_network: bool) -> Vec<Toleration> {
    let mut keys = vec![
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ("node.kubernetes.io/pid-pressure", "NoSchedule"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    if host_network {
        keys.push(("node.kubernetes.io/network-unavailable", "NoSchedule"));
    }
    keys.into_iter()
        .map(|(key, effect)| Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some(effect.into()),
            ..Toleration::default()
        })
        .collect()
}

/// The template as a pod (no node yet), with the daemon tolerations added to its own.
fn template_pod(ds: &DaemonSet, hash: &str) -> Result<Pod, Error> {
    let template = ds
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .ok_or_else(|| Error::Invalid(format!("daemonset {} has no spec", ds.name_any())))?;
    let mut meta = template.metadata.unwrap_or_default();
    meta.name = None;
    meta.generate_name = Some(format!("{}-", ds.name_any()));
    meta.namespace = ds.namespace();
    meta.owner_references = Some(vec![owner_ref(ds)]);
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_LABEL.into(), hash.into());
    let mut spec = template.spec.unwrap_or_default();
    let mut tolerations = spec.tolerations.take().unwrap_or_default();
    for t in daemon_tolerations(spec.host_network == Some(true)) {
        if !tolerations
            .iter()
            .any(|x| x.key == t.key && x.effect == t.effect)
        {
            tolerations.push(t);
        }
    }
    spec.tolerations = Some(tolerations);
    Ok(Pod {
        metadata: meta,
        spec: Some(spec),
        status: None,
    })
}

/// The template pod pinned to `node` (its required node affinity replaced by the node's name,
/// as kube's controller does: eligibility was already decided).
fn pinned(mut pod: Pod, node: &str) -> Pod {
    if let Some(spec) = pod.spec.as_mut() {
        let affinity = spec.affinity.get_or_insert_with(Affinity::default);
        let na = affinity
            .node_affinity
            .get_or_insert_with(NodeAffinity::default);
        na.required_during_scheduling_ignored_during_execution = Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_fields: Some(vec![NodeSelectorRequirement {
                    key: "metadata.name".into(),
                    operator: "In".into(),
                    values: Some(vec![node.to_owned()]),
                }]),
                ..NodeSelectorTerm::default()
            }],
        });
    }
    pod
}

/// `maxUnavailable` of a RollingUpdate as a number of nodes out of `desired` (at least 1).
fn max_unavailable(ds: &DaemonSet, desired: usize) -> usize {
    let v = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.clone());
    let n = match v {
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i)) => {
            usize::try_from(i).unwrap_or(0)
        }
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(p)) => p
            .trim_end_matches('%')
            .parse::<usize>()
            .map_or(1, |pct| (desired * pct) / 100),
        None => 1,
    };
    n.max(1)
}

async fn reconcile(ds: Arc<DaemonSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = ds.namespace().unwrap_or_default();
    let spec = ds.spec.clone().unwrap_or_default();
    let selector = LabelSelector::from_api(Some(&spec.selector))
        .map_err(|e| Error::Invalid(format!("daemonset {}: {e}", ds.name_any())))?;
    let hash = crate::controllers::deployment::template_hash(&spec.template, 0);
    let template = template_pod(&ds, &hash)?;
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let pods = pods_api.list(&ListParams::default()).await?.items;
    let mine: Vec<Pod> = claim(&pods_api, pods, &*ds, &selector)
        .await?
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    // The template's ControllerRevision (`kubectl rollout history|undo ds`); revisions live
    // pods still run are kept.
    let live: Vec<String> = mine
        .iter()
        .filter_map(|p| p.labels().get(HASH_LABEL))
        .map(|h| format!("{}-{h}", ds.name_any()))
        .collect();
    super::history::sync(
        &ctx.client,
        &*ds,
        &spec.template,
        &spec.selector.match_labels.clone().unwrap_or_default(),
        usize::try_from(spec.revision_history_limit.unwrap_or(10)).unwrap_or(10),
        &live,
    )
    .await?;
    let mut by_node: BTreeMap<String, Vec<Pod>> = BTreeMap::new();
    let mut delete: Vec<Pod> = Vec::new();
    for p in mine {
        match node_of(&p) {
            Some(n) => by_node.entry(n).or_default().push(p),
            None => delete.push(p),
        }
    }
    let eligible: Vec<String> = nodes
        .into_iter()
        .filter(|n| daemon_eligible(&template, &NodeInfo::new(n.clone())))
        .map(|n| n.name_any())
        .collect();
    let mut create: Vec<String> = Vec::new();
    let mut outdated: Vec<Pod> = Vec::new();
    for node in &eligible {
        let mut here = by_node.remove(node).unwrap_or_default();
        // Failed pods are replaced.
        let (active, failed): (Vec<Pod>, Vec<Pod>) = here.drain(..).partition(is_active);
        delete.extend(failed);
        let mut active = active;
        // Keep the oldest, updated ones first.
        active.sort_by_key(|p| {
            (
                p.labels().get(HASH_LABEL) != Some(&hash),
                p.metadata.creation_timestamp.clone().map(|t| t.0),
            )
        });
        let mut rest = active.into_iter();
        match rest.next() {
            None => create.push(node.clone()),
            Some(p) if p.labels().get(HASH_LABEL) != Some(&hash) => outdated.push(p),
            Some(_) => {}
        }
        delete.extend(rest);
    }
    // Nodes no longer eligible lose their daemon pods.
    delete.extend(by_node.into_values().flatten());
    // A RollingUpdate replaces outdated pods while at most maxUnavailable nodes lack a ready
    // pod of the current template.
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.type_.as_deref())
        .unwrap_or("RollingUpdate")
        == "RollingUpdate";
    if rolling && !outdated.is_empty() {
        let unavailable = create.len()
            + outdated.iter().filter(|p| !is_ready(p)).count()
            + by_node_unready(&eligible, &pods_api, &hash).await?;
        let budget = max_unavailable(&ds, eligible.len()).saturating_sub(unavailable);
        // Unready outdated pods go first: they serve nothing.
        outdated.sort_by_key(is_ready);
        let unready_outdated = outdated.iter().filter(|p| !is_ready(p)).count();
        let take = unready_outdated + budget;
        delete.extend(outdated.into_iter().take(take));
    }
    for p in &delete {
        match pods_api
            .delete(&p.name_any(), &DeleteParams::default())
            .await
        {
            Err(e) if !not_found(&e) => return Err(e.into()),
            _ => {
                ctx.events
                    .record(
                        &*ds,
                        COMPONENT,
                        Kind::Normal,
                        "SuccessfulDelete",
                        &format!("Deleted pod: {}", p.name_any()),
                    )
                    .await;
            }
        }
    }
    for node in &create {
        create_pod(
            &ctx,
            &pods_api,
            &*ds,
            COMPONENT,
            &pinned(template.clone(), node),
        )
        .await?;
    }
    write_status(&ds, &ctx, &pods_api, &eligible, &hash).await?;
    Ok(Action::await_change())
}

/// Eligible nodes whose pod of the current template exists but is not ready.
async fn by_node_unready(eligible: &[String], api: &Api<Pod>, hash: &str) -> Result<usize, Error> {
    let pods = api
        .list(&ListParams::default().labels(&format!("{HASH_LABEL}={hash}")))
        .await?
        .items;
    Ok(pods
        .iter()
        .filter(|p| is_active(p) && !is_ready(p))
        .filter(|p| node_of(p).is_some_and(|n| eligible.contains(&n)))
        .count())
}

async fn write_status(
    ds: &DaemonSet,
    ctx: &Ctx,
    pods_api: &Api<Pod>,
    eligible: &[String],
    hash: &str,
) -> Result<(), Error> {
    let uid = ds.uid().unwrap_or_default();
    let pods: Vec<Pod> = pods_api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| super::controller_of(&p.metadata).is_some_and(|o| o.uid == uid) && is_active(p))
        .collect();
    let min_ready = i64::from(
        ds.spec
            .as_ref()
            .and_then(|s| s.min_ready_seconds)
            .unwrap_or(0),
    );
    let on_eligible = |p: &&Pod| node_of(p).is_some_and(|n| eligible.contains(&n));
    let scheduled = pods.iter().filter(on_eligible).count();
    let misscheduled = pods.len() - scheduled;
    let ready = pods
        .iter()
        .filter(on_eligible)
        .filter(|p| is_ready(p))
        .count();
    let available = pods
        .iter()
        .filter(on_eligible)
        .filter(|p| ready_since(p).is_some_and(|s| s >= min_ready))
        .count();
    let updated = pods
        .iter()
        .filter(on_eligible)
        .filter(|p| p.labels().get(HASH_LABEL).map(String::as_str) == Some(hash))
        .count();
    let status = json!({
        "currentNumberScheduled": scheduled,
        "numberMisscheduled": misscheduled,
        "desiredNumberScheduled": eligible.len(),
        "numberReady": ready,
        "updatedNumberScheduled": updated,
        "numberAvailable": available,
        "numberUnavailable": eligible.len().saturating_sub(available),
        "observedGeneration": ds.metadata.generation,
    });
    super::patch_status_if_changed(&ctx.client, ds, status).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_pods_are_pinned_and_tolerate_what_daemons_tolerate() {
        let ds: DaemonSet = serde_json::from_value(json!({
            "metadata": {"name": "agent", "namespace": "kube-system", "uid": "u1"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                     "template": {"metadata": {"labels": {"app": "agent"}},
                                  "spec": {"hostNetwork": true, "containers": [{"name": "a", "image": "x"}],
                                           "tolerations": [{"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}]}}}
        }))
        .unwrap();
        let pod = pinned(template_pod(&ds, "h1").unwrap(), "node2");
        assert_eq!(node_of(&pod).as_deref(), Some("node2"));
        assert_eq!(pod.labels().get(HASH_LABEL).map(String::as_str), Some("h1"));
        let tol = pod.spec.as_ref().unwrap().tolerations.clone().unwrap();
        assert_eq!(
            tol.len(),
            7,
            "six defaults, network-unavailable, no duplicate: {tol:?}"
        );
        let node = |taints: serde_json::Value| -> NodeInfo {
            NodeInfo::new(
                serde_json::from_value(
                    json!({"metadata": {"name": "n"}, "spec": {"taints": taints}}),
                )
                .unwrap(),
            )
        };
        // Eligibility is decided on the template, before pinning.
        let template = template_pod(&ds, "h1").unwrap();
        assert!(daemon_eligible(
            &template,
            &node(json!([{"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}]))
        ));
        assert!(
            !daemon_eligible(&pod, &node(json!([]))),
            "pinned to node2, not n"
        );
        assert!(!daemon_eligible(
            &template,
            &node(json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]))
        ));
        assert_eq!(max_unavailable(&ds, 10), 1);
    }
}
