//! The agent loop: registers the Node, renews its Lease, and reconciles every pod bound to it
//! into a CRI pod sandbox (networked by the runtime's CNI plugin, weft-cni) and its
//! containers, reporting their state as the pod's status. A pod being deleted has its
//! containers stopped within its grace period, its sandbox removed (the runtime runs CNI DEL),
//! and is then deleted for good. Sandboxes and containers are found by the pod UID label on
//! each pass, so an agent that restarts adopts what runs instead of starting it again, and
//! removes sandboxes of pods that no longer exist.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_cri::v1::{
    self as cri, image_service_client::ImageServiceClient,
    runtime_service_client::RuntimeServiceClient,
};
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Container, Node, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::probe::Tracker;

pub(crate) const UID_LABEL: &str = "io.kubernetes.pod.uid";
pub(crate) const NAME_LABEL: &str = "io.kubernetes.pod.name";
pub(crate) const NS_LABEL: &str = "io.kubernetes.pod.namespace";
pub(crate) const CONTAINER_LABEL: &str = "io.kubernetes.container.name";

/// The agent failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The API refused or could not be reached.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The container runtime refused.
    #[error("container runtime: {0}")]
    Cri(#[from] tonic::Status),
    /// The container runtime could not be reached.
    #[error("connecting to the container runtime at {0}: {1}")]
    Connect(String, tonic::transport::Error),
}

/// What the agent is told about its node.
#[derive(Clone, Debug)]
pub struct Config {
    /// The Node's name.
    pub node_name: String,
    /// The CRI socket.
    pub cri_socket: std::path::PathBuf,
    /// The node's address (InternalIP).
    pub address: Option<String>,
    /// The node's pod range (`spec.podCIDR`).
    pub pod_cidr: Option<String>,
    /// Where pod logs go (`<dir>/<ns>_<name>_<uid>/<container>/<attempt>.log`).
    pub log_dir: std::path::PathBuf,
    /// Where pods' volumes are made (`<dir>/<uid>/volumes/<name>`).
    pub state_dir: std::path::PathBuf,
    /// The cgroup (cgroupfs path) pods' cgroups are made under.
    pub cgroup_parent: String,
    /// How often every pod is looked at even without an API change.
    pub resync: Duration,
    /// The port of the node's HTTP endpoint (logs), as the Node advertises it.
    pub port: u16,
    /// TLS for that endpoint (requiring a client certificate of the cluster's CA); without it
    /// the endpoint is plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// weft-csi's socket on this node, for persistentVolumeClaim volumes.
    pub csi_socket: Option<std::path::PathBuf>,
    /// When containers' logs are rotated.
    pub log_rotation: LogRotation,
}

/// kubelet's container log rotation (`--container-log-max-size`, `--container-log-max-files`).
#[derive(Clone, Copy, Debug)]
pub struct LogRotation {
    /// A log larger than this is rotated.
    pub max_bytes: u64,
    /// Files kept per container, the current one included.
    pub max_files: usize,
}

impl Default for LogRotation {
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024,
            max_files: 5,
        }
    }
}

/// The CRI clients.
#[derive(Clone, Debug)]
pub struct Cri {
    /// RuntimeService.
    pub runtime: RuntimeServiceClient<Channel>,
    /// ImageService.
    pub images: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects to the runtime's unix socket.
    pub async fn connect(path: &std::path::Path) -> Result<Self, NodeError> {
        let p = path.to_owned();
        let channel = tonic::transport::Endpoint::try_from("http://[::1]:0")
            .map_err(|e| NodeError::Connect(path.display().to_string(), e))?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                tokio::net::UnixStream::connect(p.clone())
            }))
            .await
            .map_err(|e| NodeError::Connect(path.display().to_string(), e))?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }
}

/// The pod sandbox containers are made in.
struct Sandbox<'a> {
    id: &'a str,
    config: &'a cri::PodSandboxConfig,
    ip: &'a str,
}

struct Agent {
    client: Client,
    cri: Cri,
    csi: Option<crate::csi::Csi>,
    config: Config,
    events: weft_events::Recorder,
}

