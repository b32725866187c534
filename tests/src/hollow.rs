//! Hollow nodes: stand-ins for node agents, for tests and benchmarks of the control plane
//! alone (as kubemark's hollow kubelets are for Kubernetes). Each registers a Node, renews its
//! Lease, and plays the part of the agent for the pods bound to it: a pod becomes Running and
//! Ready after a delay, with an address from the node's range; a pod being deleted is
//! removed after a delay, as an agent does once its containers have stopped. Nothing runs:
//! the proof that pods really run is the node agent's own tests. A node can be killed: it then
//! stops renewing its Lease and stops answering for its pods, like a machine that lost power.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Node, Pod},
    },
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

/// How the hollow nodes behave.
#[derive(Clone, Debug)]
pub struct Options {
    /// From binding to Ready.
    pub ready_after: Duration,
    /// From a deletion request to the pod's removal (when its grace period allows).
    pub stop_after: Duration,
    /// CPU and memory each node offers.
    pub cpu: String,
    /// Memory each node offers.
    pub memory: String,
    /// Pods each node takes.
    pub pods: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ready_after: Duration::from_millis(300),
            stop_after: Duration::from_millis(200),
            cpu: "4".into(),
            memory: "8Gi".into(),
            pods: 110,
        }
    }
}

struct Hollow {
    index: u32,
    alive: AtomicBool,
    next_ip: AtomicU32,
}

/// A set of hollow nodes served by one background runtime; dropping it stops them all.
pub struct HollowNodes {
    rt: Option<tokio::runtime::Runtime>,
    nodes: Arc<Mutex<HashMap<String, Arc<Hollow>>>>,
}

impl std::fmt::Debug for HollowNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HollowNodes").finish_non_exhaustive()
    }
}

impl HollowNodes {
    /// Registers `names` as Ready nodes of the API server at `kubeconfig` and starts serving
    /// them.
    pub fn start(kubeconfig: &Path, names: &[&str], options: Options) -> Result<Self, kube::Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| kube::Error::Service(Box::new(e)))?;
        let client = rt.block_on(crate::kube_client(kubeconfig))?;
        let nodes: Arc<Mutex<HashMap<String, Arc<Hollow>>>> = Arc::default();
        for (i, name) in names.iter().enumerate() {
            let hollow = Arc::new(Hollow {
                index: u32::try_from(i).unwrap_or(0) + 1,
                alive: AtomicBool::new(true),
                next_ip: AtomicU32::new(2),
            });
            rt.block_on(register(&client, name, &hollow, &options))?;
            nodes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((*name).to_owned(), hollow.clone());
            rt.spawn(heartbeat(client.clone(), (*name).to_owned(), hollow));
        }
        rt.spawn(serve_pods(client, nodes.clone(), options));
        Ok(Self {
            rt: Some(rt),
            nodes,
        })
    }

    /// Stops `name` for good: no more Lease renewals, no more pod updates.
    pub fn kill(&self, name: &str) {
        if let Some(h) = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            h.alive.store(false, Ordering::SeqCst);
        }
    }
}

impl Drop for HollowNodes {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn register(
    client: &Client,
    name: &str,
    hollow: &Hollow,
    o: &Options,
) -> Result<(), kube::Error> {
    let now = Time(Timestamp::now());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": format!("10.244.{}.0/24", hollow.index)},
        "status": {
            "capacity": {"cpu": o.cpu, "memory": o.memory, "pods": o.pods.to_string()},
            "allocatable": {"cpu": o.cpu, "memory": o.memory, "pods": o.pods.to_string()},
            "addresses": [{"type": "InternalIP", "address": format!("10.200.0.{}", 10 + hollow.index)},
                          {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "hollow node is posting ready status", "lastHeartbeatTime": now, "lastTransitionTime": now}],
        },
    }))
    .map_err(|e| kube::Error::Service(Box::new(e)))?;
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await?;
    Ok(())
}

async fn heartbeat(client: Client, name: String, hollow: Arc<Hollow>) {
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while hollow.alive.load(Ordering::SeqCst) {
        tick.tick().await;
        if !hollow.alive.load(Ordering::SeqCst) {
            break;
        }
        weft_node::agent::renew_lease(&leases, &name).await;
    }
}

async fn serve_pods(client: Client, nodes: Arc<Mutex<HashMap<String, Arc<Hollow>>>>, o: Options) {
    let mut events = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(e) = events.next().await {
        let pod = match e {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => p,
            _ => continue,
        };
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        let Some(hollow) = nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .cloned()
        else {
            continue;
        };
        if !hollow.alive.load(Ordering::SeqCst) {
            continue;
        }
        let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
        let name = pod.name_any();
        if pod.metadata.deletion_timestamp.is_some() {
            let delay = o.stop_after;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if hollow.alive.load(Ordering::SeqCst) {
                    let _ = api
                        .delete(&name, &DeleteParams::default().grace_period(0))
                        .await;
                }
            });
            continue;
        }
        let has_ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_ref())
            .is_some();
        if has_ip {
            continue;
        }
        let ip = format!(
            "10.244.{}.{}",
            hollow.index,
            hollow.next_ip.fetch_add(1, Ordering::SeqCst) % 250 + 2
        );
        let containers: Vec<_> = pod
            .spec
            .as_ref()
            .map(|s| {
                s.containers
                    .iter()
                    .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        let delay = o.ready_after;
        tokio::spawn(async move {
            let now = Time(Timestamp::now());
            let statuses = |ready: bool| -> Vec<serde_json::Value> {
                containers
                    .iter()
                    .map(|(n, image)| json!({"name": n, "image": image, "imageID": format!("hollow://{image}"),
                        "containerID": format!("hollow://{n}"), "ready": ready, "started": true, "restartCount": 0,
                        "state": {"running": {"startedAt": now}}}))
                    .collect()
            };
            let cond = |ready: &str| {
                json!([
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": Time(Timestamp::now())},
                {"type": "Ready", "status": ready, "lastTransitionTime": Time(Timestamp::now())}])
            };
            let running = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                "hostIP": format!("10.200.0.{}", 10 + hollow.index), "startTime": now,
                "conditions": cond("False"), "containerStatuses": statuses(false)}});
            if api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&running))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(delay).await;
            if !hollow.alive.load(Ordering::SeqCst) {
                return;
            }
            let ready = json!({"status": {"conditions": cond("True"), "containerStatuses": statuses(true)}});
            let _ = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&ready))
                .await;
        });
    }
}
