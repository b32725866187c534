//! `weft`: the control plane (Kubernetes-compatible API server, store, scheduler, controllers), the
//! node agent and `weft up`.
//!
//! **Not implemented yet.** This crate is an empty placeholder so the workspace shows the
//! architecture; nothing in weft uses it or claims it works.
