//! `weft-csi`: serves the CSI Identity, Controller and Node services on a unix socket.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use std::time::Duration;
use weft_csi::local::LocalBackend;
use weft_csi::mounts::{Mounter, SysMounter};
use weft_csi::nfs::{LocalExportMounter, NfsBackend};
use weft_csi::service::{Driver, Roles};

/// weft's CSI driver for local and NFS persistent volumes.
#[derive(Debug, Parser)]
#[command(name = "weft-csi", version)]
struct Args {
    /// CSI endpoint: unix:///path/to/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    /// This node's name (NodeGetInfo and the topology of local volumes).
    #[arg(long, env = "NODE_ID")]
    node_id: String,
    /// Where volumes, snapshots and their records live.
    #[arg(long, default_value = "/var/lib/weft-csi")]
    state_dir: PathBuf,
    /// Services to serve: controller, node, or both (the default).
    #[arg(long, value_delimiter = ',', default_value = "controller,node")]
    roles: Vec<String>,
    /// Bytes the local pool may hand out (suffixes K, M, G, T, Ki, Mi, Gi, Ti); default: the size
    /// of the filesystem holding --state-dir.
    #[arg(long)]
    capacity: Option<String>,
    /// Seconds an NFS server gets to answer (controller calls and the node's mount).
    #[arg(long, default_value_t = 10)]
    nfs_timeout: u64,
    /// SERVER:/SHARE=DIR: on a node whose kernel has no NFS client and where DIR is the directory
    /// that SERVER exports as SHARE, serve that export's volumes by binding DIR's subdirectories
    /// instead of mounting over NFS. Repeatable.
    #[arg(long = "nfs-local-export", value_name = "SERVER:/SHARE=DIR")]
    nfs_local_exports: Vec<String>,
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().with_context(|| format!("size {s:?}"))?;
    let mult: u64 = match unit {
        "" => 1,
        "K" => 1000,
        "M" => 1000_u64.pow(2),
        "G" => 1000_u64.pow(3),
        "T" => 1000_u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        other => bail!("size {s:?}: unknown unit {other:?}"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} overflows"))
}

fn main() -> anyhow::Result<()> {
    weft_log::init("RUST_LOG", "info");
    let args = Args::parse();
    let mut roles = Roles {
        controller: false,
        node: false,
    };
    for r in &args.roles {
        match r.as_str() {
            "controller" => roles.controller = true,
            "node" => roles.node = true,
            other => bail!("--roles: unknown role {other:?} (controller, node)"),
        }
    }
    if args.node_id.is_empty() {
        bail!("--node-id must not be empty");
    }
    let socket = weft_csi::server::socket_path(&args.endpoint)?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("create {}", args.state_dir.display()))?;
    let pool = match &args.capacity {
        Some(s) => parse_size(s)?,
        None => weft_csi::fs::usage(&args.state_dir)?.total,
    };
    let local = LocalBackend::open(&args.state_dir, pool, Arc::new(SysMounter))
        .with_context(|| format!("open state in {}", args.state_dir.display()))?;
    let nfs = NfsBackend::open(&args.state_dir, Duration::from_secs(args.nfs_timeout))?;
    let mut exports = Vec::new();
    for e in &args.nfs_local_exports {
        let (export, dir) = e
            .split_once('=')
            .filter(|(x, d)| x.contains(":/") && d.starts_with('/'))
            .with_context(|| format!("--nfs-local-export {e:?}: expected SERVER:/SHARE=/DIR"))?;
        exports.push((export.to_string(), PathBuf::from(dir)));
    }
    let nfs_mounter: Arc<dyn Mounter> = if exports.is_empty() {
        Arc::new(SysMounter)
    } else {
        Arc::new(LocalExportMounter::new(Arc::new(SysMounter), exports))
    };
    let driver = Driver::new(
        args.node_id.clone(),
        local,
        nfs,
        nfs_mounter,
        Duration::from_secs(args.nfs_timeout),
        roles,
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down");
        };
        weft_csi::server::serve(driver, &socket, shutdown).await
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4Gi").unwrap(), 4 << 30);
        assert_eq!(parse_size("10M").unwrap(), 10_000_000);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("4Gb").is_err());
        assert!(parse_size("x").is_err());
    }
}
