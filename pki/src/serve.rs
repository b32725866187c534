//! The HTTPS accept loop weft's endpoints share (the API server's and the node's): TLS
//! handshakes with a deadline, then HTTP/1.1 with upgrades (exec, attach, port-forward) over an
//! axum router, each request carrying the [`PeerSubject`] of the client certificate the
//! handshake verified. Only the handshake can attach one, so no request can claim an identity.

use std::{sync::Arc, time::Duration};

use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};
use tower::ServiceExt as _;

use crate::Subject;

/// Who the client certificate of a request's connection names (a request extension).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSubject(pub Subject);

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves `router` over TLS on `listener` until `stop` turns true.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    config: Arc<rustls::ServerConfig>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: the listener itself is fine.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stopped => return Ok(()),
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let who = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|der| crate::subject_of(der).ok())
                .map(PeerSubject);
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    if let Some(who) = &who {
                        req.extensions_mut().insert(who.clone());
                    }
                    router.clone().oneshot(req.map(axum::body::Body::new))
                },
            );
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}
