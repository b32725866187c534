//! The control-plane benchmark: how fast weft's scheduler and controllers place pods, and what
//! the API server's writes cost meanwhile.
//!
//! 1. N pending pods (1,000 and 10,000 by default) on 100 simulated nodes, on a server whose
//!    store is in memory: the pods are created
//!    while no scheduler runs, then `weft controllers` starts, and the time until every pod is
//!    bound is taken (its start-up list included).
//! 2. A Deployment scaled from 0 to 1,000 replicas with the controllers running (what
//!    `kubectl scale --replicas=1000` does): time until 1,000 pods are bound, ReplicaSet
//!    creation included; meanwhile another client creates ConfigMaps and the latency of each
//!    write is recorded (p50/p99). This runs twice: on a server whose store is in memory
//!    only, and on one keeping it in SQLite as `weft up` does (each write durable before it is
//!    answered).
//! 3. Resident memory of the API server and of the controllers afterwards.
//!
//! kube-scheduler cannot run here (no registry); its published scheduler_perf figures
//! (roughly 100-300 pods/s for this kind of workload) are printed as the reference.
//! Flags: `--pods 1000,10000`, `--nodes 100`, `--quick` (1,000 pods, 300 replicas),
//! `--json PATH` (default `target/bench/control.json`).
//! Build first: `cargo build --release -p weft-control -p weft-tests`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Node, Pod},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use serde_json::json;
use weft_tests::{BenchArgs, kube_client, percentile, rss_mib, weft_binary};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The API server's store in a run: kept in memory only, or in SQLite as `weft up` keeps it.
#[derive(Clone, Copy)]
enum Store {
    Memory,
    Sqlite,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Sqlite => "sqlite",
        }
    }
}

