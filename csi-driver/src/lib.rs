//! `weft-csi`: a CSI driver for local and NFS persistent volumes.
//!
//! **Not implemented yet** (issue 6). This crate is an empty placeholder so the workspace shows the
//! architecture; nothing in weft uses it or claims it works.
