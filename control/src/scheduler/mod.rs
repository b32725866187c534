//! The scheduler: assigns pending pods (no `spec.nodeName`, `schedulerName` unset or
//! `default-scheduler`) to nodes and binds them through `pods/binding`, as kube-scheduler
//! does. It keeps its own view of the nodes and of what is placed on them from two watches,
//! counts a pod against its node the moment it decides (so pods decided in a row never
//! over-commit a node even before the API has confirmed the bindings), binds several pods at
//! once, and records `Scheduled` or `FailedScheduling` events (and the pod's PodScheduled
//! condition) with kube-scheduler's wording. Pods that fit nowhere are tried again when the
//! cluster changes and at least every few seconds.

pub mod plugins;

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    sync::Arc,
    time::Duration,
};

use futures::{StreamExt, stream::FuturesUnordered};
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod};
use kube::{
    Api, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

pub use plugins::tolerates;
use plugins::{NodeInfo, Snapshot};

use crate::controllers::Ctx;
use weft_events::Kind;

const COMPONENT: &str = "default-scheduler";
/// Bindings in flight at once.
const IN_FLIGHT: usize = 32;

fn key(pod: &Pod) -> (String, String) {
    (pod.namespace().unwrap_or_default(), pod.name_any())
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .filter(|n| !n.is_empty())
}

fn ours(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduler_name.as_deref())
        .is_none_or(|n| n.is_empty() || n == COMPONENT)
}

/// Whether a bound pod still holds its node's resources.
fn holds(pod: &Pod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

#[derive(Debug, Default)]
struct State {
    snap: Snapshot,
    index: HashMap<String, usize>,
    /// uid → node, for every pod counted on a node.
    placed: HashMap<String, String>,
    /// Pending pods by key.
    pending: HashMap<(String, String), Pod>,
    queue: VecDeque<(String, String)>,
    queued: HashSet<(String, String)>,
    /// Pods that fit nowhere, tried again when the cluster changes.
    unschedulable: BTreeSet<(String, String)>,
    ties: usize,
}

impl State {
    fn reindex(&mut self) {
        self.index = self
            .snap
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.node.name_any(), i))
            .collect();
    }

    fn enqueue(&mut self, k: (String, String)) {
        if self.queued.insert(k.clone()) {
            self.queue.push_back(k);
        }
    }

    fn retry_unschedulable(&mut self) {
        for k in std::mem::take(&mut self.unschedulable) {
            self.enqueue(k);
        }
    }

    fn unplace(&mut self, uid: &str) {
        let Some(node) = self.placed.remove(uid) else {
            return;
        };
        if let Some(&i) = self.index.get(&node) {
            let info = &mut self.snap.nodes[i];
            let rest: Vec<Pod> = std::mem::take(&mut info.pods)
                .into_iter()
                .filter(|p| p.uid().as_deref() != Some(uid))
                .collect();
            let mut fresh = NodeInfo::new(info.node.clone());
            for p in rest {
                fresh.add(p);
            }
            *info = fresh;
        }
    }

    fn place(&mut self, pod: Pod, node: &str) {
        let uid = pod.uid().unwrap_or_default();
        self.unplace(&uid);
        if let Some(&i) = self.index.get(node) {
            self.snap.nodes[i].add(pod);
            self.placed.insert(uid, node.to_owned());
        }
    }

    fn pod_changed(&mut self, pod: Pod) {
        let k = key(&pod);
        let uid = pod.uid().unwrap_or_default();
        match node_of(&pod).map(str::to_owned) {
            Some(node) => {
                self.pending.remove(&k);
                self.unschedulable.remove(&k);
                if holds(&pod) {
                    self.place(pod, &node);
                } else {
                    self.unplace(&uid);
                    self.retry_unschedulable();
                }
            }
            None if pod.metadata.deletion_timestamp.is_none() && ours(&pod) => {
                self.pending.insert(k.clone(), pod);
                if !self.unschedulable.contains(&k) {
                    self.enqueue(k);
                }
            }
            None => {
                self.pending.remove(&k);
            }
        }
    }

    fn pod_gone(&mut self, pod: &Pod) {
        let k = key(pod);
        self.pending.remove(&k);
        self.unschedulable.remove(&k);
        if self.placed.contains_key(pod.uid().as_deref().unwrap_or("")) {
            self.unplace(pod.uid().as_deref().unwrap_or(""));
            self.retry_unschedulable();
        }
    }

    fn node_changed(&mut self, node: Node) {
        let name = node.name_any();
        match self.index.get(&name) {
            Some(&i) => self.snap.nodes[i].node = node,
            None => {
                self.snap.nodes.push(NodeInfo::new(node));
                self.reindex();
            }
        }
        self.retry_unschedulable();
    }

    fn node_gone(&mut self, node: &Node) {
        let name = node.name_any();
        self.snap.nodes.retain(|n| n.node.name_any() != name);
        self.placed.retain(|_, n| *n != name);
        self.reindex();
    }
}

