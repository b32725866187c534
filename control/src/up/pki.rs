//! The cluster's certificates and credentials, made by every `weft up` under `<dir>/pki/`
//! (kubeadm's layout and names): a CA; the API server's serving certificate for every name it
//! is reached by (the machine's loopback, the underlay address, the `kubernetes` Service
//! names); an admin client certificate (`weft:admin` in `system:masters`) in the kubeconfig
//! kubectl uses; and one client certificate per node (`system:node:nodeN` in `system:nodes`)
//! in that node's kubeconfig, for its `weft node` and `weft-proxy`, which the API server's node
//! authorization holds to what that node may do. The node endpoints (logs, exec, port-forward)
//! serve TLS too, each with a certificate for its node's address (`nodeN-serving.crt`), and
//! accept only the API server's client certificate (`apiserver-kubelet-client.crt`, in
//! `system:masters`), as kubeadm sets kubelets up. Keys are written readable by root only.
//!
//! The supervisor and `weft status` reach the API with the admin's certificate ([`Client`]).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use weft_pki::{Ca, Subject, Usage};

use super::{Options, UpError, io, topology};

/// The Service IP of `kubernetes.default` (the first address of the service range).
const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

/// The files of a cluster's certificates.
#[derive(Clone, Debug)]
pub struct Files {
    dir: PathBuf,
}

impl Files {
    /// The certificates of the cluster kept in `cluster_dir`.
    pub fn of(cluster_dir: &Path) -> Self {
        Self {
            dir: cluster_dir.join("pki"),
        }
    }

    /// A file of the directory (`ca.crt`, `apiserver.key`, ...).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

fn failed(what: &str) -> impl FnOnce(weft_pki::Error) -> UpError + '_ {
    move |e| UpError::Failed(format!("{what}: {e}"))
}

/// Makes the CA and every certificate of the cluster, and the kubeconfigs: the admin's (at
/// `opts.kubeconfig()`, for the API server on the machine's loopback at `api`) and each
/// node's (at `opts.node_kubeconfig(i)`).
pub fn create(opts: &Options, api: SocketAddr) -> Result<(), UpError> {
    let files = Files::of(&opts.dir);
    std::fs::create_dir_all(&files.dir).map_err(io("creating the pki directory"))?;
    let write = |name: &str, text: &str| {
        crate::write_private(&files.path(name), text).map_err(io(format!("writing {name}")))
    };
    let ca = Ca::generate("weft-ca").map_err(failed("making the CA"))?;
    write("ca.crt", &ca.cert_pem())?;
    write("ca.key", &ca.key_pem())?;
    let names: Vec<String> = [
        "127.0.0.1",
        "localhost",
        &topology::API_ADDR.to_string(),
        KUBERNETES_SERVICE_IP,
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    // Issues a certificate and writes it and its key as `<file>.crt` and `<file>.key`.
    let issue = |file: &str, who: Subject, names: &[String], usage: Usage| {
        let issued = ca
            .issue(&who, names, usage)
            .map_err(failed("issuing a certificate"))?;
        write(&format!("{file}.crt"), &issued.cert_pem)?;
        write(&format!("{file}.key"), &issued.key_pem)?;
        Ok::<_, UpError>(issued)
    };
    let masters = [crate::auth::MASTERS];
    issue(
        "apiserver",
        Subject::new("kube-apiserver", &[]),
        &names,
        Usage::Server,
    )?;
    let admin = issue(
        "admin",
        Subject::new("weft:admin", &masters),
        &[],
        Usage::Client,
    )?;
    issue(
        "apiserver-kubelet-client",
        Subject::new("kube-apiserver-kubelet-client", &masters),
        &[],
        Usage::Client,
    )?;
    let kubeconfig = |path: &Path, server: &str, user: &str, cert: &weft_pki::Issued| {
        let text = crate::kubeconfig(
            server,
            Some(&ca.cert_pem()),
            user,
            crate::Credentials::Certificate {
                cert_pem: &cert.cert_pem,
                key_pem: &cert.key_pem,
            },
        );
        crate::write_private(path, &text).map_err(io(format!("writing {}", path.display())))
    };
    kubeconfig(
        &opts.kubeconfig(),
        &format!("https://{api}"),
        "weft:admin",
        &admin,
    )?;
    for i in 1..=opts.nodes {
        let user = format!("{}node{i}", crate::auth::NODE_PREFIX);
        let cert = issue(
            &format!("node{i}"),
            Subject::new(&user, &[crate::auth::NODES]),
            &[],
            Usage::Client,
        )?;
        issue(
            &format!("node{i}-serving"),
            Subject::new(&format!("node{i}"), &[]),
            &[topology::node_addr(i).to_string()],
            Usage::Server,
        )?;
        let path = opts.node_kubeconfig(i);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating a node's directory"))?;
        }
        kubeconfig(
            &path,
            &format!("https://{}:6443", topology::API_ADDR),
            &user,
            &cert,
        )?;
    }
    Ok(())
}

