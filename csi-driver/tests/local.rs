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

#[test]
fn block_volume_reads_and_writes_within_its_size() {
    let mut d = Driver::start("csi-block", 1 << 30);
    let vol = d.create("pvc-block", 16 * MIB, block_cap());
    let v = vol.volume_id;
    assert!(!vol.volume_context.contains_key("fsType"));
    let staging = d.stage(&v, block_cap());
    d.stage(&v, block_cap());
    let dev = d
        .publish(&v, &staging, "pod-dev", block_cap(), false)
        .unwrap();
    d.publish(&v, &staging, "pod-dev", block_cap(), false)
        .unwrap();
    let (ok, out) = d.sh(&format!(
        "blockdev --getsize64 {dev} && printf weft-block | dd of={dev} bs=512 seek=100 conv=fsync \
         2>/dev/null && dd if={dev} bs=512 skip=100 count=1 2>/dev/null | head -c 10",
        dev = dev.display()
    ));
    assert!(ok, "{out}");
    assert!(out.starts_with(&(16 * MIB).to_string()), "{out}");
    assert!(out.contains("weft-block"), "{out}");
    let (ok, out) = d.sh(&format!(
        "dd if=/dev/zero of={} bs=1M seek=16 count=1 conv=fsync 2>&1",
        dev.display()
    ));
    assert!(!ok, "writing past the end must fail: {out}");
    // Mounting a block volume as a filesystem is refused.
    let (code_, msg) = code(d.publish(&v, &staging, "pod-fs", mount_cap(""), false));
    assert_eq!(code_, Code::InvalidArgument, "{msg}");
    d.unpublish(&v, &dev).unwrap();
    d.unstage(&v, &staging).unwrap();
    d.assert_nothing_attached();
    d.delete(&v).unwrap();
}

#[test]
fn expansion_online_xfs_and_offline_ext4() {
    let mut d = Driver::start("csi-grow", 4 << 30);
    let mut c = d.controller.clone();
    let mut n = d.node.clone();
    let size_of = |d: &Driver, path: &std::path::Path| -> i64 {
        let (ok, out) = d.sh(&format!(
            "df -B1 --output=size {} | tail -1",
            path.display()
        ));
        assert!(ok, "{out}");
        out.trim().parse().unwrap()
    };

    // xfs, grown while published.
    let v = d.create("pvc-xfs", 300 * MIB, mount_cap("xfs")).volume_id;
    let staging = d.stage(&v, mount_cap("xfs"));
    let target = d
        .publish(&v, &staging, "pod", mount_cap("xfs"), false)
        .unwrap();
    let before = size_of(&d, &target);
    let r = d
        .block(
            c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: v.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 500 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
        )
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 500 * MIB);
    assert!(r.node_expansion_required);
    let grown = d
        .block(n.node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: v.clone(),
            volume_path: target.to_string_lossy().into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 500 * MIB);
    let after = size_of(&d, &target);
    assert!(
        after > before + 150 * MIB,
        "xfs grew online: {before} -> {after}"
    );
    d.unpublish(&v, &target).unwrap();
    d.unstage(&v, &staging).unwrap();

    // ext4, grown while not staged: the controller resizes it offline.
    let e = d.create("pvc-ext4", 32 * MIB, mount_cap("ext4")).volume_id;
    let r = d
        .block(
            c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: e.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 96 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
        )
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 96 * MIB);
    assert!(!r.node_expansion_required, "resized offline");
    let staging = d.stage(&e, mount_cap("ext4"));
    let size = size_of(&d, &staging);
    assert!(size > 80 * MIB, "ext4 sees the new size: {size}");
    // Shrinking is not a thing: a smaller request returns the current size.
    let r = d
        .block(
            c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: e.clone(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 16 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }),
        )
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 96 * MIB);
    d.unstage(&e, &staging).unwrap();
    d.assert_nothing_attached();
    for id in [v, e] {
        d.delete(&id).unwrap();
    }
    assert_eq!(d.available(), 4 << 30);
}