/// The outcome of one binding.
type Bound = ((String, String), Pod, String, Result<(), kube::Error>);

/// Runs the scheduler until the API goes away for good.
pub async fn run(ctx: Arc<Ctx>) {
    let nodes = watcher(
        Api::<Node>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .boxed();
    let pods = watcher(
        Api::<Pod>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .boxed();
    let mut nodes = nodes.fuse();
    let mut pods = pods.fuse();
    let mut state = State::default();
    let (mut nodes_synced, mut pods_synced) = (false, false);
    let mut binds: FuturesUnordered<futures::future::BoxFuture<'static, Bound>> =
        FuturesUnordered::new();
    let mut retry = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            Some(e) = nodes.next() => match e {
                Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => state.node_changed(n),
                Ok(watcher::Event::Delete(n)) => state.node_gone(&n),
                Ok(watcher::Event::InitDone) => nodes_synced = true,
                Ok(watcher::Event::Init) => {}
                Err(e) => tracing::debug!(error = %e, "scheduler: node watch"),
            },
            Some(e) = pods.next() => match e {
                Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => state.pod_changed(p),
                Ok(watcher::Event::Delete(p)) => state.pod_gone(&p),
                Ok(watcher::Event::InitDone) => pods_synced = true,
                Ok(watcher::Event::Init) => {}
                Err(e) => tracing::debug!(error = %e, "scheduler: pod watch"),
            },
            Some((k, pod, _, result)) = binds.next(), if !binds.is_empty() => {
                bound(&mut state, k, pod, result);
            }
            _ = retry.tick() => state.retry_unschedulable(),
        }
        if !(nodes_synced && pods_synced) {
            continue;
        }
        while binds.len() < IN_FLIGHT {
            let Some(k) = state.queue.pop_front() else {
                break;
            };
            state.queued.remove(&k);
            let Some(pod) = state.pending.get(&k).cloned() else {
                continue;
            };
            let tie = state.ties;
            state.ties = state.ties.wrapping_add(1);
            let decided = match with_volume_affinity(&ctx, &pod).await {
                Ok(constrained) => plugins::choose(&constrained, &state.snap, tie),
                Err(message) => Err(message),
            };
            match decided {
                Ok(i) => {
                    let node = state.snap.nodes[i].node.name_any();
                    // Counted at once, so the next decision sees it.
                    let mut assumed = pod.clone();
                    assumed.spec.get_or_insert_default().node_name = Some(node.clone());
                    state.place(assumed, &node);
                    state.pending.remove(&k);
                    binds.push(Box::pin(bind(ctx.clone(), k, pod, node)));
                }
                Err(message) => {
                    state.unschedulable.insert(k);
                    unschedulable(&ctx, &pod, &message).await;
                }
            }
        }
    }
}

