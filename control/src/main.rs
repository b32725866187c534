//! `weft`: the control plane's command line.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::{Parser, Subcommand};
use weft_control::{server, store};

#[derive(Debug, Parser)]
#[command(name = "weft", version, about = "weft's control plane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the Kubernetes API (plain HTTP) from an embedded store.
    Server {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:6443")]
        listen: SocketAddr,
        /// File the store is kept in (created when missing); without it nothing survives a
        /// restart.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Range Services get their cluster IPs from.
        #[arg(long, default_value = "10.96.0.0/16")]
        service_cidr: ipnet::Ipv4Net,
        /// Write a kubeconfig for this server here (for kubectl and the agents).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
}

fn kubeconfig(server: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: weft\n  cluster:\n    server: {server}\n\
         contexts:\n- name: weft\n  context:\n    cluster: weft\n    user: weft\n    namespace: default\n\
         current-context: weft\nusers:\n- name: weft\n  user: {{}}\n"
    )
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Server {
            listen,
            data,
            service_cidr,
            kubeconfig: kubeconfig_path,
        } => {
            let store = store::Store::open(store::Options {
                path: data.clone(),
                service_cidr,
                ..store::Options::default()
            })
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("opening the store")?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("listening on {listen}"))?;
                let bound = listener.local_addr()?;
                if let Some(path) = kubeconfig_path {
                    std::fs::write(&path, kubeconfig(&format!("http://{bound}")))
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                tracing::info!(%bound, store = ?data, "serving the Kubernetes API");
                axum::serve(listener, server::router(Arc::new(store)))
                    .with_graceful_shutdown(async {
                        let _ = tokio::signal::ctrl_c().await;
                    })
                    .await
                    .context("serving")
            })
        }
    }
}
