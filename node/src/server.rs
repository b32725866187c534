//! The node's HTTP endpoint (kubelet's port, 10250 by default): `GET
//! /containerLogs/{namespace}/{pod}/{container}` with the `pods/log` query, which the API server
//! proxies `kubectl logs` to; `/exec`, `/attach` and `/portForward` ([`crate::stream`]), which
//! it forwards `kubectl exec`, `attach`, `cp` and `port-forward` to; `/stats/summary`
//! ([`crate::stats`]), which `metrics.k8s.io` reads; and `/healthz`.
//!
//! With TLS (`weft node --tls-cert-file ... --client-ca-file ...`, as `weft up` runs it) every
//! request needs a client certificate of the cluster's CA naming a member of `system:masters`:
//! the API server's (`--kubelet-client-certificate`). A node's own certificate, from the same
//! CA, is refused, so one node cannot exec into another's pods.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::Request,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{agent::Cri, logs, stats::Sampler, stream};

/// What the endpoint serves from.
#[derive(Clone, Debug)]
struct Ctx {
    log_dir: PathBuf,
    cri: Cri,
    stats: Arc<Sampler>,
}

async fn summary(State(ctx): State<Ctx>) -> Response {
    match ctx.stats.summary().await {
        Ok(s) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            serde_json::to_vec(&s).unwrap_or_default(),
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("container stats from the runtime: {}\n", e.message()),
        )
            .into_response(),
    }
}

fn query(q: &HashMap<String, String>) -> logs::Query {
    let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
    logs::Query {
        tail_lines: q.get("tailLines").and_then(|v| v.parse().ok()),
        since_seconds: q.get("sinceSeconds").and_then(|v| v.parse().ok()),
        timestamps: flag("timestamps"),
        previous: flag("previous"),
        follow: flag("follow"),
    }
}

async fn container_logs(
    State(Ctx { log_dir, .. }): State<Ctx>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let q = query(&q);
    let Some(path) = logs::file(&log_dir, &ns, &pod, &container, q.previous) else {
        let what = if q.previous {
            "previous terminated container"
        } else {
            "container"
        };
        return (
            StatusCode::NOT_FOUND,
            format!("{what} {container:?} in pod {pod:?} has no logs\n"),
        )
            .into_response();
    };
    let (first, offset) = match logs::read(&path, &q) {
        Ok(x) => x,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading {}: {e}\n", path.display()),
            )
                .into_response();
        }
    };
    if !q.follow {
        return (StatusCode::OK, first).into_response();
    }
    let start = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(first)) });
    let rest = futures::stream::unfold((path, offset, q), |(path, offset, q)| async move {
        loop {
            match logs::more(&path, offset, &q, Duration::from_secs(5)).await {
                Ok((text, next)) if !text.is_empty() => {
                    return Some((Ok(Bytes::from(text)), (path, next, q)));
                }
                Ok(_) => {}
                Err(e) => return Some((Err(e), (path, offset, q))),
            }
        }
    });
    Response::new(Body::from_stream(futures::StreamExt::chain(start, rest)))
}

async fn exec(
    State(ctx): State<Ctx>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    stream::serve(&ctx.cri, stream::Kind::Exec, &ns, &pod, &container, req).await
}

async fn attach(
    State(ctx): State<Ctx>,
    Path((ns, pod, container)): Path<(String, String, String)>,
    req: Request,
) -> Response {
    stream::serve(&ctx.cri, stream::Kind::Attach, &ns, &pod, &container, req).await
}

async fn port_forward(
    State(ctx): State<Ctx>,
    Path((ns, pod)): Path<(String, String)>,
    req: Request,
) -> Response {
    stream::serve(&ctx.cri, stream::Kind::PortForward, &ns, &pod, "", req).await
}

/// The group whose client certificates may use the endpoint.
const ALLOWED_GROUP: &str = "system:masters";

/// Refuses a request whose connection presented no certificate of [`ALLOWED_GROUP`].
async fn require_master(req: Request, next: axum::middleware::Next) -> Response {
    match req.extensions().get::<weft_pki::serve::PeerSubject>() {
        Some(p) if p.0.organizations.iter().any(|o| o == ALLOWED_GROUP) => next.run(req).await,
        Some(p) => (
            StatusCode::FORBIDDEN,
            format!(
                "Forbidden (user={}, verb={}, resource=nodes, subresource=proxy)\n",
                p.0.common_name,
                req.method().as_str().to_lowercase()
            ),
        )
            .into_response(),
        None => (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response(),
    }
}

/// Serves the node's endpoint on `addr` until the process ends: over TLS with `tls` (which
/// should require client certificates), else plain HTTP.
pub async fn serve(
    addr: SocketAddr,
    log_dir: PathBuf,
    cri: Cri,
    stats: Arc<Sampler>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/stats/summary", get(summary))
        .route("/containerLogs/{ns}/{pod}/{container}", get(container_logs))
        .route("/exec/{ns}/{pod}/{container}", get(exec).post(exec))
        .route("/attach/{ns}/{pod}/{container}", get(attach).post(attach))
        .route(
            "/portForward/{ns}/{pod}",
            get(port_forward).post(port_forward),
        )
        .with_state(Ctx {
            log_dir,
            cri,
            stats,
        });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    match tls {
        Some(config) => {
            let app = app.layer(axum::middleware::from_fn(require_master));
            let (_keep, never) = tokio::sync::watch::channel(false);
            weft_pki::serve::serve_tls(listener, app, config, never).await
        }
        None => axum::serve(listener, app).await,
    }
}
