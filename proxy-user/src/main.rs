//! `weft-proxy`: command-line entry point. Parses arguments and calls the `weft_proxy` library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weft_proxy::{
    agent::{self, Agent},
    bpffs::PinLayout,
    counters, services, socklb,
};

#[derive(Debug, Parser)]
#[command(name = "weft-proxy", version, about = "weft's eBPF datapath agent")]
struct Cli {
    /// Directory in bpffs where maps and links are pinned.
    #[arg(long, global = true, env = "WEFT_PIN_DIR", default_value = weft_proxy::bpffs::DEFAULT_PIN_ROOT)]
    pin_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: attach the socket load balancer and program services from manifests.
    Run(RunArgs),
    /// List the service frontends and backends as the kernel holds them.
    Services {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Socket load balancer attachment.
    #[command(subcommand)]
    Socklb(SocklbCmd),
    /// The TC path's flow table.
    #[command(subcommand)]
    Flows(FlowsCmd),
    /// Connect to an address as an application would and report who answered (for debugging
    /// service routing): prints JSON with the reply, the peer address and the local address.
    Probe(ProbeArgs),
    /// Per-interface packet and byte counters (tcx programs).
    #[command(subcommand)]
    Counters(CountersCmd),
    /// NetworkPolicy as weft computes it from a manifests directory.
    #[command(subcommand)]
    Policy(PolicyCmd),
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// What the kernel's policy maps hold (JSON): local pods, isolated pods, known prefixes,
    /// rule entries, pod ranges, named policies.
    Status,
    /// Whether a connection may start, and which policy (or default deny) decides each side:
    /// `weft-proxy policy trace --manifests DIR 10.244.1.5 10.244.2.7 tcp/80`.
    Trace {
        /// Directory of Kubernetes YAML (Pod, Namespace, NetworkPolicy).
        #[arg(long)]
        manifests: PathBuf,
        /// Source address.
        from: std::net::Ipv4Addr,
        /// Destination address.
        to: std::net::Ipv4Addr,
        /// PROTOCOL/PORT, for example tcp/80 or udp/53.
        port: String,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Standalone mode: a directory of Kubernetes YAML (Service, EndpointSlice, Pod, Node,
    /// Namespace, NetworkPolicy), watched for changes. Without it, the Kubernetes API is the
    /// source (see --kubeconfig).
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// kubeconfig for the Kubernetes API (default: $KUBECONFIG, ~/.kube/config, or the
    /// in-cluster service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// This node's name.
    #[arg(long, env = "WEFT_NODE_NAME")]
    node_name: String,
    /// cgroup2 directory to attach the socket load balancer to (default: the cgroup2 root,
    /// which covers every process on the node).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// How often to look at the manifests for changes (the Kubernetes API source is
    /// event-driven; this is then the longest pause between checks of local interfaces).
    #[arg(long, default_value_t = 200)]
    poll_ms: u64,
    /// Service map size (frontends), used when the map is created.
    #[arg(long, default_value_t = 65_536)]
    max_services: u32,
    /// Backend map size (slots over all frontends), used when the map is created.
    #[arg(long, default_value_t = 262_144)]
    max_backends: u32,
    /// Where to serve Prometheus metrics (`GET /metrics`); `off` to disable.
    #[arg(long, default_value = "127.0.0.1:9402")]
    metrics_addr: String,
    /// External interface on which NodePort, externalIP and LoadBalancer traffic from outside
    /// the node is translated per packet (repeatable).
    #[arg(long = "nodeport-iface")]
    nodeport_ifaces: Vec<String>,
    /// Name prefix of pods' host-side interfaces, where NetworkPolicy is enforced (repeatable;
    /// weft-cni names them wft...).
    #[arg(long = "policy-iface-prefix", default_value = "wft")]
    policy_iface_prefixes: Vec<String>,
    /// Address that traffic from outside the node to backends on other nodes leaves with, so
    /// replies return here (default: this Node's InternalIP; 0.0.0.0: use only this node's
    /// backends on the per-packet path).
    #[arg(long)]
    snat_addr: Option<std::net::Ipv4Addr>,
    /// Socket-level load balancing (cgroup hooks). With `false`, pods' service traffic is
    /// translated per packet at TC on their host-side interfaces (those --policy-iface-prefix
    /// names) instead, as kube-proxy would do it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    socket_lb: bool,
    /// Source port range for that traffic, FIRST-LAST (outside ip_local_port_range).
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
    snat_ports: (u16, u16),
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("expected FIRST-LAST")?;
    let (a, b): (u16, u16) = (
        a.parse().map_err(|e| format!("{a}: {e}"))?,
        b.parse().map_err(|e| format!("{b}: {e}"))?,
    );
    if a == 0 || b < a {
        return Err(format!("{s}: FIRST must be 1 or more and not above LAST"));
    }
    Ok((a, b))
}

#[derive(Debug, Subcommand)]
enum SocklbCmd {
    /// Detach the socket load balancer from a cgroup.
    Detach {
        /// cgroup2 directory (default: the cgroup2 root).
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum FlowsCmd {
    /// Forget every flow (like `conntrack -F`); each chooses its backend again.
    Flush,
    /// Show NetworkPolicy verdicts as they happen (one per new connection of a pod that policy
    /// knows): source, destination, protocol, direction, allowed or denied, and which policy or
    /// the default deny decided.
    Observe {
        /// Only `allowed` or `denied`.
        #[arg(long, value_parser = ["allowed", "denied"])]
        verdict: Option<String>,
        /// Only flows from or to this address.
        #[arg(long)]
        ip: Option<std::net::Ipv4Addr>,
        /// Only this destination port.
        #[arg(long)]
        port: Option<u16>,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
        /// Keep watching (otherwise print what is waiting and exit).
        #[arg(long, short)]
        follow: bool,
        /// Stop after this many flows.
        #[arg(long)]
        count: Option<usize>,
    },
}

#[derive(Debug, clap::Args)]
struct ProbeArgs {
    /// tcp or udp.
    #[arg(value_parser = ["tcp", "udp"])]
    protocol: String,
    /// Address to connect to.
    addr: std::net::SocketAddr,
    /// What to send.
    #[arg(long, default_value = "weft-probe")]
    payload: String,
    /// Give up after this long.
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

#[derive(Debug, Subcommand)]
enum CountersCmd {
    /// Attach the counters to both directions of each interface (in this network namespace).
    Attach {
        /// Interface names.
        #[arg(required = true)]
        interfaces: Vec<String>,
    },
    /// Detach the counters from interfaces and forget their counts.
    Detach {
        /// Interface names.
        #[arg(required_unless_present = "all")]
        interfaces: Vec<String>,
        /// Detach from every interface and remove the counter map.
        #[arg(long, conflicts_with = "interfaces")]
        all: bool,
    },
    /// Print the counters.
    Show {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    weft_log::init("RUST_LOG", "warn");
    let cli = Cli::parse();
    let layout = PinLayout::new(cli.pin_dir);
    match cli.command {
        Command::Run(args) => run(layout, args)?,
        Command::Services { json } => {
            let rows = services::read(&layout)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<28} {:>5} {:>5}  BACKENDS (local first)",
                    "FRONTEND", "ID", "LOCAL"
                );
                for r in rows {
                    let b = if r.backends.is_empty() {
                        "(none: refused)".to_owned()
                    } else {
                        r.backends.join(" ")
                    };
                    println!("{:<28} {:>5} {:>5}  {b}", r.frontend, r.id, r.local);
                }
            }
        }
        Command::Flows(FlowsCmd::Observe {
            verdict,
            ip,
            port,
            json,
            follow,
            count,
        }) => {
            let filter = weft_proxy::flowlog::Filter { verdict, ip, port };
            let mut observer = weft_proxy::flowlog::Observer::open(&layout)?;
            let mut shown = 0usize;
            let limit = count.unwrap_or(usize::MAX);
            loop {
                for f in observer.drain().into_iter().filter(|f| filter.matches(f)) {
                    if json {
                        println!("{}", serde_json::to_string(&f)?);
                    } else {
                        println!("{}", weft_proxy::flowlog::render(&f));
                    }
                    shown += 1;
                    if shown >= limit {
                        return Ok(());
                    }
                }
                if !follow {
                    break;
                }
                std::io::Write::flush(&mut std::io::stdout())?;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        Command::Flows(FlowsCmd::Flush) => {
            let n = services::flush_flows(&layout)?;
            println!("{n} flows forgotten");
        }
        Command::Socklb(SocklbCmd::Detach { cgroup }) => {
            socklb::detach(&layout, &cgroup_or_root(cgroup)?)?;
        }
        Command::Policy(PolicyCmd::Status) => {
            let maps = weft_proxy::policymap::PolicyMaps::open(&layout)?;
            println!("{}", serde_json::to_string(&maps.counts())?);
        }
        Command::Policy(PolicyCmd::Trace {
            manifests,
            from,
            to,
            port,
        }) => {
            let (objects, mut problems) = weft_proxy::manifests::load_dir(&manifests)
                .with_context(|| format!("reading {}", manifests.display()))?;
            let (proto, port) = port
                .split_once('/')
                .and_then(|(p, n)| {
                    Some((
                        weft_proxy::policy::Proto::parse(Some(&p.to_ascii_uppercase())).ok()?,
                        n.parse::<u16>().ok()?,
                    ))
                })
                .with_context(|| format!("{port:?}: expected PROTOCOL/PORT such as tcp/80"))?;
            let (compiled, more) = weft_proxy::policy::compile(
                &objects.network_policies,
                &objects.namespaces,
                &objects.pods,
            );
            problems.extend(more);
            for p in &problems {
                eprintln!("warning: {}: {}", p.object, p.reason);
            }
            let trace = compiled.trace(from, to, proto, port);
            println!("{}", serde_json::to_string_pretty(&trace)?);
            if !trace.allowed {
                std::process::exit(1);
            }
        }
        Command::Probe(args) => {
            let out = probe(&args);
            println!("{}", serde_json::to_string(&out)?);
            if out.get("error").is_some() {
                std::process::exit(1);
            }
        }
        Command::Counters(CountersCmd::Attach { interfaces }) => {
            for iface in &interfaces {
                counters::attach(&layout, iface)
                    .with_context(|| format!("attaching to {iface}"))?;
            }
        }
        Command::Counters(CountersCmd::Detach { interfaces, all }) => {
            if all {
                counters::detach_all(&layout)?;
            }
            for iface in &interfaces {
                counters::detach(&layout, iface)
                    .with_context(|| format!("detaching from {iface}"))?;
            }
        }
        Command::Counters(CountersCmd::Show { json }) => {
            let rows = counters::read(&layout)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print!("{}", counters::render_table(&rows));
            }
        }
    }
    Ok(())
}

fn cgroup_or_root(cgroup: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    cgroup
        .or_else(socklb::cgroup2_root)
        .context("no cgroup2 hierarchy is mounted; pass --cgroup")
}

fn run(layout: PinLayout, args: RunArgs) -> anyhow::Result<()> {
    // Signals are caught before anything is loaded: a stop asked for while the agent starts is
    // honoured once it has started, with a clean exit and consistent pins.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let source = match args.manifests {
        Some(dir) => agent::SourceConfig::Manifests(dir),
        None => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let config = rt
                .block_on(weft_proxy::kube_source::client_config(
                    args.kubeconfig.as_deref(),
                ))
                .context("--manifests not given, so the Kubernetes API is the source")?;
            agent::SourceConfig::Kubernetes(Box::new(config))
        }
    };
    let config = agent::Config {
        source,
        node_name: args.node_name,
        cgroup: cgroup_or_root(args.cgroup)?,
        layout,
        limits: services::Limits {
            max_services: args.max_services,
            max_backends: args.max_backends,
        },
        nodeport_ifaces: args.nodeport_ifaces,
        policy_iface_prefixes: args.policy_iface_prefixes,
        snat_addr: args.snat_addr,
        snat_ports: args.snat_ports,
        socket_lb: args.socket_lb,
    };
    let mut agent = Agent::start(config.clone()).context("starting the agent")?;
    let metrics = std::sync::Arc::new(weft_proxy::metrics::Metrics::new(config.layout.clone()));
    if args.metrics_addr != "off" {
        let addr = args.metrics_addr.parse().context("--metrics-addr")?;
        let bound = metrics.serve(addr)?;
        tracing::info!(%bound, "serving metrics");
    }
    tracing::info!(cgroup = %config.cgroup.display(), source = %config.source, "weft-proxy running");
    let poll = std::time::Duration::from_millis(args.poll_ms);
    let mut backoff = agent::Backoff::default();
    let mut force = true;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let (outcome, next) = agent.reconcile(force, &mut backoff, poll);
        match outcome {
            Ok(Some(report)) => {
                let (services, backends) = agent.totals();
                metrics.record_sync(&report, services, backends);
                for p in &report.problems {
                    tracing::warn!(problem = %p, "skipped");
                }
                for e in &report.errors {
                    tracing::error!(error = %e, "not programmed");
                }
                tracing::info!(
                    frontends = report.frontends,
                    added = report.applied.added,
                    updated = report.applied.updated,
                    removed = report.applied.removed,
                    micros = report.micros as u64,
                    policies_compiled = report.policy_work.policies,
                    pods_recomputed = report.policy_work.endpoints,
                    "synchronised"
                );
            }
            Ok(None) => {}
            Err(e) => {
                metrics.record_failure();
                tracing::error!(error = %e, ?next, "synchronising services");
            }
        }
        match next {
            agent::Next::Wait(timeout) => {
                force = false;
                agent.wait(timeout);
            }
            agent::Next::Retry(after) => {
                force = true;
                // In short steps, so a stop is honoured during a long back-off.
                let until = std::time::Instant::now() + after;
                while std::time::Instant::now() < until
                    && !stop.load(std::sync::atomic::Ordering::Relaxed)
                {
                    std::thread::sleep(std::time::Duration::from_millis(50).min(after));
                }
            }
        }
    }
    tracing::info!("stopping; programs and maps stay pinned and keep serving");
    Ok(())
}

fn probe(args: &ProbeArgs) -> serde_json::Value {
    use std::io::{Read as _, Write as _};
    let timeout = std::time::Duration::from_millis(args.timeout_ms);
    let result = (|| -> std::io::Result<serde_json::Value> {
        if args.protocol == "tcp" {
            let mut s = std::net::TcpStream::connect_timeout(&args.addr, timeout)?;
            // Before any read: once the server closes, there is no peer to ask about.
            let (peer, local) = (s.peer_addr()?, s.local_addr()?);
            s.set_read_timeout(Some(timeout))?;
            s.write_all(args.payload.as_bytes())?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut reply = Vec::new();
            s.read_to_end(&mut reply)?;
            Ok(serde_json::json!({
                "reply": String::from_utf8_lossy(&reply),
                "peer": peer.to_string(),
                "local": local.to_string(),
            }))
        } else {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(timeout))?;
            s.send_to(args.payload.as_bytes(), args.addr)?;
            let mut buf = vec![0u8; 65536];
            let (n, from) = s.recv_from(&mut buf)?;
            Ok(serde_json::json!({
                "reply": String::from_utf8_lossy(&buf[..n]),
                "peer": from.to_string(),
                "local": s.local_addr()?.to_string(),
            }))
        }
    })();
    result.unwrap_or_else(|e| serde_json::json!({ "error": e.to_string(), "kind": format!("{:?}", e.kind()), "os_error": e.raw_os_error() }))
}
