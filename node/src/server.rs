//! The node's HTTP endpoint (kubelet's port, 10250 by default): `GET
//! /containerLogs/{namespace}/{pod}/{container}` with the `pods/log` query, which the API server
//! proxies `kubectl logs` to; `/exec`, `/attach` and `/portForward` ([`crate::stream`]), which
//! it forwards `kubectl exec`, `attach`, `cp` and `port-forward` to; and `/healthz`.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::Request,
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{agent::Cri, logs, stream};

/// What the endpoint serves from.
#[derive(Clone, Debug)]
struct Ctx {
    log_dir: PathBuf,
    cri: Cri,
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

/// Serves the node's endpoint on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, log_dir: PathBuf, cri: Cri) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/containerLogs/{ns}/{pod}/{container}", get(container_logs))
        .route("/exec/{ns}/{pod}/{container}", get(exec).post(exec))
        .route("/attach/{ns}/{pod}/{container}", get(attach).post(attach))
        .route(
            "/portForward/{ns}/{pod}",
            get(port_forward).post(port_forward),
        )
        .with_state(Ctx { log_dir, cri });
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}