/// Flags naming files of the cluster's certificates: `(flag, file name)` pairs.
fn flags(opts: &Options, pairs: &[(&str, String)]) -> Vec<std::ffi::OsString> {
    let files = Files::of(&opts.dir);
    pairs
        .iter()
        .flat_map(|(flag, name)| [(*flag).into(), files.path(name).into_os_string()])
        .collect()
}

/// The API server's flags for the cluster's certificates.
pub fn server_args(opts: &Options) -> Vec<std::ffi::OsString> {
    let pair = |f: &'static str, n: &str| (f, n.to_owned());
    flags(
        opts,
        &[
            pair("--tls-cert-file", "apiserver.crt"),
            pair("--tls-private-key-file", "apiserver.key"),
            pair("--client-ca-file", "ca.crt"),
            pair(
                "--kubelet-client-certificate",
                "apiserver-kubelet-client.crt",
            ),
            pair("--kubelet-client-key", "apiserver-kubelet-client.key"),
            pair("--kubelet-certificate-authority", "ca.crt"),
        ],
    )
}

/// Node `i`'s flags for its endpoint's certificate.
pub fn node_args(opts: &Options, i: usize) -> Vec<std::ffi::OsString> {
    flags(
        opts,
        &[
            ("--tls-cert-file", format!("node{i}-serving.crt")),
            ("--tls-private-key-file", format!("node{i}-serving.key")),
            ("--client-ca-file", "ca.crt".to_owned()),
        ],
    )
}

/// An HTTPS client of the API server as the cluster's admin (blocking, one request per
/// connection: the supervisor's few calls).
#[derive(Clone, Debug)]
pub struct Client {
    api: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl Client {
    /// The admin's client of the cluster kept in `cluster_dir`, its API server at `api`.
    pub fn new(cluster_dir: &Path, api: SocketAddr) -> Result<Self, UpError> {
        let files = Files::of(cluster_dir);
        let read =
            |name: &str| std::fs::read(files.path(name)).map_err(io(format!("reading {name}")));
        let tls = weft_pki::client_config(
            &read("ca.crt")?,
            Some((&read("admin.crt")?, &read("admin.key")?)),
        )
        .map_err(failed("configuring the admin's TLS"))?;
        Ok(Self {
            api,
            tls: Arc::new(tls),
        })
    }

    /// Sends one request and returns the status code and body.
    fn request(&self, head: &str, body: &str) -> Option<(u16, String)> {
        let tcp = TcpStream::connect_timeout(&self.api, Duration::from_secs(2)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let name = rustls::pki_types::ServerName::IpAddress(self.api.ip().into());
        let conn = rustls::ClientConnection::new(self.tls.clone(), name).ok()?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        write!(
            s,
            "{head}\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.api,
            body.len()
        )
        .ok()?;
        let mut answer = Vec::new();
        // The server may close without TLS's close_notify: what arrived before counts.
        let _ = s.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        let (status, rest) = answer.split_once("\r\n\r\n")?;
        let code = status.split(' ').nth(1)?.parse().ok()?;
        Some((code, rest.to_owned()))
    }

    /// A GET of `path`: the body of a 200 answer.
    pub fn get(&self, path: &str) -> Option<String> {
        match self.request(&format!("GET {path} HTTP/1.1"), "")? {
            (200, body) => Some(body),
            _ => None,
        }
    }

    /// A POST of `body` to `path`: whether it was created (or already existed).
    pub fn post(&self, path: &str, body: &serde_json::Value) -> bool {
        matches!(
            self.request(&format!("POST {path} HTTP/1.1"), &body.to_string()),
            Some((201 | 409, _))
        )
    }
}