/// The pod as the filters should see it: with the node selector terms of the PersistentVolumes
/// its bound claims use ([`plugins::VOLUME_AFFINITY`]); a claim that does not exist makes the
/// pod unschedulable, as in kube-scheduler. Unbound claims add nothing: their volume is made on
/// the node the pod goes to.
async fn with_volume_affinity(ctx: &Ctx, pod: &Pod) -> Result<Pod, String> {
    let claims: Vec<String> = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|v| Some(v.persistent_volume_claim.as_ref()?.claim_name.clone()))
        .collect();
    if claims.is_empty() {
        return Ok(pod.clone());
    }
    let ns = pod.namespace().unwrap_or_default();
    let pvcs: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &ns);
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(ctx.client.clone());
    let mut volumes = Vec::new();
    for name in claims {
        let pvc = match pvcs.get_opt(&name).await {
            Ok(Some(c)) => c,
            Ok(None) => return Err(format!("persistentvolumeclaim \"{name}\" not found")),
            Err(e) => return Err(format!("persistentvolumeclaim \"{name}\": {e}")),
        };
        let Some(pv) = pvc
            .spec
            .and_then(|s| s.volume_name)
            .filter(|v| !v.is_empty())
        else {
            continue;
        };
        let terms = match pvs.get_opt(&pv).await {
            Ok(Some(pv)) => pv
                .spec
                .and_then(|s| s.node_affinity)
                .and_then(|a| a.required)
                .map(|r| r.node_selector_terms),
            Ok(None) => {
                return Err(format!(
                    "persistentvolume \"{pv}\" of claim \"{name}\" not found"
                ));
            }
            Err(e) => return Err(format!("persistentvolume \"{pv}\": {e}")),
        };
        volumes.extend(terms);
    }
    let mut constrained = pod.clone();
    if !volumes.is_empty() {
        constrained.annotations_mut().insert(
            plugins::VOLUME_AFFINITY.into(),
            serde_json::to_string(&volumes).unwrap_or_default(),
        );
    }
    Ok(constrained)
}

/// Binds the pod and, once bound, records `Scheduled` (bindings and their Events run
/// concurrently, off the decision loop).
async fn bind(ctx: Arc<Ctx>, k: (String, String), pod: Pod, node: String) -> Bound {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &k.0);
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(k.1.clone()),
            namespace: Some(k.0.clone()),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            kind: Some("Node".into()),
            name: Some(node.clone()),
            api_version: Some("v1".into()),
            ..ObjectReference::default()
        },
    };
    let result = api
        .create_subresource::<_, serde_json::Value>(
            "binding",
            &k.1,
            &PostParams::default(),
            &binding,
        )
        .await
        .map(|_| ());
    if result.is_ok() {
        ctx.events
            .record(
                &pod,
                COMPONENT,
                Kind::Normal,
                "Scheduled",
                &format!("Successfully assigned {}/{} to {node}", k.0, k.1),
            )
            .await;
    }
    (k, pod, node, result)
}

fn bound(state: &mut State, k: (String, String), pod: Pod, result: Result<(), kube::Error>) {
    match result {
        Ok(()) => {}
        Err(e) => {
            // Gone, already bound or refused: forget the assumption; the watch brings the truth.
            tracing::debug!(pod = %k.1, error = %e, "binding failed");
            state.unplace(pod.uid().as_deref().unwrap_or(""));
            if !crate::controllers::not_found(&e) {
                state.pending.insert(k.clone(), pod);
                state.unschedulable.insert(k);
            }
        }
    }
}

async fn unschedulable(ctx: &Ctx, pod: &Pod, message: &str) {
    let already = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "PodScheduled"))
        .is_some_and(|c| c.status == "False" && c.message.as_deref() == Some(message));
    ctx.events
        .record(pod, COMPONENT, Kind::Warning, "FailedScheduling", message)
        .await;
    if already {
        return;
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let mut conditions: Vec<serde_json::Value> = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|c| {
            c.iter()
                .filter(|c| c.type_ != "PodScheduled")
                .map(|c| json!(c))
                .collect()
        })
        .unwrap_or_default();
    conditions.push(json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                           "lastTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now())}));
    let patch = json!({"status": {"conditions": conditions}});
    if let Err(e) = api
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        tracing::debug!(pod = %pod.name_any(), error = %e, "recording PodScheduled=False");
    }
}
