//! The local backend end to end, through the real binary on its socket: real sparse images, loop
//! devices, filesystems and mounts, inside a mount namespace the test creates and removes.
//! Written from the CSI spec's lifecycle and error tables.

use weft_tests::csi::*;

fn driver(label: &str, capacity: u64) -> Driver {
    Driver::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_weft-csi")),
        label,
        capacity,
    )
}
use tonic::Code;
use weft_csi::csi;

#[test]
fn lifecycle_keeps_data_and_leaves_nothing_behind() {
    let mut d = driver("csi-life", 2 << 30);
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
    let mut d = driver("csi-size", 1 << 30);
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

    let stats = d.stats(&v, &target);
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
    let mut d = driver("csi-block", 1 << 30);
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
    let mut d = driver("csi-grow", 4 << 30);
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
    let r = d.expand(&v, 500 * MIB);
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
    let r = d.expand(&e, 96 * MIB);
    assert_eq!(r.capacity_bytes, 96 * MIB);
    assert!(!r.node_expansion_required, "resized offline");
    let staging = d.stage(&e, mount_cap("ext4"));
    let size = size_of(&d, &staging);
    assert!(size > 80 * MIB, "ext4 sees the new size: {size}");
    // Shrinking is not a thing: a smaller request returns the current size.
    let r = d.expand(&e, 16 * MIB);
    assert_eq!(r.capacity_bytes, 96 * MIB);
    d.unstage(&e, &staging).unwrap();

    // btrfs (which reports an anonymous device in mountinfo), grown while published.
    let b = d
        .create("pvc-btrfs", 128 * MIB, mount_cap("btrfs"))
        .volume_id;
    let staging = d.stage(&b, mount_cap("btrfs"));
    d.stage(&b, mount_cap("btrfs"));
    let target = d
        .publish(&b, &staging, "pod-b", mount_cap("btrfs"), false)
        .unwrap();
    d.publish(&b, &staging, "pod-b", mount_cap("btrfs"), false)
        .unwrap();
    let before = size_of(&d, &target);
    d.expand(&b, 256 * MIB);
    d.block(n.node_expand_volume(csi::NodeExpandVolumeRequest {
        volume_id: b.clone(),
        volume_path: target.to_string_lossy().into(),
        ..Default::default()
    }))
    .unwrap();
    let after = size_of(&d, &target);
    assert!(
        after > before + 100 * MIB,
        "btrfs grew online: {before} -> {after}"
    );
    let (code_, msg) = code(d.delete(&b));
    assert_eq!(code_, Code::FailedPrecondition, "{msg}");
    d.unpublish(&b, &target).unwrap();
    d.unstage(&b, &staging).unwrap();
    d.assert_nothing_attached();
    for id in [v, e, b] {
        d.delete(&id).unwrap();
    }
    assert_eq!(d.available(), 4 << 30);
}

#[test]
fn snapshots_and_clones_hold_their_point_in_time() {
    let mut d = driver("csi-snap", 2 << 30);
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

#[test]
fn listing_pages_and_state_survive_a_crash() {
    let mut d = driver("csi-restart", 2 << 30);
    let mut ids: Vec<String> = (0..5)
        .map(|i| {
            d.create(&format!("pvc-{i}"), 8 * MIB, mount_cap("ext4"))
                .volume_id
        })
        .collect();
    ids.sort();
    let list_all = |d: &mut Driver| {
        let mut c = d.controller.clone();
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let r = d
                .block(c.list_volumes(csi::ListVolumesRequest {
                    max_entries: 2,
                    starting_token: token.clone(),
                }))
                .unwrap()
                .into_inner();
            assert!(r.entries.len() <= 2);
            pages += 1;
            for e in r.entries {
                assert!(!e.status.unwrap().volume_condition.unwrap().abnormal);
                seen.push(e.volume.unwrap().volume_id);
            }
            if r.next_token.is_empty() {
                break;
            }
            token = r.next_token;
        }
        (seen, pages)
    };
    let (seen, pages) = list_all(&mut d);
    assert_eq!(seen, ids);
    assert_eq!(pages, 3);
    let mut c = d.controller.clone();
    let (code_, msg) = code(d.block(c.list_volumes(csi::ListVolumesRequest {
        max_entries: 2,
        starting_token: "no-such-token".into(),
    })));
    assert_eq!(code_, Code::Aborted, "{msg}");

    // One volume staged when the driver dies; an interrupted create left work in tmp/.
    let staging = d.stage(&ids[0], mount_cap("ext4"));
    let leftover = d.state().join("local/tmp/local-deadbeef.1.2");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("disk.img"), b"partial").unwrap();
    let available = d.available();
    d.crash_and_restart();

    assert!(!leftover.exists(), "interrupted work is swept at start");
    let (seen, _) = list_all(&mut d);
    assert_eq!(seen, ids, "volumes survive the restart");
    assert_eq!(
        d.available(),
        available,
        "capacity accounting survives the restart"
    );
    // The staged volume is still staged and is recognised as such.
    d.stage(&ids[0], mount_cap("ext4"));
    d.unstage(&ids[0], &staging).unwrap();
    for id in &ids {
        d.delete(id).unwrap();
    }
    d.assert_nothing_attached();
}

