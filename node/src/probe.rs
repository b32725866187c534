//! Probes, as kubelet runs them: httpGet (from the node to the pod's address; 200-399 is a
//! success), tcpSocket (a connection is a success) and exec (through CRI ExecSync; exit 0 is a
//! success), each with initialDelaySeconds, periodSeconds, timeoutSeconds, successThreshold
//! and failureThreshold. [`Tracker`] keeps one container's probe state and says what follows:
//! readiness, whether it has started, and whether it must be killed.

use std::{collections::HashMap, time::Duration};

use k8s_cri::v1::{self as cri, runtime_service_client::RuntimeServiceClient};
use k8s_openapi::{
    api::core::v1::{Container, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

/// Which probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// livenessProbe: failing kills the container.
    Liveness,
    /// readinessProbe: failing takes the pod out of its Services.
    Readiness,
    /// startupProbe: the others wait for it; failing kills the container.
    Startup,
}

impl Kind {
    /// The name kubectl and Events use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Liveness => "Liveness",
            Self::Readiness => "Readiness",
            Self::Startup => "Startup",
        }
    }
}

/// One container's probes and their state.
#[derive(Debug)]
pub struct Tracker {
    /// The container these counts are about (a new container starts over).
    pub container_id: String,
    started: tokio::time::Instant,
    last: HashMap<Kind, tokio::time::Instant>,
    successes: HashMap<Kind, i32>,
    failures: HashMap<Kind, i32>,
    /// Whether the startup probe has succeeded (true without one).
    pub started_ok: bool,
    /// Whether the container is ready (readiness succeeded, or no readiness probe).
    pub ready: bool,
}

/// What a pass of the probes concluded.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Kill the container (liveness or startup failed `failureThreshold` times), and why.
    pub kill: Option<String>,
    /// Failures to report (`Unhealthy` events).
    pub unhealthy: Vec<String>,
}

fn probe_of(c: &Container, kind: Kind) -> Option<&Probe> {
    match kind {
        Kind::Liveness => c.liveness_probe.as_ref(),
        Kind::Readiness => c.readiness_probe.as_ref(),
        Kind::Startup => c.startup_probe.as_ref(),
    }
}

impl Tracker {
    /// A container that just started.
    pub fn new(container_id: &str, c: &Container) -> Self {
        Self {
            container_id: container_id.to_owned(),
            started: tokio::time::Instant::now(),
            last: HashMap::new(),
            successes: HashMap::new(),
            failures: HashMap::new(),
            started_ok: c.startup_probe.is_none(),
            ready: c.readiness_probe.is_none(),
        }
    }

    fn due(&self, kind: Kind, p: &Probe) -> bool {
        let delay =
            Duration::from_secs(u64::try_from(p.initial_delay_seconds.unwrap_or(0)).unwrap_or(0));
        let period =
            Duration::from_secs(u64::try_from(p.period_seconds.unwrap_or(10).max(1)).unwrap_or(10));
        self.started.elapsed() >= delay
            && self.last.get(&kind).is_none_or(|t| t.elapsed() >= period)
    }

    /// Runs the probes that are due and updates the state.
    pub async fn step(
        &mut self,
        c: &Container,
        pod_ip: &str,
        runtime: &mut RuntimeServiceClient<Channel>,
    ) -> Verdict {
        let mut verdict = Verdict::default();
        let order: &[Kind] = if self.started_ok {
            &[Kind::Liveness, Kind::Readiness]
        } else {
            &[Kind::Startup]
        };
        for &kind in order {
            let Some(p) = probe_of(c, kind) else {
                continue;
            };
            if !self.due(kind, p) {
                continue;
            }
            self.last.insert(kind, tokio::time::Instant::now());
            let result = run(p, c, pod_ip, &self.container_id, runtime).await;
            let threshold_ok = p.success_threshold.unwrap_or(1).max(1);
            let threshold_fail = p.failure_threshold.unwrap_or(3).max(1);
            match result {
                Ok(()) => {
                    self.failures.insert(kind, 0);
                    let s = self.successes.entry(kind).or_default();
                    *s += 1;
                    if *s >= threshold_ok {
                        match kind {
                            Kind::Readiness => self.ready = true,
                            Kind::Startup => self.started_ok = true,
                            Kind::Liveness => {}
                        }
                    }
                }
                Err(why) => {
                    self.successes.insert(kind, 0);
                    let f = self.failures.entry(kind).or_default();
                    *f += 1;
                    verdict
                        .unhealthy
                        .push(format!("{} probe failed: {why}", kind.name()));
                    if *f >= threshold_fail {
                        match kind {
                            Kind::Readiness => self.ready = false,
                            Kind::Liveness | Kind::Startup => {
                                verdict.kill = Some(format!(
                                    "Container {} failed {} probe, will be restarted",
                                    c.name,
                                    kind.name().to_lowercase()
                                ));
                            }
                        }
                    }
                }
            }
        }
        verdict
    }
}

fn port_of(port: &IntOrString, c: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("no container port named {name:?}")),
    }
}

async fn run(
    p: &Probe,
    c: &Container,
    pod_ip: &str,
    id: &str,
    runtime: &mut RuntimeServiceClient<Channel>,
) -> Result<(), String> {
    let timeout =
        Duration::from_secs(u64::try_from(p.timeout_seconds.unwrap_or(1).max(1)).unwrap_or(1));
    if let Some(e) = &p.exec {
        let r = runtime
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.to_owned(),
                cmd: e.command.clone().unwrap_or_default(),
                timeout: i64::try_from(timeout.as_secs()).unwrap_or(1),
            })
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner();
        return if r.exit_code == 0 {
            Ok(())
        } else {
            Err(format!(
                "command exited with {}: {}",
                r.exit_code,
                String::from_utf8_lossy(&r.stdout).trim()
            ))
        };
    }
    if let Some(t) = &p.tcp_socket {
        let port = port_of(&t.port, c)?;
        let host = t.host.clone().unwrap_or_else(|| pod_ip.to_owned());
        return match tokio::time::timeout(
            timeout,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {host}:{port}: {e}")),
            Err(_) => Err(format!("dial tcp {host}:{port}: i/o timeout")),
        };
    }
    if let Some(h) = &p.http_get {
        let port = port_of(&h.port, c)?;
        let host = h.host.clone().unwrap_or_else(|| pod_ip.to_owned());
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let url = format!("http://{host}:{port}{path}");
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| format!("Get {url:?}: {e}"))?;
            let mut req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.32\r\nAccept: */*\r\nConnection: close\r\n"
            );
            for hd in h.http_headers.iter().flatten() {
                req.push_str(&format!("{}: {}\r\n", hd.name, hd.value));
            }
            req.push_str("\r\n");
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| format!("Get {url:?}: {e}"))?;
            let mut buf = vec![0u8; 512];
            let n = s
                .read(&mut buf)
                .await
                .map_err(|e| format!("Get {url:?}: {e}"))?;
            let line = String::from_utf8_lossy(&buf[..n]);
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("Get {url:?}: malformed response"))?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        };
        return match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "Get {url:?}: context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
            )),
        };
    }
    Ok(())
}