/// Runs the agent until the process ends.
pub async fn run(client: Client, config: Config) -> Result<(), NodeError> {
    let cri = Cri::connect(&config.cri_socket).await?;
    let csi = match &config.csi_socket {
        Some(socket) => Some(
            crate::csi::Csi::connect(socket, &config.node_name, config.state_dir.join("csi"))
                .await
                .map_err(|e| NodeError::Connect(socket.display().to_string(), e))?,
        ),
        None => None,
    };
    let events = weft_events::Recorder::for_node(client.clone(), &config.node_name);
    let agent = Arc::new(Agent {
        client,
        cri,
        csi,
        config,
        events,
    });
    agent.register().await?;
    tokio::spawn(agent.clone().heartbeat());
    tokio::spawn(agent.clone().rotate_logs());
    let endpoint = std::net::SocketAddr::from(([0, 0, 0, 0], agent.config.port));
    let log_dir = agent.config.log_dir.clone();
    let cri = agent.cri.clone();
    let tls = agent.config.tls.clone();
    let stats = Arc::new(crate::stats::Sampler::new(
        cri.clone(),
        &agent.config.node_name,
        &agent.config.cgroup_parent,
    ));
    tokio::spawn(stats.clone().run());
    tokio::spawn(async move {
        if let Err(e) = crate::server::serve(endpoint, log_dir, cri, stats, tls).await {
            tracing::error!(%endpoint, error = %e, "the node's endpoint stopped");
        }
    });
    let pods: Api<Pod> = Api::all(agent.client.clone());
    let selector = format!("spec.nodeName={}", agent.config.node_name);
    let mut events = watcher(pods, watcher::Config::default().fields(&selector))
        .default_backoff()
        .boxed();
    let mut known: HashMap<String, Pod> = HashMap::new();
    let mut workers: HashMap<String, tokio::sync::watch::Sender<Option<Pod>>> = HashMap::new();
    let mut synced = false;
    let mut resync = tokio::time::interval(agent.config.resync);
    loop {
        tokio::select! {
            e = events.next() => match e {
                Some(Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p))) => {
                    known.insert(p.uid().unwrap_or_default(), p);
                }
                Some(Ok(watcher::Event::Delete(p))) => {
                    let uid = p.uid().unwrap_or_default();
                    known.remove(&uid);
                    if let Some(w) = workers.get(&uid) {
                        let _ = w.send(None);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    synced = true;
                    agent.clone().collect_orphans(known.keys().cloned().collect()).await;
                }
                Some(Ok(watcher::Event::Init)) => {}
                Some(Err(e)) => tracing::debug!(error = %e, "pod watch"),
                None => return Ok(()),
            },
            _ = resync.tick() => {}
        }
        if !synced {
            continue;
        }
        workers.retain(|_, w| !w.is_closed());
        for (uid, pod) in &known {
            match workers.get(uid) {
                Some(w) => {
                    let _ = w.send(Some(pod.clone()));
                }
                None => {
                    let (tx, rx) = tokio::sync::watch::channel(Some(pod.clone()));
                    tokio::spawn(agent.clone().worker(uid.clone(), rx));
                    workers.insert(uid.clone(), tx);
                }
            }
        }
    }
}

