//! The garbage collector: ownerReference cascading deletion, as kube-controller-manager's.
//! It watches every served kind into one graph (uid → object, owner → dependents) and acts on
//! what changes:
//!
//! * an object none of whose owners exists any more is deleted (background), after a live
//!   read confirms the owners are gone (so a cache that lags never deletes a live object's
//!   dependents);
//! * an owner deleted with `propagationPolicy: Foreground` (finalizer `foregroundDeletion`)
//!   has its dependents deleted the same way, and loses the finalizer (and so goes) once no
//!   dependent with `blockOwnerDeletion` is left;
//! * an owner deleted with `Orphan` (finalizer `orphan`) has its ownerReference removed from
//!   its dependents, then loses the finalizer.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{
    Api, ResourceExt,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

use super::{Ctx, Error, not_found};
use crate::resources::{self, RESOURCES, Resource};

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";

fn api_resource(r: &Resource) -> ApiResource {
    ApiResource {
        group: r.group.to_owned(),
        version: r.version.to_owned(),
        api_version: r.api_version(),
        kind: r.kind.to_owned(),
        plural: r.plural.to_owned(),
    }
}

#[derive(Clone, Debug)]
struct Node {
    resource: &'static Resource,
    namespace: String,
    name: String,
    owners: Vec<OwnerReference>,
    finalizers: Vec<String>,
    deleting: bool,
}

#[derive(Debug, Default)]
struct Graph {
    nodes: HashMap<String, Node>,
    dependents: HashMap<String, BTreeSet<String>>,
}

impl Graph {
    fn insert(&mut self, uid: String, node: Node) {
        self.remove(&uid);
        for o in &node.owners {
            self.dependents
                .entry(o.uid.clone())
                .or_default()
                .insert(uid.clone());
        }
        self.nodes.insert(uid, node);
    }

    fn remove(&mut self, uid: &str) {
        if let Some(old) = self.nodes.remove(uid) {
            for o in &old.owners {
                if let Some(d) = self.dependents.get_mut(&o.uid) {
                    d.remove(uid);
                    if d.is_empty() {
                        self.dependents.remove(&o.uid);
                    }
                }
            }
        }
    }
}

fn api_for(ctx: &Ctx, r: &Resource, ns: &str) -> Api<DynamicObject> {
    let ar = api_resource(r);
    if r.namespaced {
        Api::namespaced_with(ctx.client.clone(), ns, &ar)
    } else {
        Api::all_with(ctx.client.clone(), &ar)
    }
}

/// Runs the collector until the API goes away for good.
pub async fn run(ctx: Arc<Ctx>) {
    let kinds: Vec<&'static Resource> = RESOURCES.iter().filter(|r| r.kind != "Event").collect();
    let streams = kinds.iter().enumerate().map(|(i, r)| {
        let api: Api<DynamicObject> = Api::all_with(ctx.client.clone(), &api_resource(r));
        watcher(api, watcher::Config::default())
            .default_backoff()
            .map(move |e| (i, e))
            .boxed()
    });
    let mut events = futures::stream::select_all(streams);
    let mut graph = Graph::default();
    let mut synced = vec![false; kinds.len()];
    let mut pending: BTreeSet<String> = BTreeSet::new();
    while let Some((i, event)) = events.next().await {
        let r = kinds[i];
        let touch =
            |graph: &mut Graph, pending: &mut BTreeSet<String>, o: &DynamicObject, gone: bool| {
                let uid = o.uid().unwrap_or_default();
                if let Some(d) = graph.dependents.get(&uid) {
                    pending.extend(d.iter().cloned());
                }
                // An owner waiting for its dependents looks again when one of them changes.
                pending.extend(o.owner_references().iter().map(|r| r.uid.clone()));
                if let Some(before) = graph.nodes.get(&uid) {
                    pending.extend(before.owners.iter().map(|r| r.uid.clone()));
                }
                if gone {
                    graph.remove(&uid);
                    return;
                }
                let node = Node {
                    resource: r,
                    namespace: o.namespace().unwrap_or_default(),
                    name: o.name_any(),
                    owners: o.owner_references().to_vec(),
                    finalizers: o.finalizers().to_vec(),
                    deleting: o.metadata.deletion_timestamp.is_some(),
                };
                if !node.owners.is_empty() || node.deleting {
                    pending.insert(uid.clone());
                }
                graph.insert(uid, node);
            };
        match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                touch(&mut graph, &mut pending, &o, false)
            }
            Ok(watcher::Event::Delete(o)) => touch(&mut graph, &mut pending, &o, true),
            Ok(watcher::Event::InitDone) => synced[i] = true,
            Ok(watcher::Event::Init) => {}
            Err(e) => tracing::debug!(kind = r.kind, error = %e, "garbage collector watch"),
        }
        if !synced.iter().all(|s| *s) {
            continue;
        }
        for uid in std::mem::take(&mut pending) {
            if let Err(e) = attend(&ctx, &graph, &uid).await {
                tracing::warn!(%uid, error = %e, "garbage collection; will retry on the next change");
            }
        }
    }
}

