//! A running `weft-csi` inside a private mount namespace, with CSI clients on its socket: the
//! harness of the CSI driver's integration tests and of its benchmark.

// The helpers hand back the gRPC status itself so callers can read its code and message.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use bpfman_csi::v1 as csi;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::transport::{Channel, Endpoint, Uri};
use weft_testbed::MountSandbox;

/// Identity client.
pub type Identity = csi::identity_client::IdentityClient<Channel>;
/// Controller client.
pub type Controller = csi::controller_client::ControllerClient<Channel>;
/// Node client.
pub type Node = csi::node_client::NodeClient<Channel>;

/// The node ID the driver runs with.
pub const NODE: &str = "node-a";
/// A mebibyte, as CSI sizes are typed.
pub const MIB: i64 = 1 << 20;

/// The driver under test.
#[derive(Debug)]
pub struct Driver {
    /// Its mount namespace and scratch directory.
    pub sandbox: MountSandbox,
    /// The runtime the clients run on.
    pub rt: tokio::runtime::Runtime,
    binary: PathBuf,
    child: Option<Child>,
    capacity: u64,
    /// The state directory as the driver (inside the namespace) names it.
    state: PathBuf,
    extra: Vec<String>,
    /// Identity client.
    pub identity: Identity,
    /// Controller client.
    pub controller: Controller,
    /// Node client.
    pub node: Node,
}

impl Driver {
    /// Starts `binary` (weft-csi) in a new sandbox with a local pool of `capacity` bytes, its state
    /// on a tmpfs of the sandbox's own with a GiB to spare: GetCapacity, which the driver caps at
    /// the host filesystem's free space, is then exactly the pool's arithmetic, however full the
    /// machine's disk is.
    pub fn start(binary: &Path, label: &str, capacity: u64) -> Driver {
        let mut sandbox = MountSandbox::new(label).expect("mount sandbox (run the tests as root)");
        let state = sandbox
            .tmpfs_pool(capacity + (1 << 30))
            .expect("tmpfs pool")
            .join("state");
        Driver::launch_in(binary, sandbox, state, capacity, vec![])
    }

    /// Starts the driver with its state on the machine's disk (as the benchmark measures it).
    pub fn start_on_disk(binary: &Path, label: &str, capacity: u64) -> Driver {
        let sandbox = MountSandbox::new(label).expect("mount sandbox (run the tests as root)");
        Driver::start_in(binary, sandbox, capacity, vec![])
    }

    /// Starts the driver in an existing sandbox, its state on disk, with extra command-line
    /// arguments.
    pub fn start_in(
        binary: &Path,
        sandbox: MountSandbox,
        capacity: u64,
        extra: Vec<String>,
    ) -> Driver {
        let state = sandbox.dir().join("state");
        Driver::launch_in(binary, sandbox, state, capacity, extra)
    }

    fn launch_in(
        binary: &Path,
        sandbox: MountSandbox,
        state: PathBuf,
        capacity: u64,
        extra: Vec<String>,
    ) -> Driver {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (child, channel) = launch(binary, &sandbox, &state, &rt, capacity, &extra);
        Driver {
            sandbox,
            rt,
            binary: binary.to_path_buf(),
            child: Some(child),
            capacity,
            state,
            extra,
            identity: Identity::new(channel.clone()),
            controller: Controller::new(channel.clone()),
            node: Node::new(channel),
        }
    }

    /// The driver's socket.
    pub fn socket(&self) -> PathBuf {
        self.sandbox.dir().join("csi.sock")
    }

    /// The driver's state directory, as the test (outside the namespace) reaches it.
    pub fn state(&self) -> PathBuf {
        self.sandbox.outside(&self.state)
    }

    /// A path for staging or publishing.
    pub fn path(&self, name: &str) -> PathBuf {
        self.sandbox.dir().join("mnt").join(name)
    }

