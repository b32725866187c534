//! `weft-cni`: a CNI 1.1 plugin (IPAM, veth + bridge, VXLAN overlay).
//!
//! **Not implemented yet** (issue 3).
