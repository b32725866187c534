//! `weft`: the control plane. It owns the Kubernetes-compatible API server and its embedded
//! store ([`server`], [`store`]): discovery, CRUD, list and watch with resourceVersion, label
//! and field selectors, the status and scale subresources, pods' binding and eviction, graceful
//! deletion with finalizers, the patch types kubectl sends and server-side apply with field
//! ownership ([`apply`]), for the kinds in [`resources`]; and the reconcile loops that act on
//! those objects ([`controllers`]: ReplicaSets, Deployments, StatefulSets, DaemonSets, Jobs,
//! EndpointSlices, garbage collection, node lifecycle) and the [`scheduler`],
//! which are API clients like kube-controller-manager and kube-scheduler. kubectl and kube-rs
//! clients talk to it unchanged.
//!
//! The `weft` binary also fronts the node agent (`weft node`, from `weft-node`), and [`up`]
//! composes everything into a cluster on this machine (`weft up`, `weft down`, `weft status`).
//! The store's backends (SQLite, etcd, memory) are `weft-store`'s. Not here yet:
//! authentication and TLS (the server is meant for loopback or a trusted network).

pub mod apply;
pub mod controllers;
pub mod defaults;
pub mod patch;
pub mod protobuf;
pub mod resources;
pub mod scheduler;
pub mod selector;
pub mod server;
pub mod status;
pub mod store;
pub mod table;
pub mod up;

/// A kubeconfig for the API server at `server` (plain HTTP, no credentials).
pub fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: weft\n  cluster:\n    server: {server}\n\
         contexts:\n- name: weft\n  context:\n    cluster: weft\n    user: weft\n    namespace: default\n\
         current-context: weft\nusers:\n- name: weft\n  user: {{}}\n"
    )
}
