//! Streaming: `kubectl exec`, `attach`, `port-forward` and `cp` as kubelet serves them.
//!
//! The API server forwards the client's HTTP upgrade request (SPDY/3.1 or WebSocket, whichever
//! kubectl offers) to the node's endpoint (`/exec/{ns}/{pod}/{container}`,
//! `/attach/{ns}/{pod}/{container}`, `/portForward/{ns}/{pod}`); the node asks the runtime for a
//! streaming URL over CRI (`Exec`, `Attach`, `PortForward`) and forwards the same request there:
//! containerd's streaming server is Kubernetes' own implementation of the stream protocols, so
//! every protocol version kubectl and the runtime agree on works, and neither hop parses it.
//! [`proxy_upgrade`] is that hop, used by both the API server and the node: the request goes to
//! the next server as it came, a refusal (any answer but `101 Switching Protocols`) comes back as
//! it is (kubectl falls back from WebSocket to SPDY on it), and after `101` the two upgraded
//! connections are spliced until either side closes.

use std::{collections::HashMap, sync::Arc};

use axum::{
    body::Body,
    extract::Request,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use k8s_cri::v1 as cri;

use crate::agent::Cri;

/// Headers of an upgrade request that the next hop must see.
const FORWARDED: [&str; 8] = [
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "x-stream-protocol-version",
    "origin",
];

/// A connection to the next hop: plain TCP or TLS over it.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Connects to `target` (`host:port`): over TLS with `tls` (the server's certificate checked
/// for the host), else plain TCP.
pub async fn dial(
    target: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> std::io::Result<Box<dyn Io>> {
    let tcp = tokio::net::TcpStream::connect(target).await?;
    let Some(config) = tls else {
        return Ok(Box::new(tcp));
    };
    let host = target
        .rsplit_once(':')
        .map_or(target, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let stream = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await?;
    Ok(Box::new(stream))
}

/// Sends `GET {path}` to the node endpoint `target` (over TLS with `tls`) and returns its
/// answer, whose body streams as it comes.
pub async fn get(
    target: &str,
    path: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let stream = dial(target, tls).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = hyper::Request::builder()
        .uri(path)
        .header(hyper::header::HOST, target)
        .body(http_body_util::Empty::<axum::body::Bytes>::new())
        .map_err(|e| e.to_string())?;
    sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())
}

/// Forwards the upgrade request `req` to `{target}{path}` (over TLS with `tls`) and, once the
/// target switches protocols, splices the client's connection to the target's. Any other
/// answer is returned as it came. Errors reaching the target are a 502 with the reason.
pub async fn proxy_upgrade(
    mut req: Request,
    target: &str,
    path: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Response {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let fail = |e: &dyn std::fmt::Display| {
        (
            StatusCode::BAD_GATEWAY,
            format!("error dialing backend {scheme}://{target}{path}: {e}\n"),
        )
            .into_response()
    };
    let stream = match dial(target, tls).await {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => return fail(&e),
        };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut onward = axum::http::Request::builder()
        .method(req.method().clone())
        .uri(path)
        .header(header::HOST, target);
    for (name, value) in req.headers() {
        if FORWARDED.contains(&name.as_str()) {
            onward = onward.header(name, value);
        }
    }
    let onward = match onward.body(http_body_util::Empty::<axum::body::Bytes>::new()) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let mut answer = match sender.send_request(onward).await {
        Ok(a) => a,
        Err(e) => return fail(&e),
    };
    if answer.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, body) = answer.into_parts();
        return Response::from_parts(parts, Body::new(body));
    }
    let mut reply = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    for (name, value) in answer.headers() {
        reply = reply.header(name, value);
    }
    let upstream = hyper::upgrade::on(&mut answer);
    let downstream = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let (Ok(up), Ok(down)) = (upstream.await, downstream.await) else {
            tracing::debug!("an upgraded stream closed before it started");
            return;
        };
        let mut up = hyper_util::rt::TokioIo::new(up);
        let mut down = hyper_util::rt::TokioIo::new(down);
        if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
            tracing::debug!(error = %e, "stream ended");
        }
    });
    reply.body(Body::empty()).unwrap_or_else(|e| fail(&e))
}

/// The query of a streaming request: repeated keys (`command`) kept in order.
fn params(req: &Request) -> Vec<(String, String)> {
    serde_urlencoded::from_str(req.uri().query().unwrap_or("")).unwrap_or_default()
}

fn flag(params: &[(String, String)], key: &str) -> bool {
    params
        .iter()
        .any(|(k, v)| k == key && (v == "true" || v == "1"))
}

fn error(code: StatusCode, text: String) -> Response {
    (code, text).into_response()
}

/// What a streaming request names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `exec`: a new process in the container.
    Exec,
    /// `attach`: the container's own stdio.
    Attach,
    /// `portForward`: connections into the pod's network namespace.
    PortForward,
}