/// Renews (or creates) the node's Lease in `kube-node-lease`: the heartbeat the node
/// lifecycle controller watches.
pub async fn renew_lease(leases: &Api<Lease>, name: &str) {
    let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": MicroTime(Timestamp::now())}});
    if leases
        .patch(name, &PatchParams::default(), &Patch::Merge(&lease))
        .await
        .is_err()
        && let Ok(typed) = serde_json::from_value::<Lease>(lease)
        && let Err(e) = leases.create(&PostParams::default(), &typed).await
    {
        tracing::debug!(node = name, error = %e, "renewing the Lease");
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn memory_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

impl Agent {
    /// Records an Event about `pod` (and one of its containers), as kubelet does.
    async fn event(
        &self,
        pod: &Pod,
        container: Option<&str>,
        warning: bool,
        reason: &str,
        message: &str,
    ) {
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name_any()),
            namespace: pod.namespace(),
            uid: pod.uid(),
            field_path: container.map(|c| format!("spec.containers{{{c}}}")),
            ..Default::default()
        };
        let kind = if warning {
            weft_events::Kind::Warning
        } else {
            weft_events::Kind::Normal
        };
        self.events
            .record_for(reference, "kubelet", kind, reason, message)
            .await;
    }

    fn node_status(&self) -> Value {
        let t = now();
        let mut addresses = vec![json!({"type": "Hostname", "address": self.config.node_name})];
        if let Some(a) = &self.config.address {
            addresses.insert(0, json!({"type": "InternalIP", "address": a}));
        }
        let capacity = json!({"cpu": cpu_count().to_string(), "memory": format!("{}Ki", memory_kib()), "pods": "110"});
        json!({
            "capacity": capacity, "allocatable": capacity, "addresses": addresses,
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.config.port}},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "weft node is posting ready status", "lastHeartbeatTime": t, "lastTransitionTime": t}],
            "nodeInfo": {"kubeletVersion": format!("v1.32.0-weft.{}", env!("CARGO_PKG_VERSION")), "containerRuntimeVersion": "containerd",
                         "operatingSystem": "linux", "architecture": "amd64", "osImage": "", "kernelVersion": "",
                         "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""},
        })
    }

    async fn register(&self) -> Result<(), NodeError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let name = &self.config.node_name;
        let mut node = json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
            "spec": {}, "status": self.node_status()});
        if let Some(c) = &self.config.pod_cidr {
            node["spec"]["podCIDR"] = json!(c);
            node["spec"]["podCIDRs"] = json!([c]);
        }
        match nodes.get_opt(name).await? {
            None => {
                let typed: Node = serde_json::from_value(node).unwrap_or_default();
                nodes.create(&PostParams::default(), &typed).await?;
            }
            Some(_) => {
                nodes
                    .patch_status(
                        name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"status": node["status"]})),
                    )
                    .await?;
            }
        }
        if let Some(csi) = &self.csi {
            csi.register(&self.client, name).await;
        }
        tracing::info!(node = %name, "registered");
        Ok(())
    }

    /// Rotates running containers' logs every 10 s, as kubelet's container log manager does:
    /// a log past the size limit is renamed, the runtime reopens it (ReopenContainerLog), and
    /// the oldest rotated files beyond the limit go.
    async fn rotate_logs(self: Arc<Self>) {
        let limits = self.config.log_rotation;
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            let mut runtime = self.cri.runtime.clone();
            let running = runtime
                .list_containers(cri::ListContainersRequest {
                    filter: Some(cri::ContainerFilter {
                        state: Some(cri::ContainerStateValue {
                            state: cri::ContainerState::ContainerRunning as i32,
                        }),
                        ..Default::default()
                    }),
                })
                .await
                .map(|r| r.into_inner().containers)
                .unwrap_or_default();
            for c in running {
                let status = runtime
                    .container_status(cri::ContainerStatusRequest {
                        container_id: c.id.clone(),
                        verbose: false,
                    })
                    .await
                    .ok()
                    .and_then(|r| r.into_inner().status);
                let Some(path) = status.map(|s| s.log_path).filter(|p| !p.is_empty()) else {
                    continue;
                };
                let path = std::path::PathBuf::from(path);
                match crate::logs::rotate(&path, limits.max_bytes, limits.max_files) {
                    Ok(false) => {}
                    Ok(true) => {
                        if let Err(e) = runtime
                            .reopen_container_log(cri::ReopenContainerLogRequest {
                                container_id: c.id.clone(),
                            })
                            .await
                        {
                            tracing::warn!(container = c.id, error = %e.message(), "reopening a rotated log");
                        } else {
                            tracing::debug!(container = c.id, path = %path.display(), "log rotated");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "rotating a log");
                    }
                }
            }
        }
    }

    async fn heartbeat(self: Arc<Self>) {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let nodes: Api<Node> = Api::all(self.client.clone());
        let name = self.config.node_name.clone();
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut n = 0u64;
        loop {
            tick.tick().await;
            renew_lease(&leases, &name).await;
            if let Some(csi) = &self.csi {
                csi.tend(&self.client).await;
            }
            n += 1;
            if n.is_multiple_of(6) {
                let status = json!({"status": self.node_status()});
                if let Err(e) = nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                {
                    tracing::debug!(error = %e, "node status");
                }
            }
        }
    }

    /// Removes the sandboxes of pods the API no longer has (deleted while the agent was down).
    async fn collect_orphans(self: Arc<Self>, live: Vec<String>) {
        let mut runtime = self.cri.runtime.clone();
        let Ok(list) = runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
        else {
            return;
        };
        for sb in list.into_inner().items {
            let uid = sb.labels.get(UID_LABEL).cloned().unwrap_or_default();
            if !live.contains(&uid) {
                tracing::info!(%uid, sandbox = %sb.id, "removing the sandbox of a pod that is gone");
                let _ = self.teardown(&uid, 0).await;
            }
        }
    }

    async fn worker(
        self: Arc<Self>,
        uid: String,
        mut rx: tokio::sync::watch::Receiver<Option<Pod>>,
    ) {
        let mut backoff: HashMap<String, (u32, tokio::time::Instant)> = HashMap::new();
        let mut failures = 0u32;
        let mut trackers: HashMap<String, Tracker> = HashMap::new();
        let mut stopping = false;
        loop {
            let pod = rx.borrow_and_update().clone();
            let Some(pod) = pod else {
                // Gone from the API: nothing may stay.
                let _ = self.teardown(&uid, 0).await;
                return;
            };
            if pod.metadata.deletion_timestamp.is_some() {
                let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30);
                if !stopping {
                    stopping = true;
                    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
                        self.event(
                            &pod,
                            Some(&c.name),
                            false,
                            "Killing",
                            &format!("Stopping container {}", c.name),
                        )
                        .await;
                    }
                }
                if let Err(e) = self.teardown(&uid, grace).await {
                    tracing::warn!(pod = %pod.name_any(), error = %e, "stopping");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                let api: Api<Pod> =
                    Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match api.delete(&pod.name_any(), &dp).await {
                    Ok(_) => return,
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return,
                    Err(e) => tracing::warn!(pod = %pod.name_any(), error = %e, "deleting"),
                }
            } else if let Err(e) = self.sync(&pod, &mut backoff, &mut trackers).await {
                tracing::warn!(pod = %pod.name_any(), error = %e, "syncing");
                // Failing again at once would only repeat the error: back off (1 s doubling
                // to 30 s) before the next attempt, whatever the API says meanwhile.
                failures += 1;
                tokio::time::sleep(
                    Duration::from_secs(1 << failures.min(5)).min(Duration::from_secs(30)),
                )
                .await;
                continue;
            } else {
                failures = 0;
            }
            if rx.changed().await.is_err() {
                let _ = self.teardown(&uid, 0).await;
                return;
            }
        }
    }

    /// Every sandbox of the pod `uid`, whatever its state.
    async fn sandboxes_of(&self, uid: &str) -> Result<Vec<cri::PodSandbox>, NodeError> {
        let mut labels = HashMap::new();
        labels.insert(UID_LABEL.to_owned(), uid.to_owned());
        Ok(self
            .cri
            .runtime
            .clone()
            .list_pod_sandbox(cri::ListPodSandboxRequest {
                filter: Some(cri::PodSandboxFilter {
                    label_selector: labels,
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .items)
    }

    /// The pod's newest ready sandbox.
    async fn sandbox_of(&self, uid: &str) -> Result<Option<cri::PodSandbox>, NodeError> {
        Ok(self
            .sandboxes_of(uid)
            .await?
            .into_iter()
            .filter(|s| s.state == cri::PodSandboxState::SandboxReady as i32)
            .max_by_key(|s| s.created_at))
    }

    /// Stops and removes everything of the pod `uid`, giving its containers `grace` seconds.
    async fn teardown(&self, uid: &str, grace: i64) -> Result<(), NodeError> {
        let mut runtime = self.cri.runtime.clone();
        let sandboxes = self.sandboxes_of(uid).await?;
        for sb in sandboxes {
            let containers = runtime
                .list_containers(cri::ListContainersRequest {
                    filter: Some(cri::ContainerFilter {
                        pod_sandbox_id: sb.id.clone(),
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner()
                .containers;
            for c in &containers {
                if c.state == cri::ContainerState::ContainerRunning as i32 {
                    runtime
                        .stop_container(cri::StopContainerRequest {
                            container_id: c.id.clone(),
                            timeout: grace,
                        })
                        .await?;
                }
            }
            runtime
                .stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: sb.id.clone(),
                })
                .await?;
            runtime
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: sb.id.clone(),
                })
                .await?;
        }
        self.remove_cgroup(uid);
        crate::volumes::release(&self.config.state_dir, uid, self.csi.as_ref()).await;
        Ok(())
    }

    fn cgroup_of(&self, uid: &str) -> String {
        format!(
            "{}/pod{uid}",
            self.config.cgroup_parent.trim_end_matches('/')
        )
    }

    /// runc leaves a pod's parent cgroup behind (cgroup v1): remove it in every hierarchy.
    fn remove_cgroup(&self, uid: &str) {
        let rel = self.cgroup_of(uid);
        let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for e in entries.flatten() {
            let dir = e.path().join(rel.trim_start_matches('/'));
            // Children first (a container's cgroup may be left too).
            if let Ok(children) = std::fs::read_dir(&dir) {
                for c in children.flatten() {
                    if c.path().is_dir() {
                        let _ = std::fs::remove_dir(c.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }

    async fn sync(
        &self,
        pod: &Pod,
        backoff: &mut HashMap<String, (u32, tokio::time::Instant)>,
        trackers: &mut HashMap<String, Tracker>,
    ) -> Result<(), NodeError> {
        let mut runtime = self.cri.runtime.clone();
        let uid = pod.uid().unwrap_or_default();
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let spec = pod.spec.clone().unwrap_or_default();
        let sandbox_config = self.sandbox_config(pod);
        let sandbox = match self.sandbox_of(&uid).await? {
            Some(s) => s.id,
            None => {
                // A sandbox that is not ready (its network failed, or it was stopped) is
                // removed first: the new one takes its name.
                self.teardown(&uid, 0).await?;
                let r = runtime
                    .run_pod_sandbox(cri::RunPodSandboxRequest {
                        config: Some(sandbox_config.clone()),
                        runtime_handler: String::new(),
                    })
                    .await;
                match r {
                    Ok(r) => r.into_inner().pod_sandbox_id,
                    Err(e) => {
                        self.event(
                            pod,
                            None,
                            true,
                            "FailedCreatePodSandBox",
                            &format!("Failed to create pod sandbox: {}", e.message()),
                        )
                        .await;
                        self.write_status(pod, json!({"phase": "Pending", "conditions": [
                            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
                            {"type": "Ready", "status": "False", "reason": "SandboxFailed", "message": e.message(), "lastTransitionTime": now()}]}))
                            .await?;
                        return Err(e.into());
                    }
                }
            }
        };
        let status = runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.clone(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .unwrap_or_default();
        let pod_ip = status
            .network
            .as_ref()
            .map(|n| n.ip.clone())
            .unwrap_or_default();
        let sb = Sandbox {
            id: &sandbox,
            config: &sandbox_config,
            ip: &pod_ip,
        };
        let t = now();
        let started = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.clone())
            .unwrap_or_else(now);
        let keep_time = |kind: &str, status: &str| -> Value {
            pod.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == kind && c.status == status))
                .and_then(|c| c.last_transition_time.clone())
                .map_or(json!(t), |x| json!(x))
        };
        // Init containers, in order: each must exit 0 before the next one starts, and all of
        // them before the app containers.
        let policy = spec.restart_policy.as_deref().unwrap_or("Always");
        let waiting = |c: &Container| {
            json!({"name": c.name, "image": c.image, "imageID": "", "ready": false, "started": false,
                   "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}})
        };
        let mut init_statuses = Vec::new();
        let mut pending: Vec<String> = Vec::new();
        let mut failed = false;
        for c in spec.init_containers.iter().flatten() {
            if !pending.is_empty() {
                init_statuses.push(waiting(c));
                pending.push(c.name.clone());
                continue;
            }
            let mut st = self.ensure_container(pod, c, &sb, backoff, true).await?;
            match st
                .pointer("/state/terminated/exitCode")
                .and_then(Value::as_i64)
            {
                Some(0) => st["ready"] = json!(true),
                Some(_) if policy == "Never" => {
                    failed = true;
                    pending.push(c.name.clone());
                }
                _ => pending.push(c.name.clone()),
            }
            init_statuses.push(st);
        }
        if !pending.is_empty() {
            let message = format!("containers with incomplete status: [{}]", pending.join(" "));
            let status = json!({
                "phase": if failed { "Failed" } else { "Pending" },
                "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
                "hostIP": self.config.address, "startTime": started,
                "conditions": [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": keep_time("PodScheduled", "True")},
                    {"type": "Initialized", "status": "False", "reason": "ContainersNotInitialized", "message": message,
                     "lastTransitionTime": keep_time("Initialized", "False")},
                    {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": keep_time("ContainersReady", "False")},
                    {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": keep_time("Ready", "False")},
                ],
                "initContainerStatuses": init_statuses,
                "containerStatuses": spec.containers.iter().map(waiting).collect::<Vec<_>>(),
            });
            return self.write_status(pod, status).await;
        }
        let mut statuses = Vec::new();
        let mut all_running = true;
        let mut all_ready = true;
        for c in &spec.containers {
            let mut st = self.ensure_container(pod, c, &sb, backoff, false).await?;
            let running = st.pointer("/state/running").is_some();
            all_running &= running;
            let id = st["containerID"]
                .as_str()
                .and_then(|i| i.strip_prefix("containerd://"))
                .unwrap_or("")
                .to_owned();
            if running && !id.is_empty() {
                let tracker = trackers
                    .entry(c.name.clone())
                    .and_modify(|t| {
                        if t.container_id != id {
                            *t = Tracker::new(&id, c);
                        }
                    })
                    .or_insert_with(|| Tracker::new(&id, c));
                let verdict = tracker.step(c, &pod_ip, &mut runtime).await;
                for why in &verdict.unhealthy {
                    self.event(pod, Some(&c.name), true, "Unhealthy", why).await;
                }
                if let Some(why) = verdict.kill {
                    self.event(pod, Some(&c.name), false, "Killing", &why).await;
                    tracing::info!(pod = %name, container = %c.name, "{why}");
                    let grace = spec.termination_grace_period_seconds.unwrap_or(30);
                    runtime
                        .stop_container(cri::StopContainerRequest {
                            container_id: id.clone(),
                            timeout: grace,
                        })
                        .await?;
                }
                st["ready"] = json!(tracker.ready && tracker.started_ok);
                st["started"] = json!(tracker.started_ok);
            }
            all_ready &= st["ready"] == true;
            statuses.push(st);
        }
        let _ = &ns;
        let ready = if all_running && all_ready {
            "True"
        } else {
            "False"
        };
        // A pod whose containers all ended and will not be restarted is done: Succeeded when
        // every one exited 0, else Failed.
        let exits: Vec<Option<i64>> = statuses
            .iter()
            .map(|s| {
                s.pointer("/state/terminated/exitCode")
                    .and_then(Value::as_i64)
            })
            .collect();
        let phase = if policy != "Always" && !exits.is_empty() && exits.iter().all(Option::is_some)
        {
            if exits.iter().all(|e| *e == Some(0)) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if all_running {
            "Running"
        } else {
            "Pending"
        };
        let mut status = json!({
            "phase": phase,
            "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
            "hostIP": self.config.address, "startTime": started,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": keep_time("PodScheduled", "True")},
                {"type": "Initialized", "status": "True", "lastTransitionTime": keep_time("Initialized", "True")},
                {"type": "ContainersReady", "status": ready, "lastTransitionTime": keep_time("ContainersReady", ready)},
                {"type": "Ready", "status": ready, "lastTransitionTime": keep_time("Ready", ready)},
            ],
            "containerStatuses": statuses,
        });
        if !init_statuses.is_empty() {
            status["initContainerStatuses"] = json!(init_statuses);
        }
        self.write_status(pod, status).await
    }

    async fn write_status(&self, pod: &Pod, status: Value) -> Result<(), NodeError> {
        let before = serde_json::to_value(&pod.status).unwrap_or_default();
        let mut merged = before.clone();
        if let (Some(m), Some(s)) = (merged.as_object_mut(), status.as_object()) {
            for (k, v) in s {
                m.insert(k.clone(), v.clone());
            }
        }
        let typed: Option<k8s_openapi::api::core::v1::PodStatus> =
            serde_json::from_value(merged.clone()).ok();
        if serde_json::to_value(&typed).unwrap_or_default() == before {
            return Ok(());
        }
        let api: Api<Pod> =
            Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        api.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
        Ok(())
    }

    fn sandbox_config(&self, pod: &Pod) -> cri::PodSandboxConfig {
        let uid = pod.uid().unwrap_or_default();
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let mut labels: HashMap<String, String> = pod.labels().clone().into_iter().collect();
        labels.insert(UID_LABEL.into(), uid.clone());
        labels.insert(NAME_LABEL.into(), name.clone());
        labels.insert(NS_LABEL.into(), ns.clone());
        let sc = pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.clone())
            .unwrap_or_default();
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.clone(),
                uid: uid.clone(),
                namespace: ns.clone(),
                attempt: 0,
            }),
            // spec.hostname when the pod names one (StatefulSet and Indexed Job pods), as
            // kubelet does; the pod's name otherwise.
            hostname: pod
                .spec
                .as_ref()
                .and_then(|s| s.hostname.clone())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| name.clone()),
            log_directory: self
                .config
                .log_dir
                .join(format!("{ns}_{name}_{uid}"))
                .display()
                .to_string(),
            labels,
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_of(&uid),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    run_as_user: sc.run_as_user.map(|value| cri::Int64Value { value }),
                    run_as_group: sc.run_as_group.map(|value| cri::Int64Value { value }),
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The status of container `c` after making it run if it should. An `init` container is
    /// restarted only when it failed (and the pod's restartPolicy is not Never); one that exited 0
    /// is done.
    async fn ensure_container(
        &self,
        pod: &Pod,
        c: &Container,
        sb: &Sandbox<'_>,
        backoff: &mut HashMap<String, (u32, tokio::time::Instant)>,
        init: bool,
    ) -> Result<Value, NodeError> {
        let (sandbox, sandbox_config, pod_ip) = (sb.id, sb.config, sb.ip);
        let mut runtime = self.cri.runtime.clone();
        let image = crate::image::normalize(c.image.as_deref().unwrap_or(""));
        let mut labels = HashMap::new();
        labels.insert(CONTAINER_LABEL.to_owned(), c.name.clone());
        let existing = runtime
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    pod_sandbox_id: sandbox.to_owned(),
                    label_selector: labels.clone(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner()
            .containers;
        let latest = existing.iter().max_by_key(|x| x.created_at).cloned();
        let restarts = existing.len().saturating_sub(1);
        let base = |state: Value, ready: bool, id: &str| {
            json!({"name": c.name, "image": c.image, "imageID": image, "containerID": if id.is_empty() { Value::Null } else { json!(format!("containerd://{id}")) },
                   "ready": ready, "started": ready, "restartCount": restarts, "state": state})
        };
        if let Some(l) = &latest {
            let st = runtime
                .container_status(cri::ContainerStatusRequest {
                    container_id: l.id.clone(),
                    verbose: false,
                })
                .await?
                .into_inner()
                .status
                .unwrap_or_default();
            let ts = |ns: i64| {
                json!(Time(
                    Timestamp::from_nanosecond(i128::from(ns)).unwrap_or(Timestamp::UNIX_EPOCH)
                ))
            };
            match cri::ContainerState::try_from(st.state) {
                Ok(cri::ContainerState::ContainerRunning) => {
                    return Ok(base(
                        json!({"running": {"startedAt": ts(st.started_at)}}),
                        true,
                        &l.id,
                    ));
                }
                Ok(cri::ContainerState::ContainerCreated) => {
                    runtime
                        .start_container(cri::StartContainerRequest {
                            container_id: l.id.clone(),
                        })
                        .await?;
                    return Ok(base(json!({"running": {"startedAt": now()}}), true, &l.id));
                }
                _ => {
                    let policy = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.restart_policy.as_deref())
                        .unwrap_or("Always");
                    let restart = if init {
                        policy != "Never" && st.exit_code != 0
                    } else {
                        policy == "Always" || (policy == "OnFailure" && st.exit_code != 0)
                    };
                    let terminated = json!({"terminated": {"exitCode": st.exit_code, "reason": if st.reason.is_empty() { "Error".to_owned() } else { st.reason.clone() },
                                                           "startedAt": ts(st.started_at), "finishedAt": ts(st.finished_at), "containerID": format!("containerd://{}", l.id)}});
                    if !restart {
                        return Ok(base(terminated, false, &l.id));
                    }
                    // kubelet's back-off: 10 s doubling to 5 min.
                    let (n, since) = backoff
                        .get(&c.name)
                        .copied()
                        .unwrap_or((0, tokio::time::Instant::now()));
                    let wait = Duration::from_secs((10u64 << n.min(5)).min(300));
                    if since.elapsed() < wait && n > 0 {
                        self.event(
                            pod,
                            Some(&c.name),
                            true,
                            "BackOff",
                            &format!(
                                "Back-off restarting failed container {} in pod {}_{}({})",
                                c.name,
                                pod.name_any(),
                                pod.namespace().unwrap_or_default(),
                                pod.uid().unwrap_or_default()
                            ),
                        )
                        .await;
                        let mut s = base(
                            json!({"waiting": {"reason": "CrashLoopBackOff",
                            "message": format!("back-off {}s restarting failed container={} pod={}", wait.as_secs(), c.name, pod.name_any())}}),
                            false,
                            &l.id,
                        );
                        s["lastState"] = terminated;
                        return Ok(s);
                    }
                    backoff.insert(c.name.clone(), (n + 1, tokio::time::Instant::now()));
                }
            }
        }
        // Create (or re-create) the container.
        let mut found = self.image_of(&image).await?;
        let present = found.is_some();
        if !present {
            let policy = c.image_pull_policy.as_deref().unwrap_or("IfNotPresent");
            let (reason, message) = if policy == "Never" {
                (
                    "ErrImageNeverPull",
                    format!(
                        "Container image {:?} is not present with pull policy of Never",
                        c.image.as_deref().unwrap_or("")
                    ),
                )
            } else {
                let pulled = self
                    .cri
                    .images
                    .clone()
                    .pull_image(cri::PullImageRequest {
                        image: Some(cri::ImageSpec {
                            image: image.clone(),
                            ..Default::default()
                        }),
                        auth: None,
                        sandbox_config: Some(sandbox_config.clone()),
                    })
                    .await;
                match pulled {
                    Ok(_) => ("", String::new()),
                    Err(e) => (
                        "ErrImagePull",
                        format!(
                            "failed to pull image {:?}: {}",
                            c.image.as_deref().unwrap_or(""),
                            e.message()
                        ),
                    ),
                }
            };
            if !reason.is_empty() {
                self.event(pod, Some(&c.name), true, reason, &message).await;
                return Ok(base(
                    json!({"waiting": {"reason": reason, "message": message}}),
                    false,
                    "",
                ));
            }
            self.event(
                pod,
                Some(&c.name),
                false,
                "Pulled",
                &format!(
                    "Successfully pulled image {:?}",
                    c.image.as_deref().unwrap_or("")
                ),
            )
            .await;
        } else {
            self.event(
                pod,
                Some(&c.name),
                false,
                "Pulled",
                &format!(
                    "Container image {:?} already present on machine",
                    c.image.as_deref().unwrap_or("")
                ),
            )
            .await;
        }
        if !present {
            found = self.image_of(&image).await?;
        }
        if let Some(refusal) = crate::security::non_root_violation(
            pod,
            c,
            found.as_ref().and_then(|i| i.uid.as_ref()).map(|u| u.value),
            found.as_ref().map_or("", |i| i.username.as_str()),
        ) {
            self.event(
                pod,
                Some(&c.name),
                true,
                "Failed",
                &format!("Error: {refusal}"),
            )
            .await;
            return Ok(base(
                json!({"waiting": {"reason": "CreateContainerConfigError", "message": refusal}}),
                false,
                "",
            ));
        }
        let attempt = u32::try_from(existing.len()).unwrap_or(0);
        let volumes = match crate::volumes::prepare(
            &self.client,
            pod,
            &self.config.state_dir,
            self.csi.as_ref(),
        )
        .await
        {
            Ok(v) => v,
            Err(e) => {
                let message = format!("MountVolume.SetUp failed: {e}");
                self.event(pod, None, true, "FailedMount", &message).await;
                return Ok(base(
                    json!({"waiting": {"reason": "ContainerCreating", "message": message}}),
                    false,
                    "",
                ));
            }
        };
        let fields = crate::env::PodFields {
            pod,
            pod_ip,
            node_name: &self.config.node_name,
            host_ip: self.config.address.as_deref(),
        };
        let envs = match crate::env::resolve(&self.client, c, &fields).await {
            Ok(e) => e,
            Err(message) => {
                self.event(
                    pod,
                    Some(&c.name),
                    true,
                    "Failed",
                    &format!("Error: {message}"),
                )
                .await;
                return Ok(base(
                    json!({"waiting": {"reason": "CreateContainerConfigError", "message": message}}),
                    false,
                    "",
                ));
            }
        };
        let mut config = self.container_config(pod, c, &image, attempt, envs);
        for m in c.volume_mounts.iter().flatten() {
            let Some(host) = volumes.get(&m.name) else {
                continue;
            };
            let host = match m
                .sub_path
                .as_deref()
                .filter(|p| !p.is_empty() && !p.split('/').any(|x| x == ".."))
            {
                Some(sub) => {
                    let p = host.join(sub);
                    let _ = std::fs::create_dir_all(&p);
                    p
                }
                None => host.clone(),
            };
            config.mounts.push(cri::Mount {
                container_path: m.mount_path.clone(),
                host_path: host.display().to_string(),
                readonly: m.read_only == Some(true),
                ..Default::default()
            });
        }
        let id = runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.to_owned(),
                config: Some(config),
                sandbox_config: Some(sandbox_config.clone()),
            })
            .await?
            .into_inner()
            .container_id;
        self.event(
            pod,
            Some(&c.name),
            false,
            "Created",
            &format!("Created container {}", c.name),
        )
        .await;
        runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await?;
        self.event(
            pod,
            Some(&c.name),
            false,
            "Started",
            &format!("Started container {}", c.name),
        )
        .await;
        Ok(base(json!({"running": {"startedAt": now()}}), true, &id))
    }

    /// The runtime's record of `image`, if it has the image.
    async fn image_of(&self, image: &str) -> Result<Option<cri::Image>, NodeError> {
        Ok(self
            .cri
            .images
            .clone()
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: image.to_owned(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await?
            .into_inner()
            .image)
    }

    fn container_config(
        &self,
        pod: &Pod,
        c: &Container,
        image: &str,
        attempt: u32,
        envs: Vec<cri::KeyValue>,
    ) -> cri::ContainerConfig {
        let mut labels = HashMap::new();
        labels.insert(CONTAINER_LABEL.to_owned(), c.name.clone());
        labels.insert(UID_LABEL.to_owned(), pod.uid().unwrap_or_default());
        labels.insert(NAME_LABEL.to_owned(), pod.name_any());
        labels.insert(NS_LABEL.to_owned(), pod.namespace().unwrap_or_default());
        let sc = c.security_context.clone().unwrap_or_default();
        let crate::security::Identity { user, group, .. } = crate::security::identity(pod, c);
        let limits: BTreeMap<String, String> = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        let requests: BTreeMap<String, String> = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        let cpu = |m: &BTreeMap<String, String>| {
            m.get("cpu")
                .and_then(|q| crate::quantity(q))
                .map(|c| (c * 1000.0).round() as i64)
        };
        let memory = |m: &BTreeMap<String, String>| {
            m.get("memory")
                .and_then(|q| crate::quantity(q))
                .map(|v| v as i64)
        };
        let quota = cpu(&limits).map_or(0, |milli| (milli * 100).max(1000));
        let shares = cpu(&requests)
            .or(cpu(&limits))
            .map_or(2, |milli| (milli * 1024 / 1000).max(2));
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: c.name.clone(),
                attempt,
            }),
            image: Some(cri::ImageSpec {
                image: image.to_owned(),
                ..Default::default()
            }),
            command: c.command.clone().unwrap_or_default(),
            args: c.args.clone().unwrap_or_default(),
            working_dir: c.working_dir.clone().unwrap_or_default(),
            envs,
            labels,
            log_path: format!("{}/{attempt}.log", c.name),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    cpu_period: if quota > 0 { 100_000 } else { 0 },
                    cpu_quota: quota,
                    cpu_shares: shares,
                    memory_limit_in_bytes: memory(&limits).unwrap_or(0),
                    ..Default::default()
                }),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    run_as_user: user.map(|value| cri::Int64Value { value }),
                    run_as_group: group.map(|value| cri::Int64Value { value }),
                    supplemental_groups: pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.security_context.as_ref())
                        .map(|sc| {
                            sc.supplemental_groups
                                .iter()
                                .flatten()
                                .copied()
                                .chain(sc.fs_group)
                                .collect()
                        })
                        .unwrap_or_default(),
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    privileged: sc.privileged == Some(true),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }
}