    /// Kills the driver (as a crash would: SIGKILL, socket left behind) and starts it again.
    pub fn crash_and_restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
        assert!(self.socket().exists(), "a killed driver leaves its socket");
        let (child, channel) = launch(
            &self.binary,
            &self.sandbox,
            &self.state,
            &self.rt,
            self.capacity,
            &self.extra,
        );
        self.child = Some(child);
        self.identity = Identity::new(channel.clone());
        self.controller = Controller::new(channel.clone());
        self.node = Node::new(channel);
    }

    /// Runs a shell script inside the driver's mount namespace; returns (success, stdout+stderr).
    pub fn sh(&self, script: &str) -> (bool, String) {
        let out = self.sandbox.sh(script).unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Runs a client call to completion.
    pub fn block<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Asserts that no mount and no loop device of this driver remains.
    pub fn assert_nothing_attached(&self) {
        assert_eq!(self.sandbox.mounts(), Vec::<PathBuf>::new(), "mounts left");
        assert_eq!(
            self.sandbox.loop_devices(),
            Vec::<PathBuf>::new(),
            "loop devices left"
        );
    }

    /// CreateVolume, which must succeed.
    pub fn create(&mut self, name: &str, bytes: i64, cap: csi::VolumeCapability) -> csi::Volume {
        let req = create_request(name, bytes, cap);
        let mut c = self.controller.clone();
        self.block(c.create_volume(req))
            .unwrap_or_else(|e| panic!("create {name}: {e}"))
            .into_inner()
            .volume
            .unwrap()
    }

    /// NodeStageVolume at a fresh staging path, which must succeed.
    pub fn stage(&mut self, id: &str, cap: csi::VolumeCapability) -> PathBuf {
        let staging = self.path(&format!("staging-{id}"));
        std::fs::create_dir_all(&staging).unwrap();
        let mut n = self.node.clone();
        self.block(n.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.to_string_lossy().into(),
            volume_capability: Some(cap),
            ..Default::default()
        }))
        .unwrap_or_else(|e| panic!("stage {id}: {e}"));
        staging
    }

    /// NodePublishVolume at `path(target)`.
    pub fn publish(
        &mut self,
        id: &str,
        staging: &Path,
        target: &str,
        cap: csi::VolumeCapability,
        readonly: bool,
    ) -> Result<PathBuf, tonic::Status> {
        let target = self.path(target);
        let mut n = self.node.clone();
        self.block(n.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.to_string_lossy().into(),
            target_path: target.to_string_lossy().into(),
            volume_capability: Some(cap),
            readonly,
            ..Default::default()
        }))?;
        Ok(target)
    }

    /// NodeUnpublishVolume.
    pub fn unpublish(&mut self, id: &str, target: &Path) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        self.block(n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.to_string_lossy().into(),
        }))
        .map(|_| ())
    }

    /// NodeUnstageVolume.
    pub fn unstage(&mut self, id: &str, staging: &Path) -> Result<(), tonic::Status> {
        let mut n = self.node.clone();
        self.block(n.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.to_string_lossy().into(),
        }))
        .map(|_| ())
    }

    /// DeleteVolume.
    pub fn delete(&mut self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.controller.clone();
        self.block(c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        }))
        .map(|_| ())
    }

    /// NodeGetVolumeStats, which must succeed.
    pub fn stats(&mut self, id: &str, path: &Path) -> csi::NodeGetVolumeStatsResponse {
        let mut n = self.node.clone();
        self.block(n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.to_string_lossy().into(),
            staging_target_path: String::new(),
        }))
        .unwrap_or_else(|e| panic!("stats {id}: {e}"))
        .into_inner()
    }

    /// ControllerExpandVolume to `bytes`, which must succeed.
    pub fn expand(&mut self, id: &str, bytes: i64) -> csi::ControllerExpandVolumeResponse {
        let mut c = self.controller.clone();
        self.block(
            c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: id.into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: bytes,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
        )
        .unwrap_or_else(|e| panic!("expand {id}: {e}"))
        .into_inner()
    }

    /// GetCapacity with no filter.
    pub fn available(&mut self) -> i64 {
        let mut c = self.controller.clone();
        self.block(c.get_capacity(csi::GetCapacityRequest::default()))
            .unwrap()
            .into_inner()
            .available_capacity
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn launch(
    binary: &Path,
    sandbox: &MountSandbox,
    state: &Path,
    rt: &tokio::runtime::Runtime,
    capacity: u64,
    extra: &[String],
) -> (Child, Channel) {
    let socket = sandbox.dir().join("csi.sock");
    let child = sandbox
        .command(binary)
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(["--node-id", NODE, "--capacity", &capacity.to_string()])
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .expect("start weft-csi");
    let deadline = Instant::now() + Duration::from_secs(20);
    let channel = loop {
        // The socket may still be the stale one of a killed driver; retry until the new one answers.
        let path = socket.clone();
        let attempt = rt.block_on(async move {
            let ch = Endpoint::try_from("http://[::]:50051")
                .unwrap()
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    tokio::net::UnixStream::connect(path.clone())
                }))
                .await?;
            let mut id = Identity::new(ch.clone());
            id.probe(csi::ProbeRequest {})
                .await
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(ch)
        });
        match attempt {
            Ok(ch) => break ch,
            Err(e) if Instant::now() > deadline => panic!("weft-csi did not come up: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    (child, channel)
}

/// A single-node-writer mount capability with `fs` (empty: the driver's default).
pub fn mount_cap(fs: &str) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}

/// A single-node-writer block capability.
pub fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// A CreateVolume request for `bytes` with one capability.
pub fn create_request(
    name: &str,
    bytes: i64,
    cap: csi::VolumeCapability,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap],
        ..Default::default()
    }
}

/// The gRPC code of a failed call, with its message for assertion output.
pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (tonic::Code, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => (s.code(), s.message().to_string()),
    }
}