#[test]
fn bad_requests_get_the_codes_the_spec_names() {
    let mut d = driver("csi-bad", 1 << 30);
    let mut c = d.controller.clone();
    let mut n = d.node.clone();
    let vol = d.create("pvc-ok", 8 * MIB, mount_cap("ext4")).volume_id;
    let unknown = "local-00000000000000000000000000000000".to_string();
    let hostile = "../../../../etc".to_string();
    let staging = d.path("stage");
    let target = d.path("target");
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();

    let mut no_name = create_request("", 8 * MIB, mount_cap("ext4"));
    no_name.name.clear();
    let mut no_caps = create_request("x", 8 * MIB, mount_cap("ext4"));
    no_caps.volume_capabilities.clear();
    let mut multi = create_request("x", 8 * MIB, mount_cap("ext4"));
    multi.volume_capabilities[0].access_mode = Some(csi::volume_capability::AccessMode {
        mode: csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
    });
    let mut bad_fs = create_request("x", 8 * MIB, mount_cap("ntfs"));
    bad_fs.name = "x2".into();
    let mut bad_param = create_request("x", 8 * MIB, mount_cap("ext4"));
    bad_param.parameters.insert("fstype".into(), "ext4".into());
    let mut inverted = create_request("x", 8 * MIB, mount_cap("ext4"));
    inverted.capacity_range = Some(csi::CapacityRange {
        required_bytes: 8 * MIB,
        limit_bytes: 4 * MIB,
    });
    let mut xfs_tiny = create_request("x", 8 * MIB, mount_cap("xfs"));
    xfs_tiny.capacity_range = Some(csi::CapacityRange {
        required_bytes: 0,
        limit_bytes: 64 * MIB,
    });
    let mut elsewhere = create_request("x", 8 * MIB, mount_cap("ext4"));
    elsewhere.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: [("topology.weft.io/node".to_string(), "node-b".to_string())].into(),
        }],
        preferred: vec![],
    });
    let mut missing_source = create_request("x", 8 * MIB, mount_cap("ext4"));
    missing_source.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: "snap-00000000000000000000000000000000".into(),
            },
        )),
    });
    for (req, want, needle) in [
        (no_name, Code::InvalidArgument, "name"),
        (no_caps, Code::InvalidArgument, "volume_capabilities"),
        (multi, Code::InvalidArgument, "access_mode"),
        (bad_fs, Code::InvalidArgument, "fs_type"),
        (bad_param, Code::InvalidArgument, "fstype"),
        (inverted, Code::InvalidArgument, "limit_bytes"),
        (xfs_tiny, Code::OutOfRange, "limit_bytes"),
        (elsewhere, Code::ResourceExhausted, "requisite"),
        (missing_source, Code::NotFound, "snapshot"),
    ] {
        let (got, msg) = code(d.block(c.create_volume(req)));
        assert_eq!(got, want, "{msg}");
        assert!(msg.contains(needle), "{msg:?} should name {needle}");
    }

    // Required fields, one RPC at a time.
    let checks: Vec<(Result<(), tonic::Status>, &str)> = vec![
        (
            d.block(c.delete_volume(csi::DeleteVolumeRequest::default()))
                .map(drop),
            "volume_id",
        ),
        (
            d.block(
                c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: vol.clone(),
                    ..Default::default()
                }),
            )
            .map(drop),
            "capacity_range",
        ),
        (
            d.block(c.create_snapshot(csi::CreateSnapshotRequest {
                name: "s".into(),
                ..Default::default()
            }))
            .map(drop),
            "source_volume_id",
        ),
        (
            d.block(
                c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: vol.clone(),
                    ..Default::default()
                }),
            )
            .map(drop),
            "volume_capabilities",
        ),
        (
            d.block(n.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: vol.clone(),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            }))
            .map(drop),
            "staging_target_path",
        ),
        (
            d.block(n.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: vol.clone(),
                staging_target_path: s(&staging),
                ..Default::default()
            }))
            .map(drop),
            "volume_capability",
        ),
        (
            d.block(n.node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: vol.clone(),
                staging_target_path: s(&staging),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            }))
            .map(drop),
            "target_path",
        ),
        (
            d.block(n.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: vol.clone(),
                ..Default::default()
            }))
            .map(drop),
            "target_path",
        ),
        (
            d.block(n.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: vol.clone(),
                ..Default::default()
            }))
            .map(drop),
            "volume_path",
        ),
        (
            d.block(n.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: vol.clone(),
                ..Default::default()
            }))
            .map(drop),
            "volume_path",
        ),
    ];
    for (r, field) in checks {
        let (got, msg) = code(r);
        assert_eq!(got, Code::InvalidArgument, "{msg}");
        assert!(msg.contains(field), "{msg:?} should name {field}");
    }

    // Unknown and hostile IDs: NOT_FOUND where the spec says so, success for deletes.
    for id in [&unknown, &hostile] {
        let (got, msg) = code(
            d.block(n.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: s(&staging),
                volume_capability: Some(mount_cap("ext4")),
                ..Default::default()
            }))
            .map(drop),
        );
        assert_eq!(got, Code::NotFound, "{msg}");
        let (got, msg) = code(
            d.block(
                c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: 16 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                }),
            )
            .map(drop),
        );
        assert_eq!(got, Code::NotFound, "{msg}");
        let (got, msg) = code(
            d.block(
                c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: id.clone(),
                    volume_capabilities: vec![mount_cap("ext4")],
                    ..Default::default()
                }),
            )
            .map(drop),
        );
        assert_eq!(got, Code::NotFound, "{msg}");
        d.delete(id).unwrap();
        d.block(c.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.clone(),
            ..Default::default()
        }))
        .unwrap();
    }
    assert!(std::path::Path::new("/etc/passwd").exists());

    // Publishing before staging is a precondition failure; a wrong filesystem is refused.
    let (got, msg) = code(d.publish(&vol, &staging, "target", mount_cap("ext4"), false));
    assert_eq!(got, Code::FailedPrecondition, "{msg}");
    let (got, msg) = code(
        d.block(n.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: vol.clone(),
            staging_target_path: s(&staging),
            volume_capability: Some(mount_cap("xfs")),
            ..Default::default()
        }))
        .map(drop),
    );
    assert_eq!(got, Code::InvalidArgument, "{msg}");
    assert!(!target.exists());

    // ValidateVolumeCapabilities confirms what fits and explains what does not.
    let ok = d
        .block(
            c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: vol.clone(),
                volume_capabilities: vec![mount_cap("ext4")],
                ..Default::default()
            }),
        )
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let no = d
        .block(
            c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: vol.clone(),
                volume_capabilities: vec![mount_cap("xfs")],
                ..Default::default()
            }),
        )
        .unwrap()
        .into_inner();
    assert!(
        no.confirmed.is_none() && no.message.contains("ext4"),
        "{no:?}"
    );

    // A second driver on the same socket is refused; the first keeps serving.
    let out = d
        .sandbox
        .command(env!("CARGO_BIN_EXE_weft-csi"))
        .arg("--endpoint")
        .arg(format!("unix://{}", d.socket().display()))
        .args(["--node-id", NODE, "--state-dir"])
        .arg(d.sandbox.dir().join("state2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another process is serving"));
    d.delete(&vol).unwrap();
    d.assert_nothing_attached();
}