fn server(dir: &Path, store: Store) -> Proc {
    let kc = dir.join("kubeconfig");
    let _ = std::fs::remove_file(&kc);
    let mut cmd = Command::new(weft_binary("weft"));
    cmd.args([
        "server",
        "--listen",
        "127.0.0.1:0",
        "--controllers=false",
        "--kubeconfig",
    ])
    .arg(&kc);
    if let Store::Sqlite = store {
        let db = dir.join(format!("store-{}.db", std::process::id()));
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
        cmd.arg("--data").arg(db);
    }
    let child = cmd
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("weft server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !kc.exists() {
        assert!(Instant::now() < deadline, "weft server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc(child)
}

fn controllers(dir: &Path) -> Proc {
    Proc(
        Command::new(weft_binary("weft"))
            .args([
                "controllers",
                "--node-monitor-grace-period",
                "3600",
                "--kubeconfig",
            ])
            .arg(dir.join("kubeconfig"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("weft controllers"),
    )
}

async fn client(dir: &Path) -> Client {
    kube_client(&dir.join("kubeconfig")).await.expect("client")
}

async fn nodes(c: &Client, n: usize) {
    let api: Api<Node> = Api::all(c.clone());
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let node: Node = serde_json::from_value(json!({
                    "metadata": {"name": format!("sim-{i:03}"), "labels": {"kubernetes.io/hostname": format!("sim-{i:03}")}},
                    "status": {"allocatable": {"cpu": "32", "memory": "128Gi", "pods": "250"},
                               "capacity": {"cpu": "32", "memory": "128Gi", "pods": "250"},
                               "conditions": [{"type": "Ready", "status": "True"}]}}))
                .expect("node");
                api.create(&PostParams::default(), &node).await.map(|_| ())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .expect("creating nodes");
}

fn pod(i: usize, label: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": format!("{label}-{i:05}"), "labels": {"bench": label}},
        "spec": {"containers": [{"name": "c", "image": "weft/echo:dev",
                 "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}}))
    .expect("pod")
}

/// Waits until `n` pods labelled `bench=label` are bound, following them with a watch (as a
/// controller would) rather than listing them all again and again, which would load the
/// server being measured.
async fn wait_bound(c: &Client, label: &str, n: usize, limit: Duration) -> Duration {
    let t = Instant::now();
    let api: Api<Pod> = Api::namespaced(c.clone(), "default");
    let mut bound = std::collections::HashSet::new();
    let params = WatchParams::default()
        .labels(&format!("bench={label}"))
        .timeout(290);
    while bound.len() < n {
        let mut events = api
            .watch(&params, "0")
            .await
            .expect("watching pods")
            .boxed();
        loop {
            let left = limit.saturating_sub(t.elapsed());
            assert!(
                !left.is_zero(),
                "{label}: not all {n} pods bound within {limit:?}"
            );
            let Ok(Some(event)) = tokio::time::timeout(left, events.next()).await else {
                break;
            };
            if let Ok(WatchEvent::Added(p) | WatchEvent::Modified(p)) = event
                && p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
            {
                bound.insert(p.metadata.name.unwrap_or_default());
                if bound.len() >= n {
                    break;
                }
            }
        }
    }
    t.elapsed()
}

/// One scale-up's figures.
struct Scale {
    store: Store,
    seconds: f64,
    writes: usize,
    p50: f64,
    p99: f64,
    server_rss: f64,
    controllers_rss: f64,
}

/// `kubectl scale` of a Deployment from 0 to `replicas` on a server with `store`, while another
/// client creates ConfigMaps and the latency of each write is recorded.
async fn scale_up(dir: &Path, store: Store, node_count: usize, replicas: i32) -> Scale {
    let srv = server(dir, store);
    let c = client(dir).await;
    nodes(&c, node_count).await;
    let ctl = controllers(dir);
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "scale"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"bench": "scale"}},
                 "template": {"metadata": {"labels": {"bench": "scale"}},
                              "spec": {"containers": [{"name": "c", "image": "weft/echo:dev",
                                       "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}}}}))
    .expect("deployment");
    deployments
        .create(&PostParams::default(), &d)
        .await
        .expect("deployment");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writer_client = c.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = tokio::spawn(async move {
        let api: Api<ConfigMap> = Api::namespaced(writer_client, "default");
        let mut lat = Vec::new();
        let mut i = 0;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            let cm: ConfigMap = serde_json::from_value(
                json!({"metadata": {"name": format!("w-{i}")}, "data": {"k": "v"}}),
            )
            .expect("cm");
            let t = Instant::now();
            if api.create(&PostParams::default(), &cm).await.is_ok() {
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lat
    });
    let t = Instant::now();
    deployments
        .patch_scale(
            "scale",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .expect("scale");
    let _ = wait_bound(
        &c,
        "scale",
        usize::try_from(replicas).unwrap_or(0),
        Duration::from_secs(600),
    )
    .await;
    let scale_took = t.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut lat = writer.await.unwrap_or_default();
    let (p50, p99) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99));
    let row = Scale {
        store,
        seconds: scale_took.as_secs_f64(),
        writes: lat.len(),
        p50,
        p99,
        server_rss: rss_mib(srv.0.id()),
        controllers_rss: rss_mib(ctl.0.id()),
    };
    drop(ctl);
    drop(srv);
    row
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = BenchArgs::from_env();
    let quick = args.has("--quick");
    let sizes: Vec<usize> = args
        .value("--pods")
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| {
            if quick {
                vec![1000]
            } else {
                vec![1000, 10_000]
            }
        });
    let node_count: usize = args.parsed("--nodes", 100);
    let replicas: i32 = if quick { 300 } else { 1000 };
    let json_path = PathBuf::from(
        args.value("--json")
            .unwrap_or_else(|| "target/bench/control.json".into()),
    );
    let dir = std::env::temp_dir().join(format!("weft-control-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench dir");

    let mut rows = Vec::new();
    for &n in &sizes {
        let srv = server(&dir, Store::Memory);
        let c = client(&dir).await;
        nodes(&c, node_count).await;
        let api: Api<Pod> = Api::namespaced(c.clone(), "default");
        futures::stream::iter(0..n)
            .map(|i| {
                let api = api.clone();
                async move {
                    api.create(&PostParams::default(), &pod(i, "pending"))
                        .await
                        .map(|_| ())
                }
            })
            .buffer_unordered(32)
            .try_collect::<Vec<_>>()
            .await
            .expect("creating pods");
        let ctl = controllers(&dir);
        let took = wait_bound(&c, "pending", n, Duration::from_secs(600)).await;
        let rate = n as f64 / took.as_secs_f64();
        eprintln!(
            "{n} pending pods on {node_count} nodes: bound in {:.2} s ({rate:.0} pods/s)",
            took.as_secs_f64()
        );
        rows.push(json!({"pending": n, "nodes": node_count, "seconds": took.as_secs_f64(), "pods_per_second": rate,
                         "server_rss_mib": rss_mib(srv.0.id()), "controllers_rss_mib": rss_mib(ctl.0.id())}));
        drop(ctl);
        drop(srv);
    }

    // kubectl scale 0 -> replicas, with a writer measuring latency meanwhile, on each store.
    let mut scales = Vec::new();
    for store in [Store::Memory, Store::Sqlite] {
        let row = scale_up(&dir, store, node_count, replicas).await;
        eprintln!(
            "scale 0 -> {replicas} ({}): {:.2} s, writes p50 {:.2} ms p99 {:.2} ms",
            store.name(),
            row.seconds,
            row.p50,
            row.p99
        );
        scales.push(row);
    }
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "| weft scheduler, {node_count} nodes | pods | time to bind all | pods/s | kube-scheduler (published scheduler_perf) |"
    );
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| pending pods, scheduler started after them | {} | {:.2} s | **{:.0}** | 100-300 pods/s |",
            r["pending"],
            r["seconds"].as_f64().unwrap_or(0.0),
            r["pods_per_second"].as_f64().unwrap_or(0.0)
        );
    }
    for r in &scales {
        println!(
            "| Deployment scaled 0 -> {replicas}, {} store (ReplicaSet creates, scheduler binds) | {replicas} | {:.2} s | **{:.0}** | - |",
            r.store.name(),
            r.seconds,
            f64::from(replicas) / r.seconds
        );
    }
    println!();
    println!("| API writes during the scale-up (ConfigMap creates) | writes | p50 | p99 |");
    println!("|---|---|---|---|");
    for r in &scales {
        println!(
            "| weft server, {} store | {} | {:.2} ms | {:.2} ms |",
            r.store.name(),
            r.writes,
            r.p50,
            r.p99
        );
    }
    println!();
    println!("| resident memory after the scale-up | weft server | weft controllers |");
    println!("|---|---|---|");
    for r in &scales {
        println!(
            "| {} store, MiB | {:.0} | {:.0} |",
            r.store.name(),
            r.server_rss,
            r.controllers_rss
        );
    }
    let scale: Vec<_> = scales
        .iter()
        .map(|r| {
            json!({"store": r.store.name(), "replicas": replicas, "seconds": r.seconds,
                   "write_latency_ms": {"p50": r.p50, "p99": r.p99, "samples": r.writes},
                   "rss_mib": {"server": r.server_rss, "controllers": r.controllers_rss}})
        })
        .collect();
    let out = json!({"pending": rows, "scale": scale});
    if let Some(parent) = json_path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::write(
        &json_path,
        serde_json::to_vec_pretty(&out).unwrap_or_default(),
    );
}
