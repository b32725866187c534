//! Serving the CSI services on a unix socket.

use std::future::Future;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::csi;
use crate::error::{Error, Result};
use crate::service::{ControllerService, Driver, IdentityService, NodeService};

/// Turns a CSI endpoint (`unix:///path`, `unix:/path` or a bare path) into a socket path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "endpoint {endpoint:?}: expected unix:///absolute/path"
        )));
    }
    Ok(PathBuf::from(path))
}

/// Removes a socket left by a driver that died, refusing to touch anything else: a live socket
/// (another driver answers on it) or a file that is not a socket.
pub fn remove_stale_socket(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("stat {}", path.display()))(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::AlreadyExists(format!(
            "{} exists and is not a socket; not removing it",
            path.display()
        )));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(Error::AlreadyExists(format!(
            "another process is serving on {}",
            path.display()
        )));
    }
    tracing::info!(path = %path.display(), "removing stale socket");
    std::fs::remove_file(path).map_err(Error::io(format!("remove {}", path.display())))
}

/// Serves `driver` on the socket at `path` until `shutdown` completes, then removes the socket.
pub async fn serve(
    driver: Arc<Driver>,
    path: &Path,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    remove_stale_socket(path)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
    }
    let listener =
        UnixListener::bind(path).map_err(Error::io(format!("bind {}", path.display())))?;
    tracing::info!(path = %path.display(), node = %driver.node_id, controller = driver.roles.controller, node_service = driver.roles.node, "serving CSI");
    let identity = csi::identity_server::IdentityServer::new(IdentityService(driver.clone()));
    let controller = driver
        .roles
        .controller
        .then(|| csi::controller_server::ControllerServer::new(ControllerService(driver.clone())));
    let node = driver
        .roles
        .node
        .then(|| csi::node_server::NodeServer::new(NodeService(driver.clone())));
    let result = tonic::transport::Server::builder()
        .add_service(identity)
        .add_optional_service(controller)
        .add_optional_service(node)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(path);
    result.map_err(|e| Error::Io {
        context: "serve gRPC".into(),
        source: std::io::Error::other(e.to_string()),
    })
}
