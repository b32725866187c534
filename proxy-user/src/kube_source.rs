//! The Kubernetes API as the source of desired state: kube-rs reflectors over Services,
//! EndpointSlices, Pods, Nodes, Namespaces and NetworkPolicies (kubeconfig or in-cluster
//! config), read as one [`Objects`] snapshot whenever something changed.
//!
//! Nothing is reported until every kind has been listed once, so an agent that restarts while
//! the API is slow or unreachable keeps the datapath it has instead of programming a partial
//! view (which would remove services and open isolated pods).

use std::{
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, reflector, watcher},
};
use serde::de::DeserializeOwned;

use crate::model::Objects;

/// Errors starting the source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// No usable client configuration (kubeconfig, in-cluster environment).
    #[error("kubernetes client configuration: {0}")]
    Config(String),
    /// The client could not be built.
    #[error("kubernetes client: {0}")]
    Client(#[from] kube::Error),
    /// The background runtime could not start.
    #[error("starting the watch runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// Change counter plus a way to sleep until it moves.
#[derive(Debug, Default)]
struct Signal {
    generation: Mutex<u64>,
    moved: Condvar,
}

impl Signal {
    fn bump(&self) {
        let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        *g += 1;
        self.moved.notify_all();
    }

    fn get(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reflector stores kept current by watches on a background thread.
pub struct KubeSource {
    services: reflector::Store<Service>,
    slices: reflector::Store<EndpointSlice>,
    pods: reflector::Store<Pod>,
    nodes: reflector::Store<Node>,
    namespaces: reflector::Store<Namespace>,
    policies: reflector::Store<NetworkPolicy>,
    ready: Arc<AtomicBool>,
    signal: Arc<Signal>,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("ready", &self.ready.load(Ordering::Relaxed))
            .field("generation", &self.signal.get())
            .finish()
    }
}

/// The client configuration: the kubeconfig at `path`, or else the usual inference
/// (`KUBECONFIG`, `~/.kube/config`, the in-cluster service account).
pub async fn client_config(path: Option<&std::path::Path>) -> Result<kube::Config, SourceError> {
    match path {
        Some(p) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(p)
                .map_err(|e| SourceError::Config(format!("{}: {e}", p.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| SourceError::Config(format!("{}: {e}", p.display())))
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| SourceError::Config(e.to_string())),
    }
}

fn watch_into<K>(
    client: &Client,
    signal: &Arc<Signal>,
) -> (
    reflector::Store<K>,
    impl std::future::Future<Output = ()> + use<K>,
)
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let api: Api<K> = Api::all(client.clone());
    let signal = signal.clone();
    let task = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .for_each(move |event| {
            match event {
                Ok(_) => signal.bump(),
                Err(e) => tracing::warn!(kind = K::kind(&()).as_ref(), error = %e, "watching"),
            }
            std::future::ready(())
        });
    (reader, task)
}

impl KubeSource {
    /// Builds the client and starts the watches on a thread of their own.
    pub fn start(config: kube::Config) -> Result<Self, SourceError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = {
            let _guard = runtime.enter();
            Client::try_from(config)?
        };
        let signal = Arc::new(Signal::default());
        let (services, t1) = watch_into::<Service>(&client, &signal);
        let (slices, t2) = watch_into::<EndpointSlice>(&client, &signal);
        let (pods, t3) = watch_into::<Pod>(&client, &signal);
        let (nodes, t4) = watch_into::<Node>(&client, &signal);
        let (namespaces, t5) = watch_into::<Namespace>(&client, &signal);
        let (policies, t6) = watch_into::<NetworkPolicy>(&client, &signal);
        let ready = Arc::new(AtomicBool::new(false));
        let source = Self {
            services,
            slices,
            pods,
            nodes,
            namespaces,
            policies,
            ready: ready.clone(),
            signal: signal.clone(),
        };
        let readers = (
            source.services.clone(),
            source.slices.clone(),
            source.pods.clone(),
            source.nodes.clone(),
            source.namespaces.clone(),
            source.policies.clone(),
        );
        std::thread::Builder::new()
            .name("kube-watch".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let all_listed = async move {
                        let (a, b, c, d, e, f) = readers;
                        let _ = futures::join!(
                            a.wait_until_ready(),
                            b.wait_until_ready(),
                            c.wait_until_ready(),
                            d.wait_until_ready(),
                            e.wait_until_ready(),
                            f.wait_until_ready()
                        );
                        ready.store(true, Ordering::SeqCst);
                        signal.bump();
                        tracing::info!("every kind listed from the Kubernetes API");
                    };
                    futures::join!(all_listed, t1, t2, t3, t4, t5, t6);
                });
            })?;
        Ok(source)
    }

    /// A number that changes whenever any watched object changes; `None` until every kind
    /// has been listed once.
    pub fn generation(&self) -> Option<u64> {
        self.ready.load(Ordering::SeqCst).then(|| self.signal.get())
    }

    /// Sleeps until the generation is no longer `seen`, or `timeout` passes.
    pub fn wait_for_change(&self, seen: Option<u64>, timeout: Duration) {
        let g = self
            .signal
            .generation
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let ready = &self.ready;
        let _ = self.signal.moved.wait_timeout_while(g, timeout, |g| {
            !ready.load(Ordering::SeqCst) || Some(*g) == seen
        });
    }

    /// Every watched object as it is now.
    pub fn snapshot(&self) -> Objects {
        fn all<K: Resource<DynamicType = ()> + Clone>(s: &reflector::Store<K>) -> Vec<K> {
            s.state().iter().map(|o| K::clone(o)).collect()
        }
        Objects {
            services: all(&self.services),
            slices: all(&self.slices),
            pods: all(&self.pods),
            nodes: all(&self.nodes),
            namespaces: all(&self.namespaces),
            network_policies: all(&self.policies),
        }
    }
}