#[test]
fn many_volumes_are_provisioned_concurrently() {
    let d = driver("csi-many", 8 << 30);
    let c = d.controller.clone();
    let started = std::time::Instant::now();
    let results = d.block(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..24 {
            let mut c = c.clone();
            set.spawn(async move {
                c.create_volume(create_request(
                    &format!("pvc-{i}"),
                    64 * MIB,
                    mount_cap("ext4"),
                ))
                .await
            });
        }
        set.join_all().await
    });
    let elapsed = started.elapsed();
    for r in &results {
        assert!(r.is_ok(), "{r:?}");
    }
    // The same name twice at once: one wins, the other is ABORTED or returns the same volume.
    let (a, b) = d.block(async {
        let mut c1 = c.clone();
        let mut c2 = c.clone();
        tokio::join!(
            c1.create_volume(create_request("pvc-race", 64 * MIB, mount_cap("xfs"))),
            c2.create_volume(create_request("pvc-race", 64 * MIB, mount_cap("xfs")))
        )
    });
    let a_ok = a
        .as_ref()
        .map(|r| r.get_ref().volume.as_ref().unwrap().volume_id.clone());
    let b_ok = b
        .as_ref()
        .map(|r| r.get_ref().volume.as_ref().unwrap().volume_id.clone());
    match (&a_ok, &b_ok) {
        (Ok(x), Ok(y)) => assert_eq!(x, y),
        (Ok(_), Err(e)) | (Err(e), Ok(_)) => assert_eq!(e.code(), Code::Aborted, "{e}"),
        (Err(x), Err(y)) => panic!("both failed: {x} / {y}"),
    }
    eprintln!("24 concurrent creates took {elapsed:?}");
}
