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
//! The store's backends (SQLite, etcd, memory) are `weft-store`'s. Every request is
//! authenticated (bearer tokens, client certificates) and authorized (admins, nodes, nobody
//! else) by [`auth`]; [`listen`] serves TLS, or plain HTTP on loopback only.

pub mod apply;
pub mod auth;
pub mod controllers;
pub mod defaults;
pub mod leader;
pub mod listen;
pub mod metrics;
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

/// The credentials a kubeconfig carries.
#[derive(Clone, Copy, Debug)]
pub enum Credentials<'a> {
    /// A bearer token.
    Token(&'a str),
    /// A client certificate and its key (PEM).
    Certificate {
        /// The certificate.
        cert_pem: &'a str,
        /// Its key.
        key_pem: &'a str,
    },
}

/// A kubeconfig for the API server at `server` (`https://...` or, on loopback, `http://...`),
/// trusting `ca_pem` for its serving certificate when given, as `user` with `credentials`.
pub fn kubeconfig(
    server: &str,
    ca_pem: Option<&str>,
    user: &str,
    credentials: Credentials<'_>,
) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let ca = ca_pem
        .map(|c| format!("    certificate-authority-data: {}\n", b64(c)))
        .unwrap_or_default();
    let credentials = match credentials {
        Credentials::Token(t) => format!("    token: {t}\n"),
        Credentials::Certificate { cert_pem, key_pem } => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(cert_pem),
            b64(key_pem)
        ),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: weft\n  cluster:\n    server: {server}\n{ca}\
         contexts:\n- name: weft\n  context:\n    cluster: weft\n    user: {user:?}\n    namespace: default\n\
         current-context: weft\nusers:\n- name: {user:?}\n  user:\n{credentials}"
    )
}

/// Writes `text` to `path`, readable by its owner only (keys, kubeconfigs with credentials),
/// all at once: a reader sees the old file or the whole new one (written beside it, renamed).
pub fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The bearer token of a kubeconfig [`kubeconfig`] wrote, if it has one.
pub fn kubeconfig_token(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("token: "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_kubeconfig_reads_back_with_its_credentials() {
        let text = super::kubeconfig(
            "https://127.0.0.1:6443",
            Some("CA"),
            "weft:admin",
            super::Credentials::Token("abc"),
        );
        let k: kube::config::Kubeconfig = serde_yaml_ng_or_kube(&text);
        assert_eq!(
            k.clusters[0]
                .cluster
                .as_ref()
                .unwrap()
                .certificate_authority_data
                .as_deref(),
            Some("Q0E=")
        );
        assert_eq!(super::kubeconfig_token(&text), Some("abc"));
        let cert = super::kubeconfig(
            "https://x",
            None,
            "n",
            super::Credentials::Certificate {
                cert_pem: "C",
                key_pem: "K",
            },
        );
        let k = serde_yaml_ng_or_kube(&cert);
        let user = k.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.client_certificate_data.as_deref(), Some("Qw=="));
        assert_eq!(super::kubeconfig_token(&cert), None);
    }

    fn serde_yaml_ng_or_kube(text: &str) -> kube::config::Kubeconfig {
        kube::config::Kubeconfig::from_yaml(text).expect("a kubeconfig kube-rs reads")
    }
}
