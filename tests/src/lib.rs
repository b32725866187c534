//! weft's cross-component tests and benchmarks.
//!
//! Owns: tests that span more than one weft binary or the test bed itself (`tests/*.rs`), and
//! helpers for them. A component's own integration tests live beside it (for example
//! `proxy-user/tests/`), where Cargo can hand them the component's binary; the harness such tests
//! share with a benchmark lives here (for example [`csi`]).

pub mod csi;
pub mod hollow;
pub mod load;
pub mod node;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use weft_testbed::Host;

/// `weft-proxy --pin-dir PIN run` in `host` for the test node `node0`, reading `manifests`,
/// attached to `cgroup`, looking for changes every `poll_ms`: a command to add flags to and spawn.
pub fn proxy_agent(
    host: &Host,
    binary: &Path,
    pin: &Path,
    manifests: &Path,
    cgroup: &Path,
    poll_ms: u64,
) -> Command {
    proxy_agent_from(
        host,
        binary,
        pin,
        ("--manifests", manifests),
        cgroup,
        poll_ms,
    )
}

/// Like [`proxy_agent`], with the source of desired state given as a flag and its path
/// (`("--kubeconfig", path)` for the Kubernetes API).
pub fn proxy_agent_from(
    host: &Host,
    binary: &Path,
    pin: &Path,
    (source_flag, source): (&str, &Path),
    cgroup: &Path,
    poll_ms: u64,
) -> Command {
    let mut cmd = host.command(binary).expect("command in the node");
    cmd.arg("--pin-dir")
        .arg(pin)
        .args([
            "run",
            "--node-name",
            "node0",
            "--poll-ms",
            &poll_ms.to_string(),
        ])
        .arg(source_flag)
        .arg(source)
        .arg("--cgroup")
        .arg(cgroup);
    cmd
}

/// `weft-proxy probe tcp ADDR` from `host` inside `cgroup` (where socket load balancing runs):
/// the reply, or `None` if the connection failed.
pub fn probe_tcp(
    host: &Host,
    binary: &Path,
    cgroup: &Path,
    addr: &str,
    timeout_ms: u32,
) -> Option<String> {
    let out = host
        .command_in_cgroup(binary, cgroup)
        .expect("command in the pod")
        .args([
            "probe",
            "tcp",
            addr,
            "--timeout-ms",
            &timeout_ms.to_string(),
        ])
        .output()
        .expect("running weft-proxy probe");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["reply"].as_str().map(str::to_owned)
}

/// Runs `cmd` with `stdin` written to it, capturing stdout and stderr.
pub fn output_with_stdin(mut cmd: Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

/// Path of a weft binary from the same build profile as the running executable: beside it (a
/// benchmark binary) or one level up (a test executable in `deps/`). Panics with the command to
/// run if it is missing.
pub fn weft_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("executable directory");
    let candidates = [
        dir.join(name),
        dir.parent().map(|d| d.join(name)).unwrap_or_default(),
    ];
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "{name} is missing next to {}: build it first with `cargo build --workspace` in the same profile",
            exe.display()
        )
    })
}

/// Command-line flags of the benchmark binaries: `--name value` pairs and bare switches.
#[derive(Debug)]
pub struct BenchArgs(Vec<String>);

impl BenchArgs {
    /// The process's arguments.
    pub fn from_env() -> Self {
        Self(std::env::args().collect())
    }

    /// The value after `--name`, if given.
    pub fn value(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.0.get(i + 1))
            .cloned()
    }

    /// Whether the switch `--name` is present.
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|a| a == name)
    }

    /// The parsed value of `--name`, or `default`; panics naming the flag on a bad value.
    pub fn parsed<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        self.value(name).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("bad value for {name}: {v}"))
        })
    }

    /// All arguments.
    pub fn all(&self) -> &[String] {
        &self.0
    }
}

/// What kubectl run in `host`'s namespace with `kubeconfig` (and `stdin`, if given) did.
pub fn kubectl_output(
    host: &Host,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> Output {
    let mut cmd = host.command("kubectl").expect("kubectl in the namespace");
    cmd.env("KUBECONFIG", kubeconfig).args(args);
    match stdin {
        Some(text) => output_with_stdin(cmd, text.as_bytes()),
        None => cmd.output().expect("running kubectl"),
    }
}

/// kubectl run in `host`'s namespace with `kubeconfig` (and `stdin`, if given); its stdout,
/// panicking with its stderr when it fails.
pub fn kubectl_in(host: &Host, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> String {
    let out = kubectl_output(host, kubeconfig, args, stdin);
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A kube-rs client for the API server a kubeconfig file names.
pub async fn kube_client(kubeconfig: &Path) -> Result<kube::Client, kube::Error> {
    let k = kube::config::Kubeconfig::read_from(kubeconfig)
        .map_err(|e| kube::Error::Service(Box::new(e)))?;
    let config = kube::Config::from_custom_kubeconfig(k, &Default::default())
        .await
        .map_err(|e| kube::Error::Service(Box::new(e)))?;
    kube::Client::try_from(config)
}

/// The resident memory of process `pid` in MiB (0 when it cannot be read).
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The `p` quantile (0..=1) of `v` (sorted in place); 0 for no samples.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}
