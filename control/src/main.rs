//! `weft`: the control plane's command line.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::FutureExt as _;
use weft_control::{auth, controllers, server, store};

#[derive(Debug, Parser)]
#[command(name = "weft", version, about = "weft's control plane")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the Kubernetes API from an embedded store or etcd, over TLS (with the certificate
    /// given, else a self-signed one). Every request is authenticated (bearer tokens, client
    /// certificates) and authorized (admins, nodes, nobody else).
    Server {
        /// Address to listen on (repeatable; the first one goes into --kubeconfig).
        #[arg(long, default_value = "127.0.0.1:6443")]
        listen: Vec<SocketAddr>,
        /// Also serve on this inherited listening socket (repeatable), as `weft up` passes the
        /// one it opened on the machine's loopback to a server in another network namespace.
        #[arg(long)]
        listen_fd: Vec<i32>,
        /// SQLite database the store is kept in (created when missing; a JSON store of earlier
        /// releases there is converted once); without it nothing survives a restart.
        #[arg(long, conflicts_with = "etcd_servers")]
        data: Option<PathBuf>,
        /// Keep the store in etcd v3 instead: the members' client URLs, comma-separated
        /// (`http://127.0.0.1:2379`), as kube-apiserver's flag of the same name.
        #[arg(long, value_delimiter = ',')]
        etcd_servers: Vec<String>,
        /// The key prefix of the store in etcd.
        #[arg(long, default_value = "/registry/")]
        etcd_prefix: String,
        /// Range Services get their cluster IPs from.
        #[arg(long, default_value = "10.96.0.0/16")]
        service_cidr: ipnet::Ipv4Net,
        /// Write an admin's kubeconfig for this server here (mode 0600; a bearer token of
        /// `system:masters`, kept across restarts while the file is there).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Serve TLS with this certificate (PEM, with its chain). Without it the server makes a
        /// self-signed CA and certificate (for loopback and the --listen addresses), kept in
        /// --cert-dir when given.
        #[arg(long, requires = "tls_private_key_file")]
        tls_cert_file: Option<PathBuf>,
        /// The serving certificate's private key (PEM).
        #[arg(long, requires = "tls_cert_file")]
        tls_private_key_file: Option<PathBuf>,
        /// Authenticate clients by certificates this CA issued (PEM): the common name is the
        /// user, each organization a group (`CN=system:node:node1,O=system:nodes`).
        #[arg(long)]
        client_ca_file: Option<PathBuf>,
        /// Keep the self-signed CA and certificate here (without --tls-cert-file), so that
        /// kubeconfigs stay valid across restarts [default: `pki/` beside --data; without
        /// either, they last as long as the process].
        #[arg(long, conflicts_with = "tls_cert_file")]
        cert_dir: Option<PathBuf>,
        /// Authenticate bearer tokens listed here: kube-apiserver's static token file, one
        /// `token,user,uid,"group1,group2"` line per user.
        #[arg(long)]
        token_auth_file: Option<PathBuf>,
        /// Reach nodes' endpoints (logs, exec, port-forward) over TLS with this client
        /// certificate (PEM; a member of system:masters), as kube-apiserver's flag; without it
        /// plain HTTP.
        #[arg(long, requires_all = ["kubelet_client_key", "kubelet_certificate_authority"])]
        kubelet_client_certificate: Option<PathBuf>,
        /// The key of --kubelet-client-certificate.
        #[arg(long, requires = "kubelet_client_certificate")]
        kubelet_client_key: Option<PathBuf>,
        /// The CA nodes' serving certificates are checked against.
        #[arg(long, requires = "kubelet_client_certificate")]
        kubelet_certificate_authority: Option<PathBuf>,
        /// A request not answered within this long gets `504 Timeout` (a Go duration: `60s`,
        /// `1m0s`; watches, followed logs and exec/attach/port-forward streams excepted).
        #[arg(long, default_value = "1m0s", value_parser = request_timeout)]
        request_timeout: std::time::Duration,
        /// Read requests beyond this many at once get `429 Too Many Requests` (0: no limit).
        #[arg(long, default_value_t = 400)]
        max_requests_inflight: usize,
        /// Writes beyond this many at once get `429 Too Many Requests` (0: no limit).
        #[arg(long, default_value_t = 200)]
        max_mutating_requests_inflight: usize,
        /// Run the controllers and the scheduler in this process (`--controllers=false` to
        /// serve the API alone, for example to run them elsewhere with `weft controllers`).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        controllers: bool,
        #[command(flatten)]
        timing: Timing,
    },
    /// Run the node agent: register this node and run the pods bound to it through a
    /// container runtime's CRI (containerd), starting containerd itself unless --cri is given.
    Node {
        /// kubeconfig of the API server.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// The Node's name.
        #[arg(long)]
        node_name: String,
        /// The node's address (its InternalIP).
        #[arg(long)]
        address: Option<String>,
        /// The node's pod range (spec.podCIDR).
        #[arg(long)]
        pod_cidr: Option<String>,
        /// The directory the node keeps its containerd, logs and state in.
        #[arg(long, default_value = "/var/lib/weft/node")]
        root_dir: PathBuf,
        /// A running CRI runtime's socket; without it weft starts containerd under --root-dir.
        #[arg(long)]
        cri: Option<PathBuf>,
        /// Directory of CNI plugins for the containerd weft starts (weft-cni, loopback).
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// Directory of CNI configuration for the containerd weft starts.
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// The pause image (load it first with `weft image load`).
        #[arg(long, default_value = "weft/pause:dev")]
        sandbox_image: String,
        /// The cgroup (cgroupfs path) pods' cgroups are made under.
        #[arg(long, default_value = "/weft")]
        cgroup_parent: String,
        /// Port of the node's HTTP endpoint (container logs for `kubectl logs`).
        #[arg(long, default_value_t = 10250)]
        port: u16,
        /// weft-csi's socket on this node: persistentVolumeClaim volumes are provisioned and
        /// mounted through it.
        #[arg(long)]
        csi_socket: Option<PathBuf>,
        /// Rotate a container's log once it is larger than this (a quantity: `10Mi`), as
        /// kubelet's flag of the same name.
        #[arg(long, default_value = "10Mi", value_parser = log_size)]
        container_log_max_size: u64,
        /// Keep at most this many log files per container (the current one included).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(2..))]
        container_log_max_files: u64,
        /// Serve the node's endpoint over TLS with this certificate (PEM), as kubelet's flag;
        /// without it plain HTTP.
        #[arg(long, requires_all = ["tls_private_key_file", "client_ca_file"])]
        tls_cert_file: Option<PathBuf>,
        /// The key of --tls-cert-file.
        #[arg(long, requires = "tls_cert_file")]
        tls_private_key_file: Option<PathBuf>,
        /// Require client certificates of this CA (only system:masters, the API server's, may
        /// use the endpoint).
        #[arg(long, requires = "tls_cert_file")]
        client_ca_file: Option<PathBuf>,
    },
    /// Start a whole cluster on this machine: the API server, controllers and scheduler, and
    /// on each node (a network namespace on a private underlay) containerd, weft node,
    /// weft-cni, weft-proxy and, with several nodes, weft-overlay. Prints the kubeconfig to use.
    Up {
        #[command(flatten)]
        cluster: ClusterArgs,
        /// How many nodes.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// The API server's port on this machine's loopback (0: any free port).
        #[arg(long, default_value_t = 6443)]
        port: u16,
        /// Where weft's binaries are (default: beside this one).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// The API server's store: `sqlite` (embedded, one file) or `etcd` (an etcd member this
        /// cluster runs beside the API server, as clusters that outgrow one machine use).
        #[arg(long, value_enum, default_value_t = weft_control::up::StoreKind::Sqlite)]
        store: weft_control::up::StoreKind,
        /// Stay attached: run the supervisor in this process (Ctrl-C takes the cluster down).
        #[arg(long)]
        foreground: bool,
    },
    /// Take a cluster started by `weft up` down and remove everything it made (also after a
    /// crash).
    Down {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Show what a cluster started by `weft up` runs.
    Status {
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Build images without a registry, and load them into a node's containerd.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Run the controllers and the scheduler against an API server.
    Controllers {
        /// kubeconfig of the API server (default: $KUBECONFIG, ~/.kube/config, in-cluster).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        #[command(flatten)]
        timing: Timing,
    },
}

/// Which cluster `weft up`, `down` and `status` mean.
#[derive(Debug, clap::Args)]
struct ClusterArgs {
    /// The cluster's name (the prefix of its network namespaces and cgroups).
    #[arg(long, default_value = "weft")]
    name: String,
    /// Where the cluster keeps everything (default: /var/lib/weft/<name>).
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl ClusterArgs {
    fn dir(&self) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/lib/weft").join(&self.name))
    }

    fn options(
        &self,
        nodes: usize,
        port: u16,
        bin_dir: Option<PathBuf>,
    ) -> anyhow::Result<weft_control::up::Options> {
        let bin_dir = match bin_dir {
            Some(d) => d,
            None => std::env::current_exe()?
                .parent()
                .context("the binary's directory")?
                .to_owned(),
        };
        Ok(weft_control::up::Options {
            name: self.name.clone(),
            dir: self.dir(),
            nodes,
            port,
            bin_dir,
            store: weft_control::up::StoreKind::Sqlite,
        })
    }
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Pack a binary (and the shared libraries it loads) into an OCI image archive.
    Build {
        /// The binary: the image's entrypoint.
        #[arg(long)]
        from: PathBuf,
        /// A tool to add at /bin/<name> with its libraries (a shell, tar for kubectl cp);
        /// repeatable.
        #[arg(long = "add")]
        tools: Vec<PathBuf>,
        /// The image's name (`weft/echo:dev`).
        #[arg(long)]
        tag: String,
        /// The archive to write.
        #[arg(long, short)]
        output: PathBuf,
        /// Arguments the entrypoint always gets.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Import an OCI or docker-archive tarball into a node's containerd (namespace k8s.io).
    Load {
        /// The archive.
        file: PathBuf,
        /// containerd's socket.
        #[arg(long)]
        address: PathBuf,
    },
}

fn log_size(text: &str) -> Result<u64, String> {
    weft_node::quantity(text)
        .filter(|b| *b >= 1.0)
        .map(|b| b as u64)
        .ok_or_else(|| format!("{text:?} is not a size such as 10Mi"))
}

fn request_timeout(text: &str) -> Result<std::time::Duration, String> {
    server::parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a duration such as 60s or 1m0s"))
}

/// The controllers' timing, as kube-controller-manager's flags of the same names.
#[derive(Debug, clap::Args)]
struct Timing {
    /// Seconds without a Lease renewal after which a node is NotReady.
    #[arg(long, default_value_t = 40)]
    node_monitor_grace_period: u64,
    /// Seconds between checks of the nodes.
    #[arg(long, default_value_t = 5)]
    node_monitor_period: u64,
    #[command(flatten)]
    leading: Leading,
}

impl Timing {
    fn options(&self) -> controllers::Options {
        controllers::Options {
            node_grace: std::time::Duration::from_secs(self.node_monitor_grace_period),
            node_monitor_period: std::time::Duration::from_secs(self.node_monitor_period.max(1)),
        }
    }
}

/// Leader election of the controllers, as kube-controller-manager's `--leader-elect*` flags
/// (durations in seconds).
#[derive(Debug, clap::Args)]
struct Leading {
    /// Run the controllers and the scheduler only while holding the leader Lease, for several
    /// API servers (or `weft controllers`) serving one cluster on etcd.
    #[arg(long)]
    leader_elect: bool,
    /// Seconds a leader's Lease, not renewed, keeps the other candidates waiting.
    #[arg(long, default_value_t = 15)]
    leader_elect_lease_duration: u64,
    /// Seconds the leader goes on trying to renew before it stops leading.
    #[arg(long, default_value_t = 10)]
    leader_elect_renew_deadline: u64,
    /// Seconds between the candidates' attempts and the leader's renewals.
    #[arg(long, default_value_t = 2)]
    leader_elect_retry_period: u64,
    /// The leader Lease's name.
    #[arg(long, default_value = "weft-controllers")]
    leader_elect_resource_name: String,
    /// The leader Lease's namespace.
    #[arg(long, default_value = "kube-system")]
    leader_elect_resource_namespace: String,
}

/// Runs the controllers and the scheduler until `stop` (while leading, with `--leader-elect`).
async fn controllers_until(
    client: kube::Client,
    timing: Timing,
    stop: impl std::future::Future<Output = ()>,
) {
    let options = timing.options();
    let l = &timing.leading;
    if !l.leader_elect {
        tokio::select! {
            () = controllers::run(client, options) => {}
            () = stop => {}
        }
        return;
    }
    let secs = std::time::Duration::from_secs;
    let election = weft_control::leader::Election {
        namespace: l.leader_elect_resource_namespace.clone(),
        name: l.leader_elect_resource_name.clone(),
        lease_duration: secs(l.leader_elect_lease_duration.max(1)),
        renew_deadline: secs(l.leader_elect_renew_deadline.max(1)),
        retry_period: secs(l.leader_elect_retry_period.max(1)),
        ..weft_control::leader::Election::new(&l.leader_elect_resource_name)
    };
    let work = || controllers::run(client.clone(), options.clone());
    weft_control::leader::run(client.clone(), election, work, stop).await;
}

async fn client_for(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(p) => {
            let k = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("reading {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(k, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// A file's bytes, or an error naming it.
fn read(p: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() -> anyhow::Result<()> {
    weft_log::init("RUST_LOG", "info");
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Server {
            listen,
            listen_fd,
            data,
            etcd_servers,
            etcd_prefix,
            service_cidr,
            kubeconfig: kubeconfig_path,
            tls_cert_file,
            tls_private_key_file,
            client_ca_file,
            cert_dir,
            token_auth_file,
            kubelet_client_certificate,
            kubelet_client_key,
            kubelet_certificate_authority,
            request_timeout,
            max_requests_inflight,
            max_mutating_requests_inflight,
            controllers: run_controllers,
            timing,
        } => {
            let tls = weft_control::listen::serving(
                &weft_control::listen::TlsFiles {
                    cert_and_key: tls_cert_file.clone().zip(tls_private_key_file.clone()),
                    client_ca: client_ca_file.clone(),
                    cert_dir: cert_dir.clone().or_else(|| {
                        let dir = data.as_deref()?.parent()?;
                        Some(dir.join("pki"))
                    }),
                },
                &listen.iter().map(SocketAddr::ip).collect::<Vec<_>>(),
            )
            .context("setting up TLS")?;
            let kubelet = match (
                &kubelet_client_certificate,
                &kubelet_client_key,
                &kubelet_certificate_authority,
            ) {
                (Some(cert), Some(key), Some(ca)) => Some(Arc::new(
                    weft_pki::client_config(&read(ca)?, Some((&read(cert)?, &read(key)?)))
                        .context("configuring TLS to the nodes")?,
                )),
                _ => None,
            };
            let mut authenticator = auth::Authenticator::new();
            if let Some(file) = &token_auth_file {
                authenticator.load_token_file(file)?;
            }
            // The controllers in this process are an admin with a token nobody else sees.
            let loopback_token = auth::generate_token().context("generating a token")?;
            authenticator.add(
                &loopback_token,
                auth::Identity::new("system:kube-controller-manager", &[auth::MASTERS]),
            );
            let admin_token = match kubeconfig_path.as_ref().map(std::fs::read_to_string) {
                Some(Ok(text)) => weft_control::kubeconfig_token(&text).map(str::to_owned),
                _ => None,
            };
            let admin_token = match admin_token {
                Some(t) => t,
                None => auth::generate_token().context("generating a token")?,
            };
            if kubeconfig_path.is_some() {
                authenticator.add(
                    &admin_token,
                    auth::Identity::new("weft:admin", &[auth::MASTERS]),
                );
            }
            let etcd = (!etcd_servers.is_empty()).then(|| store::Etcd {
                endpoints: etcd_servers.clone(),
                prefix: etcd_prefix.clone(),
            });
            let described = match (&etcd, &data) {
                (Some(e), _) => format!("etcd {}", e.endpoints.join(",")),
                (None, Some(p)) => format!("sqlite {}", p.display()),
                (None, None) => "memory".to_owned(),
            };
            let store = store::Store::open(store::Options {
                path: data.clone(),
                etcd,
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
                let mut listeners = Vec::new();
                for addr in &listen {
                    listeners.push(
                        tokio::net::TcpListener::bind(addr)
                            .await
                            .with_context(|| format!("listening on {addr}"))?,
                    );
                }
                for fd in &listen_fd {
                    // SAFETY: the parent handed this descriptor over as a listening TCP socket
                    // for this process to own; it is taken over once, here.
                    let std = unsafe {
                        <std::net::TcpListener as std::os::fd::FromRawFd>::from_raw_fd(*fd)
                    };
                    std.set_nonblocking(true)?;
                    listeners.push(
                        tokio::net::TcpListener::from_std(std)
                            .with_context(|| format!("serving on descriptor {fd}"))?,
                    );
                }
                let bound = listeners
                    .first()
                    .context("nothing to listen on")?
                    .local_addr()?;
                if let Some(path) = kubeconfig_path {
                    let text = weft_control::kubeconfig(
                        &format!("https://{bound}"),
                        Some(&tls.ca_pem),
                        "weft:admin",
                        weft_control::Credentials::Token(&admin_token),
                    );
                    weft_control::write_private(&path, &text)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                tracing::info!(%bound, store = described, "serving the Kubernetes API over TLS");
                let store = Arc::new(store);
                store.follow();
                tokio::spawn(server::sweep_events(store.clone()));
                // The controllers reach the API on a loopback listener of their own, with a
                // token only this process knows.
                let internal = match run_controllers {
                    true => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?),
                    false => None,
                };
                // On SIGTERM or SIGINT: stop the controllers (a leader gives its Lease up
                // while the API still serves), stop accepting, give requests in flight a
                // moment, then go (watches and the controllers' own connections never end by
                // themselves).
                let (stop, stopping) = tokio::sync::watch::channel(false);
                let (stop_controllers, controllers_stopping) = tokio::sync::watch::channel(false);
                let mut controllers_task = None;
                if let Some(internal) = &internal {
                    let at = internal.local_addr()?;
                    debug_assert!(weft_control::listen::plain_allowed(at));
                    let mut config = kube::Config::new(format!("http://{at}").parse()?);
                    config.auth_info.token = Some(loopback_token.clone().into());
                    let client = kube::Client::try_from(config)?;
                    let mut stopping = controllers_stopping;
                    controllers_task = Some(tokio::spawn(controllers_until(
                        client,
                        timing,
                        async move {
                            let _ = stopping.wait_for(|s| *s).await;
                        },
                    )));
                }
                tokio::spawn(async move {
                    shutdown().await;
                    let _ = stop_controllers.send(true);
                    if let Some(task) = controllers_task {
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(3), task).await;
                    }
                    let _ = stop.send(true);
                });
                let mut deadline = stopping.clone();
                let limits = server::Limits {
                    request_timeout,
                    max_requests_inflight,
                    max_mutating_requests_inflight,
                };
                let router = server::router(store, Arc::new(authenticator), kubelet, limits);
                let plain = |l: tokio::net::TcpListener| {
                    let mut graceful = stopping.clone();
                    axum::serve(l, router.clone())
                        .with_graceful_shutdown(async move {
                            let _ = graceful.wait_for(|s| *s).await;
                        })
                        .into_future()
                        .boxed()
                };
                let mut serving = Vec::new();
                for l in listeners {
                    serving.push(
                        weft_control::listen::serve_tls(
                            l,
                            router.clone(),
                            tls.config.clone(),
                            stopping.clone(),
                        )
                        .boxed(),
                    );
                }
                serving.extend(internal.map(plain));
                let serve = futures::future::try_join_all(serving);
                tokio::select! {
                    r = serve => r.map(|_| ()).context("serving"),
                    () = async move {
                        let _ = deadline.wait_for(|s| *s).await;
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    } => Ok(()),
                }
            })
        }
        Cmd::Node {
            kubeconfig,
            node_name,
            address,
            pod_cidr,
            root_dir,
            cri,
            cni_bin_dir,
            cni_conf_dir,
            sandbox_image,
            cgroup_parent,
            port,
            csi_socket,
            container_log_max_size,
            container_log_max_files,
            tls_cert_file,
            tls_private_key_file,
            client_ca_file,
        } => {
            let tls = match (&tls_cert_file, &tls_private_key_file, &client_ca_file) {
                (Some(cert), Some(key), Some(ca)) => {
                    let ca = read(ca)?;
                    Some(Arc::new(
                        weft_pki::server_config(
                            &read(cert)?,
                            &read(key)?,
                            Some((&ca, weft_pki::ClientAuth::Required)),
                        )
                        .context("configuring the endpoint's TLS")?,
                    ))
                }
                _ => None,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut containerd = None;
                let socket = match cri {
                    Some(s) => s,
                    None => {
                        let layout = weft_node::containerd::Layout {
                            dir: root_dir.join("containerd"),
                            sandbox_image,
                            cni_bin: cni_bin_dir,
                            cni_conf: cni_conf_dir,
                        };
                        let socket = layout.socket();
                        // A containerd left running by an agent that died is used as it is.
                        if tokio::net::UnixStream::connect(&socket).await.is_err() {
                            containerd = Some(layout.start().context("starting containerd")?);
                        }
                        if !weft_node::containerd::wait_for_socket(
                            &socket,
                            std::time::Duration::from_secs(20),
                        )
                        .await
                        {
                            anyhow::bail!("containerd did not open {}", socket.display());
                        }
                        socket
                    }
                };
                if let Some(csi) = &csi_socket
                    && !weft_node::containerd::wait_for_socket(
                        csi,
                        std::time::Duration::from_secs(30),
                    )
                    .await
                {
                    anyhow::bail!("weft-csi does not answer on {}", csi.display());
                }
                let client = client_for(kubeconfig.as_deref()).await?;
                let config = weft_node::agent::Config {
                    node_name,
                    cri_socket: socket,
                    address,
                    pod_cidr,
                    log_dir: root_dir.join("pods"),
                    state_dir: root_dir.join("state"),
                    cgroup_parent,
                    resync: std::time::Duration::from_secs(1),
                    port,
                    csi_socket,
                    tls,
                    log_rotation: weft_node::agent::LogRotation {
                        max_bytes: container_log_max_size,
                        max_files: usize::try_from(container_log_max_files).unwrap_or(5),
                    },
                };
                let result = tokio::select! {
                    r = weft_node::agent::run(client, config) => r.context("node agent"),
                    () = shutdown() => Ok(()),
                };
                // The containerd this agent started stops with it; the pods' shims do not, so
                // pods keep running while the agent restarts, and the next agent (and its
                // containerd) adopts them.
                if let Some(mut c) = containerd {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(c.id() as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                    let _ = c.wait();
                }
                result
            })
        }
        Cmd::Up {
            cluster,
            nodes,
            port,
            bin_dir,
            store,
            foreground,
        } => {
            anyhow::ensure!(
                (1..=80).contains(&nodes),
                "--nodes must be between 1 and 80 (underlay addresses 10.200.0.11-90)"
            );
            let mut opts = cluster.options(nodes, port, bin_dir)?;
            opts.store = store;
            if foreground {
                return weft_control::up::supervise(&opts).context("weft up");
            }
            let kubeconfig = weft_control::up::up(&opts).context("weft up")?;
            println!(
                "\nThe cluster is up. Use it with:\n  export KUBECONFIG={}\n  kubectl get nodes\nweft status --name {} shows it; weft down --name {} removes it.",
                kubeconfig.display(),
                opts.name,
                opts.name
            );
            Ok(())
        }
        Cmd::Down { cluster } => {
            let opts = cluster.options(0, 0, None)?;
            weft_control::up::down(&opts).context("weft down")?;
            println!("cluster {:?} is down; nothing of it is left", opts.name);
            Ok(())
        }
        Cmd::Status { cluster } => {
            print!(
                "{}",
                weft_control::up::status(&cluster.dir()).context("weft status")?
            );
            Ok(())
        }
        Cmd::Image { cmd } => match cmd {
            ImageCmd::Build {
                from,
                tools,
                tag,
                output,
                args,
            } => weft_node::image::build(&from, &tools, &tag, &args, &output)
                .with_context(|| format!("building {tag}")),
            ImageCmd::Load { file, address } => weft_node::image::load(&file, &address)
                .with_context(|| format!("loading {}", file.display())),
        },
        Cmd::Controllers { kubeconfig, timing } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let client = client_for(kubeconfig.as_deref()).await?;
                controllers_until(client, timing, shutdown()).await;
                Ok(())
            })
        }
    }
}