#[test]
fn snapshots_and_clones_hold_their_point_in_time() {
    let mut d = Driver::start("csi-snap", 2 << 30);
    let mut c = d.controller.clone();
    let src = d.create("pvc-src", 64 * MIB, mount_cap("ext4")).volume_id;
    let staging = d.stage(&src, mount_cap("ext4"));
    let target = d
        .publish(&src, &staging, "pod", mount_cap("ext4"), false)
        .unwrap();
    let t = target.display().to_string();
    assert!(d.sh(&format!("echo v1 > {t}/f")).0);
    // Taken while the source is mounted and written to: the filesystem is frozen for the copy.
    let snap = d
        .block(c.create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: src.clone(),
            name: "snap-1".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, 64 * MIB);
    assert_eq!(snap.source_volume_id, src);
    let again = d
        .block(c.create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: src.clone(),
            name: "snap-1".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, snap.snapshot_id);
    assert!(d.sh(&format!("echo v2 > {t}/f && sync")).0);

    // A volume restored from the snapshot sees v1, larger than the source; a clone sees v2.
    let mut req = create_request("pvc-restore", 128 * MIB, mount_cap("ext4"));
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let restored = d
        .block(c.create_volume(req))
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.capacity_bytes, 128 * MIB);
    let mut req = create_request("pvc-clone", 64 * MIB, mount_cap("ext4"));
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: src.clone(),
            },
        )),
    });
    let clone = d
        .block(c.create_volume(req))
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    // Smaller than the source is out of range.
    let mut req = create_request("pvc-tiny", 0, mount_cap("ext4"));
    req.capacity_range = Some(csi::CapacityRange {
        required_bytes: 0,
        limit_bytes: 16 * MIB,
    });
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let (code_, msg) = code(d.block(c.create_volume(req)));
    assert_eq!(code_, Code::OutOfRange, "{msg}");

    for (vol, want) in [(&restored, "v1"), (&clone, "v2")] {
        let id = vol.volume_id.clone();
        let st = d.stage(&id, mount_cap("ext4"));
        let (ok, out) = d.sh(&format!(
            "cat {}/f; df -B1 --output=size {} | tail -1",
            st.display(),
            st.display()
        ));
        assert!(
            ok && out.starts_with(want),
            "{} should read {want}: {out}",
            vol.volume_id
        );
        let size: i64 = out.lines().last().unwrap().trim().parse().unwrap();
        assert!(
            size > vol.capacity_bytes - 16 * MIB,
            "filesystem fills the volume: {size}"
        );
        d.unstage(&id, &st).unwrap();
    }

    let list = d
        .block(c.list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: src.clone(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert_eq!(list.entries.len(), 1);
    let none = d
        .block(c.list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: "snap-00000000000000000000000000000000".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty());
    let (code_, msg) = code(d.block(c.create_snapshot(csi::CreateSnapshotRequest {
        source_volume_id: restored.volume_id.clone(),
        name: "snap-1".into(),
        ..Default::default()
    })));
    assert_eq!(code_, Code::AlreadyExists, "{msg}");
    let (code_, msg) = code(d.block(c.create_snapshot(csi::CreateSnapshotRequest {
        source_volume_id: "local-00000000000000000000000000000000".into(),
        name: "snap-2".into(),
        ..Default::default()
    })));
    assert_eq!(code_, Code::NotFound, "{msg}");

    // Snapshots outlive their source's data changes and deletion is independent.
    d.unpublish(&src, &target).unwrap();
    d.unstage(&src, &staging).unwrap();
    for id in [&src, &restored.volume_id, &clone.volume_id] {
        d.delete(id).unwrap();
    }
    for _ in 0..2 {
        d.block(c.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        }))
        .unwrap();
    }
    d.assert_nothing_attached();
    assert_eq!(d.available(), 2 << 30);
}
