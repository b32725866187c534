//! containerd as weft runs it: a configuration of weft's own (root, state, socket and runc
//! state under one directory, the CRI plugin with the overlayfs snapshotter, the cgroupfs
//! driver, weft's pause image and CNI directories holding weft-cni), never the distribution's
//! service or `/run/containerd`'s socket, and the process started from it.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
};

/// Where one node's containerd keeps everything.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The directory everything lives under.
    pub dir: PathBuf,
    /// The pod sandbox image (`weft/pause:dev`).
    pub sandbox_image: String,
    /// Directory with the CNI plugins (weft-cni, loopback).
    pub cni_bin: PathBuf,
    /// Directory with the CNI network configuration.
    pub cni_conf: PathBuf,
}

impl Layout {
    /// The CRI socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// containerd's configuration (version 2, as containerd 1.6 reads it).
    pub fn config(&self) -> String {
        let d = self.dir.display();
        format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
"#,
            image = crate::image::normalize(&self.sandbox_image),
            bin = self.cni_bin.display(),
            conf = self.cni_conf.display(),
        )
    }

    /// Writes the configuration and starts containerd in the calling process's namespaces;
    /// its log goes to `containerd.log` beside the configuration.
    pub fn start(&self) -> std::io::Result<Child> {
        std::fs::create_dir_all(&self.dir)?;
        let config = self.dir.join("config.toml");
        std::fs::write(&config, self.config())?;
        let log = std::fs::File::create(self.dir.join("containerd.log"))?;
        Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
    }
}

/// Waits until a unix socket accepts connections.
pub async fn wait_for_socket(path: &Path, timeout: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}
