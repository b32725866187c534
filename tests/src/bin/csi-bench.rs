//! The CSI benchmark: what it costs to get a local volume to a workload.
//!
//! 1. Create + stage + publish of a 1 GiB local volume for each filesystem (ext4, xfs, btrfs),
//!    through weft-csi's gRPC socket, interleaved round by round with the same work done by hand
//!    with the standard tools (`truncate`, `mkfs`, `losetup`, `mount`, `mount --bind`): the floor a
//!    script-based provisioner pays.
//! 2. N volumes (default 100, 128 MiB ext4) provisioned and published one after another, and all at
//!    once: if the concurrent run is not faster than the sequential one, something serialised.
//!
//! Runs as root in a private mount namespace; everything is removed at the end.
//! Flags: `--rounds N` (default 7), `--count N` (default 100), `--quick` (3 rounds, 20 volumes),
//! `--json PATH` (default `target/bench/csi.json`).
//! Build first: `cargo build --release -p weft-csi -p weft-tests`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bpfman_csi::v1 as csi;
use serde_json::json;
use weft_tests::csi::*;
use weft_tests::{BenchArgs, weft_binary};

const GIB: i64 = 1 << 30;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One create + stage + publish through the driver, and its teardown. Returns the three phases.
fn weft_once(d: &mut Driver, name: &str, fs: &str, bytes: i64) -> [Duration; 3] {
    let t0 = Instant::now();
    let vol = d.create(name, bytes, mount_cap(fs));
    let t1 = Instant::now();
    let staging = d.stage(&vol.volume_id, mount_cap(fs));
    let t2 = Instant::now();
    let target = d
        .publish(&vol.volume_id, &staging, name, mount_cap(fs), false)
        .unwrap();
    let t3 = Instant::now();
    d.unpublish(&vol.volume_id, &target).unwrap();
    d.unstage(&vol.volume_id, &staging).unwrap();
    d.delete(&vol.volume_id).unwrap();
    [t1 - t0, t2 - t1, t3 - t2]
}

/// The same by hand with the standard tools, in one shell.
fn shell_once(d: &Driver, name: &str, fs: &str) -> Duration {
    let dir = d.sandbox.dir().join("shell").join(name);
    let script = format!(
        "set -e; mkdir -p {dir}/stage {dir}/pod; truncate -s 1G {dir}/disk.img; \
         mkfs.{fs} -q {force} {dir}/disk.img >/dev/null; dev=$(losetup --find --show {dir}/disk.img); \
         mount $dev {dir}/stage; mount --bind {dir}/stage {dir}/pod",
        dir = dir.display(),
        force = if fs == "ext4" { "-F" } else { "-f" },
    );
    let t = Instant::now();
    let (ok, out) = d.sh(&script);
    let took = t.elapsed();
    assert!(ok, "shell baseline failed: {out}");
    let (ok, out) = d.sh(&format!(
        "set -e; dev=$(findmnt -n -o SOURCE {dir}/stage); umount {dir}/pod; umount {dir}/stage; \
         losetup -d $dev 2>/dev/null || true; rm -rf {dir}",
        dir = dir.display()
    ));
    assert!(ok, "shell teardown failed: {out}");
    took
}

