//! `weft-cni`: a CNI 1.1 plugin (also accepting 1.0.0 configs) with built-in IPAM, veth + bridge
//! pod networking, and the node-level VXLAN overlay.
//!
//! Owns: the CNI protocol (environment, config, results, error codes: [`env`], [`config`],
//! [`result`], [`error`]), address allocation ([`ipam`]), wiring pods into a node's network
//! ([`plugin`], over the kernel seam in `links`), masquerade of traffic leaving the cluster ([`masq`]), and the VXLAN overlay between nodes ([`overlay`], run by `weft-overlay`). Does not own: namespace and netlink primitives (`weft-netns`), or deciding which
//! pods exist (the runtime or weft's node agent calls the plugin).

pub mod config;
pub mod env;
pub mod error;
pub mod ipam;
mod links;
pub mod masq;
pub mod overlay;
pub mod plugin;
pub mod result;

pub use error::{CniError, Error, Result};
