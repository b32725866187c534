//! `weft`: the control plane. Today it owns the Kubernetes-compatible API server and its
//! embedded store ([`server`], [`store`]): discovery, CRUD, list and watch with resourceVersion,
//! label and field selectors, the status subresource and the patch types kubectl sends, for the
//! kinds weft's agents read ([`resources`]). kubectl and kube-rs clients talk to it unchanged.
//!
//! Not here yet: the scheduler, controllers, the node agent, `weft up`, an etcd backend,
//! authentication and TLS (the server is meant for loopback or a trusted network).

pub mod patch;
pub mod resources;
pub mod selector;
pub mod server;
pub mod status;
pub mod store;
pub mod table;