fn provision_many(d: &mut Driver, count: usize, concurrent: bool, tag: &str) -> Duration {
    let start = Instant::now();
    let names: Vec<String> = (0..count).map(|i| format!("{tag}-{i}")).collect();
    // (volume, staging path, target path) of each volume, for the teardown.
    let made: Vec<(String, PathBuf, PathBuf)> = if concurrent {
        let (c, n, base) = (d.controller.clone(), d.node.clone(), d.path(""));
        d.block(async move {
            let mut set = tokio::task::JoinSet::new();
            for name in names {
                let (mut c, mut n, base) = (c.clone(), n.clone(), base.clone());
                set.spawn(async move {
                    let id = c
                        .create_volume(create_request(&name, 128 * MIB, mount_cap("ext4")))
                        .await
                        .unwrap()
                        .into_inner()
                        .volume
                        .unwrap()
                        .volume_id;
                    let staging = base.join(format!("staging-{name}"));
                    let target = base.join(&name);
                    n.node_stage_volume(csi::NodeStageVolumeRequest {
                        volume_id: id.clone(),
                        staging_target_path: staging.to_string_lossy().into(),
                        volume_capability: Some(mount_cap("ext4")),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                    n.node_publish_volume(csi::NodePublishVolumeRequest {
                        volume_id: id.clone(),
                        staging_target_path: staging.to_string_lossy().into(),
                        target_path: target.to_string_lossy().into(),
                        volume_capability: Some(mount_cap("ext4")),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                    (id, staging, target)
                });
            }
            set.join_all().await
        })
    } else {
        names
            .iter()
            .map(|name| {
                let id = d.create(name, 128 * MIB, mount_cap("ext4")).volume_id;
                let staging = d.stage(&id, mount_cap("ext4"));
                let target = d
                    .publish(&id, &staging, name, mount_cap("ext4"), false)
                    .unwrap();
                (id, staging, target)
            })
            .collect()
    };
    let took = start.elapsed();
    for (id, staging, target) in made {
        d.unpublish(&id, &target).unwrap();
        d.unstage(&id, &staging).unwrap();
        d.delete(&id).unwrap();
    }
    took
}

fn main() {
    let args = BenchArgs::from_env();
    let quick = args.has("--quick");
    let rounds: usize = args.parsed("--rounds", if quick { 3 } else { 7 });
    let count: usize = args.parsed("--count", if quick { 20 } else { 100 });
    let json_path = args
        .value("--json")
        .unwrap_or_else(|| "target/bench/csi.json".into());
    let binary = weft_binary("weft-csi");
    let mut d = Driver::start_on_disk(&binary, "csi-bench", 64 << 30);

    println!(
        "weft-csi: create + stage + publish of a 1 GiB local volume ({rounds} rounds, interleaved)\n"
    );
    println!(
        "{:<7} {:>11} {:>10} {:>12} {:>11} {:>15} {:>7}",
        "fs", "create ms", "stage ms", "publish ms", "weft total", "shell baseline", "ratio"
    );
    let mut rows = Vec::new();
    for fs in ["ext4", "xfs", "btrfs"] {
        let mut phases = [Vec::new(), Vec::new(), Vec::new()];
        let mut totals = Vec::new();
        let mut shell = Vec::new();
        for r in 0..rounds {
            let p = weft_once(&mut d, &format!("lat-{fs}-{r}"), fs, GIB);
            for (i, x) in p.iter().enumerate() {
                phases[i].push(ms(*x));
            }
            totals.push(ms(p.iter().sum()));
            shell.push(ms(shell_once(&d, &format!("sh-{fs}-{r}"), fs)));
        }
        let [c, s, p] = phases.map(weft_tests::load::median);
        let (t, b) = (
            weft_tests::load::median(totals),
            weft_tests::load::median(shell),
        );
        println!(
            "{fs:<7} {c:>11.1} {s:>10.1} {p:>12.1} {t:>11.1} {b:>15.1} {:>7.2}",
            t / b
        );
        rows.push(
            json!({"fs": fs, "create_ms": c, "stage_ms": s, "publish_ms": p,
            "weft_total_ms": t, "shell_baseline_ms": b, "ratio": t / b}),
        );
    }

    println!("\n{count} volumes (128 MiB ext4), each created, staged and published\n");
    let seq = provision_many(&mut d, count, false, "seq");
    let conc = provision_many(&mut d, count, true, "con");
    println!("{:<12} {:>10} {:>14}", "mode", "total s", "per volume ms");
    println!(
        "{:<12} {:>10.2} {:>14.1}",
        "sequential",
        seq.as_secs_f64(),
        ms(seq) / count as f64
    );
    println!(
        "{:<12} {:>10.2} {:>14.1}",
        "concurrent",
        conc.as_secs_f64(),
        ms(conc) / count as f64
    );
    let speedup = seq.as_secs_f64() / conc.as_secs_f64();
    println!(
        "\nconcurrent is {speedup:.2}x sequential on {} CPUs ({})",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        if speedup > 1.2 {
            "requests ran in parallel"
        } else {
            "something serialised"
        }
    );
    d.assert_nothing_attached();
    let report = json!({
        "latency_1gib": rows,
        "many": {"count": count, "sequential_s": seq.as_secs_f64(),
                 "concurrent_s": conc.as_secs_f64(), "speedup": speedup},
    });
    if let Some(dir) = std::path::Path::new(&json_path).parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("\nJSON: {json_path}");
}