/// The CRI labels naming pod `ns/pod` (and one of its containers).
fn pod_labels(ns: &str, pod: &str, container: Option<&str>) -> HashMap<String, String> {
    [
        (crate::agent::NS_LABEL, Some(ns)),
        (crate::agent::NAME_LABEL, Some(pod)),
        (crate::agent::CONTAINER_LABEL, container),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
    .collect()
}

async fn running_container(
    cri: &Cri,
    ns: &str,
    pod: &str,
    container: &str,
) -> Result<String, Response> {
    let labels = pod_labels(ns, pod, Some(container));
    let found = cri
        .runtime
        .clone()
        .list_containers(cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                state: Some(cri::ContainerStateValue {
                    state: cri::ContainerState::ContainerRunning as i32,
                }),
                label_selector: labels,
                ..Default::default()
            }),
        })
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")))?
        .into_inner()
        .containers;
    found
        .into_iter()
        .max_by_key(|c| c.created_at)
        .map(|c| c.id)
        .ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                format!("container {container:?} of pod {ns}/{pod} is not running\n"),
            )
        })
}

async fn ready_sandbox(cri: &Cri, ns: &str, pod: &str) -> Result<String, Response> {
    let labels = pod_labels(ns, pod, None);
    let found = cri
        .runtime
        .clone()
        .list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                state: Some(cri::PodSandboxStateValue {
                    state: cri::PodSandboxState::SandboxReady as i32,
                }),
                label_selector: labels,
                ..Default::default()
            }),
        })
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")))?
        .into_inner()
        .items;
    found
        .into_iter()
        .max_by_key(|s| s.created_at)
        .map(|s| s.id)
        .ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                format!("pod {ns}/{pod} has no running sandbox on this node\n"),
            )
        })
}

/// Serves one streaming request on the node: asks the runtime for a streaming URL and forwards
/// the upgrade there. `container` is unused for port forwarding.
pub async fn serve(
    cri: &Cri,
    kind: Kind,
    ns: &str,
    pod: &str,
    container: &str,
    req: Request,
) -> Response {
    let q = params(&req);
    let url = match kind {
        Kind::Exec | Kind::Attach => {
            let id = match running_container(cri, ns, pod, container).await {
                Ok(id) => id,
                Err(r) => return r,
            };
            let (stdin, stdout, stderr, tty) = (
                flag(&q, "input") || flag(&q, "stdin"),
                flag(&q, "output") || flag(&q, "stdout"),
                flag(&q, "error") || flag(&q, "stderr"),
                flag(&q, "tty"),
            );
            if kind == Kind::Exec {
                let cmd: Vec<String> = q
                    .iter()
                    .filter(|(k, _)| k == "command")
                    .map(|(_, v)| v.clone())
                    .collect();
                if cmd.is_empty() {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "you must specify at least 1 command\n".into(),
                    );
                }
                cri.runtime
                    .clone()
                    .exec(cri::ExecRequest {
                        container_id: id,
                        cmd,
                        tty,
                        stdin,
                        stdout,
                        stderr: stderr && !tty,
                    })
                    .await
                    .map(|r| r.into_inner().url)
            } else {
                cri.runtime
                    .clone()
                    .attach(cri::AttachRequest {
                        container_id: id,
                        stdin,
                        tty,
                        stdout,
                        stderr: stderr && !tty,
                    })
                    .await
                    .map(|r| r.into_inner().url)
            }
        }
        Kind::PortForward => {
            let id = match ready_sandbox(cri, ns, pod).await {
                Ok(id) => id,
                Err(r) => return r,
            };
            let port = q
                .iter()
                .filter(|(k, _)| k == "port")
                .filter_map(|(_, v)| v.parse().ok())
                .collect();
            cri.runtime
                .clone()
                .port_forward(cri::PortForwardRequest {
                    pod_sandbox_id: id,
                    port,
                })
                .await
                .map(|r| r.into_inner().url)
        }
    };
    let url = match url {
        Ok(u) => u,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}\n", e.message()),
            );
        }
    };
    let Some((target, path)) = split_url(&url) else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the runtime gave an unusable streaming URL {url:?}\n"),
        );
    };
    let mut req = req;
    // The runtime's URL carries everything; the client's query is not forwarded.
    req.headers_mut()
        .entry(header::CONNECTION)
        .or_insert(HeaderValue::from_static("Upgrade"));
    proxy_upgrade(req, target, path, None).await
}

/// `http://host:port/path` → (`host:port`, `/path`).
fn split_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("http://")?;
    let slash = rest.find('/')?;
    Some((&rest[..slash], &rest[slash..]))
}

#[cfg(test)]
mod tests {
    #[test]
    fn streaming_urls_split() {
        assert_eq!(
            super::split_url("http://127.0.0.1:4321/exec/AbC"),
            Some(("127.0.0.1:4321", "/exec/AbC"))
        );
        assert_eq!(super::split_url("https://x/y"), None);
        assert_eq!(super::split_url("http://x"), None);
    }
}
