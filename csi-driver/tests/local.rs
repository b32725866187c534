//! The local backend end to end, through the real binary on its socket: real sparse images, loop
//! devices, filesystems and mounts, inside a mount namespace the test creates and removes.
//! Written from the CSI spec's lifecycle and error tables.

mod common;

use common::*;
use tonic::Code;
use weft_csi::csi;

#[test]
fn lifecycle_keeps_data_and_leaves_nothing_behind() {
    let mut d = Driver::start("csi-life", 2 << 30);
    let mut id = d.identity.clone();
    let info = d
        .block(id.get_plugin_info(csi::GetPluginInfoRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.weft.io");

    let vol = d.create("pvc-life", 64 * MIB, mount_cap("ext4"));
    assert_eq!(vol.capacity_bytes, 64 * MIB);
    assert_eq!(
        vol.accessible_topology[0].segments["topology.weft.io/node"],
        NODE
    );
    // Idempotent: the same request gives the same volume; a different size for the name is refused.
    let again = d.create("pvc-life", 64 * MIB, mount_cap("ext4"));
    assert_eq!(again.volume_id, vol.volume_id);
    let mut c = d.controller.clone();
    let (code_, msg) =
        code(d.block(c.create_volume(create_request("pvc-life", 128 * MIB, mount_cap("ext4")))));
    assert_eq!(code_, Code::AlreadyExists, "{msg}");

    let v = vol.volume_id.clone();
    let staging = d.stage(&v, mount_cap("ext4"));
    d.stage(&v, mount_cap("ext4")); // idempotent
    let target = d
        .publish(&v, &staging, "pod-a", mount_cap("ext4"), false)
        .unwrap();
    d.publish(&v, &staging, "pod-a", mount_cap("ext4"), false)
        .unwrap();
    let (_, msg) = code(d.publish(&v, &staging, "pod-a", mount_cap("ext4"), true));
    assert!(msg.contains("already published"), "{msg}");
    let (ok, out) = d.sh(&format!(
        "echo precious > {t}/data && sync && cat {t}/data",
        t = target.display()
    ));
    assert!(ok && out.contains("precious"), "{out}");

    // Deleting a volume in use is refused.
    let (code_, msg) = code(d.delete(&v));
    assert_eq!(code_, Code::FailedPrecondition, "{msg}");

    // A read-only publish of the same volume: reads work, writes fail.
    let ro = d
        .publish(&v, &staging, "pod-ro", mount_cap("ext4"), true)
        .unwrap();
    let (ok, out) = d.sh(&format!("cat {}/data", ro.display()));
    assert!(ok && out.contains("precious"), "{out}");
    let (ok, out) = d.sh(&format!("echo x > {}/other", ro.display()));
    assert!(!ok && out.contains("Read-only"), "{out}");

    for t in [&target, &ro] {
        d.unpublish(&v, t).unwrap();
        d.unpublish(&v, t).unwrap(); // idempotent
        assert!(!t.exists(), "target path removed");
    }
    d.unstage(&v, &staging).unwrap();
    d.unstage(&v, &staging).unwrap();
    d.assert_nothing_attached();

    // Publish again: the data is still there.
    let staging = d.stage(&v, mount_cap("ext4"));
    let target = d
        .publish(&v, &staging, "pod-b", mount_cap("ext4"), false)
        .unwrap();
    let (ok, out) = d.sh(&format!("cat {}/data", target.display()));
    assert!(ok && out.contains("precious"), "{out}");
    d.unpublish(&v, &target).unwrap();
    d.unstage(&v, &staging).unwrap();
    d.assert_nothing_attached();

    d.delete(&v).unwrap();
    d.delete(&v).unwrap(); // deleting what is gone succeeds
    let left: Vec<_> = std::fs::read_dir(d.state().join("local/volumes"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "volume files left: {left:?}");
    assert_eq!(d.available(), 2 << 30);
}

#[test]
fn size_is_enforced_and_reported() {
    let mut d = Driver::start("csi-size", 1 << 30);
    let before = d.available();
    let vol = d.create("pvc-small", 32 * MIB, mount_cap("ext4"));
    assert_eq!(
        d.available(),
        before - 32 * MIB,
        "GetCapacity shrinks by the volume"
    );
    let v = vol.volume_id;
    let staging = d.stage(&v, mount_cap(""));
    let target = d
        .publish(&v, &staging, "pod", mount_cap(""), false)
        .unwrap();
    // Writing 64 MiB into a 32 MiB volume fails with ENOSPC inside the volume.
    let (ok, out) = d.sh(&format!(
        "dd if=/dev/zero of={}/big bs=1M count=64 conv=fsync 2>&1",
        target.display()
    ));
    assert!(!ok && out.contains("No space left"), "{out}");

    let mut n = d.node.clone();
    let stats = d
        .block(n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: v.clone(),
            volume_path: target.to_string_lossy().into(),
            staging_target_path: String::new(),
        }))
        .unwrap()
        .into_inner();
    let bytes = &stats.usage[0];
    assert!(
        bytes.total > 20 * MIB && bytes.total <= 32 * MIB,
        "{stats:?}"
    );
    assert!(
        bytes.used > 20 * MIB,
        "the failed write filled the volume: {stats:?}"
    );
    assert!(!stats.volume_condition.unwrap().abnormal);

    // The pool cannot hand out more than it has.
    let mut c = d.controller.clone();
    let (code_, msg) =
        code(d.block(c.create_volume(create_request("pvc-huge", 2 << 30, mount_cap("ext4")))));
    assert_eq!(code_, Code::ResourceExhausted, "{msg}");

    d.unpublish(&v, &target).unwrap();
    d.unstage(&v, &staging).unwrap();
    d.delete(&v).unwrap();
    assert_eq!(d.available(), before);
    d.assert_nothing_attached();
}
