//! `weft-overlay`: the node-level half of weft-cni. Programs this node's VXLAN device and the
//! routes, neighbour and FDB entries for every other node from a node list file, and keeps them in
//! line as the file changes (and every `--resync-secs`, to repair drift).

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use weft_cni::overlay::{self, Settings};
use weft_netns::Netlink;

#[derive(Debug, Parser)]
#[command(
    name = "weft-overlay",
    version,
    about = "weft's VXLAN overlay agent (one per node)"
)]
struct Cli {
    /// Node list: JSON `[{"name", "address", "podCIDR"}]`.
    #[arg(long, required_unless_present = "teardown")]
    nodes: Option<PathBuf>,
    /// This node's name in the list.
    #[arg(long, env = "WEFT_NODE_NAME", required_unless_present = "teardown")]
    node_name: Option<String>,
    /// Also write this node's pod CIDR here (for weft-cni's `ipam.podCIDRFile`).
    #[arg(long)]
    pod_cidr_file: Option<PathBuf>,
    /// VXLAN device name.
    #[arg(long, default_value = weft_cni::plugin::VXLAN_DEVICE)]
    device: String,
    /// VXLAN network identifier.
    #[arg(long, default_value_t = overlay::DEFAULT_VNI)]
    vni: u32,
    /// VXLAN UDP port.
    #[arg(long, default_value_t = overlay::DEFAULT_PORT)]
    port: u16,
    /// Reconcile once and exit.
    #[arg(long)]
    once: bool,
    /// Remove the overlay device and exit.
    #[arg(long)]
    teardown: bool,
    /// How often to look at the node list for changes.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    /// Full reconciliation period even without changes.
    #[arg(long, default_value_t = 30)]
    resync_secs: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    weft_log::init("RUST_LOG", "info");
    let cli = Cli::parse();
    let nl = Netlink::connect_current().await?;
    let mut settings = Settings::new(cli.node_name.clone().unwrap_or_default());
    settings.device = cli.device.clone();
    settings.vni = cli.vni;
    settings.port = cli.port;
    if cli.teardown {
        let removed = overlay::teardown(&nl, &settings).await?;
        tracing::info!(device = settings.device, removed, "overlay torn down");
        return Ok(());
    }
    let path = cli.nodes.clone().context("--nodes is required")?;
    let sync = |nl: &Netlink, settings: &Settings| {
        let path = path.clone();
        let pod_cidr_file = cli.pod_cidr_file.clone();
        let nl = nl.clone();
        let settings = settings.clone();
        async move {
            let nodes = overlay::read_nodes(&path)?;
            let report = overlay::reconcile(&nl, &settings, &nodes).await?;
            if let Some(f) = &pod_cidr_file
                && let Some(me) = nodes.iter().find(|n| n.name == settings.node_name)
            {
                overlay::write_pod_cidr(f, me.pod_cidr)?;
            }
            Ok::<_, overlay::OverlayError>((nodes.len(), report))
        }
    };
    if cli.once {
        let (n, report) = sync(&nl, &settings).await?;
        tracing::info!(nodes = n, ?report, "overlay reconciled");
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let mut last_seen = None;
    let mut last_sync = tokio::time::Instant::now() - Duration::from_secs(cli.resync_secs + 1);
    let mut tick = tokio::time::interval(Duration::from_millis(cli.poll_ms));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        let seen = std::fs::metadata(&path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()));
        if seen == last_seen && last_sync.elapsed() < Duration::from_secs(cli.resync_secs) {
            continue;
        }
        match sync(&nl, &settings).await {
            Ok((n, report)) => {
                if report.changed + report.removed > 0 || report.created_device {
                    tracing::info!(nodes = n, ?report, "overlay reconciled");
                }
                last_seen = seen;
            }
            // Keep what is programmed; a bad file must not tear the overlay down.
            Err(e) => tracing::error!(error = %e, "overlay not reconciled"),
        }
        last_sync = tokio::time::Instant::now();
    }
    tracing::info!("stopping; the overlay stays programmed");
    Ok(())
}
