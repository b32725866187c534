//! The nfs backend against a real NFS server: nfs-ganesha (Debian), started by the test on
//! 127.0.0.1 and exporting a directory of the test's sandbox. The controller works over the NFS
//! protocol; the node's mount goes through the driver's local-export substitute because this
//! kernel has no NFS client, and the data written through it is read back over NFS.

use std::collections::HashMap;
use std::net::TcpListener;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tonic::Code;
use weft_csi::csi;
use weft_csi::csi::volume_capability::access_mode::Mode;
use weft_testbed::MountSandbox;
use weft_tests::csi::*;

struct Ganesha {
    child: Child,
    port: u16,
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_ganesha(sandbox: &MountSandbox) -> Ganesha {
    let dir = sandbox.dir();
    let export = dir.join("export");
    std::fs::create_dir_all(&export).unwrap();
    let port = free_port();
    let conf = dir.join("ganesha.conf");
    std::fs::write(
        &conf,
        format!(
            "NFS_CORE_PARAM {{ Protocols = 4; NFS_Port = {port}; Bind_addr = 127.0.0.1; \
             Enable_NLM = false; Enable_RQUOTA = false; }}\n\
             NFSV4 {{ Graceless = true; }}\n\
             NFS_KRB5 {{ Active_krb5 = false; }}\n\
             EXPORT {{ Export_Id = 1; Path = {}; Pseudo = /export; Access_Type = RW; \
             Squash = No_Root_Squash; SecType = sys; Protocols = 4; Transports = TCP; \
             FSAL {{ Name = VFS; }} }}\n",
            export.display()
        ),
    )
    .unwrap();
    let child = sandbox
        .command("ganesha.nfsd")
        .arg("-F")
        .arg("-L")
        .arg(dir.join("ganesha.log"))
        .arg("-f")
        .arg(&conf)
        .arg("-p")
        .arg(dir.join("ganesha.pid"))
        .stdin(Stdio::null())
        .spawn()
        .expect("start ganesha.nfsd (Debian nfs-ganesha, nfs-ganesha-vfs)");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "ganesha did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ganesha { child, port }
}

fn nfs_cap() -> csi::VolumeCapability {
    let mut cap = mount_cap("");
    cap.access_mode = Some(csi::volume_capability::AccessMode {
        mode: Mode::MultiNodeMultiWriter as i32,
    });
    cap
}

fn nfs_request(name: &str, port: u16, extra: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    let mut req = create_request(name, 1 << 30, nfs_cap());
    req.parameters = HashMap::from([
        ("backend".to_string(), "nfs".to_string()),
        ("server".to_string(), "127.0.0.1".to_string()),
        ("share".to_string(), "/export".to_string()),
        ("port".to_string(), port.to_string()),
    ]);
    for (k, v) in extra {
        req.parameters.insert(k.to_string(), v.to_string());
    }
    req
}

/// Reads a file over NFS, as any other client of the server would.
fn read_over_nfs(d: &Driver, port: u16, path: &str) -> Vec<u8> {
    let path = path.to_string();
    d.block(async move {
        let m = nfs_rs::parse_url_and_mount(&format!(
            "nfs://127.0.0.1/export?version=4.1&nfsport={port}&noresvport=true"
        ))
        .await
        .unwrap();
        let f = m.open_path(&path, nfs_rs::OPEN_READ).await.unwrap();
        let data = m.read(f.fh.clone(), 0, 4096).await.unwrap();
        m.close(f.fh).await.unwrap();
        m.umount().await.unwrap();
        data.to_vec()
    })
}

#[test]
fn nfs_volumes_against_a_real_server() {
    let sandbox = MountSandbox::new("csi-nfs").expect("mount sandbox (run as root)");
    let ganesha = start_ganesha(&sandbox);
    let export = sandbox.dir().join("export");
    let extra = vec![
        "--nfs-timeout".to_string(),
        "2".to_string(),
        "--nfs-local-export".to_string(),
        format!("127.0.0.1:/export={}", export.display()),
    ];
    let mut d = Driver::start_in(
        std::path::Path::new(env!("CARGO_BIN_EXE_weft-csi")),
        sandbox,
        1 << 30,
        extra,
    );
    let mut c = d.controller.clone();
    let port = ganesha.port;
    let meta = [
        ("subDir", "${pvc.metadata.namespace}/${pvc.metadata.name}"),
        ("csi.storage.k8s.io/pvc/name", "data"),
        ("csi.storage.k8s.io/pvc/namespace", "team-a"),
    ];

    // CreateVolume makes the directory on the server, over NFS.
    let vol = d
        .block(c.create_volume(nfs_request("pvc-nfs", port, &meta)))
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(vol.volume_id.starts_with("nfs-"));
    assert!(
        vol.accessible_topology.is_empty(),
        "reachable from every node"
    );
    assert_eq!(vol.volume_context["subDir"], "team-a/data");
    assert!(export.join("team-a/data").is_dir());
    let again = d
        .block(c.create_volume(nfs_request("pvc-nfs", port, &meta)))
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, vol.volume_id);
    let (got, msg) =
        code(d.block(c.create_volume(nfs_request("pvc-nfs", port, &[("subDir", "elsewhere")]))));
    assert_eq!(got, Code::AlreadyExists, "{msg}");

