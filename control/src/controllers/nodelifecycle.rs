//! The node lifecycle controller: a node whose Lease (in `kube-node-lease`) has not been
//! renewed for the grace period gets its conditions set to `Unknown` and the
//! `node.kubernetes.io/unreachable` taints; a node that reports `Ready=False` gets
//! `node.kubernetes.io/not-ready`. Pods on a node with a `NoExecute` taint they do not
//! tolerate are evicted, at once or after their `tolerationSeconds` (every pod tolerates the
//! two taints for 300 s unless it says otherwise, as kube-apiserver's admission adds), so
//! their ReplicaSets recreate them elsewhere; each is first given the `DisruptionTarget`
//! condition (`DeletionByTaintManager`), which a Job's podFailurePolicy can match. A node that renews its Lease again loses the
//! taints.

use std::{collections::HashMap, sync::Arc};

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Node, Pod, Taint},
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde_json::json;

use super::{Ctx, Error, age_secs, not_found};
use weft_events::Kind;

const COMPONENT: &str = "node-controller";
/// Taint key of a node whose agent stopped renewing its Lease.
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// Taint key of a node that reports itself not ready.
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

/// Runs the controller until the process ends.
pub async fn run(ctx: Arc<Ctx>) {
    let mut tick = tokio::time::interval(ctx.options.node_monitor_period);
    loop {
        tick.tick().await;
        if let Err(e) = pass(&ctx).await {
            tracing::debug!(error = %e, "node lifecycle pass");
        }
    }
}

fn ready_status(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

/// Seconds since the node was last heard of: its Lease's renewTime, else its Ready
/// condition's heartbeat, else its creation.
fn silence(node: &Node, lease: Option<&Lease>) -> i64 {
    if let Some(t) = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
    {
        return (Timestamp::now().as_second() - t.0.as_second()).max(0);
    }
    let heartbeat = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time.as_ref());
    age_secs(heartbeat.or(node.metadata.creation_timestamp.as_ref()))
}

async fn pass(ctx: &Ctx) -> Result<(), Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), "kube-node-lease");
    let leases: HashMap<String, Lease> = leases
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|l| (l.name_any(), l))
        .collect();
    let grace = i64::try_from(ctx.options.node_grace.as_secs()).unwrap_or(40);
    let mut tainted: Vec<(String, Vec<Taint>)> = Vec::new();
    for node in nodes.list(&ListParams::default()).await?.items {
        let name = node.name_any();
        let lost = silence(&node, leases.get(&name)) > grace;
        let ready = ready_status(&node);
        if lost && ready.as_deref() != Some("Unknown") {
            mark_unknown(&nodes, &node).await?;
            ctx.events
                .record(
                    &node,
                    COMPONENT,
                    Kind::Normal,
                    "NodeNotReady",
                    &format!("Node {name} status is now: NodeNotReady"),
                )
                .await;
        }
        let key = if lost || ready.as_deref() == Some("Unknown") {
            Some(UNREACHABLE)
        } else if ready.as_deref() != Some("True") {
            Some(NOT_READY)
        } else {
            None
        };
        let taints = set_taints(&nodes, &node, key).await?;
        if taints.iter().any(|t| t.effect == "NoExecute") {
            tainted.push((name, taints));
        }
    }
    for (node, taints) in tainted {
        evict(ctx, &node, &taints).await?;
    }
    Ok(())
}

async fn mark_unknown(nodes: &Api<Node>, node: &Node) -> Result<(), Error> {
    let now = Time(Timestamp::now());
    let conditions: Vec<_> = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|mut c| {
            if c.status != "Unknown" {
                c.last_transition_time = Some(now.clone());
            }
            c.status = "Unknown".into();
            c.reason = Some("NodeStatusUnknown".into());
            c.message = Some("Kubelet stopped posting node status.".into());
            c
        })
        .collect();
    let conditions = if conditions.iter().any(|c| c.type_ == "Ready") {
        conditions
    } else {
        let mut c = conditions;
        c.push(k8s_openapi::api::core::v1::NodeCondition {
            type_: "Ready".into(),
            status: "Unknown".into(),
            reason: Some("NodeStatusNeverUpdated".into()),
            message: Some("Kubelet never posted node status.".into()),
            last_transition_time: Some(now),
            last_heartbeat_time: None,
        });
        c
    };
    nodes
        .patch_status(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": conditions}})),
        )
        .await?;
    Ok(())
}

/// Makes the node's lifecycle taints those of `key` (none when `None`); returns its taints.
async fn set_taints(
    nodes: &Api<Node>,
    node: &Node,
    key: Option<&str>,
) -> Result<Vec<Taint>, Error> {
    let current = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let mut next: Vec<Taint> = current
        .iter()
        .filter(|t| (t.key != UNREACHABLE && t.key != NOT_READY) || Some(t.key.as_str()) == key)
        .cloned()
        .collect();
    if let Some(k) = key {
        for effect in ["NoSchedule", "NoExecute"] {
            if !next.iter().any(|t| t.key == k && t.effect == effect) {
                next.push(Taint {
                    key: k.to_owned(),
                    effect: effect.to_owned(),
                    time_added: (effect == "NoExecute").then(|| Time(Timestamp::now())),
                    value: None,
                });
            }
        }
    }
    if next != current {
        let patch = json!({"spec": {"taints": next}});
        nodes
            .patch(
                &node.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
    }
    Ok(next)
}

/// Deletes the pods on `node` whose tolerations of its NoExecute taints have run out.
async fn evict(ctx: &Ctx, node: &str, taints: &[Taint]) -> Result<(), Error> {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await?
        .items;
    for pod in on_node {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let tolerations = pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.clone())
            .unwrap_or_default();
        let due = taints.iter().filter(|t| t.effect == "NoExecute").any(|t| {
            let tolerated = tolerations
                .iter()
                .find(|tol| crate::scheduler::tolerates(tol, t));
            match tolerated {
                None => true,
                Some(tol) => tol
                    .toleration_seconds
                    .is_some_and(|secs| age_secs(t.time_added.as_ref()) >= secs),
            }
        });
        if !due {
            continue;
        }
        let api: Api<Pod> =
            Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
        let mut conditions: Vec<serde_json::Value> = pod
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .filter(|c| c.type_ != "DisruptionTarget")
            .map(|c| json!(c))
            .collect();
        conditions.push(json!({"type": "DisruptionTarget", "status": "True",
            "reason": "DeletionByTaintManager", "message": "Taint manager: deleting due to NoExecute taint",
            "lastTransitionTime": Time(Timestamp::now())}));
        let marked = api
            .patch_status(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": conditions}})),
            )
            .await;
        if let Err(e) = marked
            && !not_found(&e)
        {
            return Err(e.into());
        }
        match api.delete(&pod.name_any(), &DeleteParams::default()).await {
            Err(e) if !not_found(&e) => return Err(e.into()),
            _ => {
                ctx.events
                    .record(
                        &pod,
                        COMPONENT,
                        Kind::Normal,
                        "TaintManagerEviction",
                        &format!(
                            "Marking for deletion Pod {}/{}",
                            pod.namespace().unwrap_or_default(),
                            pod.name_any()
                        ),
                    )
                    .await;
            }
        }
    }
    Ok(())
}