/// Whether one of `node`'s owners still exists (checked live), and whether one that does is
/// waiting for its dependents (foreground deletion).
async fn owners_state(ctx: &Ctx, graph: &Graph, node: &Node) -> Result<(bool, bool), Error> {
    let mut alive = false;
    let mut waiting = false;
    for o in &node.owners {
        let waits_for_dependents = |deleting: bool, finalizers: &[String]| {
            deleting && finalizers.iter().any(|f| f == FOREGROUND)
        };
        let fg = match graph.nodes.get(&o.uid) {
            Some(n) => waits_for_dependents(n.deleting, &n.finalizers),
            None => {
                // Not in the graph: confirm with a live read before trusting that.
                let Some(r) = resources::by_kind(&o.api_version, &o.kind) else {
                    continue;
                };
                match api_for(ctx, r, &node.namespace).get_opt(&o.name).await? {
                    Some(live) if live.uid().as_deref() == Some(o.uid.as_str()) => {
                        waits_for_dependents(
                            live.metadata.deletion_timestamp.is_some(),
                            live.finalizers(),
                        )
                    }
                    _ => continue,
                }
            }
        };
        alive = true;
        waiting |= fg;
    }
    Ok((alive, waiting))
}

async fn attend(ctx: &Ctx, graph: &Graph, uid: &str) -> Result<(), Error> {
    let Some(node) = graph.nodes.get(uid) else {
        return Ok(());
    };
    let api = api_for(ctx, node.resource, &node.namespace);
    if !node.owners.is_empty() && !node.deleting {
        let (alive, waiting) = owners_state(ctx, graph, node).await?;
        if !alive || waiting {
            let params = if waiting {
                DeleteParams::foreground()
            } else {
                DeleteParams::background()
            };
            let preconditions = kube::api::Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            };
            match api
                .delete(
                    &node.name,
                    &DeleteParams {
                        preconditions: Some(preconditions),
                        ..params
                    },
                )
                .await
            {
                Err(e) if !not_found(&e) => return Err(e.into()),
                _ => {
                    tracing::debug!(kind = node.resource.kind, name = %node.name, "garbage collected")
                }
            }
            return Ok(());
        }
    }
    if !node.deleting {
        return Ok(());
    }
    let dependents: Vec<&Node> = graph
        .dependents
        .get(uid)
        .into_iter()
        .flatten()
        .filter_map(|d| graph.nodes.get(d))
        .collect();
    if node.finalizers.iter().any(|f| f == ORPHAN) {
        for d in &dependents {
            let refs: Vec<&OwnerReference> = d.owners.iter().filter(|o| o.uid != uid).collect();
            let patch = json!({"metadata": {"ownerReferences": refs}});
            match api_for(ctx, d.resource, &d.namespace)
                .patch(&d.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Err(e) if !not_found(&e) => return Err(e.into()),
                _ => {}
            }
        }
        return drop_finalizer(&api, node, ORPHAN).await;
    }
    if node.finalizers.iter().any(|f| f == FOREGROUND) {
        let blocking = dependents.iter().filter(|d| {
            d.owners
                .iter()
                .any(|o| o.uid == uid && o.block_owner_deletion == Some(true))
        });
        let mut any = false;
        for d in blocking {
            any = true;
            if !d.deleting {
                match api_for(ctx, d.resource, &d.namespace)
                    .delete(&d.name, &DeleteParams::foreground())
                    .await
                {
                    Err(e) if !not_found(&e) => return Err(e.into()),
                    _ => {}
                }
            }
        }
        // Non-blocking dependents are collected once the owner is gone.
        if !any {
            return drop_finalizer(&api, node, FOREGROUND).await;
        }
    }
    Ok(())
}

async fn drop_finalizer(
    api: &Api<DynamicObject>,
    node: &Node,
    finalizer: &str,
) -> Result<(), Error> {
    let rest: Vec<&String> = node.finalizers.iter().filter(|f| *f != finalizer).collect();
    let patch = json!({"metadata": {"finalizers": rest}});
    match api
        .patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Err(e) if !not_found(&e) => Err(e.into()),
        _ => Ok(()),
    }
}