    // The node stages and publishes it; what a pod writes is on the server.
    let v = vol.volume_id.clone();
    let staging = d.path("staging-nfs");
    let mut n = d.node.clone();
    let stage = csi::NodeStageVolumeRequest {
        volume_id: v.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(nfs_cap()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    };
    d.block(n.node_stage_volume(stage.clone())).unwrap();
    d.block(n.node_stage_volume(stage)).unwrap();
    let target = d.path("pod-nfs");
    let publish = csi::NodePublishVolumeRequest {
        volume_id: v.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(nfs_cap()),
        volume_context: vol.volume_context.clone(),
        ..Default::default()
    };
    d.block(n.node_publish_volume(publish.clone())).unwrap();
    d.block(n.node_publish_volume(publish)).unwrap();
    let (ok, out) = d.sh(&format!("echo over-nfs > {}/hello", target.display()));
    assert!(ok, "{out}");
    assert_eq!(read_over_nfs(&d, port, "team-a/data/hello"), b"over-nfs\n");
    let stats = d.stats(&v, &target);
    assert!(!stats.volume_condition.unwrap().abnormal);
    d.unpublish(&v, &target).unwrap();
    d.unstage(&v, &staging).unwrap();
    d.assert_nothing_attached();

    // Delete removes the directory on the server, with what was in it.
    d.delete(&v).unwrap();
    d.delete(&v).unwrap();
    assert!(!export.join("team-a/data").exists());

    // Archive renames; retain keeps.
    let arch = d
        .block(c.create_volume(nfs_request("pvc-arch", port, &[("onDelete", "archive")])))
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    std::fs::write(export.join("pvc-arch/keep"), b"k").unwrap();
    d.delete(&arch.volume_id).unwrap();
    assert_eq!(
        std::fs::read(export.join("archived-pvc-arch/keep")).unwrap(),
        b"k"
    );
    let kept = d
        .block(c.create_volume(nfs_request("pvc-keep", port, &[("onDelete", "retain")])))
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    d.delete(&kept.volume_id).unwrap();
    assert!(export.join("pvc-keep").is_dir());

    // Paths cannot leave the share, from parameters or from a volume context.
    let (got, msg) =
        code(d.block(c.create_volume(nfs_request("pvc-escape", port, &[("subDir", "../../etc")]))));
    assert_eq!(got, Code::InvalidArgument, "{msg}");
    let mut ctx = vol.volume_context.clone();
    ctx.insert("subDir".into(), "team-a/../..".into());
    let (got, msg) = code(d.block(n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: v.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(nfs_cap()),
        volume_context: ctx,
        ..Default::default()
    })));
    assert_eq!(got, Code::InvalidArgument, "{msg}");
    // Block access and snapshots are not for nfs volumes.
    let mut block = nfs_request("pvc-block", port, &[]);
    block.volume_capabilities = vec![block_cap()];
    let (got, msg) = code(d.block(c.create_volume(block)));
    assert_eq!(got, Code::InvalidArgument, "{msg}");

    // A server that accepts connections but never answers: the call fails within the timeout.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let started = Instant::now();
    let (got, msg) = code(d.block(c.create_volume(nfs_request("pvc-dead", silent_port, &[]))));
    assert_eq!(got, Code::Unavailable, "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop(silent);
    d.assert_nothing_attached();
}
