//! How the API server accepts connections: always TLS (rustls, through weft-pki's accept loop,
//! which attaches the subject of a verified client certificate to each of the connection's
//! requests); each request is then authenticated and authorized by the router
//! ([`crate::server`]).
//!
//! The serving certificate is the one given (`--tls-cert-file`, as `weft up` passes the
//! cluster's), else — as kube-apiserver does without one — a self-signed CA and a certificate
//! it issues for loopback and the listen addresses ([`serving`]), kept in `--cert-dir` when
//! given so that kubeconfigs stay valid across restarts. kubectl sends no bearer token over
//! plain HTTP, so there is none: only the in-process controllers' own listener on loopback is
//! plain ([`plain_allowed`]).

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
};

pub use weft_pki::serve::serve_tls;

/// Where the serving certificate comes from.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// The serving certificate (PEM, with its chain) and key; both or neither.
    pub cert_and_key: Option<(PathBuf, PathBuf)>,
    /// The CA whose client certificates authenticate users.
    pub client_ca: Option<PathBuf>,
    /// Where a self-signed CA and certificate are kept (without a given certificate).
    pub cert_dir: Option<PathBuf>,
}

/// The TLS a server serves with.
#[derive(Debug)]
pub struct Serving {
    /// The rustls configuration.
    pub config: Arc<rustls::ServerConfig>,
    /// The CA a client should trust for the serving certificate (PEM), for kubeconfigs: the
    /// self-signed CA, else the client CA (the cluster's, as `weft up` makes it), else the
    /// serving certificate itself.
    pub ca_pem: String,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The certificates or keys are unusable.
    #[error(transparent)]
    Pki(#[from] weft_pki::Error),
}

fn file(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::File {
        path: path.display().to_string(),
        source,
    }
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(file(path))
}

/// The self-signed CA, certificate and key in `cert_dir` (made there when missing), or made
/// in memory without one: valid for loopback, `localhost` and `names`.
fn self_signed(
    cert_dir: Option<&Path>,
    names: &[IpAddr],
) -> Result<(String, String, String), TlsError> {
    let files = cert_dir.map(|d| {
        (
            d.join("ca.crt"),
            d.join("apiserver.crt"),
            d.join("apiserver.key"),
        )
    });
    if let Some((ca, cert, key)) = &files
        && ca.exists()
        && cert.exists()
        && key.exists()
    {
        return Ok((read(ca)?, read(cert)?, read(key)?));
    }
    let ca = weft_pki::Ca::generate("weft-apiserver-ca")?;
    let mut sans = vec![
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
        "localhost".to_owned(),
    ];
    for ip in names.iter().filter(|ip| !ip.is_unspecified()) {
        let ip = ip.to_string();
        if !sans.contains(&ip) {
            sans.push(ip);
        }
    }
    let issued = ca.issue(
        &weft_pki::Subject::new("kube-apiserver", &[]),
        &sans,
        weft_pki::Usage::Server,
    )?;
    let made = (ca.cert_pem(), issued.cert_pem, issued.key_pem);
    if let (Some(dir), Some((ca_file, cert, key))) = (cert_dir, &files) {
        std::fs::create_dir_all(dir).map_err(file(dir))?;
        for (path, text) in [(ca_file, &made.0), (cert, &made.1), (key, &made.2)] {
            crate::write_private(path, text).map_err(file(path))?;
        }
    }
    Ok(made)
}

/// The TLS to serve with for `files`, the server listening on `names`.
pub fn serving(files: &TlsFiles, names: &[IpAddr]) -> Result<Serving, TlsError> {
    let client_ca = files.client_ca.as_deref().map(read).transpose()?;
    let (ca_pem, cert, key) = match &files.cert_and_key {
        Some((cert, key)) => {
            let cert = read(cert)?;
            (
                client_ca.clone().unwrap_or_else(|| cert.clone()),
                cert,
                read(key)?,
            )
        }
        None => self_signed(files.cert_dir.as_deref(), names)?,
    };
    let config = weft_pki::server_config(
        cert.as_bytes(),
        key.as_bytes(),
        client_ca
            .as_deref()
            .map(|c| (c.as_bytes(), weft_pki::ClientAuth::Optional)),
    )?;
    Ok(Serving {
        config: Arc::new(config),
        ca_pem,
    })
}

/// Whether plain HTTP may be served on `addr` (loopback only: the controllers' listener).
pub fn plain_allowed(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}
