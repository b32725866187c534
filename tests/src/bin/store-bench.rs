//! The store benchmark: what a write and a watch cost on each of weft server's stores — the
//! embedded SQLite database (the default), etcd (one real member on loopback, started here) and
//! memory (nothing durable, the floor) — with 10,000 and 100,000 objects already stored.
//!
//! For each store and size: `weft server` is started on an empty store, the objects are written
//! (ConfigMaps of ~1 KiB, 64 writers at once: the load rate), then a watcher of ConfigMaps is
//! opened and one client creates 1,000 more, one after another: the write latency is the time
//! to the create's answer, the watch latency the time from sending the create to the watcher
//! receiving the event. Then the server is killed with SIGKILL and started again on the same
//! store: the time until it serves (reloading every object and the watch history). Resident
//! memory and the store's size on disk are taken with everything loaded.
//! Flags: `--sizes 10000,100000`, `--stores sqlite,etcd,memory`, `--json PATH` (default
//! `target/bench/store.json`). Build first: `cargo build --release -p weft-control -p weft-tests`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{PostParams, WatchEvent, WatchParams},
};
use serde_json::json;
use weft_store::conformance::EtcdCluster;
use weft_tests::{BenchArgs, kube_client, percentile, rss_mib, weft_binary};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `weft server` with `store` flags; returns it once its kubeconfig is written.
fn server(dir: &Path, store: &[String]) -> (Server, Duration) {
    let kc = dir.join("kubeconfig");
    let _ = std::fs::remove_file(&kc);
    let t = Instant::now();
    let child = Command::new(weft_binary("weft"))
        .args(["server", "--listen", "127.0.0.1:0", "--controllers=false"])
        .args(store)
        .arg("--kubeconfig")
        .arg(&kc)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("weft server");
    while !kc.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "weft server did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    (Server(child), t.elapsed())
}

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"bench": "store"}},
        "data": {"payload": "x".repeat(1000)},
    }))
    .expect("config map")
}

fn du_mib(path: &Path) -> f64 {
    let out = Command::new("du").arg("-sk").arg(path).output();
    out.ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

struct Row {
    store: String,
    objects: usize,
    load_per_s: f64,
    write: (f64, f64),
    watch: (f64, f64),
    restart_s: f64,
    rss_mib: f64,
    disk_mib: f64,
}

async fn measure(store: &str, objects: usize, root: &Path) -> Row {
    let dir = root.join(format!("{store}-{objects}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    // Kept alive for the whole measurement (stopped when dropped).
    let mut etcd = None;
    let (flags, data): (Vec<String>, Option<PathBuf>) = match store {
        "sqlite" => (
            vec!["--data".into(), dir.join("store.db").display().to_string()],
            Some(dir.join("store.db")),
        ),
        "etcd" => {
            let cluster = EtcdCluster::start(&format!("bench-{objects}"), 1);
            let flags = vec!["--etcd-servers".into(), cluster.endpoints().join(",")];
            let data = cluster.data_dir();
            etcd = Some(cluster);
            (flags, Some(data))
        }
        _ => (Vec::new(), None),
    };
    let (srv, _) = server(&dir, &flags);
    let client = kube_client(&dir.join("kubeconfig")).await.expect("client");
    let api: Api<ConfigMap> = Api::namespaced(client, "default");
    let t = Instant::now();
    futures::stream::iter(0..objects)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &config_map(&format!("load-{i:06}")))
                    .await
                    .map(drop)
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<_>>()
        .await
        .expect("loading objects");
    let load_per_s = objects as f64 / t.elapsed().as_secs_f64();

    // One watcher; one writer creating objects one after another.
    let sent: Arc<Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let stream = api
        .watch(&WatchParams::default().labels("bench=probe"), "0")
        .await
        .expect("watch");
    let seen = sent.clone();
    let watcher = tokio::spawn(async move {
        let mut lat = Vec::new();
        let mut stream = stream.boxed();
        while let Some(Ok(e)) = stream.next().await {
            if let WatchEvent::Added(cm) = e {
                let name = cm.metadata.name.unwrap_or_default();
                if let Some(t) = seen.lock().expect("lock").get(&name) {
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                if name == "probe-0999" {
                    break;
                }
            }
        }
        lat
    });
    let mut write = Vec::new();
    for i in 0..1000 {
        let name = format!("probe-{i:04}");
        let mut cm = config_map(&name);
        cm.metadata.labels = Some([("bench".to_owned(), "probe".to_owned())].into());
        let t = Instant::now();
        sent.lock().expect("lock").insert(name, t);
        api.create(&PostParams::default(), &cm)
            .await
            .expect("probe write");
        write.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut watch = tokio::time::timeout(Duration::from_secs(60), watcher)
        .await
        .expect("watch events")
        .unwrap_or_default();
    let rss = rss_mib(srv.0.id());
    let disk = data.as_deref().map_or(0.0, du_mib);
    // kill -9 and start again on the same store.
    drop(srv);
    let (srv, restart) = server(&dir, &flags);
    drop(srv);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
    Row {
        store: store.to_owned(),
        objects,
        load_per_s,
        write: (percentile(&mut write, 0.5), percentile(&mut write, 0.99)),
        watch: (percentile(&mut watch, 0.5), percentile(&mut watch, 0.99)),
        restart_s: restart.as_secs_f64(),
        rss_mib: rss,
        disk_mib: disk,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let args = BenchArgs::from_env();
    let sizes: Vec<usize> = args
        .value("--sizes")
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000]);
    let stores: Vec<String> = args
        .value("--stores")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|| vec!["sqlite".into(), "etcd".into(), "memory".into()]);
    let json_path = PathBuf::from(
        args.value("--json")
            .unwrap_or_else(|| "target/bench/store.json".into()),
    );
    let root = std::env::temp_dir().join(format!("weft-store-bench-{}", std::process::id()));
    let mut rows = Vec::new();
    for &n in &sizes {
        for s in &stores {
            eprintln!("store {s}, {n} objects ...");
            rows.push(measure(s, n, &root).await);
        }
    }
    let _ = std::fs::remove_dir_all(&root);
    println!(
        "| store | objects | load (writes/s, 64 writers) | write p50 | write p99 | watch p50 | watch p99 | restart to serving | server RSS | on disk |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} s | {:.0} MiB | {:.0} MiB |",
            r.store,
            r.objects,
            r.load_per_s,
            r.write.0,
            r.write.1,
            r.watch.0,
            r.watch.1,
            r.restart_s,
            r.rss_mib,
            r.disk_mib
        );
    }
    let out: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({"store": r.store, "objects": r.objects, "load_per_second": r.load_per_s,
                   "write_ms": {"p50": r.write.0, "p99": r.write.1},
                   "watch_ms": {"p50": r.watch.0, "p99": r.watch.1},
                   "restart_seconds": r.restart_s, "rss_mib": r.rss_mib, "disk_mib": r.disk_mib})
        })
        .collect();
    if let Some(parent) = json_path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::write(
        &json_path,
        serde_json::to_vec_pretty(&out).unwrap_or_default(),
    );
}
